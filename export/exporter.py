"""Export a model to an ONNX bundle: encoder.onnx + decoder.onnx + manifest.json.

The bundle is written into a temporary folder beside the target and renamed into place, so
a crash never leaves a half bundle where the server looks. Parity against PyTorch is
measured before the rename; an fp32 export that misses the tolerance is refused.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from histosam.backend import __version__
from histosam.backend.bundles.bundle import MANIFEST, write_manifest
from histosam.backend.bundles.catalog import (
    BUNDLE_FORMAT,
    check_recorded_weights,
    decoder_weights_sha256,
)
from histosam.backend.core.atomic import atomic_write, staged_dir
from histosam.backend.core.errors import HistosamError, ParityError
from histosam.export.onnx_graphs import DECODER_OUTPUTS, DecoderGraph, EncoderGraph
from histosam.training.models.loading import load_model_from_source
from histosam.training.models.registry import source_sha256
from histosam.training.models.sam_model import HistoSam

DEFAULT_OPSET = 17


def export_graphs(model: HistoSam, out: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write encoder.onnx and decoder.onnx (and decoder_stock.onnx if the decoder has extra
    inputs and can also run without them). Returns the graphs' manifest entries."""
    model = model.eval()
    spec = model.spec
    s = spec.input_size
    entries: dict[str, Any] = {}
    enc = EncoderGraph(model)
    image = torch.zeros(1, 3, s, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc, (image,), str(out / "encoder.onnx"), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=enc.output_names, do_constant_folding=True,
        )
    with torch.no_grad():
        feats = model.encode(image)
    entries["encoder"] = {
        "file": "encoder.onnx",
        "inputs": {"image": {"shape": [1, 3, s, s], "dtype": "float32",
                             "doc": "RGB resized (longest side = input_size), normalised, zero-padded bottom/right, NCHW"}},
        "outputs": {k: {"shape": list(feats[k].shape), "dtype": "float32"} for k in enc.output_names},
    }

    def decoder(extra: tuple[str, ...], filename: str) -> dict[str, Any]:
        graph = DecoderGraph(model, extra)
        n = 3
        dummy = (
            feats["image_embeddings"],
            torch.randint(0, s, (1, n, 2)).float(),
            torch.tensor([[1.0, 0.0, -1.0]]),
            torch.zeros(1, 1, 256, 256),
            torch.tensor([1.0]),
            torch.tensor([s * 0.8, float(s)]),
            *(feats[k] for k in extra),
        )
        dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                   "masks": {2: "height", 3: "width"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, dummy, str(out / filename), dynamo=False, opset_version=opset,
                input_names=graph.input_names, output_names=DECODER_OUTPUTS,
                dynamic_axes=dynamic, do_constant_folding=True,
            )
        return {
            "file": filename,
            "inputs": {
                "image_embeddings": {"shape": [1, *spec.embedding_shape]},
                "point_coords": {"shape": [1, "N", 2], "doc": "x,y in the model's input frame (pixels of the resized image)"},
                "point_labels": {"shape": [1, "N"], "doc": "1 positive, 0 negative, -1 padding, 2/3 box corners"},
                "mask_input": {"shape": [1, 1, 256, 256], "doc": "previous low_res_masks (logits)"},
                "has_mask_input": {"shape": [1], "doc": "1 if mask_input is used"},
                "orig_im_size": {"shape": [2], "doc": "H, W of the original image (float32)"},
                **{k: {"shape": list(feats[k].shape), "doc": "extra encoder feature"} for k in extra},
            },
            "outputs": {
                "masks": {"shape": [1, 1, "H", "W"], "doc": "logits at the original size"},
                "iou_predictions": {"shape": [1, 1]},
                "low_res_masks": {"shape": [1, 1, 256, 256]},
            },
            "mask_selection": "single mask output (token 0)",
        }

    extras = tuple(spec.extra_features)
    entries["decoder"] = decoder(extras, "decoder.onnx")
    if extras and getattr(model.mask_decoder, "supports_stock_interface", False):
        model.mask_decoder.stock_mode = True
        try:
            entries["decoder_stock"] = decoder((), "decoder_stock.onnx")
        finally:
            model.mask_decoder.stock_mode = False
    return entries


def quantize_bundle(out: Path, mode: str) -> None:
    """int8: dynamic quantisation of weights (MatMul/Gemm); fp16: float16 weights and math."""
    for name in ("encoder.onnx", "decoder.onnx", "decoder_stock.onnx"):
        path = out / name
        if not path.exists():
            continue
        if mode not in ("int8", "fp16"):
            raise HistosamError(f"unknown quantisation {mode!r}; use int8 or fp16")
        atomic_write(path, functools.partial(_quantize, path, mode=mode))


def _quantize(source: Path, target: Path, *, mode: str) -> None:
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    else:
        import onnx
        from onnx import version_converter  # noqa: F401  (ensures onnx is importable)
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


def export_bundle(
    source: dict[str, Any],
    out: Path,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    check: bool = True,
    model: HistoSam | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the model from ``source``, export, check parity, write the bundle atomically."""
    from histosam.export.parity import check_parity

    out = Path(out)
    check_recorded_weights(source)  # the cache key trusts the recorded sha256s
    model = model if model is not None else load_model_from_source(source)
    # The folder gets the mode mkdir() gives (not mkdtemp's 0o700): a service account must read
    # it; it reaches the disk before it replaces a previous bundle, and goes when an export fails.
    with staged_dir(out, durable=True) as tmp:
        graphs = export_graphs(model, tmp, opset)
        if quantize:
            quantize_bundle(tmp, quantize)
        spec = model.spec
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "model": source.get("name") or spec.name,
            "base_model": spec.name,
            "histosam_version": __version__,
            "input_size": spec.input_size,
            "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "scale": "0-255 RGB"},
            "embedding_shape": list(spec.embedding_shape),
            # Mask calibration of these weights (ImageTransform.mask_dilation; 0 for none).
            "mask_dilation": int(source.get("mask_dilation") or 0),
            # Whether servers snap these weights' mask edges by default (histosam.backend.postprocess.edge_snap).
            "edge_snap": bool(source.get("edge_snap")),
            "extra_features": list(spec.extra_features),
            "opset": opset,
            "quantize": quantize,
            "graphs": graphs,
            "source": {
                "model": spec.name,
                "checkpoint": str(source["checkpoint"]) if source.get("checkpoint") else None,
                "decoder_weights": str(source["decoder_weights"]) if source.get("decoder_weights") else None,
                "weights_sha256": source_sha256(spec.name, source.get("checkpoint")),
                "decoder_weights_sha256": decoder_weights_sha256(source),
            },
        }
        write_manifest(tmp, manifest)  # files' sha256 first, so parity runs on a verifiable bundle
        if check:
            report = check_parity(model, tmp, progress=progress)
            manifest["parity"] = report
            write_manifest(tmp, manifest)
            if not quantize and not report["passed"]:
                raise ParityError(
                    f"ONNX/PyTorch parity failed: min mask IoU {report['min_mask_iou']:.5f} (need >= 0.999), "
                    f"max logit diff {report['max_low_res_logit_diff']:.2e} (need <= 1e-3)"
                )
    return manifest


def ensure_bundle(name: str, checkpoint: str | None = None, decoder_weights: str | None = None,
                  cache_dir: Path | None = None) -> Path:
    """The bundle for a model name, exported into the cache on first use.

    The folder name carries a key over the source weights, histosam version and bundle
    format (histosam.backend.bundles.catalog.bundle_key), so stale exports are never reused.
    """
    from histosam.backend.bundles.catalog import cached_bundle_path, resolve_source

    target = cached_bundle_path(name, checkpoint, decoder_weights, cache_dir)
    if (target / MANIFEST).is_file():
        return target
    export_bundle(resolve_source(name, checkpoint, decoder_weights), target)
    return target


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((Path(bundle) / MANIFEST).read_text())
