"""`histosam evaluate`: NoC / NoF / SPC / mIoU-per-click of a model or a classical baseline.

Runs the RITM simulated-user protocol (histosam.backend.evaluation) over image/mask folders
and writes results.json, table.md and miou_per_click.png into ``--out``. ``--backend both``
runs the PyTorch model and its ONNX bundle in lockstep and adds a parity section.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from histosam.backend.catalog import SERVED_PROPAGATION

LEARNED_BACKENDS = ("torch", "onnx")
BASELINE_BACKENDS = ("grabcut", "random_walker")
BACKEND_CHOICES = ("torch", "onnx", "both", *BASELINE_BACKENDS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="interactive-segmentation metrics (NoC, NoF, SPC, mIoU per click) on image/mask folders",
        description=(
            "Simulate a user clicking on the largest error (the RITM protocol) and report "
            "NoC@80/85/90, NoF@85/90, seconds per click and mIoU per click."
        ),
    )
    p.add_argument("--model", help="model name (default, lite_medsam_histo, lite_medsam, vit_b, ...) or a bundle "
                   "folder with manifest.json")
    p.add_argument(
        "--backend", nargs="+", choices=BACKEND_CHOICES, default=["onnx"],
        help="one or more of %(choices)s; 'both' = torch and onnx with a parity report (default: onnx)",
    )
    p.add_argument(
        "--data", type=Path, action="append", required=True,
        help="folder with images/ and masks/ sharing file stems (repeatable)",
    )
    p.add_argument(
        "--fraction", type=float, nargs=2, metavar=("LO", "HI"),
        help="keep samples whose foreground fraction is in [LO, HI] (the paper: 0.2 0.8)",
    )
    p.add_argument(
        "--split", choices=("all", "train", "validation"), default="all",
        help="of the folders named in the shipped splits.yaml (bcss, ocdc), keep only the validation or the "
        "training source images (default: all patches)",
    )
    p.add_argument("--max-clicks", type=int, default=20, help="clicks per image (default: %(default)s)")
    p.add_argument(
        "--target-iou", type=float, default=0.90,
        help="stop clicking once IoU reaches this (default and minimum: 0.90, the highest NoC threshold)",
    )
    p.add_argument("--full-curve", action="store_true", help="always make --max-clicks clicks (exact mIoU per click)")
    p.add_argument("--limit", type=int, help="evaluate only the first N kept samples of each --data folder")
    p.add_argument("--out", type=Path, required=True, help="output folder for results.json, table.md, miou_per_click.png")
    p.add_argument(
        "--propagation", choices=("on", "off", "auto", "both", "all"), nargs="+", default=[SERVED_PROPAGATION],
        help=f"learned models: the model's mask alone (off), spread by the click-seeded random walker (on), "
        f"spread on images where the model is unsure or ignores a correction click (auto); one run each (both = "
        f"off on, all = off on auto); default: {SERVED_PROPAGATION}, as `histosam serve` answers",
    )
    p.add_argument("--propagation-config", type=Path, metavar="F",
                   help="YAML of click-propagation settings (default: the shipped propagation.yaml)")
    p.add_argument(
        "--edge-snap", choices=("model", "on", "off", "both"), default="model",
        help="learned models: mask edges snapped onto the image's colour edges where the model's bundle asks for "
        "it (model, the default, as `histosam serve`: the shipped default model), always (on), never (off), or "
        "one run each without and with (both)",
    )
    p.add_argument("--edge-snap-config", type=Path, metavar="F",
                   help="YAML of edge-snap settings (default: the shipped edge_snap.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def model_label(model: str) -> str:
    """A short name for run keys: the bundle folder's name, or the model name itself."""
    path = Path(model)
    return path.resolve().name if (path / "manifest.json").is_file() else model


def load_onnx(model: str):
    """An OnnxPredictor for a bundle folder, or for a model name (exported on first use)."""
    from histosam.backend.errors import BundleError
    from histosam.backend.onnx_predictor import OnnxPredictor

    path = Path(model)
    if (path / "manifest.json").is_file():
        return OnnxPredictor.from_bundle(path)
    if path.is_dir():
        raise BundleError(f"{path} is a folder but holds no manifest.json")
    from histosam.backend.catalog import cached_bundle_path

    cached = cached_bundle_path(model)  # torch-free: a bundle already exported is used as the server would
    if (cached / "manifest.json").is_file():
        return OnnxPredictor.from_bundle(cached)
    try:
        from histosam.export.exporter import ensure_bundle
    except ImportError as exc:
        raise _needs_torch(model, exc) from exc
    return OnnxPredictor.from_bundle(ensure_bundle(model))


def load_torch(model: str):
    """A TorchPredictor for a model name or a bundle folder (its source model)."""
    try:
        from histosam.training.torch_predictor import TorchPredictor
    except ImportError as exc:
        raise _needs_torch(model, exc) from exc
    return TorchPredictor.from_spec(model)


def with_propagation(predictor, settings, mode: str = "on"):
    """``predictor`` as the server answers a click in propagation ``mode`` (on or auto)."""
    from histosam.backend.propagation import PropagatingPredictor

    return PropagatingPredictor(predictor, settings, predictor.transform, mode)


# Run-key suffix of each propagation mode ("" = the model's mask alone).
PROPAGATION_SUFFIX = {"off": "", "on": "+propagation", "auto": "+auto-propagation"}


def propagation_modes(choices: list[str]) -> list[str]:
    """--propagation's words -> the modes to run, each once, in off / on / auto order."""
    expand = {"both": ["off", "on"], "all": ["off", "on", "auto"]}
    wanted = {m for c in choices for m in expand.get(c, [c])}
    return [m for m in ("off", "on", "auto") if m in wanted]


def _needs_torch(model: str, exc: ImportError):
    from histosam.backend.errors import HistosamError

    return HistosamError(
        f"{model}: this needs the PyTorch side (pip install 'histosam[torch]'): {exc}"
    )


def prepare_out(out: Path) -> None:
    """Create the output folder now, or say in one line why it cannot be."""
    from histosam.backend.errors import InvalidInputError

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--out {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out {out} is not writable")


def run(args: argparse.Namespace) -> int:
    from histosam.backend.baselines import BASELINES
    from histosam.backend.edge_snap import EdgeSnappingPredictor, EdgeSnapSettings
    from histosam.backend.errors import InvalidInputError
    from histosam.backend.evaluation import (
        EvalConfig,
        evaluate_pair,
        evaluate_predictor,
        parity_summary,
        select_samples,
        summarise_run,
    )
    from histosam.backend.propagation import PropagationSettings
    from histosam.backend.report import flag_line, render_table, write_report

    backends = list(dict.fromkeys(args.backend))  # unique, order kept
    if "both" in backends:
        backends = [b for b in backends if b not in LEARNED_BACKENDS]
    learned = [b for b in backends if b in (*LEARNED_BACKENDS, "both")]
    if learned and not args.model:
        raise InvalidInputError(f"--backend {' '.join(learned)} needs --model NAME_OR_BUNDLE_DIR")
    if not 0.9 <= args.target_iou <= 1.0:
        raise InvalidInputError(f"--target-iou must be between 0.90 (the highest NoC threshold) and 1, got {args.target_iou}")
    config = EvalConfig(args.max_clicks, args.target_iou, args.full_curve)
    fraction = tuple(args.fraction) if args.fraction else None
    selection = select_samples(args.data, fraction, args.limit, part=args.split)
    progress = not args.no_progress
    samples = selection.samples

    runs: dict[str, dict] = {}
    parity: dict[str, dict] = {}

    def add_run(key: str, results) -> None:
        summary = summarise_run(results, config)
        summary.update(n_kept=selection.n_kept, n_total=selection.n_total)
        runs[key] = summary

    modes = propagation_modes(args.propagation)
    # A settings file that is named is read (and checked) even when no run uses it: a typo is an error.
    settings = PropagationSettings.load(args.propagation_config) if modes != ["off"] or args.propagation_config else None
    variants = [PROPAGATION_SUFFIX[m] for m in modes]
    mode_of = {v: m for m, v in PROPAGATION_SUFFIX.items()}

    snap_settings = EdgeSnapSettings.load(args.edge_snap_config) if args.edge_snap != "off" or args.edge_snap_config else None
    prepare_out(args.out)  # after every check, before the evaluation: a bad --out must not cost a long run

    def combos(predictor) -> list[tuple[bool, str]]:
        """(edge snapped?, propagation suffix) per run of a learned predictor."""
        snaps = {"model": [bool(getattr(predictor, "edge_snap", False))], "on": [True], "off": [False],
                 "both": [False, True]}[args.edge_snap]
        # Propagation "on" replaces every mask with the walker's, which is never snapped: a snapped
        # run of it would repeat the unsnapped one at the cost of a discarded solve per click.
        pairs = [(snap and mode_of[suffix] != "on", suffix) for snap in snaps for suffix in variants]
        return list(dict.fromkeys(pairs))

    # Snapping wraps the model and propagation wraps that, as the server does it: propagated
    # masks come from the logits (never snapped), the model's own masks are snapped.
    def variant(predictor, snap: bool, suffix: str):
        if snap:
            predictor = EdgeSnappingPredictor(predictor, snap_settings)
        return with_propagation(predictor, settings, mode_of[suffix]) if suffix else predictor

    def run_key(label: str, backend: str, snap: bool, suffix: str) -> str:
        return f"{label}/{backend}{'+edge-snap' if snap else ''}{suffix}"

    for backend in backends:
        if backend in BASELINES:
            add_run(backend, evaluate_predictor(BASELINES[backend](), samples, config, backend, progress))
        elif backend == "both":
            label = model_label(args.model)
            torch_pred, onnx_pred = load_torch(args.model), load_onnx(args.model)
            for snap, suffix in combos(onnx_pred):
                kt, ko = run_key(label, "torch", snap, suffix), run_key(label, "onnx", snap, suffix)
                tag = ("+edge-snap" if snap else "") + suffix
                res_t, res_o, diffs = evaluate_pair(variant(torch_pred, snap, suffix), variant(onnx_pred, snap, suffix),
                                                    samples, config, f"{label} torch+onnx{tag}", progress)
                add_run(kt, res_t)
                add_run(ko, res_o)
                parity[label + tag] = parity_summary(res_t, res_o, diffs, config, kt, ko)
        else:
            label = model_label(args.model)
            predictor = load_torch(args.model) if backend == "torch" else load_onnx(args.model)
            for snap, suffix in combos(predictor):
                key = run_key(label, backend, snap, suffix)
                add_run(key, evaluate_predictor(variant(predictor, snap, suffix), samples, config, key, progress))

    results = {
        "config": {
            "model": args.model,
            "backends": args.backend,
            "data": [str(d) for d in args.data],
            "fraction": list(fraction) if fraction else None,
            "max_clicks": config.max_clicks,
            "target_iou": config.target_iou,
            "stop_iou": config.stop_iou,
            "full_curve": config.full_curve,
            "limit": args.limit,
            "propagation": modes,
            "propagation_settings": dataclasses.asdict(settings) if settings is not None else None,
            "edge_snap": args.edge_snap,
            "edge_snap_settings": dataclasses.asdict(snap_settings) if snap_settings is not None else None,
        },
        "n": len(samples),
        "n_kept": selection.n_kept,
        "n_total": selection.n_total,
        "n_empty": selection.n_empty,
        "runs": runs,
        "parity": parity,
    }
    paths = write_report(args.out, results)
    print(render_table(results), end="")
    for model, p in parity.items():
        if p["flagged"]:
            print(flag_line(model, p))
    print(f"wrote {paths['results']}, {paths['table']}, {paths['plot']}")
    return 0
