"""The interactive evaluation loop: simulated clicks against any ``Predictor``.

Per image the predictor encodes once (``set_image``, timed); then the RITM clicker
(``histosam.backend.evaluation.clicker.next_click``) places a click on the current error, the predictor
answers with every click so far plus its previous low-res logits as the mask prompt (none on
the first click), and the IoU of ``Prediction.mask`` against the ground truth is recorded. The
loop stops once the IoU reaches ``target_iou`` (default 0.90, the highest NoC threshold, so
NoC@80/85/90 all come from the same curve; a lower target is raised to 0.90) or after
``max_clicks``; with ``full_curve`` it always runs
``max_clicks`` clicks, which mIoU-per-click curves need. It also stops early if no unclicked
error pixel is left. Curves that stopped early are padded with their last IoU for mIoU
(see ``histosam.backend.evaluation.metrics``).

The loop knows nothing about models: ONNX, PyTorch and the classical baselines all go through
the same ``set_image``/``predict`` calls, so their numbers are comparable. ``evaluate_pair``
runs two predictors in lockstep on each sample to measure ONNX/PyTorch parity at identical
click prefixes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.predictor import Predictor
from histosam.backend.evaluation.clicker import Click, next_click
from histosam.backend.evaluation.metrics import (
    MIOU_CLICKS,
    NOC_THRESHOLDS,
    NOF_THRESHOLDS,
    REFINEMENT_SPAN,
    error_closed,
    iou,
    miou_per_click,
    noc,
    nof,
    obedience,
    setbacks,
    threshold_key,
)
from histosam.backend.evaluation.splits import DatasetSplit, check_part, in_part, load_splits
from histosam.backend.wsi.patches import load_patch_dataset

PARITY_FLAG_FRACTION = 0.02  # more samples than this with a different NoC flags the bundle


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class EvalSample:
    """One image and its ground-truth mask, from files or from arrays.

    File-backed samples keep only the mask's foreground fraction in memory (a whole-slide
    patch set can hold many thousands of patches); image and mask are read when evaluated.
    """

    name: str
    dataset: str
    mask_array: np.ndarray | None = None
    mask_path: Path | None = None
    image_array: np.ndarray | None = None
    image_path: Path | None = None
    foreground_fraction: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if (self.mask_array is None) == (self.mask_path is None):
            raise ValueError("an EvalSample needs exactly one of mask_array and mask_path")
        if (self.image_array is None) == (self.image_path is None):
            raise ValueError("an EvalSample needs exactly one of image_array and image_path")
        if self.mask_array is not None:
            self.mask_array = np.asarray(self.mask_array, bool)
        if self.foreground_fraction < 0:
            self.foreground_fraction = float(self.mask.mean())

    @property
    def mask(self) -> np.ndarray:
        """The bool ground truth (foreground: grey level > 127 in a mask file)."""
        if self.mask_array is not None:
            return self.mask_array
        assert self.mask_path is not None
        return read_mask(self.mask_path)

    def image(self, mask_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The RGB uint8 image, checked against the mask's shape."""
        if self.image_array is not None:
            img = self.image_array
        else:
            assert self.image_path is not None
            bgr = cv2.imread(str(self.image_path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise InvalidInputError(f"cannot decode image {self.image_path}")
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        mh, mw = mask_shape if mask_shape is not None else self.mask.shape
        if img.shape[:2] != (mh, mw):
            raise InvalidInputError(
                f"{self.dataset}/{self.name}: image is {img.shape[1]}x{img.shape[0]} but its "
                f"mask is {mw}x{mh}"
            )
        return img

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask), each read once."""
        mask = self.mask
        return self.image(mask.shape), mask


def read_mask(path: Path) -> np.ndarray:
    """A mask file as bool (foreground: grey level > 127)."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise InvalidInputError(f"cannot decode mask {path}")
    return grey > 127


def load_samples(folder: str | Path) -> list[EvalSample]:
    """Samples of one data folder: ``images/`` + ``masks/`` sharing stems.

    Read by the whole-slide pipeline's reader (``histosam.backend.wsi.patches.load_patch_dataset``,
    which also honours its ``manifest.csv`` order and refuses unpaired files). Masks are read
    once now for their foreground fraction (the filter needs it) and again when evaluated;
    images only when evaluated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"data folder {folder} does not exist")
    records = load_patch_dataset(folder)
    if not records:
        raise InvalidInputError(f"{folder}: the dataset holds no image/mask pairs")
    return [
        EvalSample(name=r.stem, dataset=folder.resolve().name, mask_path=Path(r.mask_path),
                   image_path=Path(r.image_path))
        for r in records
    ]


@dataclass
class SampleSelection:
    """The samples to evaluate and how they were chosen (reported in results.json)."""

    samples: list[EvalSample]
    n_total: int  # every sample found
    n_kept: int  # after dropping empty masks and the foreground-fraction filter
    n_empty: int  # samples with no foreground, never evaluated (no object to click)
    fraction: tuple[float, float] | None


def select_samples(
    folders: Sequence[str | Path],
    fraction: tuple[float, float] | None = None,
    limit: int | None = None,
    part: str = "all",
    splits: Mapping[str, DatasetSplit] | None = None,
) -> SampleSelection:
    """Load every folder, drop empty masks, keep ``lo <= foreground fraction <= hi``.

    ``limit`` caps each folder separately (its first N kept samples, in file order), so a
    quick run over several datasets still sees all of them. ``part`` keeps the training or
    validation members of the folders ``splits`` (default: the shipped splits.yaml) names.
    """
    check_part(part)
    if part != "all" and splits is None:
        splits = load_splits()
    if fraction is not None:
        lo, hi = fraction
        if not (0.0 <= lo <= hi <= 1.0):
            raise InvalidInputError(f"--fraction needs 0 <= LO <= HI <= 1, got {lo} {hi}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, got {limit}")
    names = [Path(f).resolve().name for f in folders]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"data folders must have distinct names, got {names}")
    every: list[EvalSample] = []
    kept: list[EvalSample] = []
    chosen: list[EvalSample] = []
    for folder in folders:
        found = load_samples(folder)
        if part != "all":
            dataset = Path(folder).resolve().name
            found = [smp for smp in found if in_part(dataset, smp.name, part, splits or {})]
        kept_here = [
            s
            for s in found
            if s.foreground_fraction > 0
            and (fraction is None or fraction[0] <= s.foreground_fraction <= fraction[1])
        ]
        every += found
        kept += kept_here
        chosen += kept_here[:limit] if limit is not None else kept_here
    n_empty = sum(1 for s in every if s.foreground_fraction == 0)
    if not chosen:
        raise InvalidInputError(
            f"no sample left to evaluate ({len(every)} found, {n_empty} with an empty mask, "
            f"foreground fraction filter {fraction})"
        )
    return SampleSelection(chosen, len(every), len(kept), n_empty, fraction)


# --------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    max_clicks: int = 20
    target_iou: float = 0.90
    full_curve: bool = False

    @property
    def stop_iou(self) -> float:
        """Where a curve may stop: never below the highest NoC threshold, or NoC@90 would be
        computed on curves cut short."""
        return max(self.target_iou, max(NOC_THRESHOLDS))

    def __post_init__(self) -> None:
        if self.max_clicks < 1:
            raise InvalidInputError(f"--max-clicks must be at least 1, got {self.max_clicks}")
        if not 0.0 < self.target_iou <= 1.0:
            raise InvalidInputError(f"--target-iou must be in (0, 1], got {self.target_iou}")


@dataclass
class SampleResult:
    """What happened on one image: every click, the IoU and obedience after it, timings."""

    name: str
    dataset: str
    clicks: list[Click] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    obeyed: list[bool] = field(default_factory=list)
    encoder_s: float = 0.0
    decoder_s: list[float] = field(default_factory=list)
    logits: list[np.ndarray] | None = None  # low-res logits per click, kept only for parity
    last_mask: np.ndarray | None = None  # the mask after the last click, kept only for overlays

    def noc(self, threshold: float, max_clicks: int) -> int:
        return noc(self.ious, threshold, max_clicks)

    def to_json(self, max_clicks: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "clicks": [[c.y, c.x, int(c.positive)] for c in self.clicks],
            "ious": [round(v, 6) for v in self.ious],
            "obeyed": [bool(v) for v in self.obeyed],
            "noc": {threshold_key(t): self.noc(t, max_clicks) for t in NOC_THRESHOLDS},
            "encoder_ms": self.encoder_s * 1e3,
            "decoder_ms": [t * 1e3 for t in self.decoder_s],
        }


def evaluate_sample(
    predictor: Predictor,
    image: np.ndarray,
    gt: np.ndarray,
    config: EvalConfig,
    name: str = "",
    dataset: str = "",
    keep_logits: bool = False,
    keep_mask: bool = False,
) -> SampleResult:
    """Run the simulated user on one image (see the module docstring for the protocol)."""
    gt = np.asarray(gt, bool)
    result = SampleResult(name=name, dataset=dataset, logits=[] if keep_logits else None)
    t0 = time.perf_counter()
    predictor.set_image(image)
    result.encoder_s = time.perf_counter() - t0

    pred_mask = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    prev_logits: np.ndarray | None = None
    for _ in range(config.max_clicks):
        click = next_click(gt, pred_mask, clicked)
        if click is None:
            break
        clicked[click.y, click.x] = True
        result.clicks.append(click)
        points = np.array([c.xy for c in result.clicks], np.float32)
        labels = np.array([c.label for c in result.clicks], np.float32)
        t0 = time.perf_counter()
        prediction = predictor.predict(points=points, labels=labels, box=None, mask_logits=prev_logits)
        result.decoder_s.append(time.perf_counter() - t0)
        pred_mask = np.asarray(prediction.mask, bool)
        if pred_mask.shape != gt.shape:
            raise InvalidInputError(
                f"{getattr(predictor, 'name', 'predictor')} returned a {pred_mask.shape} mask "
                f"for a {gt.shape} image"
            )
        prev_logits = prediction.low_res_logits
        if keep_logits:
            result.logits.append(np.array(prev_logits, np.float32, copy=True))
        result.ious.append(iou(pred_mask, gt))
        result.obeyed.append(bool(pred_mask[click.y, click.x]) == click.positive)
        if not config.full_curve and result.ious[-1] >= config.stop_iou:
            break
    if keep_mask:
        result.last_mask = pred_mask
    return result


def _progress(items: Sequence[Any], desc: str, show: bool) -> Iterable[Any]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", dynamic_ncols=True)


def evaluate_predictor(
    predictor: Predictor,
    samples: Sequence[EvalSample],
    config: EvalConfig,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[SampleResult]:
    """Every sample through ``evaluate_sample``, with a progress bar."""
    return [
        evaluate_sample(predictor, *s.pair(), config, s.name, s.dataset)
        for s in _progress(samples, desc, progress)
    ]


# --------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------


def aggregate(results: Sequence[SampleResult], config: EvalConfig) -> dict[str, Any]:
    """The summary metrics of one run (the stable keys of results.json).

    SPC (seconds per click) comes two ways: ``amortised`` divides all predictor time, image
    encoding included, by the clicks made; ``decoder`` counts only the ``predict`` calls.
    """
    m = config.max_clicks
    n = len(results)
    nocs = {threshold_key(t): [r.noc(t, m) for r in results] for t in NOC_THRESHOLDS}
    n_clicks = sum(len(r.clicks) for r in results)
    enc = sum(r.encoder_s for r in results)
    dec = sum(sum(r.decoder_s) for r in results)
    curve = miou_per_click([r.ious for r in results], m)
    obeyed = [o for r in results for o in r.obeyed]
    positive = [c.positive for r in results for c in r.clicks[: len(r.obeyed)]]
    nof_out = {}
    for t in NOF_THRESHOLDS:
        count, frac = nof(nocs[threshold_key(t)], m)
        nof_out[threshold_key(t)] = {"count": count, "fraction": frac}
    return {
        "n": n,
        "noc": {k: float(np.mean(v)) if v else None for k, v in nocs.items()},
        "nof": nof_out,
        "spc": {
            "amortised": (enc + dec) / n_clicks if n_clicks else None,
            "decoder": dec / n_clicks if n_clicks else None,
        },
        "encoder_ms": enc / n * 1e3 if n else None,
        "clicks_total": n_clicks,
        "miou_per_click": {str(k): float(curve[k - 1]) for k in MIOU_CLICKS if k <= m},
        "miou_curve": [float(v) for v in curve],
        "refinement": _refinement(curve),
        "obedience": obedience(obeyed, positive),
        "setbacks": setbacks([r.ious for r in results]),
    }


def _refinement(curve: np.ndarray) -> dict[str, Any]:
    """mIoU gain and error closed over ``REFINEMENT_SPAN`` (see ``histosam.backend.evaluation.metrics``)."""
    start, end = REFINEMENT_SPAN
    if len(curve) < end:
        return {"from_click": start, "to_click": end, "miou_gain": None, "error_closed": None}
    return {
        "from_click": start,
        "to_click": end,
        "miou_gain": float(curve[end - 1] - curve[start - 1]),
        "error_closed": error_closed(curve, start, end),
    }


def summarise_run(results: Sequence[SampleResult], config: EvalConfig) -> dict[str, Any]:
    """``aggregate`` over all samples, per dataset when there are several, plus the samples."""
    out = aggregate(results, config)
    datasets = sorted({r.dataset for r in results})
    if len(datasets) > 1:
        out["by_dataset"] = {
            d: aggregate([r for r in results if r.dataset == d], config) for d in datasets
        }
    out["samples"] = [r.to_json(config.max_clicks) for r in results]
    return out


# --------------------------------------------------------------------------------------------
# Parity (two predictors of the same model, e.g. PyTorch and ONNX)
# --------------------------------------------------------------------------------------------


def common_click_prefix(a: SampleResult, b: SampleResult) -> int:
    """How many leading clicks the two runs share (same pixel and label)."""
    k = 0
    for ca, cb in zip(a.clicks, b.clicks, strict=False):
        if ca != cb:
            break
        k += 1
    return k


def max_logit_difference(a: SampleResult, b: SampleResult) -> float | None:
    """Largest |logit_a - logit_b| over the clicks where both saw the same prompt so far.

    The logits after click k depend on clicks 1..k only, so they are comparable exactly on
    the shared click prefix (which also fixes the mask prompt, itself the previous logits).
    """
    if a.logits is None or b.logits is None:
        return None
    k = min(common_click_prefix(a, b), len(a.logits), len(b.logits))
    if k == 0:
        return None
    return max(float(np.max(np.abs(a.logits[i] - b.logits[i]))) for i in range(k))


def evaluate_pair(
    first: Predictor,
    second: Predictor,
    samples: Sequence[EvalSample],
    config: EvalConfig,
    desc: str = "parity",
    progress: bool = True,
) -> tuple[list[SampleResult], list[SampleResult], list[float | None]]:
    """Both predictors on each sample in turn; logits are compared then dropped (memory)."""
    res_a: list[SampleResult] = []
    res_b: list[SampleResult] = []
    diffs: list[float | None] = []
    for s in _progress(samples, desc, progress):
        image, mask = s.pair()
        a = evaluate_sample(first, image, mask, config, s.name, s.dataset, keep_logits=True)
        b = evaluate_sample(second, image, mask, config, s.name, s.dataset, keep_logits=True)
        diffs.append(max_logit_difference(a, b))
        a.logits = b.logits = None
        res_a.append(a)
        res_b.append(b)
    return res_a, res_b, diffs


def parity_summary(
    reference: Sequence[SampleResult],
    candidate: Sequence[SampleResult],
    logit_diffs: Sequence[float | None],
    config: EvalConfig,
    reference_key: str,
    candidate_key: str,
) -> dict[str, Any]:
    """How far ``candidate`` (ONNX) is from ``reference`` (PyTorch), sample by sample.

    Flagged when more than 2 % of samples differ in NoC at any of the NoC thresholds.
    """
    m = config.max_clicks
    n = len(reference)
    noc_diff: dict[str, dict[str, Any]] = {}
    differs_any = np.zeros(n, bool)
    for t in NOC_THRESHOLDS:
        d = np.array([c.noc(t, m) - r.noc(t, m) for r, c in zip(reference, candidate, strict=True)])
        differs_any |= d != 0
        noc_diff[threshold_key(t)] = {
            "per_sample": [int(v) for v in d],
            "n_different": int(np.count_nonzero(d)),
            "max_abs": int(np.max(np.abs(d))) if n else 0,
        }
    identical = sum(
        1
        for r, c in zip(reference, candidate, strict=True)
        if len(r.clicks) == len(c.clicks) == common_click_prefix(r, c)
    )
    finite = [d for d in logit_diffs if d is not None]
    ref_agg, cand_agg = aggregate(reference, config), aggregate(candidate, config)

    def ratio(kind: str) -> float | None:
        a, b = cand_agg["spc"][kind], ref_agg["spc"][kind]
        return a / b if a is not None and b else None

    fraction_different = float(differs_any.mean()) if n else 0.0
    return {
        "reference": reference_key,
        "candidate": candidate_key,
        "n": n,
        "noc_difference": noc_diff,
        "n_noc_different": int(differs_any.sum()),
        "fraction_noc_different": fraction_different,
        "identical_click_sequences": identical,
        "max_low_res_logit_difference": max(finite) if finite else None,
        "spc_ratio": {"amortised": ratio("amortised"), "decoder": ratio("decoder")},
        "flag_threshold": PARITY_FLAG_FRACTION,
        "flagged": fraction_different > PARITY_FLAG_FRACTION,
    }
