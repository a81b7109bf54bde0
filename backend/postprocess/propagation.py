"""Click propagation: the model's mask is the prior of a click-seeded random walker.

Why. The decoder reads a frozen 64x64 image embedding, so a click changes the mask only near
itself (issue 9). On tumour *regions* that is fatal: twenty clicks barely moved the decoder's
mask on OCDC patches, while a click-seeded random walker, which spreads each click over the
region of similar colour, kept closing the error. The random walker alone is poor where the
model is good (the first click on a gland). This module lets each do what it is good at;
the figures are in training/weights/MODEL_CARD.md ("Click propagation").

What. Grady's random walker with a prior (Grady 2005, "Multilabel random walker image
segmentation using prior models"): on a downscaled copy of the image, minimise

    x^T L x + sum_i g_i [p_i (1 - x_i)^2 + (1 - p_i) x_i^2]

over the foreground probability ``x`` of every pixel, with ``x`` pinned to the click's label on
a disk around each click. ``L`` is the 4-neighbour graph Laplacian in CIELAB with weights
``exp(-beta d^2 / mean(d^2))``; ``p = sigmoid(logit / temperature)`` is the model's
probability; ``g_i = gamma |2 p_i - 1|`` trusts the model where it is confident and lets the
clicks decide where it is not. The minimiser solves one sparse symmetric positive definite
system, ``(L + diag(g)) x = g p`` (clicks are pins with a weight far above any edge), by a
direct factorisation: iterative solvers stall on these ill-conditioned systems (edge weights
down to 1e-6, prior weights of 1e-4, pins of 1e4) and leave wrong labels far from the clicks;
an algebraic-multigrid preconditioner (pyamg, hierarchy set up once per image, Galerkin
operators redone per click) needed as much time per click as the factorisation. The system's
sparsity pattern is the image's: only the diagonal changes with a click. So the fill-reducing
ordering and the symbolic analysis of an LDL^T factorisation (``qdldl``: AMD order, elimination
tree) are done once per image, kept with the embedding, and a click refactors the numbers only
(``ImageGraph.solve``), a sparse Cholesky without SuperLU's pivoting LU machinery.

The answer keeps the model's detail: the walker's *change* ``x - p``, upsampled, is added to the
model's full-resolution probability, so where the walker agrees with the model the mask is the
model's own (the working copy is 160 px on its longest side, coarser than the model's
256x256 logits).

Two spreads (``SPREADS``). "model" is the above: every click spreads and the colour graph
re-decides the model's edges as well. "correction" spreads only what the clicks contradict: the
walker solves for the change ``d = x - p`` alone, 0-targeted everywhere with one prior weight
(``correction_gamma`` x ``CORRECTION_CONFIDENCE``) and with each click disk's mean pinned to
``label - p`` (``CorrectionSpread``), so a click the model already obeys changes nothing and a
correction moves the mask over the region of its colour. Its matrix is fixed per image, so a
click costs a cached solve, not a factorisation. The first keeps tumour regions moving when the
model is lost, the second keeps a good gland mask intact while its corrections still spread.

When. Spreading every click is right for regions the model cannot delineate and wrong for ones
it can, so besides "on" and "off" there is "auto": spread every click ("model") on an image when
the model's answer to its first click is unsure, i.e. its mean confidence ``mean |2p - 1|`` is
below ``auto_confidence``, or once the model has ignored correction clicks (a confident wrong
answer: ``click_ignored``); otherwise spread only the corrections (``auto_when_sure:
correction``, shipped) or keep the model's own mask (``own``, edge-snapped by the caller). The
decision, once on, holds for the rest of the image's clicks so that a session does not flip
between two kinds of answer as the model grows surer with clicks (deciding per click lost the
walker's gains late in a session).

Everything here is numpy/scipy on the serving side: the server, the evaluator and both
predictors use it, so what ``histosam evaluate`` measures is what a click returns.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import qdldl
import scipy.sparse as sp
from scipy.sparse.linalg import splu

from histosam.backend.bundles.catalog import SERVED_PROPAGATION
from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.predictor import Prediction, Predictor
from histosam.backend.core.settings import Number, SettingsFile, Text, Whole
from histosam.backend.core.transforms import LOW_RES, ImageTransform, validate_rgb
from histosam.backend.core.working_grid import WorkingGrid

DEFAULT_CONFIG = Path(__file__).with_name("propagation.yaml")
MODES = ("off", "on", "auto")  # when clicks propagate (see "When" above)
SERVED_DEFAULT = SERVED_PROPAGATION  # what a click that does not choose gets from `histosam serve`
PIN_WEIGHT = 1e4  # pins a clicked pixel: far above any edge weight (<= 1) or prior weight
PRIOR_FLOOR = 1e-4  # keeps the system definite where the model is undecided (p = 0.5)
# What the walker spreads. "model": every click, with the model's probability as a weak prior
# (gamma): the colour graph re-decides the model's edges too. "correction": only what the clicks
# contradict (the walker solves for the change x - p, each click disk's mean pinned to label - p,
# CorrectionSpread): where no click disagrees the mask stays the model's.
SPREADS = ("model", "correction")
AUTO_WHEN_SURE = ("correction", "own")
CORRECTION_CONFIDENCE = 0.5  # the correction spread's prior weight is correction_gamma x this, everywhere
CORRECTION_COLUMNS = 32  # per image: one cached column per click disk (float32, one value per working pixel)


@dataclass(frozen=True)
class PropagationSettings(SettingsFile):
    """How strongly clicks spread. Defaults live in ``propagation.yaml`` beside this module."""

    WHAT: ClassVar[str] = "propagation"
    DEFAULT_CONFIG: ClassVar[Path] = DEFAULT_CONFIG
    ZERO_ALLOWED: ClassVar[tuple[str, ...]] = ("auto_ignored_clicks",)

    gamma: Number = 0.003  # prior weight at full model confidence (smaller: clicks spread further)
    beta: Number = 5.0  # edge contrast (larger: colour edges stop the spread harder)
    temperature: Number = 4.0  # logit scale of the model's probability
    working_side: Whole = 160  # longest side of the copy the walker runs on, pixels
    click_radius: Number = 5.0  # pinned disk around each click, full-resolution pixels
    auto_confidence: Number = 0.05  # "auto" propagates when the first step's mean |2p - 1| is below this
    # ... or once this many correction clicks were ignored by the model (0: never for that reason)
    auto_ignored_clicks: Whole = 1
    correction_gamma: Number = 0.003  # prior weight when only the clicks' corrections spread (see SPREADS)
    # what "auto" answers on an image it does not spread: "correction" (the model's mask, moved only
    # where a click contradicts it, and that correction spread) or "own" (the model's mask, edge-snapped)
    auto_when_sure: Text = "correction"

    def __post_init__(self) -> None:
        self.check_positive()
        if self.auto_when_sure not in AUTO_WHEN_SURE:
            raise InvalidInputError(f"propagation auto_when_sure must be one of {', '.join(AUTO_WHEN_SURE)}, "
                                    f"got {self.auto_when_sure!r}")
        if self.auto_confidence > 1:
            raise InvalidInputError(f"propagation auto_confidence is a mean |2p - 1|, at most 1, got {self.auto_confidence}")
        if self.working_side < 8:
            raise InvalidInputError(f"propagation working_side must be at least 8, got {self.working_side}")


def _probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logits / temperature), clipped so large logits cannot overflow exp."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits / temperature, -30.0, 30.0)))


def model_confidence(low_res: np.ndarray, transform: ImageTransform, hw: tuple[int, int], temperature: float) -> float:
    """Mean ``|2p - 1|`` of the model's answer over the image's part of the low-res frame.

    0 when every pixel is a coin flip, 1 when every pixel is certain; "auto" propagation's test.
    """
    lh, lw = transform.low_res_shape(*hw)
    valid = np.asarray(low_res, np.float32).reshape(LOW_RES, LOW_RES)[:lh, :lw]
    return float(np.mean(np.abs(2.0 * _probability(valid, temperature) - 1.0)))


def click_ignored(low_res: np.ndarray, transform: ImageTransform, hw: tuple[int, int],
                  point: np.ndarray, label: int) -> bool:
    """Does the model's answer contradict ``point`` at the point itself (its mask, as a user
    sees it, gives the pixel the other label)?

    "auto" propagation's evidence of a confident wrong answer: a model that is sure of a wrong
    region looks confident to ``model_confidence`` but ignores the click that corrects it.
    Read on the low-res logits (dilated like ``ImageTransform.mask_from_logits``) at the
    point's low-res pixel, so it costs nothing beside the decoder.
    """
    h, w = hw
    lh, lw = transform.low_res_shape(h, w)
    x, y = float(point[0]), float(point[1])
    if label not in (0, 1) or not (math.isfinite(x) and math.isfinite(y)):
        return False
    col = int(min(lw - 1, max(0, x * lw / w)))
    row = int(min(lh - 1, max(0, y * lh / h)))
    logits = np.asarray(low_res, np.float32).reshape(LOW_RES, LOW_RES)
    d = transform.mask_dilation
    value = logits[max(0, row - d):row + d + 1, max(0, col - d):col + d + 1].max() if d else logits[row, col]
    return bool(value > 0) != bool(label == 1)


def auto_propagates(first_confidence: float, ignored_clicks: int, settings: PropagationSettings) -> bool:
    """"auto": spread the clicks on this image? Yes when the model was unsure of its first answer,
    or once it has ignored ``auto_ignored_clicks`` correction clicks (a confident wrong answer).

    Both tests only look back, so the choice is a function of the click history: the same
    clicks always get the same kind of answer, and once on it stays on for the session.
    """
    if first_confidence < settings.auto_confidence:
        return True
    return settings.auto_ignored_clicks > 0 and ignored_clicks >= settings.auto_ignored_clicks


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInputError(f"propagation must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _laplacian(lab: np.ndarray, beta: float) -> sp.csc_matrix:
    """4-neighbour graph Laplacian of an (h, w, 3) float image, weights exp(-beta d^2 / mean d^2).

    Built from its five diagonals (pixel i's right neighbour is i + 1, its lower one i + w).
    """
    h, w = lab.shape[:2]
    d_h = ((lab[:, 1:] - lab[:, :-1]) ** 2).sum(-1)
    d_v = ((lab[1:] - lab[:-1]) ** 2).sum(-1)
    mean = (d_h.sum() + d_v.sum()) / max(1, d_h.size + d_v.size) + 1e-12
    # The small floor keeps every pixel connected (a flat-coloured island still gets an answer).
    right = np.zeros((h, w))
    right[:, :-1] = np.exp(-beta * d_h / mean) + 1e-6  # weight to the right neighbour; 0 at the row end
    down = np.exp(-beta * d_v / mean).ravel() + 1e-6
    right = right.ravel()[:-1]
    degree = np.zeros(h * w)
    degree[:-1] += right
    degree[1:] += right
    degree[:-w] += down
    degree[w:] += down
    return sp.diags([degree, -right, -right, -down, -down], [0, 1, -1, w, -w], format="csc")


def nested_dissection(h: int, w: int, leaf: int = 6) -> np.ndarray:
    """A fill-reducing elimination order of an h x w 4-neighbour grid (George 1973).

    Split the grid by its middle row or column, order both halves recursively, the separator
    last. The grid is the same for every click on an image, so the order is computed once,
    and on a grid it leaves less fill than SuperLU's own minimum-degree ordering.
    """
    idx = np.arange(h * w).reshape(h, w)
    parts: list[np.ndarray] = []
    stack = [(0, h, 0, w, False)]
    while stack:  # iterative, so a large grid cannot exhaust the recursion limit
        r0, r1, c0, c1, is_separator = stack.pop()
        if is_separator or (r1 - r0) * (c1 - c0) <= leaf * leaf or min(r1 - r0, c1 - c0) < 3:
            parts.append(idx[r0:r1, c0:c1].ravel())
            continue
        if r1 - r0 >= c1 - c0:
            m = (r0 + r1) // 2
            halves, separator = [(r0, m, c0, c1), (m + 1, r1, c0, c1)], (m, m + 1, c0, c1)
        else:
            m = (c0 + c1) // 2
            halves, separator = [(r0, r1, c0, m), (r0, r1, m + 1, c1)], (r0, r1, m, m + 1)
        # Popped in reverse: first half, second half, then the separator.
        stack.append((*separator, True))
        stack.extend((*half, False) for half in reversed(halves))
    return np.concatenate(parts)


SOLVERS = ("ldl", "superlu")  # ImageGraph.solve: the per-image LDL^T, or the per-click SuperLU reference


class LdlFactor:
    """``M + diag(d)`` solved for any ``d``: a fixed SPD pattern analysed once, refactored per solve.

    The analysis (AMD ordering, elimination tree, sizes of the factor) depends on the pattern
    only, so it is done once, by ``analyse`` (at OpenImage) or by the first ``solve``; every
    later ``solve`` refactors the numbers in that analysis (qdldl's ``update``). One solver object
    holds one factorisation, so concurrent solves on the same image (two sessions on one slide
    region) take turns.
    """

    def __init__(self, matrix: sp.spmatrix) -> None:
        upper = sp.triu(matrix, format="csc")
        upper.sort_indices()
        n = upper.shape[0]
        starts, ends = upper.indptr[:-1], upper.indptr[1:]
        # In a sorted upper-triangular CSC column the diagonal entry is the last one.
        if n and not np.array_equal(upper.indices[ends - 1], np.arange(n)) or np.any(ends == starts):
            raise ValueError("LdlFactor needs every diagonal entry present")
        self._upper = upper
        self._base = upper.data.copy()
        self._diagonal_at = ends - 1
        self._solver: qdldl.Solver | None = None
        self._lock = threading.Lock()
        self._factor_bytes = 0
        self.analyses = 0  # counted, so tests can see the per-image work is not redone per click
        self.refactorisations = 0

    def _system(self, diagonal: np.ndarray | None) -> sp.csc_matrix:
        values = self._base.copy()
        if diagonal is not None:
            values[self._diagonal_at] += diagonal
        return sp.csc_matrix((values, self._upper.indices, self._upper.indptr), shape=self._upper.shape)

    def _analyse(self, system: sp.csc_matrix) -> None:
        """Order, analyse and factor ``system`` (call with the lock held)."""
        self._solver = qdldl.Solver(system, upper=True)
        self.analyses += 1
        # qdldl keeps L (values and 64-bit row indices), D, 1/D, the permutation and a permuted copy.
        n, nnz = self._upper.shape[0], int(self._upper.nnz)
        self._factor_bytes = int(16 * self._solver.factors()[0].nnz + 32 * nnz + 48 * n)

    def analyse(self) -> LdlFactor:
        """Do the per-image work now (OpenImage), not in the first click."""
        with self._lock:
            if self._solver is None:
                self._analyse(self._system(None))
        return self

    @property
    def nbytes(self) -> int:
        """Memory held: the pattern, and the factor once analysed."""
        upper = self._upper
        return int(2 * upper.data.nbytes + upper.indices.nbytes + upper.indptr.nbytes + self._factor_bytes)

    def solve(self, diagonal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """``(M + diag(diagonal))^-1 rhs``."""
        system = self._system(diagonal)
        with self._lock:
            if self._solver is None:
                self._analyse(system)  # not analysed at OpenImage: analysed now, with this click's numbers
            else:
                self._solver.update(system, upper=True)
            self.refactorisations += 1
            return np.asarray(self._solver.solve(np.ascontiguousarray(rhs, np.float64)))


class CorrectionSpread:
    """The "correction" spread on one image: ``d = sum_j lam_j (L + c I)^-1 1_{D_j}``, with the
    multipliers chosen so that the mean of ``d`` over each click disk ``D_j`` is that click's
    ``label - p`` (least squares when disks overlap).

    Why this form. Its matrix depends neither on the clicks nor on the model (``c`` =
    ``correction_gamma`` x ``CORRECTION_CONFIDENCE`` + ``PRIOR_FLOOR``, one prior weight for every
    pixel), so it is factored once per image (at OpenImage with the graph); a click adds one column
    (a triangular solve pair, cached by disk), and the answer is a k x k system over the k clicks
    and a weighted sum of their columns: milliseconds where refactoring costs tens (model card,
    "Spreading only the corrections").
    """

    def __init__(self, laplacian: sp.csc_matrix, weight: float) -> None:
        n = laplacian.shape[0]
        self._upper = sp.triu(laplacian + sp.identity(n, format="csc") * float(weight), format="csc")
        self._n = n
        self._solver: qdldl.Solver | None = None
        self._factor_bytes = 0
        self._columns: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.factorisations = 0  # counted, so tests can see the per-image work is not redone per click
        self.solves = 0

    def analyse(self) -> CorrectionSpread:
        with self._lock:
            self._ensure_factor()
        return self

    def _ensure_factor(self) -> qdldl.Solver:
        """The factorisation, made on first need (call with the lock held)."""
        if self._solver is None:
            self._solver = qdldl.Solver(self._upper, upper=True)
            self.factorisations += 1
            self._factor_bytes = int(16 * self._solver.factors()[0].nnz + 48 * self._n)
        return self._solver

    @property
    def nbytes(self) -> int:
        """Matrix, factor, and the column cache at its bound (a memory budget counts it up front)."""
        m = self._upper
        factor = self._factor_bytes or int(16 * 25 * self._n)  # before the factor exists: its typical size
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + factor + CORRECTION_COLUMNS * self._n * 4)

    def _columns_for(self, disks: list[np.ndarray]) -> list[np.ndarray]:
        """One column per disk: cached ones first (marked used), then the missing ones solved.

        Marking every cached one used before solving any means that a prompt with more clicks than
        the cache holds re-solves only its oldest ones, not all of them (a scan in click order
        through a smaller LRU would miss every time).
        """
        keys = [np.asarray(disk, np.int64).tobytes() for disk in disks]
        with self._lock:
            found = [self._columns.get(key) for key in keys]
            for key, column in zip(keys, found, strict=True):
                if column is not None:
                    self._columns.move_to_end(key)
            for i, (key, disk) in enumerate(zip(keys, disks, strict=True)):
                if found[i] is not None:
                    continue
                load = np.zeros(self._n)
                load[disk] = 1.0
                column = np.asarray(self._ensure_factor().solve(load), np.float32)
                self.solves += 1
                found[i] = self._columns[key] = column
                while len(self._columns) > CORRECTION_COLUMNS:
                    self._columns.popitem(last=False)
        return [c for c in found if c is not None]

    def change(self, disks: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
        """``d`` (n,) float64 whose mean over ``disks[j]`` is ``targets[j]``."""
        d = np.zeros(self._n)
        if not disks:
            return d
        columns = self._columns_for(disks)
        gram = np.array([[float(c[disk].mean()) for c in columns] for disk in disks])
        lam = np.linalg.lstsq(gram, np.asarray(targets, np.float64), rcond=1e-10)[0]
        for weight, column in zip(lam, columns, strict=True):
            d += float(weight) * column
        return d


@dataclass(frozen=True)
class ImageGraph:
    """The per-image half of the work, done once when an image is opened.

    ``laplacian`` is stored already permuted to ``order`` (nested dissection), the order the
    SuperLU reference solve runs in; ``factor`` is the analysed LDL^T of the Laplacian (natural
    order) that every click refactors.
    """

    laplacian: sp.csc_matrix
    order: np.ndarray
    small_hw: tuple[int, int]
    full_hw: tuple[int, int]
    settings: PropagationSettings
    factor: LdlFactor = field(compare=False, repr=False)
    correction: CorrectionSpread = field(compare=False, repr=False)

    @staticmethod
    def working_image(image: np.ndarray, settings: PropagationSettings) -> np.ndarray:
        """The RGB copy the walker runs on (at most ``working_side`` px a side), uint8.

        Small (<= 77 KB at 160 px) so a server keeps it with every embedding and can build
        the graph later, when a click first asks for propagation.
        """
        rgb = validate_rgb(image)
        return WorkingGrid.for_size(rgb.shape[0], rgb.shape[1], settings.working_side).shrink(rgb)

    @classmethod
    def from_working_image(
        cls, small: np.ndarray, full_hw: tuple[int, int], settings: PropagationSettings, analyse: bool = True
    ) -> ImageGraph:
        """The graph from ``working_image``'s output; ``full_hw`` is the original image's size.

        ``analyse``: order and analyse the factorisation now (a graph kept for the image's clicks);
        False for a graph built for one click, whose solve then analyses and factors in one go.
        """
        hs, ws = small.shape[:2]
        lab = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2LAB).astype(np.float64)
        order = nested_dissection(hs, ws)
        natural = _laplacian(lab, settings.beta)
        laplacian = natural[order][:, order].tocsc()
        factor = LdlFactor(natural)
        correction = CorrectionSpread(natural, settings.correction_gamma * CORRECTION_CONFIDENCE + PRIOR_FLOOR)
        if analyse:
            factor.analyse()
            correction.analyse()
        return cls(laplacian, order, (hs, ws), (int(full_hw[0]), int(full_hw[1])), settings, factor, correction)

    @classmethod
    def from_image(cls, image: np.ndarray, settings: PropagationSettings) -> ImageGraph:
        rgb = validate_rgb(image)
        return cls.from_working_image(cls.working_image(rgb, settings), rgb.shape[:2], settings)

    @property
    def nbytes(self) -> int:
        m = self.laplacian
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + self.order.nbytes + self.factor.nbytes
                   + self.correction.nbytes)

    def _small_logits(self, low_res: np.ndarray, transform: ImageTransform) -> np.ndarray:
        """The model's (256, 256) letterboxed logits resampled onto the working grid."""
        lh, lw = transform.low_res_shape(*self.full_hw)
        valid = np.asarray(low_res, np.float32).reshape(LOW_RES, LOW_RES)[:lh, :lw]
        hs, ws = self.small_hw
        interp = cv2.INTER_AREA if hs * ws < lh * lw else cv2.INTER_LINEAR
        return cv2.resize(valid, (ws, hs), interpolation=interp)

    def _pins(self, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(hs, ws) int8: 1 / 0 on positive / negative click disks, -1 elsewhere (later wins)."""
        pins = np.full(self.small_hw[0] * self.small_hw[1], -1, np.int8)
        for disk, label in zip(*self._disks(points, labels), strict=True):
            pins[disk] = label
        return pins.reshape(self.small_hw)

    def _disks(self, points: np.ndarray, labels: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        """Each click's pinned disk (flat working-pixel indices) and label, in click order."""
        grid = WorkingGrid(self.full_hw, self.small_hw)
        radius = grid.radius(self.settings.click_radius)
        disks, kept = [], []
        for (x, y), label in zip(np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels).reshape(-1),
                                 strict=True):
            if label not in (0, 1) or not (math.isfinite(x) and math.isfinite(y)):
                continue  # box corners and padding points are not clicks
            disk = np.zeros(self.small_hw, np.uint8)
            cv2.circle(disk, grid.pixel(x, y), radius, 1, -1)
            disks.append(np.flatnonzero(disk))
            kept.append(int(label))
        return disks, kept

    def solve(self, weight: np.ndarray, rhs: np.ndarray, solver: str = "ldl") -> np.ndarray:
        """``(L + diag(weight))^-1 rhs`` in natural pixel order.

        "ldl" refactors the per-image analysed LDL^T; "superlu" is the earlier per-click SuperLU
        solve in nested-dissection order, kept as the reference the LDL^T answers are checked
        against.
        """
        if solver == "ldl":
            return self.factor.solve(weight, rhs)
        if solver != "superlu":
            raise InvalidInputError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        order = self.order
        system = (self.laplacian + sp.diags(weight[order])).tocsc()
        lu = splu(system, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        x = np.empty_like(weight)
        x[order] = lu.solve(rhs[order])
        return x

    def probability_change(
        self, low_res: np.ndarray, transform: ImageTransform, points: np.ndarray, labels: np.ndarray,
        solver: str = "ldl", spread: str = "model",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(walker probability, model probability) on the working grid, both (hs, ws) float32."""
        s = self.settings
        if spread not in SPREADS:
            raise InvalidInputError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
        prior = _probability(self._small_logits(low_res, transform), s.temperature).astype(np.float64).ravel()
        hs, ws = self.small_hw
        if spread == "correction":
            # Spread only what the clicks correct: the change x - p is 0 where no click disagrees.
            disks, kept = self._disks(points, labels)
            targets = np.array([label - prior[disk].mean() for disk, label in zip(disks, kept, strict=True)])
            x = np.clip(prior + self.correction.change(disks, targets), 0.0, 1.0)
            return x.reshape(hs, ws).astype(np.float32), prior.reshape(hs, ws).astype(np.float32)
        weight = s.gamma * np.abs(2.0 * prior - 1.0) + PRIOR_FLOOR
        target = prior.copy()
        pins = self._pins(points, labels).ravel()
        pinned = pins >= 0
        weight[pinned] = PIN_WEIGHT
        target[pinned] = pins[pinned]
        x = np.clip(self.solve(weight, weight * target, solver), 0.0, 1.0)
        return x.reshape(hs, ws).astype(np.float32), prior.reshape(hs, ws).astype(np.float32)

    def refine(
        self,
        low_res: np.ndarray,
        transform: ImageTransform,
        points: np.ndarray,
        labels: np.ndarray,
        full_logits: np.ndarray | None = None,
        solver: str = "ldl",
        spread: str = "model",
    ) -> np.ndarray:
        """The propagated mask, (H, W) bool: model probability + upsampled walker change >= 0.5."""
        h, w = self.full_hw
        if full_logits is None:
            full_logits = transform.logits_to_original(low_res, (h, w))
        walker, prior = self.probability_change(low_res, transform, points, labels, solver, spread)
        change = cv2.resize(walker - prior, (w, h), interpolation=cv2.INTER_LINEAR)
        return (_probability(np.asarray(full_logits, np.float32), self.settings.temperature) + change) >= 0.5


class PropagatingPredictor:
    """Any ``Predictor`` with click propagation applied to its masks, as the server does it.

    ``low_res_logits`` stay the model's own: they are the mask prompt the model was trained
    to receive with the next click. ``mode`` is "on" or "auto" (see the module docstring);
    in "auto" the first step decides for the whole image, as in a server session.
    """

    def __init__(
        self, inner: Predictor, settings: PropagationSettings, transform: ImageTransform, mode: str = "on"
    ) -> None:
        if check_mode(mode) == "off":
            raise InvalidInputError("PropagatingPredictor needs mode on or auto (off: use the model itself)")
        self.inner = inner
        self.settings = settings
        self.transform = transform
        self.mode = mode
        self.name = f"{getattr(inner, 'name', 'model')}+{'auto-' if mode == 'auto' else ''}propagation"
        self._graph: ImageGraph | None = None
        self._confidence: dict[bytes, float] = {}  # auto: first step's prompt -> its confidence
        self._ignored: dict[bytes, int] = {}  # auto: prompt prefix -> correction clicks ignored so far

    def set_image(self, image: np.ndarray) -> None:
        self.inner.set_image(image)
        self._graph = ImageGraph.from_image(image, self.settings)
        self._confidence.clear()
        self._ignored.clear()

    @staticmethod
    def _key(points: np.ndarray, labels: np.ndarray, box: np.ndarray | None) -> bytes:
        return (np.asarray(points, np.float64).tobytes() + b"|" + np.asarray(labels, np.int64).tobytes()
                + (b"" if box is None else np.asarray(box, np.float64).tobytes()))

    def _first_confidence(self, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None,
                          answer: Prediction, n: int) -> float:
        """auto: the model's confidence in its answer to the prompt's first step."""
        first = 0 if box is not None else 1
        key = self._key(points[:first], labels[:first], box)
        if key not in self._confidence:
            if n != first:  # the first step was not asked for on its own: answer it now
                ask = getattr(self.inner, "predict_unsnapped", self.inner.predict)
                answer = ask(points=points[:first], labels=labels[:first], box=box, mask_logits=None)
            self._confidence[key] = model_confidence(answer.low_res_logits, self.transform, self._graph.full_hw,
                                                     self.settings.temperature)
        return self._confidence[key]

    def _ignored_clicks(self, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None,
                        answer: Prediction, n: int) -> int:
        """auto: how many correction clicks of this prompt the model's answers ignored.

        Counted as the evaluator (and a user) clicks, one step at a time; a prompt whose
        shorter prefix was never asked for counts only its newest click.
        """
        first = 0 if box is not None else 1
        before = self._ignored.get(self._key(points[:n - 1], labels[:n - 1], box), 0) if n - 1 > first else 0
        now = before
        if n > first:
            now += click_ignored(answer.low_res_logits, self.transform, self._graph.full_hw,
                                 points[n - 1], int(labels[n - 1]))
        self._ignored[self._key(points, labels, box)] = now
        return now

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> Prediction:
        if self._graph is None:
            raise InvalidInputError("set_image must be called before predict")
        # An edge-snapping inner predictor snaps only the masks this one keeps (as the server does).
        unsnapped = getattr(self.inner, "predict_unsnapped", None)
        snap = getattr(self.inner, "snap", None)
        p = (unsnapped or self.inner.predict)(points=points, labels=labels, box=box, mask_logits=mask_logits)
        n = 0 if points is None else len(np.asarray(points).reshape(-1, 2))

        def own() -> Prediction:
            return snap(p, points, labels) if unsnapped is not None and snap is not None else p

        if n == 0 or labels is None:
            return own()
        points = np.asarray(points, np.float64).reshape(-1, 2)
        labels = np.asarray(labels).reshape(-1)
        spread = "model"
        if self.mode == "auto":
            confidence = self._first_confidence(points, labels, box, p, n)
            if not auto_propagates(confidence, self._ignored_clicks(points, labels, box, p, n), self.settings):
                if self.settings.auto_when_sure == "own":
                    return own()
                spread = "correction"
        mask = self._graph.refine(p.low_res_logits, self.transform, points, labels, spread=spread)
        return Prediction(mask=mask, low_res_logits=p.low_res_logits, iou=p.iou)
