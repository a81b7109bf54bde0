"""Edge snapping: the model's mask edge moved onto the image's own colour edge, in a thin band.

Why. Most of the masks that stall just short of 90 % IoU are wrong in a thin rim along the
annotated boundary (model card, "The last 10 %"). The decoder cannot place an edge more finely
than its 64x64 embedding (one token is a dozen pixels of a patch), and a click in a narrow error
band moves the mask by a whole disk. The full-resolution image knows where the gland ends; the
model knows which side is which.

What. Pixels within ``band`` low-res pixels of the model's mask edge are decided again by a
random walker (Grady 2006) on the image's 4-neighbour graph in CIELAB (weights
``exp(-beta d^2 / mean d^2)``, the mean over the band's edges): the band's outer rim is pinned
to the model's answer (1 inside the mask, 0 outside), click disks to their labels, and each band
pixel keeps the label it is more likely to reach. The answer is the path of least colour
resistance between the two pinned sides, so the edge moves at most ``band`` low-res pixels, onto
the strongest colour change nearby. Pixels outside the band keep the model's answer: a click's
far-reaching effect is still the model's.

Cost. One sparse symmetric system over the band's pixels per click. The band is measured in
low-res pixels so that it follows the model's error, and the walker runs on a copy of the image
at most ``working_side`` px a side (1.5 px per low-res pixel at 384 px), so its size is bounded
whatever the region a user opens (``histosam bench serve --edge-snap on`` gives its cost per click as
a ratio to the decoder). The band changes with every click, so nothing of the factorisation
carries over: each click orders (AMD) and factors its band afresh, and the ordering is most of it.

When. It belongs to the weights it was measured for, like the mask calibration: the shipped
default's bundle manifest says ``"edge_snap": true`` and servers follow it unless told
``--edge-snap on|off``; what it does to each validation set is measured in
training/weights/MODEL_CARD.md ("Edge snapping"), every variant tried with it. Without smoothing
the edge followed stromal nuclei (as dark as the epithelium's) and carved lumens out of glands,
hence the Gaussian smoothing of the working copy and the hole filling. Numpy/scipy/OpenCV on the serving side: the
server and the evaluator's wrapper both call ``snap_mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import qdldl
import scipy.sparse as sp
from scipy.ndimage import label as label_regions
from scipy.sparse.linalg import spsolve

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.predictor import Prediction, Predictor
from histosam.backend.core.settings import Number, SettingsFile, Whole
from histosam.backend.core.transforms import LOW_RES, validate_rgb
from histosam.backend.core.working_grid import WorkingGrid

DEFAULT_CONFIG = Path(__file__).with_name("edge_snap.yaml")
EDGE_FLOOR = 1e-6  # keeps every band pixel connected to a pinned one (a flat island still gets an answer)


@dataclass(frozen=True)
class EdgeSnapSettings(SettingsFile):
    """How far and how hard the edge snaps. Defaults live in ``edge_snap.yaml`` beside this module."""

    WHAT: ClassVar[str] = "edge-snap"
    DEFAULT_CONFIG: ClassVar[Path] = DEFAULT_CONFIG
    ZERO_ALLOWED: ClassVar[tuple[str, ...]] = ("smoothing",)

    band: Number = 3.0  # half-width of the re-decided band around the model's edge, low-res pixels
    beta: Number = 5.0  # colour-edge contrast (larger: the edge follows strong colour changes only)
    smoothing: Number = 1.5  # Gaussian sigma on the working copy, working pixels (0: none): nuclei are not edges
    working_side: Whole = 384  # longest side of the copy the walker runs on, pixels
    click_radius: Number = 5.0  # pinned disk around each click, full-resolution pixels

    def __post_init__(self) -> None:
        self.check_positive()
        if self.working_side < 16:
            raise InvalidInputError(f"edge-snap working_side must be at least 16, got {self.working_side}")


def working_lab(image: np.ndarray, settings: EdgeSnapSettings) -> np.ndarray:
    """The (h, w, 3) uint8 CIELAB copy the walker runs on, at most ``working_side`` px a side.

    Made once per image (<= 0.44 MB at 384 px) and kept with its embedding.
    """
    rgb = validate_rgb(image)
    lab = cv2.cvtColor(WorkingGrid.for_size(rgb.shape[0], rgb.shape[1], settings.working_side).shrink(rgb), cv2.COLOR_RGB2LAB)
    if settings.smoothing > 0:
        lab = cv2.GaussianBlur(lab, (0, 0), settings.smoothing)
    return lab


def _holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels not 4-connected to the image border (scipy's ``binary_fill_holes`` minus
    the mask), by one OpenCV flood fill from a padding ring: a fraction of the iterated dilations'
    cost, the same pixels."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    cv2.floodFill(padded, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1, flags=4)
    return padded[1:-1, 1:-1] == 0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


SOLVERS = ("ldl", "superlu")  # snap_mask's solve: sparse LDL^T (qdldl), or the SuperLU reference


def _walk(lab: np.ndarray, pinned_value: np.ndarray, free: np.ndarray, beta: float, solver: str = "ldl") -> np.ndarray:
    """Random-walker probability of label 1 on the ``free`` pixels (bool (h, w)), the rest pinned.

    Solves ``L_ff x = -L_fp x_p`` (the combinatorial Dirichlet problem) by a sparse direct solve:
    an LDL^T factorisation of the upper triangle (qdldl, AMD order; the band is a thin strip, so
    the factor stays small), or SuperLU's general ``spsolve`` (``solver="superlu"``, the reference).
    Iterative solvers stall here: a pixel walled off by strong colour edges hangs on 1e-6 weights.
    """
    if solver not in SOLVERS:
        raise InvalidInputError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    h, w = free.shape
    n = int(free.sum())
    index = np.full((h, w), -1, np.int64)
    index[free] = np.arange(n)
    lab = lab.astype(np.float32)
    d_h = ((lab[:, 1:] - lab[:, :-1]) ** 2).sum(-1)
    d_v = ((lab[1:] - lab[:-1]) ** 2).sum(-1)
    in_h = free[:, 1:] | free[:, :-1]
    in_v = free[1:] | free[:-1]
    mean = (d_h[in_h].sum() + d_v[in_v].sum()) / max(1, int(in_h.sum() + in_v.sum())) + 1e-12
    diag = np.zeros(n)
    rhs = np.zeros(n)
    rows, cols, vals = [], [], []
    for a, b, d, pa, pb in (
        (index[:, :-1], index[:, 1:], d_h, pinned_value[:, :-1], pinned_value[:, 1:]),
        (index[:-1], index[1:], d_v, pinned_value[:-1], pinned_value[1:]),
    ):
        weight = np.exp(-beta * d / mean) + EDGE_FLOOR
        fa, fb = a >= 0, b >= 0
        diag += np.bincount(a[fa], weight[fa], n) + np.bincount(b[fb], weight[fb], n)
        only_a, only_b = fa & ~fb, fb & ~fa  # an edge to a pinned neighbour feeds the right-hand side
        rhs += np.bincount(a[only_a], (weight * pb)[only_a], n) + np.bincount(b[only_b], (weight * pa)[only_b], n)
        both = fa & fb  # a < b: pixels are numbered in row-major order, b is right of or below a
        rows.append(a[both])
        cols.append(b[both])
        vals.append(-weight[both])
    ar = np.arange(n)
    upper = sp.csc_matrix(
        (np.concatenate([*vals, diag]), (np.concatenate([*rows, ar]), np.concatenate([*cols, ar]))), shape=(n, n)
    )
    if solver == "ldl":
        return np.asarray(qdldl.Solver(upper, upper=True).solve(rhs))
    return np.asarray(spsolve((upper + sp.triu(upper, 1).T).tocsc(), rhs))


def snap_mask(
    lab: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    settings: EdgeSnapSettings,
    solver: str = "ldl",
) -> np.ndarray:
    """The model's (H, W) bool ``mask`` with its edge snapped (see the module docstring).

    ``lab`` is ``working_lab``'s copy of the same image; ``points`` are (x, y) in full-resolution
    pixels with ``labels`` 1 / 0 (other labels, e.g. box corners, are not clicks). ``solver``
    picks the sparse solve (``SOLVERS``; "superlu" is the earlier one, kept as the reference).
    """
    mask = np.asarray(mask, bool)
    full_h, full_w = mask.shape
    h, w = lab.shape[:2]
    scaled = (h, w) != (full_h, full_w)
    small = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) if scaled else mask.astype(np.uint8)
    # One low-res pixel covers max(H, W) / 256 full-resolution pixels: the band follows the model's scale.
    radius = max(1, round(settings.band * max(h, w) / LOW_RES))
    kernel = _disk(radius)
    band = (cv2.dilate(small, kernel) != cv2.erode(small, kernel))
    if not band.any():
        return mask  # empty or full mask: no edge to move
    pinned_value = small.astype(np.float64)
    grid = WorkingGrid((full_h, full_w), (h, w))
    click_r = grid.radius(settings.click_radius)
    clicks = np.zeros((h, w), np.uint8)
    negative = np.zeros((h, w), bool)
    for (x, y), label in zip(np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels).reshape(-1), strict=True):
        if label not in (0, 1) or not (math.isfinite(x) and math.isfinite(y)):
            continue
        disk = np.zeros((h, w), np.uint8)
        cv2.circle(disk, grid.pixel(x, y), click_r, 1, -1)
        hit = disk.astype(bool)
        clicks |= disk
        pinned_value[hit] = float(label)
        negative = (negative | hit) if label == 0 else (negative & ~hit)  # a later click wins
    free = band & ~clicks.astype(bool)
    if not free.any():
        return mask
    ys, xs = np.nonzero(free)
    y0, y1 = max(0, ys.min() - 1), min(h, ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(w, xs.max() + 2)
    crop = (slice(y0, y1), slice(x0, x1))
    x = _walk(lab[crop], pinned_value[crop], free[crop], settings.beta, solver)
    snapped = small.astype(bool)
    snapped[band] = pinned_value[band] >= 0.5  # click disks in the band carry their label
    snapped_crop = snapped[crop]
    snapped_crop[free[crop]] = x >= 0.5
    # Snapping moves edges; it does not change topology: holes it opened (a band crossing a gland's
    # white lumen) are filled; holes the model left, and holes around a negative click (the user
    # asked for them), stay.
    opened = _holes(snapped) & ~_holes(small.astype(bool))
    if opened.any() and negative.any():
        holes, _ = label_regions(opened)
        asked = np.unique(holes[negative & opened])
        opened &= ~np.isin(holes, asked[asked > 0])
    snapped |= opened
    if not scaled:
        return snapped
    # Back to full resolution: only the band changes, resampled smoothly.
    band_full = cv2.resize(band.astype(np.uint8), (full_w, full_h), interpolation=cv2.INTER_NEAREST).astype(bool)
    up = cv2.resize(snapped.astype(np.float32), (full_w, full_h), interpolation=cv2.INTER_LINEAR) >= 0.5
    return np.where(band_full, up, mask)


class EdgeSnappingPredictor:
    """Any ``Predictor`` whose masks are edge-snapped, as the server does it.

    ``low_res_logits`` stay the model's own: they are the mask prompt the model was trained to
    receive with the next click.
    """

    def __init__(self, inner: Predictor, settings: EdgeSnapSettings) -> None:
        self.inner = inner
        self.settings = settings
        self.transform = getattr(inner, "transform", None)
        self.name = f"{getattr(inner, 'name', 'model')}+edge-snap"
        self._lab: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.inner.set_image(image)
        self._lab = working_lab(image, self.settings)

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> Prediction:
        p = self.predict_unsnapped(points=points, labels=labels, box=box, mask_logits=mask_logits)
        return self.snap(p, points, labels)

    def predict_unsnapped(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> Prediction:
        """The model's own answer; ``snap`` finishes it. A wrapper that may replace the mask
        (click propagation) asks for this first, so it never pays for a snap it discards."""
        if self._lab is None:
            raise InvalidInputError("set_image must be called before predict")
        return self.inner.predict(points=points, labels=labels, box=box, mask_logits=mask_logits)

    def snap(self, p: Prediction, points: np.ndarray | None, labels: np.ndarray | None) -> Prediction:
        """``p`` with its mask edge-snapped (logits and predicted IoU untouched)."""
        if self._lab is None:
            raise InvalidInputError("set_image must be called before predict")
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, np.float64).reshape(-1, 2)
        lbl = np.zeros((0,)) if labels is None else np.asarray(labels).reshape(-1)
        mask = snap_mask(self._lab, p.mask, pts, lbl, self.settings)
        return Prediction(mask=mask, low_res_logits=p.low_res_logits, iou=p.iou)
