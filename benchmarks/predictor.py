"""`histosam bench predictor`: PyTorch vs onnxruntime, encoder and per-click decoder.

Both predictors run in one process, interleaved call by call, on the same image and
clicks and with the same thread count, so the ratio holds even on a noisy machine. The
target (issue 2): ONNX at least 2x faster than PyTorch for both the encoder and the decoder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def register_bench(parser: argparse.ArgumentParser) -> None:
    """PyTorch vs ONNX predictor: median encoder ms and decoder ms per click."""
    parser.add_argument("--model", default="default", help="registry name or shipped fine-tune")
    parser.add_argument("--checkpoint", help="weights for models that need one")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--encodes", type=int, default=5, help="encoder runs per backend")
    parser.add_argument("--clicks", type=int, default=30, help="decoder runs per backend")
    parser.add_argument("--size", type=int, nargs=2, default=(640, 640), metavar=("H", "W"))
    parser.add_argument("--out", type=Path, default=Path("bench_predictor.json"))
    parser.set_defaults(bench_func=run)


def _median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from histosam.backend.bundles.onnx_predictor import OnnxPredictor
    from histosam.benchmarks import progress
    from histosam.export.exporter import ensure_bundle
    from histosam.export.parity import synthetic_image
    from histosam.training.models.loading import load_model_from_source
    from histosam.training.models.registry import resolve_source
    from histosam.training.torch_predictor import TorchPredictor

    torch.set_num_threads(args.threads)
    source = resolve_source(args.model, args.checkpoint)
    progress("predictor", f"model {args.model}: its ONNX bundle (exported on first use: a minute or more)...")
    bundle = ensure_bundle(args.model, args.checkpoint)
    progress("predictor", "loading the PyTorch and ONNX predictors...")
    tp = TorchPredictor(load_model_from_source(source), name=args.model)
    op = OnnxPredictor.from_bundle(bundle, threads=args.threads)
    h, w = args.size
    image = synthetic_image(h, w, seed=0)
    rng = np.random.default_rng(0)

    times: dict[str, list[float]] = {"torch_encoder": [], "onnx_encoder": [], "torch_decoder": [], "onnx_decoder": []}
    for predictor in (tp, op):  # warm-up, not timed
        predictor.set_image(image)
        predictor.predict([[w / 2, h / 2]], [1])
    for i in range(args.encodes):
        progress("predictor", f"encoder {i + 1}/{args.encodes} (torch, then onnx)")
        for predictor, key in ((tp, "torch"), (op, "onnx")):
            start = time.perf_counter()
            predictor.set_image(image)
            times[f"{key}_encoder"].append(time.perf_counter() - start)
    prev: dict[str, np.ndarray | None] = {"torch": None, "onnx": None}
    points: list[list[float]] = []
    labels: list[int] = []
    for i in range(args.clicks):
        if i % 5 == 0:  # evaluator-like sequences of up to 5 clicks, previous logits fed back
            points, labels, prev = [], [], {"torch": None, "onnx": None}
            progress("predictor", f"clicks {i + 1}-{min(i + 5, args.clicks)} of {args.clicks} (torch, then onnx)")
        points.append([float(rng.uniform(0, w)), float(rng.uniform(0, h))])
        labels.append(int(rng.integers(0, 2)) if points[1:] else 1)
        for predictor, key in ((tp, "torch"), (op, "onnx")):
            start = time.perf_counter()
            pred = predictor.predict(np.array(points), np.array(labels), None, prev[key])
            times[f"{key}_decoder"].append(time.perf_counter() - start)
            prev[key] = pred.low_res_logits
    result = {
        "model": args.model,
        "bundle": str(bundle),
        "threads": args.threads,
        "onnx_providers": op.providers,
        "image_size": [h, w],
        "encodes": args.encodes,
        "clicks": args.clicks,
        **{f"{k}_ms_median": _median_ms(v) for k, v in times.items()},
    }
    result["encoder_speedup"] = result["torch_encoder_ms_median"] / result["onnx_encoder_ms_median"]
    result["decoder_speedup"] = result["torch_decoder_ms_median"] / result["onnx_decoder_ms_median"]
    result["target_speedup"] = 2.0
    result["meets_target"] = result["encoder_speedup"] >= 2.0 and result["decoder_speedup"] >= 2.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from histosam.backend.core.atomic import write_json

    write_json(args.out, result, indent=2)
    print(f"{'':10}{'torch ms':>10}{'onnx ms':>10}{'speedup':>9}   ({args.threads} threads, {op.providers[0]})")
    for part in ("encoder", "decoder"):
        print(f"{part:10}{result[f'torch_{part}_ms_median']:10.1f}{result[f'onnx_{part}_ms_median']:10.1f}"
              f"{result[f'{part}_speedup']:8.2f}x")
    print(f"target >= 2x for both: {'met' if result['meets_target'] else 'MISSED'}; wrote {args.out}")
    return 0
