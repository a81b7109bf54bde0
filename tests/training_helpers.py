"""Shared helpers for the training tests: a small synthetic patch dataset and a tiny config."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_blob_dataset(root: Path, n: int = 6, size: int = 96, seed: int = 0) -> Path:
    """images/ + masks/ of textured patches with one elliptic 'tumour' each (real PNG files)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        c = rng.integers(size // 3, 2 * size // 3, 2)
        axes = rng.integers(size // 6, size // 3, 2)
        cv2.ellipse(mask, (int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])), 0, 0, 360, 255, -1)
        img = rng.integers(150, 230, (size, size, 3)).astype(np.uint8)
        img[mask > 0] = (img[mask > 0] * np.array([0.6, 0.3, 0.7])).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"p{i:02d}.png"), img)
        cv2.imwrite(str(root / "masks" / f"p{i:02d}.png"), mask)
    return root


def tiny_config(data: Path, **overrides):
    from histosam.training.config import config_from_dict

    raw = {
        "name": "tiny", "base_model": "tiny_sam", "train_data": [str(data)], "holdout": 0,
        "val_data": [], "epochs": 1, "batch_size": 2, "aug_variants": 2, "num_threads": 1,
        "max_extra_clicks": 1,
    }
    raw.update(overrides)
    return config_from_dict(raw)
