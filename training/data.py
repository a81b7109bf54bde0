"""Training samples: augmented patches, their letterboxed targets and cached embeddings.

With a frozen image encoder the embedding of an (image, augmentation) pair never changes, so
it is computed once and stored on disk under a signature of everything it depends on (image
bytes, augmentation parameters, encoder weights, input size): decoder training then never
runs the encoder again, and a changed image, augmentation or model can never hit a stale
entry. Writes are atomic (temp file + rename), so parallel ranks may fill the same cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from histosam.backend.core.atomic import atomic_write
from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.transforms import ImageTransform
from histosam.backend.evaluation.splits import in_part, load_splits
from histosam.backend.wsi.patches import PatchRecord, load_patch_dataset
from histosam.training.augment import AugParams, apply_aug, identity, sample_aug
from histosam.training.config import TrainConfig, resolve_data_path


def read_pair(rec: PatchRecord) -> tuple[np.ndarray, np.ndarray]:
    bgr = cv2.imread(str(rec.image_path), cv2.IMREAD_COLOR)
    grey = cv2.imread(str(rec.mask_path), cv2.IMREAD_GRAYSCALE)
    if bgr is None or grey is None:
        raise InvalidInputError(f"cannot read patch {rec.stem} ({rec.image_path}, {rec.mask_path})")
    if bgr.shape[:2] != grey.shape:
        raise InvalidInputError(f"patch {rec.stem}: image is {bgr.shape[1]}x{bgr.shape[0]} but its mask is "
                                f"{grey.shape[1]}x{grey.shape[0]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), grey > 127


@dataclass
class Patch:
    """One training patch in memory, with its fixed augmentation variants."""

    stem: str
    dataset: str
    image: np.ndarray
    mask: np.ndarray
    image_sha: str
    variants: list[AugParams]


def split_records(cfg: TrainConfig) -> tuple[list[tuple[str, PatchRecord]], list[tuple[str, PatchRecord]]]:
    """(train, internal holdout): ``holdout`` patches of each folder drawn at random (seeded);
    none from a folder that has no more patches than that."""
    train, held = [], []
    splits = load_splits()
    for folder in cfg.train_data:
        path = resolve_data_path(folder)
        recs = load_patch_dataset(path)
        if not recs:
            raise InvalidInputError(f"no patches in {path}: its images/ and masks/ are empty")
        name = path.resolve().name
        # The validation source images of splits.yaml are never trained on (e.g. bcss_1019).
        recs = [r for r in recs if in_part(name, r.stem, "train", splits)]
        if not recs:
            raise InvalidInputError(f"no training patches in {path}: splits.yaml keeps all of them for validation")
        cap = cfg.max_patches.get(name)
        if cap is not None and len(recs) > cap:
            keep = np.sort(np.random.default_rng([cfg.seed, 1]).permutation(len(recs))[:cap])
            recs = [recs[i] for i in keep]
        rng = np.random.default_rng(cfg.seed)
        order = list(rng.permutation(len(recs)))
        held_idx = set(order[: cfg.holdout]) if len(recs) > cfg.holdout else set()
        for i, r in enumerate(recs):
            (held if i in held_idx else train).append((name, r))
    if not train:
        raise InvalidInputError("no training patches left after the holdout split")
    return train, held


def load_patches(records: list[tuple[str, PatchRecord]], cfg: TrainConfig) -> list[Patch]:
    out = []
    for name, rec in records:
        image, mask = read_pair(rec)
        if not mask.any():
            continue
        rng = np.random.default_rng([cfg.seed, int(hashlib.sha256(rec.stem.encode()).hexdigest()[:8], 16)])
        variants = [identity(mask.shape)] + [
            sample_aug(mask, rng, flips=cfg.flips, rot90=cfg.rot90, scale_range=cfg.scale_range,
                       crop_size_px=cfg.crop_size_px, colour_jitter=cfg.colour_jitter)
            for _ in range(cfg.aug_variants - 1)
        ]
        sha = hashlib.sha256(Path(rec.image_path).read_bytes()).hexdigest()
        out.append(Patch(rec.stem, name, image, mask, sha, variants))
    return out


@dataclass
class Sample:
    """What one training step needs for one (patch, variant)."""

    image: torch.Tensor  # (3, S, S) preprocessed input
    gt: np.ndarray  # (256, 256) bool, letterboxed
    valid: np.ndarray  # (256, 256) bool
    key: str  # cache signature


def make_sample(patch: Patch, variant: int, transform: ImageTransform, model_sha: str) -> Sample:
    params = patch.variants[variant]
    img, msk = apply_aug(patch.image, patch.mask, params)
    x = torch.from_numpy(transform.apply_image(img)[0])
    gt = transform.mask_to_low_res(msk) > 0.5
    valid = transform.mask_to_low_res(np.ones_like(msk)) > 0.5
    key = hashlib.sha256("|".join([patch.image_sha, params.signature(), model_sha,
                                   str(transform.input_size)]).encode()).hexdigest()
    return Sample(x, gt, valid, key)


class EncoderFeatureCache:
    """Frozen-encoder embeddings on disk with an in-memory copy, keyed by signature.

    fp16 by default (half the disk and memory; training noise dwarfs the rounding); fp32 for
    evaluations that must match ``TorchPredictor`` exactly.
    """

    def __init__(self, root: Path, dtype: torch.dtype = torch.float16) -> None:
        self.root = Path(root)
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory: dict[str, torch.Tensor] = {}

    def path(self, key: str) -> Path:
        tag = "" if self.dtype == torch.float16 else f".{str(self.dtype).rsplit('.', 1)[-1]}"
        return self.root / key[:2] / f"{key}{tag}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        p = self.path(key)
        if p.is_file():
            try:
                t = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:  # a corrupt entry is recomputed, not trusted
                return None
            self.memory[key] = t
            return t
        return None

    def put(self, key: str, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.detach().to(self.dtype).contiguous().clone()
        atomic_torch_save(emb, self.path(key))
        self.memory[key] = emb
        return emb


def default_cache_root() -> Path:
    from histosam.backend.bundles.catalog import histosam_home

    return histosam_home() / "embeddings"


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save into a temp file beside ``path``, then rename: never a half-written file.

    The file gets the mode a plain open() gives (0o666 & ~umask), not mkstemp's 0o600."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp), durable=True)
