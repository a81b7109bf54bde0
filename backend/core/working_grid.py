"""The downscaled working copy that pixel-graph methods run on, and where a click lands on it.

Why one module. Edge snapping, click propagation and the classical baselines (GrabCut, random
walker) each solve a graph problem on a smaller copy of the image: the solve grows faster
than linearly with the pixel count. They used to size that copy with three different
minimum sides and to place a click with two different rules (the working pixel under the
clicked pixel's left/top edge, or under its centre), so the same click could seed pixels one
apart in two of them. Here is the one rule all three follow.

Clicks are pixel indices ``(x, y)`` of the full image, as SAM reads them (its prompt encoder
adds 0.5: a click means the pixel's centre). A click lands on the working pixel whose area
holds that centre: ``floor((x + 0.5) * ws / w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

MIN_WORKING_SIDE = 2  # a graph needs an edge: never fewer than two pixels a side


@dataclass(frozen=True)
class WorkingGrid:
    """The full image's size and its working copy's (both (rows, columns))."""

    full_hw: tuple[int, int]
    small_hw: tuple[int, int]

    @classmethod
    def for_size(cls, h: int, w: int, side: int) -> WorkingGrid:
        """The grid of an ``h`` x ``w`` image shrunk to at most ``side`` px on its longest side
        (never enlarged)."""
        scale = min(1.0, side / max(h, w))
        if scale >= 1.0:
            return cls((int(h), int(w)), (int(h), int(w)))
        small = (max(MIN_WORKING_SIDE, round(h * scale)), max(MIN_WORKING_SIDE, round(w * scale)))
        return cls((int(h), int(w)), small)

    @property
    def scaled(self) -> bool:
        return self.small_hw != self.full_hw

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Working pixels per full-resolution pixel along x and y."""
        return self.small_hw[1] / self.full_hw[1], self.small_hw[0] / self.full_hw[0]

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """The working pixel ``(column, row)`` a full-resolution click ``(x, y)`` lands on."""
        sx, sy = self.scale_xy
        hs, ws = self.small_hw
        return (min(ws - 1, max(0, math.floor((x + 0.5) * sx))), min(hs - 1, max(0, math.floor((y + 0.5) * sy))))

    def radius(self, full_radius: float) -> int:
        """A disk radius given in full-resolution pixels, in working pixels (at least 1)."""
        return max(1, round(full_radius * min(self.scale_xy)))

    def shrink(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (of ``full_hw``) as a contiguous working copy (area-averaged when shrunk)."""
        if not self.scaled:
            return np.ascontiguousarray(rgb)
        hs, ws = self.small_hw
        return cv2.resize(np.ascontiguousarray(rgb), (ws, hs), interpolation=cv2.INTER_AREA)
