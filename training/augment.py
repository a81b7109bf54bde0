"""Augmentations as explicit, hashable parameters.

Because an augmentation is a small record (crop box, rotation, flip, colour factors) drawn
from a seeded generator, the same (image, variant) always gives the same pixels, and the
frozen encoder's embedding of it can be cached under a signature of those parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugParams:
    crop: tuple[int, int, int, int]  # y0, x0, h, w in source pixels
    rot90: int = 0  # quarter turns counter-clockwise
    flip: bool = False  # left-right, after the rotation
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # OpenCV hue units (0..180 wrap)

    def signature(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def identity(shape: tuple[int, int]) -> AugParams:
    return AugParams(crop=(0, 0, int(shape[0]), int(shape[1])))


def sample_aug(mask: np.ndarray, rng: np.random.Generator, *, flips: bool = True, rot90: bool = True,
               scale_range: tuple[float, float] = (0.6, 1.0), crop_size_px: int | None = None,
               colour_jitter: float = 0.1, tries: int = 10) -> AugParams:
    """A random augmentation whose crop keeps 5-95 % foreground (else the whole patch)."""
    h, w = mask.shape
    crop = (0, 0, h, w)
    for _ in range(tries):
        if crop_size_px:
            ch, cw = min(h, crop_size_px), min(w, crop_size_px)
        else:
            s = float(rng.uniform(*scale_range))
            ch, cw = max(8, round(h * s)), max(8, round(w * s))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        frac = float(mask[y0:y0 + ch, x0:x0 + cw].mean())
        if 0.05 <= frac <= 0.95:
            crop = (y0, x0, ch, cw)
            break
    j = colour_jitter
    return AugParams(
        crop=crop,
        rot90=int(rng.integers(4)) if rot90 else 0,
        flip=bool(rng.integers(2)) if flips else False,
        brightness=float(rng.uniform(1 - j, 1 + j)),
        contrast=float(rng.uniform(1 - j, 1 + j)),
        saturation=float(rng.uniform(1 - j, 1 + j)),
        hue=float(rng.uniform(-j, j) * 18.0),
    )


def apply_aug(image: np.ndarray, mask: np.ndarray, p: AugParams) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, bool mask) -> the augmented pair."""
    y0, x0, h, w = p.crop
    img = image[y0:y0 + h, x0:x0 + w]
    msk = mask[y0:y0 + h, x0:x0 + w]
    if p.rot90:
        img = np.rot90(img, p.rot90)
        msk = np.rot90(msk, p.rot90)
    if p.flip:
        img = img[:, ::-1]
        msk = msk[:, ::-1]
    img = np.ascontiguousarray(img)
    if (p.brightness, p.contrast, p.saturation, p.hue) != (1.0, 1.0, 1.0, 0.0):
        f = img.astype(np.float32)
        mean = f.mean()
        f = (f - mean) * p.contrast + mean
        f = f * p.brightness
        grey = f.mean(axis=2, keepdims=True)
        f = grey + (f - grey) * p.saturation
        img = np.clip(f, 0, 255).astype(np.uint8)
        if p.hue:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
            hsv[..., 0] = np.mod(hsv[..., 0] + p.hue, 180.0)
            img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return img, np.ascontiguousarray(msk)
