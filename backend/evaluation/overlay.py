"""A mask drawn over its image with the clicks that made it: what a person looks at to judge an
answer (`histosam client click --overlay-out`, `histosam evaluate --overlays`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

MASK_BGR = (0, 215, 255)  # amber fill and outline: the answer
TRUTH_BGR = (255, 120, 0)  # blue outline: the ground truth, where there is one
POSITIVE_BGR = (60, 200, 40)
NEGATIVE_BGR = (40, 40, 230)
FILL_ALPHA = 0.35


def draw_overlay(
    rgb: np.ndarray,
    mask: np.ndarray,
    points: Iterable[tuple[float, float, bool]] = (),
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """BGR uint8 picture: ``rgb`` with ``mask`` tinted and outlined, ``truth`` outlined, and each
    click (image pixels; positive green, negative red) drawn as a dot."""
    h, w = mask.shape
    if rgb.shape[:2] != (h, w):
        raise ValueError(f"the image is {rgb.shape[1]}x{rgb.shape[0]} but the mask is {w}x{h}")
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2BGR)
    inside = mask.astype(bool)
    tint = np.empty_like(bgr)
    tint[:] = MASK_BGR
    bgr[inside] = (bgr[inside] * (1 - FILL_ALPHA) + tint[inside] * FILL_ALPHA).astype(np.uint8)
    thickness = max(1, round(max(h, w) / 400))
    for shape, colour in ((truth, TRUTH_BGR), (inside, MASK_BGR)):
        if shape is None:
            continue
        contours, _ = cv2.findContours(shape.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, colour, thickness, lineType=cv2.LINE_AA)
    radius = max(3, round(max(h, w) / 120))
    for x, y, positive in points:
        centre = (round(x), round(y))
        cv2.circle(bgr, centre, radius + 1, (0, 0, 0), -1, lineType=cv2.LINE_AA)
        cv2.circle(bgr, centre, radius, POSITIVE_BGR if positive else NEGATIVE_BGR, -1, lineType=cv2.LINE_AA)
    return bgr


def write_png(path: Path, bgr: np.ndarray) -> None:
    """``bgr`` as a PNG at ``path``, written atomically."""
    from histosam.backend.core.atomic import write_bytes

    ok, buf = cv2.imencode(".png", bgr)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise RuntimeError("PNG encoding failed")
    write_bytes(Path(path), buf.tobytes())
