"""Simulated clicks for training, on the 256x256 low-res grid the loss lives on.

A batch runs rounds together: the first click is a random interior point of the object
(``sample_training_click``); every later round places one click per sample on the error of
its previous prediction, either the random error-interior rule or, with
``ritm_probability``, exactly the evaluation rule (``next_click``), so the model also trains
on the clicks it is measured with. Points are stored in the model's input frame, with a
padding point (label -1) when there is no box, as the predictors send them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from histosam.backend.evaluation.clicker import next_click, sample_training_click

LOW = 256


@dataclass
class ClickState:
    """The clicks of one sample so far, in low-res pixels (y, x, positive)."""

    gt: np.ndarray  # (256, 256) bool, letterboxed
    valid: np.ndarray  # (256, 256) bool, inside the image
    clicks: list[tuple[int, int, bool]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in low-res px
    clicked: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.clicked = np.zeros_like(self.gt, bool)

    def add_first(self, rng: np.random.Generator) -> bool:
        click = sample_training_click(self.gt, None, rng)
        if click is None:
            return False
        self._add(*click)
        return True

    def add_correction(self, pred: np.ndarray, rng: np.random.Generator, ritm: bool) -> tuple[int, int, bool] | None:
        """One click on the error of ``pred`` (bool, low-res); None when there is no error."""
        pred = np.asarray(pred, bool) & self.valid
        if ritm:
            c = next_click(self.gt, pred, self.clicked)
            click = None if c is None else (c.y, c.x, c.positive)
        else:
            click = sample_training_click(self.gt, pred, rng)
        if click is not None:
            self._add(*click)
        return click

    def _add(self, y: int, x: int, positive: bool) -> None:
        self.clicks.append((int(y), int(x), bool(positive)))
        self.clicked[y, x] = True


def box_of(gt: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(gt)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    w, h = x1 - x0 + 1, y1 - y0 + 1
    j = rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
    return (max(0.0, x0 + j[0]), max(0.0, y0 + j[1]), min(LOW - 1.0, x1 + j[2]), min(LOW - 1.0, y1 + j[3]))


def prompt_batch(states: list[ClickState], input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, 2) coords in the input frame and (B, N) labels, padded with label -1."""
    scale = input_size / LOW
    rows = []
    for s in states:
        pts = [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5, 1.0 if pos else 0.0) for y, x, pos in s.clicks]
        if s.box is not None:
            x0, y0, x1, y1 = s.box
            pts += [(x0 * scale, y0 * scale, 2.0), (x1 * scale, y1 * scale, 3.0)]
        else:
            pts.append((0.0, 0.0, -1.0))
        rows.append(pts)
    n = max(len(r) for r in rows)
    coords = np.zeros((len(rows), n, 2), np.float32)
    labels = np.full((len(rows), n), -1.0, np.float32)
    for i, r in enumerate(rows):
        for j, (x, y, lab) in enumerate(r):
            coords[i, j] = (x, y)
            labels[i, j] = lab
    return coords, labels

