"""ONNX export: official decoder interface, parity with PyTorch, atomic bundles, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
import onnxruntime as ort  # noqa: E402

from histosam.backend.bundles.bundle import load_bundle  # noqa: E402
from histosam.backend.bundles.onnx_predictor import OnnxPredictor  # noqa: E402
from histosam.backend.cli import main as cli_main  # noqa: E402
from histosam.backend.core.errors import BundleError  # noqa: E402
from histosam.export.parity import PARITY_SIZES, check_parity, synthetic_image  # noqa: E402
from histosam.training.torch_predictor import TorchPredictor  # noqa: E402

OFFICIAL_INPUTS = {
    "image_embeddings": [1, 256, 64, 64],
    "point_coords": [1, None, 2],
    "point_labels": [1, None],
    "mask_input": [1, 1, 256, 256],
    "has_mask_input": [1],
    "orig_im_size": [2],
}


def _dims(shape):
    return [d if isinstance(d, int) else None for d in shape]


def test_decoder_keeps_the_official_sam_interface(tiny_bundle):
    sess = ort.InferenceSession(str(tiny_bundle / "decoder.onnx"))
    inputs = {i.name: _dims(i.shape) for i in sess.get_inputs()}
    assert inputs == OFFICIAL_INPUTS
    assert [o.name for o in sess.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    enc = ort.InferenceSession(str(tiny_bundle / "encoder.onnx"))
    assert [o.name for o in enc.get_outputs()] == ["image_embeddings"]
    assert _dims(enc.get_outputs()[0].shape) == [1, 256, 64, 64]


def test_parity_over_aspect_ratios_and_graph_masks_follow_orig_size(tiny_model, tiny_bundle):
    report = check_parity(tiny_model, tiny_bundle, sizes=PARITY_SIZES)
    assert report["passed"], {k: v for k, v in report.items() if k != "cases"}
    assert report["max_low_res_logit_diff"] < 1e-3
    assert report["min_graph_masks_iou"] >= 0.999  # un-padding crop is not baked in
    assert {tuple(c["size"]) for c in report["cases"]} == set(PARITY_SIZES)


def test_single_click_uses_token_zero_like_torch(tiny_model, tiny_bundle):
    """One click: SAM 1.0's select_masks would pick a multimask output; we never do."""
    image = synthetic_image(300, 500, seed=7)
    tp, op = TorchPredictor(tiny_model), OnnxPredictor.from_bundle(tiny_bundle)
    tp.set_image(image)
    op.set_image(image)
    a, b = tp.predict([[250, 150]], [1]), op.predict([[250, 150]], [1])
    assert np.abs(a.low_res_logits - b.low_res_logits).max() < 1e-3
    assert abs(a.iou - b.iou) < 1e-4


def test_manifest_records_what_the_server_needs(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format"] == "histosam-bundle/1"
    assert manifest["input_size"] == 256 and manifest["opset"] == 17
    assert set(manifest["files"]) >= {"encoder.onnx", "decoder.onnx"}
    assert list(manifest["graphs"]["decoder"]["inputs"])[:6] == list(OFFICIAL_INPUTS)
    assert manifest["source"]["model"] == "tiny_sam"
    bundle = load_bundle(tiny_bundle)
    assert bundle.transform.input_size == 256


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "decoder.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="does not match the manifest sha256"):
        load_bundle(copy)
    (copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_failed_export_leaves_nothing_behind(tiny_model, tmp_path):
    from histosam.export.exporter import export_bundle
    from histosam.training.models.registry import resolve_source

    out = tmp_path / "bundle"
    with pytest.raises(Exception):  # noqa: B017 - torch's own error for an opset it cannot target
        export_bundle(resolve_source("tiny_sam"), out, opset=3, model=tiny_model, check=False)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_and_check(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli_main(["export", "--model", "tiny_sam", "--out", str(out)]) == 0
    assert "parity" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    assert cli_main(["export", "--check", str(out)]) == 0
    assert '"passed": true' in capsys.readouterr().out


def test_int8_export_reports_its_loss(tmp_path):
    out = tmp_path / "q"
    assert cli_main(["export", "--model", "tiny_sam", "--out", str(out), "--quantize", "int8"]) == 0
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["quantized"] is True
    assert "max_low_res_logit_diff" in parity and "min_mask_iou" in parity


@pytest.mark.slow
def test_real_lite_medsam_export_parity(lite_bundle):
    manifest = json.loads((lite_bundle / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] is True
    assert parity["max_low_res_logit_diff"] <= 1e-3 and parity["min_mask_iou"] >= 0.999
    assert manifest["source"]["weights_sha256"]
    assert manifest["normalisation"]["std"] == [255.0, 255.0, 255.0]
