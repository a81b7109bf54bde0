"""`histosam evaluate`: NoC / NoF / SPC / mIoU-per-click of a model or a classical baseline.

Runs the RITM simulated-user protocol (histosam.backend.evaluation.loop) over image/mask folders
and writes results.json, table.md and miou_per_click.png into ``--out``. ``--backend both``
runs the PyTorch model and its ONNX bundle in lockstep and adds a parity section.

Each image's result is appended to ``--out``/per_image.jsonl as soon as it is done, so an
interrupted run (Ctrl-C, a crash) keeps what it finished and ``--resume`` continues it; the
file goes once the report is written. An ``--out`` that already holds files is refused unless
``--resume`` or ``--force`` says what to do with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from histosam.backend.bundles.catalog import SERVED_PROPAGATION

LEARNED_BACKENDS = ("torch", "onnx")
BASELINE_BACKENDS = ("grabcut", "random_walker")
BACKEND_CHOICES = ("torch", "onnx", "both", *BASELINE_BACKENDS)
PROGRESS_FILE = "per_image.jsonl"  # one line per image as it finishes; removed with the report written
RUN_FILE = "evaluate_run.json"  # the settings the progress file was made with (checked by --resume)
OVERLAYS = "overlays"
# What an evaluation writes into --out: what --force replaces.
OWN_FILES = ("results.json", "table.md", "miou_per_click.png", PROGRESS_FILE, RUN_FILE)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="interactive-segmentation metrics (NoC, NoF, SPC, mIoU per click) on image/mask folders",
        description=(
            "Simulate a user clicking on the largest error (the RITM protocol) and report "
            "NoC@80/85/90, NoF@85/90, seconds per click and mIoU per click."
        ),
    )
    p.add_argument("--model", default="default",
                   help="model name (default, lite_medsam_histo, lite_medsam, vit_b, ...) or a bundle folder with "
                   "manifest.json (default: %(default)s, the shipped default model)")
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
    p.add_argument("--out", type=Path, required=True,
                   help="output folder for results.json, table.md, miou_per_click.png (refused when it holds files, "
                   "unless --resume or --force)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted evaluation in --out (same arguments): images already done are "
                       "not evaluated again")
    again.add_argument("--force", action="store_true", help="replace the evaluation already in --out")
    p.add_argument("--overlays", action="store_true",
                   help="also write, per run and image, the last mask over the image with the clicks and the ground "
                   "truth's outline: --out/overlays/RUN/DATASET_IMAGE.png")
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
    from histosam.backend.bundles.onnx_predictor import OnnxPredictor
    from histosam.backend.core.errors import BundleError

    path = Path(model)
    if (path / "manifest.json").is_file():
        return OnnxPredictor.from_bundle(path)
    if path.is_dir():
        raise BundleError(f"{path} is a folder but holds no manifest.json")
    from histosam.backend.bundles.catalog import cached_bundle_path

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
    from histosam.backend.postprocess.propagation import PropagatingPredictor

    return PropagatingPredictor(predictor, settings, predictor.transform, mode)


# Run-key suffix of each propagation mode ("" = the model's mask alone).
PROPAGATION_SUFFIX = {"off": "", "on": "+propagation", "auto": "+auto-propagation"}


def propagation_modes(choices: list[str]) -> list[str]:
    """--propagation's words -> the modes to run, each once, in off / on / auto order."""
    expand = {"both": ["off", "on"], "all": ["off", "on", "auto"]}
    wanted = {m for c in choices for m in expand.get(c, [c])}
    return [m for m in ("off", "on", "auto") if m in wanted]


def _needs_torch(model: str, exc: ImportError):
    from histosam.backend.core.errors import HistosamError

    return HistosamError(
        f"{model}: this needs the PyTorch side (pip install 'histosam[torch]'): {exc}"
    )


def prepare_out(out: Path, resume: bool = False, force: bool = False) -> None:
    """Create the output folder now, or say in one line why it cannot be; an --out holding
    files is only used with --resume (continue) or --force (replace)."""
    from histosam.backend.core.errors import InvalidInputError

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume and not (out / RUN_FILE).is_file():
        finished = "holds a finished evaluation (results.json)" if "results.json" in held else \
            "holds no interrupted evaluation"
        raise InvalidInputError(f"--resume: {out} {finished}; nothing to resume (--force starts it again)")
    if held and not (resume or force):
        raise InvalidInputError(
            f"--out {out} already holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}: --resume continues "
            "an interrupted evaluation there, --force replaces it, or choose another --out"
        )
    if force:
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / OVERLAYS, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--out {out} cannot be created: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out {out} is not writable")


class ProgressLog:
    """Per-image results in ``--out``/per_image.jsonl, appended as each image finishes.

    A line holds every run of one image for one group of runs (one run, or the torch/onnx
    pair of a parity check with their logit difference), so a resumed parity check compares
    the same pairs. The settings go to evaluate_run.json first: --resume refuses other ones.
    """

    def __init__(self, out: Path, settings: dict[str, Any], resume: bool) -> None:
        from histosam.backend.core.errors import InvalidInputError
        from histosam.backend.evaluation.report import write_json

        self.path = out / PROGRESS_FILE
        self.done: dict[tuple[str, str], dict[str, Any]] = {}
        if resume:
            before = json.loads((out / RUN_FILE).read_text())["settings"]
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise InvalidInputError(f"--resume: {out} was started with other arguments ({', '.join(changed)}); "
                                        "give the same ones, or --force to start again")
            self._read()
        else:
            self.path.unlink(missing_ok=True)
            write_json(out / RUN_FILE, {"settings": settings})
        self._file = self.path.open("a", encoding="utf-8")

    def _read(self) -> None:
        if not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                self.done[(record["group"], record["sample"])] = record
            except (ValueError, KeyError, TypeError):
                continue  # the line an interruption cut short: that image is evaluated again

    def __len__(self) -> int:
        return len(self.done)

    def get(self, group: str, sample: str) -> dict[str, Any] | None:
        return self.done.get((group, sample))

    def add(self, group: str, sample: str, runs: dict[str, Any], logit_diff: float | None) -> dict[str, Any]:
        record = {"group": group, "sample": sample, "logit_diff": logit_diff,
                  "runs": {key: _sample_record(r) for key, r in runs.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[(group, sample)] = record
        return record

    def close(self) -> None:
        self._file.close()


def _sample_record(result) -> dict[str, Any]:
    return {"clicks": [[c.y, c.x, bool(c.positive)] for c in result.clicks], "ious": result.ious,
            "obeyed": result.obeyed, "encoder_s": result.encoder_s, "decoder_s": result.decoder_s}


def _sample_result(record: dict[str, Any], name: str, dataset: str):
    from histosam.backend.evaluation.clicker import Click
    from histosam.backend.evaluation.loop import SampleResult

    return SampleResult(name=name, dataset=dataset, clicks=[Click(int(y), int(x), bool(p)) for y, x, p in record["clicks"]],
                        ious=[float(v) for v in record["ious"]], obeyed=[bool(v) for v in record["obeyed"]],
                        encoder_s=float(record["encoder_s"]), decoder_s=[float(v) for v in record["decoder_s"]])


def evaluate_logged(log: ProgressLog, keys: list[str], predictors: list, samples, config, desc: str,
                    show: bool, overlays: Path | None) -> tuple[dict[str, list], list[float | None]]:
    """Every sample through ``predictors`` (one run, or a parity pair), each image logged as it
    finishes; images the log already holds are not evaluated again."""
    from histosam.backend.evaluation.loop import _progress, evaluate_sample, max_logit_difference

    results: dict[str, list] = {k: [] for k in keys}
    diffs: list[float | None] = []
    pair = len(predictors) == 2
    for s in _progress(samples, desc, show):
        sample_id = f"{s.dataset}/{s.name}"
        record = log.get(keys[0], sample_id)
        if record is None:
            image, mask = s.pair()
            got = [evaluate_sample(p, image, mask, config, s.name, s.dataset, keep_logits=pair,
                                   keep_mask=overlays is not None) for p in predictors]
            if overlays is not None:
                for key, result in zip(keys, got, strict=True):
                    _write_overlay(overlays, key, s, image, mask, result)
            diff = max_logit_difference(*got) if pair else None
            record = log.add(keys[0], sample_id, dict(zip(keys, got, strict=True)), diff)
        for key in keys:
            results[key].append(_sample_result(record["runs"][key], s.name, s.dataset))
        diffs.append(record["logit_diff"])
    return results, diffs


def _write_overlay(folder: Path, key: str, sample, image, truth, result) -> None:
    from histosam.backend.evaluation.overlay import draw_overlay, write_png

    if result.last_mask is None:
        return
    clicks = [(c.x + 0.5, c.y + 0.5, c.positive) for c in result.clicks]
    name = f"{sample.dataset}_{sample.name}.png".replace(os.sep, "_")
    write_png(folder / key.replace(os.sep, "__") / name, draw_overlay(image, result.last_mask, clicks, truth))


def run(args: argparse.Namespace) -> int:
    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.evaluation.loop import EvalConfig, select_samples
    from histosam.backend.evaluation.report import flag_line, render_table, write_report
    from histosam.backend.postprocess.edge_snap import EdgeSnapSettings
    from histosam.backend.postprocess.propagation import PropagationSettings

    backends = list(dict.fromkeys(args.backend))  # unique, order kept
    if "both" in backends:
        backends = [b for b in backends if b not in LEARNED_BACKENDS]
    learned = [b for b in backends if b in (*LEARNED_BACKENDS, "both")]
    if learned and not args.model:
        raise InvalidInputError(f"--backend {' '.join(learned)} needs --model NAME_OR_BUNDLE_DIR")
    model = args.model if learned else None
    if not 0.9 <= args.target_iou <= 1.0:
        raise InvalidInputError(f"--target-iou must be between 0.90 (the highest NoC threshold) and 1, got {args.target_iou}")
    config = EvalConfig(args.max_clicks, args.target_iou, args.full_curve)
    fraction = tuple(args.fraction) if args.fraction else None
    selection = select_samples(args.data, fraction, args.limit, part=args.split)
    progress = not args.no_progress
    samples = selection.samples

    modes = propagation_modes(args.propagation)
    # A settings file that is named is read (and checked) even when no run uses it: a typo is an error.
    settings = PropagationSettings.load(args.propagation_config) if modes != ["off"] or args.propagation_config else None
    variants = [PROPAGATION_SUFFIX[m] for m in modes]
    mode_of = {v: m for m, v in PROPAGATION_SUFFIX.items()}

    snap_settings = EdgeSnapSettings.load(args.edge_snap_config) if args.edge_snap != "off" or args.edge_snap_config else None
    run_config = {
        "model": model,
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
    }
    # After every check, before the evaluation: a bad --out must not cost a long run.
    prepare_out(args.out, resume=args.resume, force=args.force)
    log = ProgressLog(args.out, {**run_config, "samples": [f"{s.dataset}/{s.name}" for s in samples]}, args.resume)
    overlays = args.out / OVERLAYS if args.overlays else None
    try:
        runs, parity = _evaluate_all(args, backends, samples, config, selection, log, overlays,
                                     variants, mode_of, settings, snap_settings, progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(log)} image result(s) kept in {log.path}; the same command with --resume "
                                "continues") from None
    finally:
        log.close()
    results = {
        "config": run_config,
        "n": len(samples),
        "n_kept": selection.n_kept,
        "n_total": selection.n_total,
        "n_empty": selection.n_empty,
        "runs": runs,
        "parity": parity,
    }
    paths = write_report(args.out, results)
    for name in (PROGRESS_FILE, RUN_FILE):  # the report holds every image now
        (args.out / name).unlink(missing_ok=True)
    print(render_table(results), end="")
    for label, p in parity.items():
        if p["flagged"]:
            print(flag_line(label, p))
    print(f"wrote {paths['results']}, {paths['table']}, {paths['plot']}"
          + (f", {overlays}/" if overlays is not None else ""))
    return 0


def _evaluate_all(args, backends, samples, config, selection, log, overlays, variants, mode_of, settings,
                  snap_settings, progress) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every run the arguments ask for: (runs, parity) of results.json."""
    from histosam.backend.evaluation.baselines import BASELINES
    from histosam.backend.evaluation.loop import parity_summary, summarise_run
    from histosam.backend.postprocess.edge_snap import EdgeSnappingPredictor

    runs: dict[str, dict] = {}
    parity: dict[str, dict] = {}

    def add_run(key: str, results) -> None:
        summary = summarise_run(results, config)
        summary.update(n_kept=selection.n_kept, n_total=selection.n_total)
        runs[key] = summary

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
            got, _ = evaluate_logged(log, [backend], [BASELINES[backend]()], samples, config, backend, progress,
                                     overlays)
            add_run(backend, got[backend])
        elif backend == "both":
            label = model_label(args.model)
            torch_pred, onnx_pred = load_torch(args.model), load_onnx(args.model)
            for snap, suffix in combos(onnx_pred):
                kt, ko = run_key(label, "torch", snap, suffix), run_key(label, "onnx", snap, suffix)
                tag = ("+edge-snap" if snap else "") + suffix
                pair = [variant(torch_pred, snap, suffix), variant(onnx_pred, snap, suffix)]
                got, diffs = evaluate_logged(log, [kt, ko], pair, samples, config, f"{label} torch+onnx{tag}",
                                             progress, overlays)
                add_run(kt, got[kt])
                add_run(ko, got[ko])
                parity[label + tag] = parity_summary(got[kt], got[ko], diffs, config, kt, ko)
        else:
            label = model_label(args.model)
            predictor = load_torch(args.model) if backend == "torch" else load_onnx(args.model)
            for snap, suffix in combos(predictor):
                key = run_key(label, backend, snap, suffix)
                got, _ = evaluate_logged(log, [key], [variant(predictor, snap, suffix)], samples, config, key,
                                         progress, overlays)
                add_run(key, got[key])
    return runs, parity
