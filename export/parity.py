"""PyTorch vs ONNX parity: the proof that the served graphs compute the trained model.

Runs both predictors on synthetic images of several aspect ratios (the shared transforms
letterbox each differently) and several prompt sets, including a fed-back mask prompt and a
box, and also checks the decoder graph's own full-size ``masks`` output for every size (the
un-padding crop must follow ``orig_im_size``; a baked-in crop fails here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from histosam.backend.bundles.onnx_predictor import OnnxPredictor
from histosam.backend.core.predictor import prompt_arrays
from histosam.backend.evaluation.metrics import iou
from histosam.training.models.sam_model import HistoSam
from histosam.training.torch_predictor import TorchPredictor

PARITY_SIZES: tuple[tuple[int, int], ...] = ((700, 900), (900, 700), (1024, 1024), (333, 1200))
MAX_LOGIT_DIFF = 1e-3
MIN_MASK_IOU = 0.999


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Tissue-like test image: smooth colour noise with a few dark elliptical blobs."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (max(4, height // 32), max(4, width // 32), 3)).astype(np.float32)
    base = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    img = 200 + 25 * base
    for _ in range(4):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ax = (int(rng.integers(width // 12, width // 4)), int(rng.integers(height // 12, height // 4)))
        colour = tuple(float(c) for c in rng.uniform(60, 140, 3))
        cv2.ellipse(img, (int(cx), int(cy)), ax, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def prompt_sets(height: int, width: int) -> list[dict[str, Any]]:
    """One click, three clicks with a negative, a box, a box + click."""
    cx, cy = width * 0.5, height * 0.5
    return [
        {"points": [[cx, cy]], "labels": [1]},
        {"points": [[cx, cy], [width * 0.2, height * 0.3], [width * 0.7, height * 0.8]], "labels": [1, 0, 1]},
        {"box": [width * 0.25, height * 0.25, width * 0.75, height * 0.75]},
        {"points": [[cx, cy]], "labels": [0], "box": [width * 0.1, height * 0.2, width * 0.9, height * 0.6]},
    ]


def check_parity(model: HistoSam, bundle_dir: Path, sizes=PARITY_SIZES, progress: bool = False) -> dict[str, Any]:
    onnx_pred = OnnxPredictor.from_bundle(bundle_dir)
    torch_pred = TorchPredictor(model, mask_dilation=onnx_pred.transform.mask_dilation)
    quantized = bool(onnx_pred.bundle.manifest.get("quantize"))
    cases: list[dict[str, Any]] = []
    max_emb = 0.0
    for i, (h, w) in enumerate(tqdm(sizes, desc="parity", disable=not progress)):
        image = synthetic_image(h, w, seed=i)
        torch_pred.set_image(image)
        onnx_pred.set_image(image)
        tf = torch_pred.features
        emb_diff = max(float(np.abs(tf[k] - onnx_pred.features[k]).max()) for k in tf)
        max_emb = max(max_emb, emb_diff)
        for j, prompt in enumerate(prompt_sets(h, w)):
            pt = torch_pred.predict(prompt.get("points"), prompt.get("labels"), prompt.get("box"))
            po = onnx_pred.predict(prompt.get("points"), prompt.get("labels"), prompt.get("box"))
            # Second step: feed the previous logits back as the mask prompt (the click loop).
            pt2 = torch_pred.predict(prompt.get("points"), prompt.get("labels"), prompt.get("box"), pt.low_res_logits)
            po2 = onnx_pred.predict(prompt.get("points"), prompt.get("labels"), prompt.get("box"), pt.low_res_logits)
            logit_diff = max(float(np.abs(pt.low_res_logits - po.low_res_logits).max()),
                             float(np.abs(pt2.low_res_logits - po2.low_res_logits).max()))
            raw = torch_pred.transform.logits_to_original(pt.low_res_logits, (h, w)) > 0  # the graph's own rule
            graph_iou = _graph_masks_iou(onnx_pred, prompt, (h, w), raw)
            cases.append({
                "size": [h, w], "prompt": j,
                "embedding_diff": emb_diff,
                "low_res_logit_diff": logit_diff,
                "mask_iou": min(iou(pt.mask, po.mask), iou(pt2.mask, po2.mask)),
                "graph_masks_iou": graph_iou,
                "iou_pred_diff": abs(pt.iou - po.iou),
            })
    report = {
        "sizes": [list(s) for s in sizes],
        "cases": cases,
        "max_embedding_diff": max_emb,
        "max_low_res_logit_diff": max(c["low_res_logit_diff"] for c in cases),
        "min_mask_iou": min(c["mask_iou"] for c in cases),
        "min_graph_masks_iou": min(c["graph_masks_iou"] for c in cases),
        "quantized": quantized,
    }
    report["passed"] = bool(
        report["max_low_res_logit_diff"] <= MAX_LOGIT_DIFF
        and report["min_mask_iou"] >= MIN_MASK_IOU
        and report["min_graph_masks_iou"] >= MIN_MASK_IOU
    )
    return report


def _graph_masks_iou(pred: OnnxPredictor, prompt: dict[str, Any], hw: tuple[int, int], reference: np.ndarray) -> float:
    """IoU of the decoder graph's own `masks` output (orig_im_size = hw) against the
    reference mask made by the shared numpy post-processing."""
    coords, labels = prompt_arrays(prompt.get("points"), prompt.get("labels"), prompt.get("box"))
    coords = pred.transform.apply_coords(coords, hw)
    feeds = {
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(hw, np.float32),
    }
    for name in pred.decoder.input_names:
        if name not in feeds:
            feeds[name] = pred.features[name]
    (masks,) = pred.decoder.session.run(["masks"], feeds)
    if masks.shape[-2:] != tuple(hw):
        return 0.0
    return iou(masks[0, 0] > 0, reference)
