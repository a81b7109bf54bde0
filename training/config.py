"""The training configuration: one dataclass, loaded from YAML, checked before any work.

Every knob of ``histosam train`` lives here (no module-level state), so a run is reproduced
from its YAML alone; the trainer writes the resolved config beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histosam.backend.errors import InvalidInputError, NotFoundError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    name: str = "md"
    base_model: str = "lite_medsam"
    decoder: dict[str, Any] = field(default_factory=lambda: {"variant": "stock"})
    # Start from a fine-tune (decoder-weights .safetensors of the same base model, relative to the
    # repository or absolute) instead of the base model's own decoder: e.g. grow refine_hq's
    # zero-initialised high-resolution head on top of an already click-trained stock decoder.
    init_weights: str | None = None
    # Which parts learn (the paper's md / ie_md / whole; the rest stays frozen).
    train_image_encoder: bool = False
    train_prompt_encoder: bool = False
    train_decoder: bool = True
    click_disk_radius: float = 0.0
    click_disk_mode: str = "add"  # "override": a click disk replaces the previous logits (sam_model.py)
    # Data: folders with images/ and masks/. ``holdout`` patches per training folder are kept
    # out of training as an internal validation split; ``val_data`` is never trained on.
    train_data: list[str] = field(default_factory=lambda: ["../shared/data/patches/ocdc",
                                                           "../shared/data/patches/ebhi"])
    holdout: int = 2
    # Times each training folder's patches come up per epoch, by folder name (default 1): the
    # balance between a few tumour-region patches and thousands of gland patches.
    repeat: dict[str, int] = field(default_factory=dict)
    # At most this many patches of a training folder, by folder name (a seeded random subset):
    # every patch costs one frozen-encoder pass per augmentation variant to cache.
    max_patches: dict[str, int] = field(default_factory=dict)
    val_data: list[str] = field(default_factory=lambda: ["../shared/data/patches/glas"])
    val_fraction: tuple[float, float] | None = (0.2, 0.8)
    val_limit: int | None = 8
    val_max_clicks: int = 10
    val_every: int = 1
    select_on: str = "internal"  # "internal" (held-out train patches) or a val_data folder name
    # Schedule (paper defaults).
    epochs: int = 30
    lr: float = 5e-4
    lr_milestones: tuple[int, ...] = (20, 25)
    lr_gamma: float = 0.1
    batch_size: int = 4
    max_steps_per_epoch: int | None = None
    max_minutes: float | None = None  # stop (checkpointed) after this wall time
    # Click simulation.
    max_extra_clicks: int = 3
    loss_every_round: bool = False
    box_probability: float = 0.0
    mask_drop_probability: float = 0.0
    ritm_click_probability: float = 0.0
    aux_stock_loss: float = 0.25
    # Click consistency: BCE toward the click label on a disk around every click (losses.py).
    click_loss_weight: float = 0.0
    click_loss_radius: float = 2.0  # low-res (256 grid) pixels  # refine_hq: loss on its SAM path too (the stock-interface decoder)
    # Loss (Normalized Focal Loss).
    alpha: float = 0.5
    gamma: float = 2.0
    # Augmentation: ``aug_variants`` fixed random augmentations per image (variant 0 is the
    # identity), so the frozen encoder's embedding of each is computed once and cached.
    aug_variants: int = 4
    flips: bool = True
    rot90: bool = True
    scale_range: tuple[float, float] = (0.6, 1.0)
    crop_size_px: int | None = None  # native-resolution crops of this size instead of scale_range
    colour_jitter: float = 0.1
    # Runtime.
    seed: int = 0
    num_threads: int = 2
    cache_dir: str | None = None  # default: $HISTOSAM_HOME or ~/.cache/histosam, /embeddings

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


def _typed(key: str, kind: str, value: Any) -> Any:
    """``value`` as the field's type, or one clear line: YAML gives ``1e-4`` as a string (YAML 1.1
    floats need a dot) and ``epochs: 1.5`` as a float, and both used to end in a traceback."""
    if value is None:
        if "None" in kind:
            return None
        raise InvalidInputError(f"config key {key} needs a value")
    base = kind.split("|")[0].strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise InvalidInputError(f"config key {key} must be true or false, got {value!r}")
        return value
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise InvalidInputError(f"config key {key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"config key {key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise InvalidInputError(f"config key {key} must be a finite number, got {value!r}")
        if base == "float":
            return number
        if not number.is_integer():
            raise InvalidInputError(f"config key {key} must be a whole number, got {value!r}")
        return int(number)
    if base == "str" and not isinstance(value, str):
        raise InvalidInputError(f"config key {key} must be text, got {value!r}")
    if base.startswith("dict") and not isinstance(value, dict):
        raise InvalidInputError(f"config key {key} must be a mapping, e.g. {{variant: stock}}, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any], validate: bool = True) -> TrainConfig:
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InvalidInputError(f"unknown config key(s): {', '.join(unknown)}")
    values = {k: _typed(k, str(known[k].type), v) for k, v in raw.items()}
    for key in ("train_data", "val_data"):
        if key in values and not (isinstance(values[key], list) and all(isinstance(d, str) for d in values[key])):
            raise InvalidInputError(f"config key {key} must be a list of folders, got {values[key]!r}")
    for key in ("val_fraction", "lr_milestones", "scale_range"):
        if values.get(key) is not None:
            whole = key == "lr_milestones"
            try:
                numbers = tuple(float(v) for v in values[key])
            except (TypeError, ValueError):
                raise InvalidInputError(f"config key {key} must be a list of numbers, got {values[key]!r}") from None
            if key != "lr_milestones" and len(numbers) != 2:
                raise InvalidInputError(f"config key {key} must be two numbers [lo, hi], got {values[key]!r}")
            if whole and not all(n.is_integer() for n in numbers):
                raise InvalidInputError(f"config key {key} must be whole epochs, got {values[key]!r}")
            values[key] = tuple(int(n) for n in numbers) if whole else numbers
    cfg = TrainConfig(**values)
    if validate:
        cfg.validate()
    return cfg


def load_config(path: str | Path, validate: bool = True) -> TrainConfig:
    """The config in ``path``; ``validate=False`` leaves the check to the caller, for recipes
    whose data folders come from the command line (``own_tissue.yaml``)."""
    import yaml

    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # `--config training/configs/X.yaml` from any folder, like the data paths
    if not path.is_file():
        raise NotFoundError(f"config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"config {path} must be a mapping of keys to values")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, validate=validate)
