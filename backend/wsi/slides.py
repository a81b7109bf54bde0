"""Read any level-0 rectangle of a whole-slide image at any scale, without a whole level 0.

A region is asked for in level-0 coordinates and a scale given one of three ways: a
downsample, a magnification (5x, 10x) or a resolution in µm/px. The reader picks the pyramid
level closest to (and not coarser than) the wanted scale, reads only the rectangle's pixels
from it, and resizes the rest of the way (area averaging for images, nearest-neighbour for
label masks, where averaging would invent labels).

Scale metadata: µm/px comes from OpenSlide (``openslide.mpp-x/y``, which OpenSlide derives
from the TIFF resolution tags for generic TIFFs) or the TIFF tags directly; magnification
from ``openslide.objective-power``, else from µm/px by the usual convention 10 µm/px / mpp
(0.25 µm/px = 40x, 0.5 = 20x) rounded to the nearest standard objective. A slide with neither
(e.g. a cropped TCGA svs) needs ``base_mpp=`` / ``base_magnification=`` (``--base-mpp`` /
``--base-magnification`` on the command line); the error says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError, NotFoundError, ResourceLimitError

# Largest block read from one pyramid level at once; bigger requests are read block by block
# so memory stays bounded whatever the region (a whole-slide thumbnail from a one-level svs).
MAX_BLOCK_PIXELS = 4096 * 4096
# Output regions bigger than this are refused: it is a mistake (e.g. a level 0 at downsample 1),
# not a patch or a thumbnail.
MAX_OUTPUT_PIXELS = 20_000 * 20_000
STANDARD_OBJECTIVES = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 63.0, 80.0, 100.0)
# µm/px of a 10x objective on a typical scanner: 10x ~ 1 µm/px, 20x ~ 0.5, 40x ~ 0.25.
MPP_AT_1X = 10.0
# Level choice tolerance: a level at downsample 2.0005 serves a request for 2.
LEVEL_TOLERANCE = 1e-3

Interpolation = Literal["area", "nearest"]


def _float_property(props: dict[str, str], key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def mpp_from_properties(props: dict[str, str]) -> float | None:
    """µm/px of level 0 from OpenSlide properties, or None when the slide does not say."""
    mx, my = _float_property(props, "openslide.mpp-x"), _float_property(props, "openslide.mpp-y")
    if mx and my:
        return (mx + my) / 2
    if mx or my:
        return mx or my
    # Older OpenSlide versions do not convert TIFF resolution tags for generic TIFFs.
    unit = props.get("tiff.ResolutionUnit", "").lower()
    per_unit = {"centimeter": 1e4, "inch": 25_400.0}.get(unit)
    res = _float_property(props, "tiff.XResolution")
    if per_unit and res:
        mpp = per_unit / res
        # 72/96 dpi screen defaults give hundreds of µm/px: not a microscope.
        if 0.01 <= mpp <= 50:
            return mpp
    return None


def nominal_magnification(mpp: float) -> float:
    """Objective power a scanner at ``mpp`` µm/px is sold as (0.486 -> 20x, 0.2525 -> 40x).

    Snapped to a standard objective when within 15 % of one, so 10x on a 0.486 µm/px slide is
    an exact downsample of 2, as a pathologist expects; otherwise the raw 10/mpp.
    """
    raw = MPP_AT_1X / mpp
    best = min(STANDARD_OBJECTIVES, key=lambda m: abs(math.log(raw / m)))
    return best if abs(raw / best - 1) <= 0.15 else raw


@dataclass(frozen=True)
class ScaleRequest:
    """Exactly one of downsample, magnification or mpp (µm/px)."""

    downsample: float | None = None
    magnification: float | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.downsample, self.magnification, self.mpp) if v is not None]
        if len(given) != 1:
            raise InvalidInputError("give exactly one of downsample, magnification or mpp")
        if not (math.isfinite(given[0]) and given[0] > 0):
            raise InvalidInputError(f"scale must be a positive number, got {given[0]}")

    def describe(self) -> str:
        if self.magnification is not None:
            return f"{self.magnification:g}x"
        if self.mpp is not None:
            return f"{self.mpp:g} µm/px"
        return f"downsample {self.downsample:g}"


class Slide:
    """An OpenSlide-readable whole-slide image with scale metadata and region reads.

    ``base_mpp`` / ``base_magnification`` override (or supply) the slide's level-0 µm/px and
    objective power.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        base_mpp: float | None = None,
        base_magnification: float | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotFoundError(f"slide {self.path} does not exist")
        if not self.path.is_file():
            raise InvalidInputError(f"slide {self.path} is not a file")
        for name, value in (("base_mpp", base_mpp), ("base_magnification", base_magnification)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InvalidInputError(f"{name} must be a positive number, got {value}")
        import openslide  # imported here: the module is light to import for the CLI

        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read slide {self.path}: {exc or type(exc).__name__}") from exc
        self._openslide = openslide
        props = dict(self._osr.properties)
        self.properties = props
        self.dimensions: tuple[int, int] = tuple(self._osr.dimensions)  # type: ignore[assignment]
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._osr.level_downsamples)
        self.slide_mpp = mpp_from_properties(props)
        self.slide_objective_power = _float_property(props, "openslide.objective-power")
        self.mpp: float | None = base_mpp if base_mpp is not None else self.slide_mpp
        if base_magnification is not None:
            self.magnification: float | None = base_magnification
        elif self.slide_objective_power is not None:
            self.magnification = self.slide_objective_power
        elif self.mpp is not None:
            self.magnification = nominal_magnification(self.mpp)
        else:
            self.magnification = None

    # -- lifecycle
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    # -- scale
    def downsample_for(
        self,
        *,
        downsample: float | None = None,
        magnification: float | None = None,
        mpp: float | None = None,
    ) -> float:
        """Level-0 pixels per output pixel for a downsample, magnification or µm/px."""
        req = ScaleRequest(downsample, magnification, mpp)
        if req.downsample is not None:
            return float(req.downsample)
        if req.magnification is not None:
            if self.magnification is None:
                raise InvalidInputError(
                    f"slide {self.path.name} records neither an objective power nor µm/px, so "
                    f"{req.describe()} cannot be located; pass base_magnification= (CLI "
                    "--base-magnification, e.g. 20) or base_mpp= (--base-mpp, e.g. 0.5), or ask "
                    "for a downsample instead"
                )
            return self.magnification / req.magnification
        assert req.mpp is not None
        if self.mpp is None:
            raise InvalidInputError(
                f"slide {self.path.name} records no µm/px, so {req.describe()} cannot be located; "
                "pass base_mpp= (CLI --base-mpp, e.g. 0.5) or ask for a magnification/downsample"
            )
        return req.mpp / self.mpp

    def mpp_at(self, downsample: float) -> float | None:
        return None if self.mpp is None else self.mpp * downsample

    def best_level(self, downsample: float, levels: list[int] | None = None) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 if none)."""
        candidates = range(self.level_count) if levels is None else levels
        best = 0
        for level in candidates:
            d = self.level_downsamples[level]
            if d <= downsample * (1 + LEVEL_TOLERANCE) and d >= self.level_downsamples[best]:
                best = level
        return best

    # -- reading
    def read_region(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        *,
        downsample: float | None = None,
        magnification: float | None = None,
        mpp: float | None = None,
    ) -> np.ndarray:
        """RGB uint8 of the level-0 rectangle (x, y, width, height) at the requested scale.

        Output size is ``round(width / downsample) x round(height / downsample)``; pixels
        outside the slide are white (background).
        """
        ds = self.downsample_for(downsample=downsample, magnification=magnification, mpp=mpp)
        out_w, out_h = max(1, round(width / ds)), max(1, round(height / ds))
        return self.read_scaled(x, y, out_w, out_h, ds)

    def read_scaled(
        self,
        x: float,
        y: float,
        out_width: int,
        out_height: int,
        downsample: float,
        *,
        interpolation: Interpolation = "area",
        channels: Literal["rgb", "rgba"] = "rgb",
        integral_levels_only: bool = False,
    ) -> np.ndarray:
        """``out_height x out_width`` pixels covering level 0 from (x, y), ``downsample`` each.

        The frame is the one of ``geometry``: output pixel (u, v) covers level-0
        ``[x + u*d, x + (u+1)*d) x [y + v*d, y + (v+1)*d)``. ``integral_levels_only`` restricts
        reads to levels with a whole-number downsample, where OpenSlide never interpolates
        (label masks).
        """
        out_width, out_height = int(out_width), int(out_height)
        if out_width <= 0 or out_height <= 0:
            raise InvalidInputError(f"region size must be positive, got {out_width}x{out_height}")
        if out_width * out_height > MAX_OUTPUT_PIXELS:
            raise ResourceLimitError(
                f"region of {out_width}x{out_height} output pixels exceeds the limit of "
                f"{MAX_OUTPUT_PIXELS} pixels; read it at a larger downsample"
            )
        if not (math.isfinite(downsample) and downsample > 0):
            raise InvalidInputError(f"downsample must be a positive number, got {downsample}")
        levels = None
        if integral_levels_only:
            levels = [i for i, d in enumerate(self.level_downsamples) if abs(d - round(d)) < 1e-6]
        level = self.best_level(downsample, levels)
        ld = self.level_downsamples[level]
        n_ch = 4 if channels == "rgba" else 3
        out = np.empty((out_height, out_width, n_ch), np.uint8)
        # Output block size so one block's read from the level stays under MAX_BLOCK_PIXELS.
        per_out = max(1.0, downsample / ld)
        block = max(64, int(math.sqrt(MAX_BLOCK_PIXELS) / per_out))
        for v0 in range(0, out_height, block):
            v1 = min(out_height, v0 + block)
            for u0 in range(0, out_width, block):
                u1 = min(out_width, u0 + block)
                out[v0:v1, u0:u1] = self._read_block(
                    x + u0 * downsample, y + v0 * downsample, u1 - u0, v1 - v0, downsample,
                    level, interpolation, channels,
                )
        return out

    def _read_level(self, level: int, lx0: int, ly0: int, lw: int, lh: int) -> np.ndarray:
        """RGBA of level pixels [lx0, lx0+lw) x [ly0, ly0+lh); outside the slide: alpha 0."""
        ld = self.level_downsamples[level]
        location = (round(lx0 * ld), round(ly0 * ld))
        try:
            region = self._osr.read_region(location, level, (lw, lh))
        except self._openslide.OpenSlideError as exc:
            raise InvalidInputError(f"cannot read slide {self.path} at level {level}: {exc}") from exc
        return np.asarray(region)

    def _read_block(
        self,
        x: float,
        y: float,
        out_w: int,
        out_h: int,
        downsample: float,
        level: int,
        interpolation: Interpolation,
        channels: str,
    ) -> np.ndarray:
        ld = self.level_downsamples[level]
        fx0, fy0 = x / ld, y / ld
        fx1, fy1 = (x + out_w * downsample) / ld, (y + out_h * downsample) / ld
        if interpolation == "nearest":
            # Sample the level pixel under each output pixel centre: exact, never a new label.
            cols = np.floor((x + (np.arange(out_w) + 0.5) * downsample) / ld).astype(np.int64)
            rows = np.floor((y + (np.arange(out_h) + 0.5) * downsample) / ld).astype(np.int64)
            lx0, ly0 = int(cols[0]), int(rows[0])
            raw = self._read_level(level, lx0, ly0, int(cols[-1]) - lx0 + 1, int(rows[-1]) - ly0 + 1)
            rgba = raw[(rows - ly0)[:, None], (cols - lx0)[None, :]]
        else:
            # Nearest level-pixel bounds (error < half a level pixel <= half an output pixel).
            lx0, ly0 = round(fx0), round(fy0)
            lx1, ly1 = max(lx0 + 1, round(fx1)), max(ly0 + 1, round(fy1))
            raw = self._read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
            if raw.shape[1] == out_w and raw.shape[0] == out_h:
                rgba = raw
            else:
                shrink = out_w * out_h < raw.shape[0] * raw.shape[1]
                rgba = cv2.resize(raw, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if channels == "rgba":
            return rgba
        return _composite_on_white(rgba)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide as RGB with its longest side <= ``max_side``, and its downsample."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_side)
        return self.read_scaled(0, 0, max(1, math.floor(w / ds)), max(1, math.floor(h / ds)), ds), ds


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over white: transparent pixels (outside the slide) read as glass."""
    alpha = rgba[..., 3:4]
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def open_slide(
    path: str | Path, *, base_mpp: float | None = None, base_magnification: float | None = None
) -> Slide:
    """``Slide(path, ...)``; named for symmetry with ``annotations.load_annotations``."""
    return Slide(path, base_mpp=base_mpp, base_magnification=base_magnification)
