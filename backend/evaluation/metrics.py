"""Interactive segmentation metrics: IoU, NoC, NoF, mIoU per click, click obedience.

Conventions (RITM's, so numbers compare with the literature):

* IoU is computed in float32 on boolean masks; two empty masks have IoU 1.
* NoC@t is the 1-based index of the first click whose IoU reaches ``t``; if none does, it is
  ``max_clicks``.
* NoF@t counts samples whose NoC@t equals ``max_clicks``. A sample that reaches ``t`` exactly
  on the last allowed click is therefore counted as a failure too (RITM's
  ``noc == max_clicks``); this is slightly pessimistic but keeps NoF a function of NoC alone.
* mIoU at click k averages IoU after k clicks over samples. Curves that stopped early (target
  reached, or no error pixel left to click) are padded with their last IoU, i.e. the
  simulated user stops clicking and the mask stays as it was.
* Error closed from click a to b is (mIoU@b - mIoU@a) / (1 - mIoU@a): the share of the error
  left after click a that clicks a+1..b removed. Unlike the plain gain mIoU@b - mIoU@a it does
  not punish a model for a good first click (a model at 0.72 after one click can gain at most
  0.28), so it is the fair measure of whether later clicks refine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOC_THRESHOLDS: tuple[float, ...] = (0.80, 0.85, 0.90)
NOF_THRESHOLDS: tuple[float, ...] = (0.85, 0.90)
MIOU_CLICKS: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
REFINEMENT_SPAN: tuple[int, int] = (1, 10)  # the clicks "error closed" is reported between
SETBACK_IOU = 0.10  # a click after which the mask's IoU fell by more than this is a setback


def threshold_key(threshold: float) -> str:
    """0.85 -> "85", the results.json key for a threshold."""
    return str(int(round(threshold * 100)))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks, in float32 (1.0 if both are empty)."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    inter = np.count_nonzero(pred & gt)
    return float(np.float32(inter) / np.float32(union))


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> int:
    """Number of clicks to reach ``threshold``: first index with IoU >= threshold, plus one."""
    arr = np.asarray(ious, np.float64)[:max_clicks]
    hits = np.nonzero(arr >= threshold)[0]
    return int(hits[0]) + 1 if len(hits) else int(max_clicks)


def nof(nocs: Sequence[int], max_clicks: int) -> tuple[int, float]:
    """Failures (NoC == max_clicks, RITM's convention) as (count, fraction of samples)."""
    arr = np.asarray(nocs)
    count = int(np.count_nonzero(arr >= max_clicks))
    return count, (count / len(arr) if len(arr) else 0.0)


def padded_curve(ious: Sequence[float], max_clicks: int) -> np.ndarray:
    """An IoU curve of exactly ``max_clicks`` values, padded with its last IoU.

    An empty curve (no click was possible) pads with 0.
    """
    arr = np.asarray(ious, np.float64)[:max_clicks]
    last = arr[-1] if len(arr) else 0.0
    return np.concatenate([arr, np.full(max_clicks - len(arr), last)])


def miou_per_click(curves: Sequence[Sequence[float]], max_clicks: int) -> np.ndarray:
    """Mean IoU after each click 1..max_clicks over samples (curves padded, see module doc)."""
    if not curves:
        return np.zeros(max_clicks)
    return np.stack([padded_curve(c, max_clicks) for c in curves]).mean(axis=0)


def error_closed(curve: Sequence[float], start: int, end: int) -> float | None:
    """Share of the error left after click ``start`` that clicks up to ``end`` removed.

    ``curve`` is an mIoU-per-click curve (1-based clicks). None when the curve is shorter than
    ``end`` or already perfect at ``start`` (nothing left to close). Negative when later clicks
    made the masks worse.
    """
    if not 1 <= start < end or len(curve) < end:
        return None
    first, last = float(curve[start - 1]), float(curve[end - 1])
    if first >= 1.0:
        return None
    return (last - first) / (1.0 - first)


def obedience(obeyed: Sequence[bool], positive: Sequence[bool]) -> dict[str, float | None]:
    """Fraction of positive and of negative clicks the prediction right after them obeyed.

    A click is obeyed when the clicked pixel carries the clicked label in the next mask
    (positive -> inside, negative -> outside). None where there was no click of that kind.
    """
    ok = np.asarray(obeyed, bool)
    pos = np.asarray(positive, bool)
    out: dict[str, float | None] = {}
    for key, sel in (("positive", pos), ("negative", ~pos)):
        out[key] = float(ok[sel].mean()) if sel.any() else None
    return out


def setbacks(curves: Sequence[Sequence[float]], drop: float = SETBACK_IOU) -> dict[str, float | int | None]:
    """Clicks that made the mask clearly worse: IoU fell by more than ``drop`` since the click before.

    Why. NoC and mIoU average over images and clicks; a user also sees each click's answer, and a
    correction that throws away a tenth of a good mask is one they must undo. Counted over the
    clicks actually made after the first (stopped curves are not padded), so a run that reaches
    its target early is not credited with clicks it never made. ``share`` is None without any
    second click.
    """
    made = 0
    worse = 0
    for curve in curves:
        arr = np.asarray(curve, np.float64)
        made += max(0, len(arr) - 1)
        worse += int(np.count_nonzero(arr[1:] < arr[:-1] - drop))
    return {"drop": drop, "clicks": made, "count": worse, "share": worse / made if made else None}
