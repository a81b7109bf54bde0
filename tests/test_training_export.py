"""Checkpoints reload and export; the refine variants export to ONNX and agree with PyTorch."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training_helpers import tiny_config, write_blob_dataset  # noqa: E402


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (90, 120, 3)).astype(np.uint8)
    img[20:60, 30:80] = (200, 60, 150)
    return img


def _agree(model, bundle, n_clicks: int = 3) -> float:
    from histosam.backend.bundles.onnx_predictor import OnnxPredictor
    from histosam.training.torch_predictor import TorchPredictor

    tp, op = TorchPredictor(model), OnnxPredictor.from_bundle(bundle)
    img = _image()
    tp.set_image(img)
    op.set_image(img)
    pts = np.array([[50, 40], [100, 10], [40, 30]], np.float32)
    lab = np.array([1, 0, 1], np.float32)
    prev_t = prev_o = None
    worst = 0.0
    for k in range(1, n_clicks + 1):
        a = tp.predict(points=pts[:k], labels=lab[:k], mask_logits=prev_t)
        b = op.predict(points=pts[:k], labels=lab[:k], mask_logits=prev_o)
        worst = max(worst, float(np.abs(a.low_res_logits - b.low_res_logits).max()))
        prev_t, prev_o = a.low_res_logits, b.low_res_logits
    return worst


@pytest.mark.slow
def test_checkpoint_reloads_resumes_and_exports(tmp_path, tiny_model):
    from histosam.export.exporter import export_bundle
    from histosam.training.models.loading import load_model_from_source
    from histosam.training.trainer import train

    data = write_blob_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(data, decoder={"variant": "refine_hq", "stem_256": 4, "stem_128": 8, "width": 8},
                      train_prompt_encoder=True, max_steps_per_epoch=2, epochs=1, holdout=1)
    out = tmp_path / "run"
    result = train(cfg, out, progress=False, model=copy.deepcopy(tiny_model), cache_dir=tmp_path / "cache")
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.csv").is_file()
    assert "internal_noc85" in result["history"][0]
    # --resume continues after the finished epoch (nothing left to do for epochs=1 -> 2 runs one more).
    import dataclasses

    more = train(dataclasses.replace(cfg, epochs=2), out, resume=True, progress=False,
                 model=copy.deepcopy(tiny_model), cache_dir=tmp_path / "cache")
    assert [r["epoch"] for r in more["history"]] == [1, 2]

    source = {"model": "tiny_sam", "checkpoint": None, "decoder_weights": str(out / "best.safetensors")}
    model = load_model_from_source(source)
    assert model.mask_decoder.config["variant"] == "refine_hq"
    assert model.spec.extra_features == ("hq_stem_256", "hq_stem_128")
    bundle = tmp_path / "bundle"
    manifest = export_bundle(source, bundle, model=model, check=False, progress=False)
    assert (bundle / "decoder_stock.onnx").is_file()
    assert set(manifest["graphs"]["decoder"]["inputs"]) >= {"hq_stem_256", "hq_stem_128"}
    assert "hq_stem_256" not in manifest["graphs"]["decoder_stock"]["inputs"]
    assert _agree(model, bundle) < 1e-3
    assert json.loads((bundle / "manifest.json").read_text())["extra_features"] == ["hq_stem_256", "hq_stem_128"]


@pytest.mark.parametrize("cfg", [
    {"variant": "refine", "width": 32, "heads": 2},
    {"variant": "refine_lite", "width": 16, "heads": 2, "attn_pool": 2},
    {"variant": "refine_hq", "stem_256": 4, "stem_128": 8, "width": 8},
])
def test_refine_variants_onnx_parity_on_tiny_sizes(tmp_path, tiny_model, cfg):
    from histosam.export.exporter import export_bundle
    from histosam.training.models.decoders import build_decoder

    model = build_decoder(copy.deepcopy(tiny_model), cfg).eval()
    if cfg["variant"] == "refine_hq":  # a non-zero head so the high-resolution path is exercised
        torch.nn.init.normal_(model.mask_decoder.head.weight, std=0.5)
    bundle = tmp_path / "b"
    export_bundle({"model": "tiny_sam", "checkpoint": None}, bundle, model=model, check=False, progress=False)
    assert _agree(model, bundle) < 1e-3


def test_unknown_variant_is_a_clear_error(tiny_model):
    from histosam.backend.core.errors import CheckpointError
    from histosam.training.models.decoders import build_decoder

    with pytest.raises(CheckpointError, match="unknown decoder variant"):
        build_decoder(tiny_model, {"variant": "nope"})


def test_refine_hq_starts_as_the_stock_decoder(tiny_model):
    """Zero-initialised head: before training refine_hq predicts exactly what SAM predicts."""
    from histosam.training.models.decoders import build_decoder

    hq = build_decoder(copy.deepcopy(tiny_model), {"variant": "refine_hq", "width": 8}).eval()
    x = torch.rand(1, 3, 256, 256)
    args = (torch.tensor([[[40.0, 50.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]]),
            torch.zeros(1, 1, 256, 256), torch.tensor([0.0]))
    with torch.no_grad():
        a, _ = tiny_model.eval().decode(tiny_model.encode(x), *args)
        b, _ = hq.decode(hq.encode(x), *args)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", ["add", "override"])
def test_click_disk_mode_reaches_the_dense_prompt_survives_saving_and_exports(tmp_path, tiny_model, mode):
    from histosam.export.exporter import export_bundle
    from histosam.training.models.decoder_weights import apply_decoder_weights, save_decoder_weights

    model = copy.deepcopy(tiny_model)
    model.click_disk_radius, model.click_disk_mode = 6.0, mode
    seen = {}
    embed = model.embed_mask

    def spy(mask_input, has_mask_input):
        seen["mask_input"] = mask_input.detach().clone()
        return embed(mask_input, has_mask_input)

    model.embed_mask = spy
    size = model.spec.input_size
    feats = model.encode(torch.zeros(1, 3, size, size))
    prev = torch.full((1, 1, 256, 256), -20.0)  # a confident "background" everywhere
    coords = torch.tensor([[[size / 2, size / 2]]])
    model.decode(feats, coords, torch.tensor([[1.0]]), prev, torch.ones(1))
    at_click = float(seen["mask_input"][0, 0, 128, 128])
    assert at_click == (8.0 if mode == "override" else -12.0)
    assert float(seen["mask_input"][0, 0, 10, 10]) == -20.0  # away from the click: the previous mask
    del model.embed_mask

    path = save_decoder_weights(model, tmp_path / "w.safetensors")
    reloaded = apply_decoder_weights(copy.deepcopy(tiny_model), path)
    assert (reloaded.click_disk_mode, reloaded.click_disk_radius) == (mode, 6.0)
    bundle = tmp_path / "bundle"
    export_bundle({"model": "tiny_sam", "checkpoint": None, "decoder_weights": str(path)}, bundle,
                  model=reloaded, check=False, progress=False)
    assert _agree(reloaded, bundle) < 1e-3


def test_export_names_a_fine_tune_after_its_folder_unless_told(tmp_path, tiny_model, capsys):
    """A fine-tune must not be served under its base model's name (QuPath's `model =` picks by name)."""
    from histosam.backend.cli import main
    from histosam.backend.serving.model_store import ModelStore
    from histosam.training.models.decoder_weights import save_decoder_weights

    weights = save_decoder_weights(tiny_model, tmp_path / "best.safetensors")
    base = ["export", "--model", "tiny_sam", "--no-check"]
    assert main([*base, "--out", str(tmp_path / "zero_shot")]) == 0
    assert main([*base, "--decoder-weights", str(weights), "--out", str(tmp_path / "my_tissue")]) == 0
    assert main([*base, "--decoder-weights", str(weights), "--name", "prostate v2",
                 "--out", str(tmp_path / "b3")]) == 0
    names = {json.loads((tmp_path / b / "manifest.json").read_text())["model"] for b in ("zero_shot", "my_tissue", "b3")}
    assert names == {"tiny_sam", "my_tissue", "prostate v2"}
    store = ModelStore.load([tmp_path / "zero_shot", tmp_path / "my_tissue"], threads=1)
    assert sorted(store.names) == ["my_tissue", "tiny_sam"]  # both served side by side
    capsys.readouterr()
    (tmp_path / "a_file").write_text("x")
    for extra, message in ((["--out", str(tmp_path / "a_file")], "not a folder"),
                           (["--out", str(tmp_path / "a_file" / "sub")], "cannot be created"),
                           (["--name", "a/b", "--out", str(tmp_path / "b4")], "--name"),
                           (["--out", str(tmp_path / "default")], "'default' is how clients ask")):
        assert main([*base, "--decoder-weights", str(weights), *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
