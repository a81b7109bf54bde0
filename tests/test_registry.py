"""Model registry: every entry builds, checkpoints load safely, bad files fail with one line."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")

from histosam.backend.cli import main as cli_main  # noqa: E402
from histosam.backend.core.errors import CheckpointError, NotFoundError  # noqa: E402
from histosam.training.models.registry import REGISTRY, build_model, resolve_source  # noqa: E402


def test_registry_entries_know_their_geometry():
    assert REGISTRY["lite_medsam"].spec.input_size == 256
    assert REGISTRY["lite_medsam"].spec.std == (255.0, 255.0, 255.0)
    for name in ("vit_b", "vit_l", "vit_h", "mobile_sam"):
        spec = REGISTRY[name].spec
        assert spec.input_size == 1024 and spec.embedding_shape == (256, 64, 64)
        assert REGISTRY[name].needs_checkpoint


def test_lite_medsam_loads_packaged_weights_and_embeds():
    model = build_model("lite_medsam")
    with torch.no_grad():
        emb = model.encode(torch.zeros(1, 3, 256, 256))["image_embeddings"]
    assert emb.shape == (1, 256, 64, 64)
    # trained weights, not a random init: the packaged file's no-mask embedding is non-trivial
    assert float(model.prompt_encoder.no_mask_embed.weight.abs().sum()) > 0


def test_mobile_sam_roundtrips_a_user_checkpoint(tmp_path):
    """A MobileSAM-shaped checkpoint (random weights standing in for mobile_sam.pt)."""
    from histosam.training.models.sam_model import HistoSam

    spec = REGISTRY["mobile_sam"].spec
    torch.manual_seed(3)
    ref = HistoSam(spec, *REGISTRY["mobile_sam"].build()).eval()
    assert ref.state_dict()["image_encoder.patch_embed.seq.0.c.weight"].shape == (32, 3, 3, 3)
    path = tmp_path / "mobile_sam.pt"
    torch.save(ref.state_dict(), path)
    model = build_model("mobile_sam", path)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        emb = model.encode(torch.zeros(1, 3, 1024, 1024))["image_embeddings"]
    assert emb.shape == (1, 256, 64, 64)


@pytest.mark.slow
def test_vit_b_checkpoint_with_wrapper_key_loads(tmp_path):
    """Official SAM layout (image_encoder./prompt_encoder./mask_decoder.), wrapped under 'model'."""
    torch.manual_seed(1)
    ref = build_model.__globals__["REGISTRY"]["vit_b"].build()
    from histosam.training.models.sam_model import HistoSam

    sam = HistoSam(REGISTRY["vit_b"].spec, *ref)
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"model": sam.state_dict()}, path)
    model = build_model("vit_b", path)
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(model.state_dict()[key], sam.state_dict()[key])


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("vit_b", tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        build_model("vit_h")


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "tiny.pth"
    torch.save(build_model("tiny_sam").state_dict(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not be read"):
        build_model("tiny_sam", bad)


def test_mismatched_checkpoint_names_the_file_and_shapes(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_model("tiny_sam").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build_model("lite_medsam", path)
    message = str(info.value)
    assert str(path) in message and "does not match" in message and "\n" not in message


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": Evil()}, handle)
    with pytest.raises(CheckpointError, match="could not be read"):
        build_model("tiny_sam", path)


def test_unknown_model():
    with pytest.raises(NotFoundError, match="unknown model"):
        resolve_source("vit_z")


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "empty.pth"
    bad.write_bytes(b"")
    code = cli_main(["export", "--model", "vit_b", "--checkpoint", str(bad), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "empty.pth" in err
    assert not (tmp_path / "b").exists()
