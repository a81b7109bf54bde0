"""The training configuration: one dataclass, loaded from YAML, checked before any work.

Every knob of ``histosam train`` lives here (no module-level state), so a run is reproduced
from its YAML alone; the trainer writes the resolved config beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict

from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.settings import (
    STRICT_CONFIG,
    Epochs,
    Flag,
    Folders,
    Number,
    OptNumber,
    OptPair,
    OptText,
    OptWhole,
    Pair,
    Table,
    Text,
    Whole,
    parse_settings,
    read_yaml_mapping,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    """Every knob of a training run; values from a file are checked by the one settings loader
    (histosam.backend.core.settings): typed, unknown keys refused, one line per mistake."""

    __pydantic_config__: ClassVar[ConfigDict] = STRICT_CONFIG

    name: Text = "md"
    base_model: Text = "lite_medsam"
    decoder: Table = field(default_factory=lambda: {"variant": "stock"})
    # Start from a fine-tune (decoder-weights .safetensors of the same base model, relative to the
    # repository or absolute) instead of the base model's own decoder: e.g. grow refine_hq's
    # zero-initialised high-resolution head on top of an already click-trained stock decoder.
    init_weights: OptText = None
    # Which parts learn (the paper's md / ie_md / whole; the rest stays frozen).
    train_image_encoder: Flag = False
    train_prompt_encoder: Flag = False
    train_decoder: Flag = True
    click_disk_radius: Number = 0.0
    click_disk_mode: Text = "add"  # "override": a click disk replaces the previous logits (sam_model.py)
    # Data: folders with images/ and masks/. ``holdout`` patches per training folder are kept
    # out of training as an internal validation split; ``val_data`` is never trained on.
    train_data: Folders = field(default_factory=lambda: ["../shared/data/patches/ocdc",
                                                           "../shared/data/patches/ebhi"])
    holdout: Whole = 2
    # Times each training folder's patches come up per epoch, by folder name (default 1): the
    # balance between a few tumour-region patches and thousands of gland patches.
    repeat: Table = field(default_factory=dict)
    # At most this many patches of a training folder, by folder name (a seeded random subset):
    # every patch costs one frozen-encoder pass per augmentation variant to cache.
    max_patches: Table = field(default_factory=dict)
    val_data: Folders = field(default_factory=lambda: ["../shared/data/patches/glas"])
    val_fraction: OptPair = (0.2, 0.8)
    val_limit: OptWhole = 8
    val_max_clicks: Whole = 10
    val_every: Whole = 1
    select_on: Text = "internal"  # "internal" (held-out train patches) or a val_data folder name
    # Schedule (paper defaults).
    epochs: Whole = 30
    lr: Number = 5e-4
    lr_milestones: Epochs = (20, 25)
    lr_gamma: Number = 0.1
    batch_size: Whole = 4
    max_steps_per_epoch: OptWhole = None
    max_minutes: OptNumber = None  # stop (checkpointed) after this wall time
    # Click simulation.
    max_extra_clicks: Whole = 3
    loss_every_round: Flag = False
    box_probability: Number = 0.0
    mask_drop_probability: Number = 0.0
    ritm_click_probability: Number = 0.0
    aux_stock_loss: Number = 0.25
    # Click consistency: BCE toward the click label on a disk around every click (losses.py).
    click_loss_weight: Number = 0.0
    click_loss_radius: Number = 2.0  # low-res (256 grid) pixels  # refine_hq: loss on its SAM path too (the stock-interface decoder)
    # Loss (Normalized Focal Loss).
    alpha: Number = 0.5
    gamma: Number = 2.0
    # Augmentation: ``aug_variants`` fixed random augmentations per image (variant 0 is the
    # identity), so the frozen encoder's embedding of each is computed once and cached.
    aug_variants: Whole = 4
    flips: Flag = True
    rot90: Flag = True
    scale_range: Pair = (0.6, 1.0)
    crop_size_px: OptWhole = None  # native-resolution crops of this size instead of scale_range
    colour_jitter: Number = 0.1
    # Runtime.
    seed: Whole = 0
    num_threads: Whole = 2
    cache_dir: OptText = None  # default: $HISTOSAM_HOME or ~/.cache/histosam, /embeddings

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "val_every", "val_max_clicks", "num_threads"):
            if getattr(self, key) < 1:
                raise InvalidInputError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("holdout", "seed"):
            if getattr(self, key) < 0:
                raise InvalidInputError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}")
        if self.max_extra_clicks < 0:
            raise InvalidInputError("max_extra_clicks must be >= 0")
        for key in ("box_probability", "mask_drop_probability", "ritm_click_probability"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise InvalidInputError(f"{key} must be in [0, 1], got {v}")
        lo, hi = self.scale_range
        if not 0.0 < lo <= hi <= 1.0:
            raise InvalidInputError(f"scale_range needs 0 < lo <= hi <= 1, got {self.scale_range}")
        if self.aug_variants < 1:
            raise InvalidInputError("aug_variants must be at least 1")
        if self.click_disk_mode not in ("add", "override"):
            raise InvalidInputError(f"click_disk_mode must be 'add' or 'override', got {self.click_disk_mode!r}")
        if self.click_loss_weight < 0 or self.click_loss_radius < 0:
            raise InvalidInputError("click_loss_weight and click_loss_radius must be >= 0")
        for key in ("repeat", "max_patches"):
            for name, times in getattr(self, key).items():
                if isinstance(times, bool) or not isinstance(times, int) or times < 1:
                    raise InvalidInputError(f"{key}.{name} must be a whole number >= 1, got {times!r}")
        if not self.train_data:
            raise InvalidInputError("train_data is empty: name the patch folders in the config or with --train-data")
        if not (self.train_decoder or self.train_prompt_encoder or self.train_image_encoder):
            raise InvalidInputError("nothing to train: set train_decoder/train_prompt_encoder/train_image_encoder")

    @property
    def encoder_frozen(self) -> bool:
        return not self.train_image_encoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_data_path(path: str) -> Path:
    """A data folder as given, else relative to the repository root (configs say ../shared)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise InvalidInputError(f"data folder {path} is a file, not a folder of images/ and masks/")
    env = os.environ.get("HISTOSAM_DATA")
    if env and "shared/data/" in path:
        alt = Path(env) / path.split("shared/data/", 1)[1]
        if alt.is_dir():
            return alt
    alt = REPO_ROOT / path
    if alt.is_dir():
        return alt.resolve()
    raise NotFoundError(f"data folder {path} not found{_looked_in()}")


def resolve_repo_path(path: str) -> Path:
    """A file path as given (absolute or relative to the working directory), else relative to
    the repository root; NotFoundError when neither exists."""
    p = Path(path).expanduser()
    for candidate in (p, REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise NotFoundError(f"file {path} not found{_looked_in()}")


def _looked_in() -> str:
    """Where relative paths were tried, each place once."""
    places = dict.fromkeys(str(p) for p in (Path.cwd(), REPO_ROOT))
    return f" (relative to {' or '.join(places)})"


def config_from_dict(raw: dict[str, Any], validate: bool = True) -> TrainConfig:
    cfg = parse_settings(TrainConfig, raw, "config key")
    if validate:
        cfg.validate()
    return cfg


def load_config(path: str | Path, validate: bool = True) -> TrainConfig:
    """The config in ``path``; ``validate=False`` leaves the check to the caller, for recipes
    whose data folders come from the command line (``own_tissue.yaml``)."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # `--config training/configs/X.yaml` from any folder, like the data paths
    if not path.is_file():
        raise NotFoundError(f"config {path} does not exist")
    raw = read_yaml_mapping(path, "config")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, validate=validate)
