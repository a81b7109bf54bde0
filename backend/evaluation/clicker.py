"""Where to click next: the RITM evaluation rule and the training click sampler.

Both are pure numpy/OpenCV so that the evaluator (serving install, no torch) and the training
loop (torch) place clicks with the same code.

Evaluation (``next_click``) follows the RITM protocol (Sofiiuk et al. 2022, ``isegm/inference/
clicker.py``) exactly, because NoC numbers are only comparable between papers when the
simulated user is the same: the click goes to the pixel of the false-negative or false-positive
region farthest from that region's boundary, the image edge counting as boundary. It is
deterministic: ties between positions go to the first pixel in row-major order, ties between
the two regions go to the negative click.

Training (``sample_training_click``) needs variety, not determinism: it draws a random pixel
from the interior of the chosen region (distance to its border at least half the maximum), so
the model sees clicks like a person would place them, well inside the error and not always on
the same pixel.

Clicks are stored as (y, x) (array indexing); SAM's point prompts are (x, y): use
``Click.xy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError


@dataclass(frozen=True)
class Click:
    """One simulated click: pixel row ``y``, column ``x``, and whether it adds (positive)."""

    y: int
    x: int
    positive: bool

    @property
    def xy(self) -> tuple[int, int]:
        """The point in SAM's (x, y) order."""
        return self.x, self.y

    @property
    def label(self) -> int:
        """SAM's point label: 1 positive, 0 negative."""
        return 1 if self.positive else 0


def squared_padded_distance(region: np.ndarray) -> np.ndarray:
    """Squared exact Euclidean distance of each region pixel to the nearest non-region pixel.

    The region is padded with a one-pixel zero border before the transform and the border is
    cropped afterwards, so the image edge counts as outside: a region touching the edge is
    thin there, as it is for a person looking at the crop. Without the padding the edge would
    not count and clicks would drift onto the image border.

    OpenCV's exact transform (``DIST_MASK_PRECISE``, as RITM computes it) returns float32;
    every squared distance is a whole number, so rounding the square recovers it exactly
    (float64). The clicker compares and ranks these squares: the square root is strictly
    increasing, so the maxima, their order and every tie are the distances' own, and the root
    (half the clicker's time on a 640-px patch) is never taken per click.
    """
    padded = np.pad(np.asarray(region, bool).view(np.uint8), 1, mode="constant", constant_values=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return np.rint(np.square(dist, dtype=np.float64))


def padded_distance(region: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each region pixel to the nearest non-region pixel, the image
    edge counting as outside (``squared_padded_distance``): the value scipy's
    ``distance_transform_edt`` gives, bit for bit.
    """
    return np.sqrt(squared_padded_distance(region))


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, bool)
    pred = np.asarray(pred, bool)
    if gt.ndim != 2 or gt.shape != pred.shape:
        raise InvalidInputError(
            f"ground truth {gt.shape} and prediction {pred.shape} must be 2-D and the same shape"
        )
    return gt, pred


def next_click(
    gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray | None = None
) -> Click | None:
    """The RITM evaluation click for prediction ``pred`` against ground truth ``gt``.

    1. ``fn = gt & ~pred``, ``fp = ~gt & pred``;
    2. exact EDT of each, with a one-pixel zero padding (``padded_distance``; compared as
       squares, ``squared_padded_distance``, which ranks the same);
    3. both maps multiplied by the not-yet-clicked map (``~clicked``): a pixel is never
       chosen twice;
    4. positive if ``max(dt_fn) > max(dt_fp)`` (strict: a tie gives a negative click);
    5. the first maximum of the chosen map in row-major order (smallest y, then x).

    Returns None when no unclicked error pixel is left (both maps all zero): the prediction is
    perfect, or every error pixel was already clicked. ``clicked`` is a bool map of pixels
    clicked so far (not modified here).
    """
    gt, pred = _check_pair(gt, pred)
    dt_fn = squared_padded_distance(gt & ~pred)
    dt_fp = squared_padded_distance(~gt & pred)
    if clicked is not None:
        clicked = np.asarray(clicked, bool)
        if clicked.shape != gt.shape:
            raise InvalidInputError(f"clicked map {clicked.shape} does not match {gt.shape}")
        dt_fn[clicked] = 0.0
        dt_fp[clicked] = 0.0
    max_fn, max_fp = float(dt_fn.max()), float(dt_fp.max())
    if max_fn == 0.0 and max_fp == 0.0:
        return None
    positive = max_fn > max_fp
    chosen = dt_fn if positive else dt_fp
    # argmax returns the first occurrence in C (row-major) order: smallest y, then x.
    y, x = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
    return Click(int(y), int(x), bool(positive))


def _random_interior_pixel(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random pixel of ``region`` whose border distance is >= half the maximum.

    The region must be non-empty, so the maximum is >= 1 and every candidate lies inside.
    """
    dt = padded_distance(region)
    ys, xs = np.nonzero(dt >= dt.max() / 2.0)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def sample_training_click(
    gt: np.ndarray, pred: np.ndarray | None, rng: np.random.Generator
) -> tuple[int, int, bool] | None:
    """A random click for training, as (y, x, positive).

    ``pred is None`` (first click): a positive click at a random interior pixel of the object.
    Otherwise the click corrects the larger error region by area (false negatives vs false
    positives; equal areas go to the false negatives, i.e. a positive click), at a random
    pixel of its interior. The returned pixel always lies in the region chosen. Returns None
    when there is nothing to click (empty object on the first click, perfect prediction
    afterwards).
    """
    gt = np.asarray(gt, bool)
    if gt.ndim != 2:
        raise InvalidInputError(f"ground truth must be 2-D, got shape {gt.shape}")
    if pred is None:
        if not gt.any():
            return None
        y, x = _random_interior_pixel(gt, rng)
        return y, x, True
    gt, pred = _check_pair(gt, pred)
    fn = gt & ~pred
    fp = ~gt & pred
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn == 0 and n_fp == 0:
        return None
    positive = n_fn >= n_fp
    y, x = _random_interior_pixel(fn if positive else fp, rng)
    return y, x, positive
