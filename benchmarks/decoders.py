"""`histosam bench decoders`: per-click ONNX decoder time of each decoder variant vs stock.

The variants are built on the real base model (LiteMedSAM by default) and exported with the
exporter's own decoder wrapper, so the graphs are those a bundle would hold; weights do not
change the cost, so untrained heads are fine. All decoders are timed in the same process,
interleaved round by round (a shared CPU's load then hits them alike), and reported as the
median per-click time and its ratio to the stock decoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VARIANTS = ("stock", "refine_lite", "refine_hq", "refine")


def register_bench(parser: argparse.ArgumentParser) -> None:
    """Per-click ONNX decoder time of refine / refine_lite / refine_hq against the stock decoder."""
    parser.add_argument("--model", default="lite_medsam", help="base registry model (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--rounds", type=int, default=10, help="timed clicks per decoder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench_decoders.json"))
    parser.set_defaults(bench_func=run_bench)


def export_decoder(model, path: Path) -> dict[str, np.ndarray]:
    import torch

    from histosam.export.onnx_graphs import DECODER_OUTPUTS, DecoderGraph

    s = model.spec.input_size
    with torch.no_grad():
        feats = model.encode(torch.zeros(1, 3, s, s))
    extra = tuple(model.spec.extra_features)
    graph = DecoderGraph(model, extra)
    dummy = (feats["image_embeddings"], torch.tensor([[[10.0, 20.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]]),
             torch.zeros(1, 1, 256, 256), torch.tensor([1.0]), torch.tensor([float(s), float(s)]),
             *(feats[k] for k in extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, dummy, str(path), dynamo=False, opset_version=17, input_names=graph.input_names,
                          output_names=DECODER_OUTPUTS,
                          dynamic_axes={"point_coords": {1: "n"}, "point_labels": {1: "n"}},
                          do_constant_folding=True)
    return {k: v.numpy() for k, v in feats.items()}


def measure(model_name: str, variants: list[str], rounds: int, threads: int,
            progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from histosam.backend.bundles.onnx_predictor import make_session
    from histosam.training.models.decoders import build_decoder
    from histosam.training.models.registry import build_model

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(variants):
            progress(f"building and exporting decoder {v} ({i + 1}/{len(variants)})...")
            base = build_model(model_name)
            model = base if v == "stock" else build_decoder(base, {"variant": v})
            path = Path(tmp) / f"{v}.onnx"
            feats = export_decoder(model.eval(), path)
            sess = make_session(path, ["CPUExecutionProvider"], threads)
            s = model.spec.input_size
            feeds = {"image_embeddings": feats["image_embeddings"],
                     "point_coords": np.array([[[60.0, 80.0], [120.0, 90.0], [0.0, 0.0]]], np.float32),
                     "point_labels": np.array([[1.0, 0.0, -1.0]], np.float32),
                     "mask_input": np.random.default_rng(0).normal(size=(1, 1, 256, 256)).astype(np.float32),
                     "has_mask_input": np.array([1.0], np.float32),
                     "orig_im_size": np.array([float(s), float(s)], np.float32)}
            feeds.update({k: feats[k] for k in model.spec.extra_features})
            names = {i.name for i in sess.get_inputs()}
            feeds = {k: v for k, v in feeds.items() if k in names}
            sess.run(None, feeds)  # warm-up
            sessions[v] = (sess, feeds, (Path(tmp) / f"{v}.onnx").stat().st_size)
        times: dict[str, list[float]] = {v: [] for v in variants}
        progress(f"timing {rounds} clicks on each of {len(variants)} decoders...")
        for _ in range(rounds):
            for v in variants:
                sess, feeds, _ = sessions[v]
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[v].append(time.perf_counter() - t0)
    stock = float(np.median(times["stock"])) if "stock" in times else None
    return {
        "model": model_name, "threads": threads, "rounds": rounds,
        "decoders": {v: {"median_ms": float(np.median(t)) * 1e3, "min_ms": float(np.min(t)) * 1e3,
                         "ratio_to_stock": (float(np.median(t)) / stock) if stock else None,
                         "onnx_bytes": sessions[v][2]} for v, t in times.items()},
    }


def run_bench(args: argparse.Namespace) -> int:
    from histosam.benchmarks import progress

    result = measure(args.model, list(args.variants), args.rounds, args.threads,
                     lambda text: progress("decoders", text))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from histosam.backend.core.atomic import write_json

    write_json(args.out, result, indent=2)
    for v, r in result["decoders"].items():
        print(f"{v:12s} {r['median_ms']:8.1f} ms/click  x{r['ratio_to_stock']:.2f} of stock")
    return 0
