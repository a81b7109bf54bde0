"""The shipped default fine-tune: present, small, documented, loadable, the default."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from histosam.training.models import registry  # noqa: E402

CARD = registry.SHIPPED_DIR / "MODEL_CARD.md"


def test_default_model_is_a_shipped_fine_tune_with_its_weights():
    assert registry.DEFAULT_MODEL in registry.SHIPPED
    assert registry.DEFAULT_MODEL in registry.shipped_models()
    path = registry.shipped_models()[registry.DEFAULT_MODEL]
    assert path.stat().st_size <= 20 * 1024 * 1024
    source = registry.resolve_source("default")
    assert source["model"] == "lite_medsam" and source["decoder_weights"] == str(path)
    # --model lite_medsam stays the unmodified zero-shot model.
    assert registry.resolve_source("lite_medsam")["decoder_weights"] is None
    # The mask calibration belongs to the shipped file: other decoder weights get none.
    assert source["mask_dilation"] == 1 and registry.resolve_source("lite_medsam")["mask_dilation"] == 0
    assert registry.resolve_source("default", decoder_weights=str(path))["mask_dilation"] == 0
    # So does edge snapping (histosam.backend.postprocess.edge_snap): measured for this file, on where it is served.
    assert source["edge_snap"] is True and registry.resolve_source("lite_medsam")["edge_snap"] is False
    assert registry.resolve_source("default", decoder_weights=str(path))["edge_snap"] is False
    from histosam.backend.bundles.catalog import bundle_key

    assert bundle_key(source) != bundle_key({**source, "edge_snap": False})  # a new export, not a stale one


def test_model_card_names_the_weights_sha256():
    text = CARD.read_text()
    for name, path in registry.shipped_models().items():
        assert path.name in text, name
        assert registry.file_sha256(path) in text, f"MODEL_CARD.md does not give the sha256 of {path.name}"
    assert re.search(r"histosam train --config", text)


def test_shipped_weights_rebuild_their_decoder_variant():
    from histosam.training.models.decoder_weights import read_metadata

    for path in registry.shipped_models().values():
        meta = read_metadata(path)
        assert meta["base_model"] == "lite_medsam"
        assert "train_config" in meta and "metrics" in meta


def test_evaluate_loads_the_default_and_shipped_names_on_the_torch_side():
    from histosam.training.torch_predictor import TorchPredictor

    for name in ("default", registry.DEFAULT_MODEL):
        pred = TorchPredictor.from_spec(name)
        assert pred.name == registry.DEFAULT_MODEL
        assert pred.model.click_disk_radius > 0  # the shipped weights' settings, not the base model
        assert pred.transform.mask_dilation == 1  # and its measured mask calibration
        assert pred.edge_snap  # and edge snapping, applied by the evaluator as by the server
    zero_shot = TorchPredictor.from_spec("lite_medsam")
    assert zero_shot.transform.mask_dilation == 0 and not zero_shot.edge_snap


def test_recorded_sha256s_match_the_files_and_a_changed_file_is_refused(tmp_path):
    """The cache key trusts the recorded sha256s (a serving install has no files to hash), so
    they must be the files' own, and an export from a changed file is refused."""
    from histosam.backend.bundles import catalog
    from histosam.backend.core.errors import CheckpointError

    for name, path in registry.shipped_models().items():
        assert registry.file_sha256(path) == catalog.SHIPPED_SHA256[name]
    assert registry.file_sha256(catalog.lite_medsam_weights()) == catalog.PACKAGED_WEIGHTS_SHA256["lite_medsam"]
    source = registry.resolve_source("default")
    catalog.check_recorded_weights(source)  # the installed files pass
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(b"not the shipped weights")
    with pytest.raises(CheckpointError, match="sha256"):
        catalog.check_recorded_weights({**source, "decoder_weights": str(changed)})
