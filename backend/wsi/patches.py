"""Whole slide + annotations -> a folder of image/mask patches that evaluate and train read.

Output folder (the dataset format of ``histosam evaluate`` and ``histosam train``)::

    OUT/images/STEM.png      RGB patch
    OUT/masks/STEM.png       0/255 mask of the chosen classes
    OUT/manifest.csv         one row per patch (stem, slide, x, y in level 0, downsample, ...)
    OUT/params.json          the arguments that made it (guards resumes)
    OUT/overview.png         thumbnail with tissue and the kept patches

Why this shape of pipeline:

* Nothing half-written: work happens in a staging folder ``.OUT.partial`` beside ``OUT``
  and becomes ``OUT`` with one ``os.replace`` when every patch is done, so a reader never sees
  a dataset with missing patches.
* Resumable: every evaluated grid position is journalled in the staging folder as it is
  finished, so a re-run with the same arguments after a crash or Ctrl-C continues where it
  stopped; ``params.json`` refuses a resume with different arguments (which would silently mix
  two datasets).
* Background is skipped before any pixel is read at full scale: a tissue mask from Otsu on
  the saturation of a low-resolution level (glass is unsaturated, H&E is not).
* Bad input (missing slide, corrupt annotations, annotations outside the slide, unknown
  class, a scale finer than the slide's level 0) fails before the output folder or the
  staging folder is created.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from histosam.backend.core.atomic import atomic_write, replace_dir, write_text
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.wsi.annotations import AnnotationSource, load_annotations
from histosam.backend.wsi.slides import ScaleRequest, Slide

PARAMS_FILE = "params.json"
MANIFEST_FILE = "manifest.csv"
JOURNAL_FILE = "journal.csv"
OVERVIEW_FILE = "overview.png"
MANIFEST_COLUMNS = (
    "stem", "slide", "x", "y", "downsample", "mpp", "magnification", "size",
    "tumour_fraction", "tissue_fraction",
)
JOURNAL_COLUMNS = ("stem", "kept", *MANIFEST_COLUMNS[2:])
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FORMAT_VERSION = 1
# Saturation thresholds (0-255) for the tissue mask: Otsu alone splits pale stroma from
# eosin-rich tissue on slides that are mostly tissue, so it is capped; the floor keeps glass
# noise out on slides that are mostly glass.
TISSUE_SATURATION_CAP = 20.0
TISSUE_SATURATION_FLOOR = 8.0
# The tissue thumbnail: the coarsest level with at least this long a side (then shrunk to at
# most TISSUE_THUMB_MAX).
TISSUE_THUMB_MIN = 1024
TISSUE_THUMB_MAX = 2048
OVERVIEW_MAX_SIDE = 1024
# Patches finer than level 0 would be upsampled slide pixels, not more detail: refused. Asked
# for by µm/px or magnification they may be this much finer (downsample >= 0.9), because
# scanners sold as 40x/20x differ from the nominal 0.25/0.5 µm/px (a GT450 scans at 0.2635:
# --mpp 0.25 is a downsample of 0.949). An explicit --downsample must be at least 1.
MIN_DOWNSAMPLE = 0.9


@dataclass(frozen=True)
class PatchConfig:
    """Everything that defines a patch dataset (and so must match to resume one)."""

    slide: Path
    annotations: Path
    out: Path
    size: int = 400
    stride: int | None = None  # default: size (no overlap)
    magnification: float | None = None
    mpp: float | None = None
    downsample: float | None = None
    classes: tuple[str, ...] | None = None  # None: the file's default classes
    exclude_classes: tuple[str, ...] | None = None  # None: the file's default exclusions
    fraction: tuple[float, float] | None = None  # keep patches whose mask fraction is in range
    tissue_threshold: float = 0.25
    base_mpp: float | None = None
    base_magnification: float | None = None
    label_map: dict[int, str] | None = None
    label_channel: int = 0

    def validate(self) -> None:
        ScaleRequest(self.downsample, self.magnification, self.mpp)
        if self.size <= 0 or self.size > 8192:
            raise InvalidInputError(f"--size must be in 1..8192 pixels, got {self.size}")
        if self.stride is not None and self.stride <= 0:
            raise InvalidInputError(f"--stride must be positive, got {self.stride}")
        if self.fraction is not None:
            lo, hi = self.fraction
            if not (0.0 <= lo <= hi <= 1.0):
                raise InvalidInputError(f"--fraction needs 0 <= LO <= HI <= 1, got {lo} {hi}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise InvalidInputError(f"--tissue-threshold must be in 0..1, got {self.tissue_threshold}")


@dataclass
class PatchSummary:
    out: Path
    downsample: float
    mpp: float | None
    n_grid: int = 0  # grid positions inside the slide
    n_tissue: int = 0  # positions with enough tissue
    n_written: int = 0  # patches in the dataset
    n_resumed: int = 0  # positions already done by an earlier run (not redone)
    n_rejected: int = 0  # tissue positions outside the fraction range
    seconds: float = 0.0
    already_complete: bool = False
    classes: list[str] = field(default_factory=list)
    labels: str | None = None  # a label mask: which label values made the mask

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


class PatchRecord(NamedTuple):
    """One patch of a dataset folder: ``(stem, image_path, mask_path)``."""

    stem: str
    image_path: Path
    mask_path: Path


# --------------------------------------------------------------------------- dataset reading


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def load_patch_dataset(directory: str | Path) -> list[PatchRecord]:
    """The (stem, image_path, mask_path) triples of a patch folder.

    With a ``manifest.csv`` its rows give the stems (and order); otherwise ``images/`` and
    ``masks/`` are paired by file stem. A patch without its partner is an error rather than
    skipped, so a damaged dataset is noticed.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotFoundError(f"patch dataset {root} does not exist")
    img_dir, mask_dir = root / "images", root / "masks"
    if not (img_dir.is_dir() and mask_dir.is_dir()):
        raise InvalidInputError(f"{root} is not a patch dataset: it needs images/ and masks/ folders")
    images, masks = _by_stem(img_dir), _by_stem(mask_dir)
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "stem" not in reader.fieldnames:
                raise InvalidInputError(f"{manifest} has no 'stem' column")
            stems = [row["stem"] for row in reader]
        missing = [s for s in stems if s not in images or s not in masks]
        if missing:
            raise InvalidInputError(
                f"{root}: {len(missing)} patch(es) of {MANIFEST_FILE} have no image or mask, e.g. {missing[0]!r}"
            )
    else:
        unpaired = sorted(set(images) ^ set(masks))
        if unpaired:
            raise InvalidInputError(
                f"{root}: {len(unpaired)} file(s) without a partner in images/ and masks/, e.g. {unpaired[0]!r}"
            )
        stems = sorted(images)
    return [PatchRecord(s, images[s], masks[s]) for s in stems]


# --------------------------------------------------------------------------- tissue


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue map of the whole slide at ``downsample`` (level-0 px per pixel)."""

    mask: np.ndarray
    downsample: float
    thumbnail: np.ndarray
    threshold: float
    _integral: np.ndarray = field(repr=False)

    def fraction(self, x: float, y: float, extent: float) -> float:
        """Tissue fraction of the level-0 square (x, y, extent) (by thumbnail pixels)."""
        h, w = self.mask.shape
        c0 = min(w - 1, max(0, math.floor(x / self.downsample)))
        r0 = min(h - 1, max(0, math.floor(y / self.downsample)))
        c1 = min(w, max(c0 + 1, math.ceil((x + extent) / self.downsample)))
        r1 = min(h, max(r0 + 1, math.ceil((y + extent) / self.downsample)))
        s = self._integral
        total = s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
        return float(total) / ((r1 - r0) * (c1 - c0))


def detect_tissue(slide: Slide) -> TissueMask:
    """Otsu on saturation (capped, see TISSUE_SATURATION_CAP) of a low-resolution level."""
    big_enough = [
        i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) >= TISSUE_THUMB_MIN
    ]
    level = max(big_enough) if big_enough else 0
    ds = slide.level_downsamples[level]
    w0, h0 = slide.dimensions
    ds = max(ds, max(w0, h0) / TISSUE_THUMB_MAX)
    thumb = slide.read_scaled(0, 0, max(1, math.floor(w0 / ds)), max(1, math.floor(h0 / ds)), ds)
    saturation = cv2.medianBlur(cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1], 5)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, TISSUE_SATURATION_FLOOR, TISSUE_SATURATION_CAP))
    mask = saturation > threshold
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    return TissueMask(mask=mask, downsample=ds, thumbnail=thumb, threshold=threshold, _integral=integral)


# --------------------------------------------------------------------------- extraction


def grid_positions(dimensions: tuple[int, int], extent: float, step: float) -> Iterator[tuple[int, int]]:
    """Level-0 top-left corners of a row-major grid of ``extent`` squares inside the slide."""
    w, h = dimensions
    nx = int(math.floor((w - extent) / step + 1e-9)) + 1 if w >= extent else 0
    ny = int(math.floor((h - extent) / step + 1e-9)) + 1 if h >= extent else 0
    for j in range(ny):
        for i in range(nx):
            yield round(i * step), round(j * step)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt(v: float | None, digits: int = 6) -> str:
    return "" if v is None else f"{v:.{digits}g}"


def _write_png(path: Path, image: np.ndarray) -> None:
    """PNG written beside its name then renamed: a crash never leaves a truncated file."""
    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"cannot write {path}")

    atomic_write(path, write)


def _write_text_atomic(path: Path, text: str) -> None:
    write_text(path, text)


def _read_journal(path: Path, repair: bool = False) -> dict[str, dict[str, str]]:
    """Rows of the journal by stem (the last row of a stem wins).

    A crash can tear the last line; ``repair`` cuts it off so rows appended by the resumed
    run start on a line of their own.
    """
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if repair and raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        with path.open("r+b") as fh:
            fh.truncate(len(raw))
    rows = csv.DictReader(raw.decode("utf-8", errors="replace").splitlines())
    done = {}
    for row in rows:
        if None in row or any(row.get(c) is None for c in JOURNAL_COLUMNS):
            continue
        done[row["stem"]] = row
    return done


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _load_params(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _params_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]


class _Prepared(NamedTuple):
    slide: Slide
    annotations: AnnotationSource
    classes: list[str]
    exclude: list[str]
    downsample: float
    params: dict[str, Any]


def _prepare(config: PatchConfig) -> _Prepared:
    """Open and check every input; raises before anything is written."""
    config.validate()
    slide = Slide(config.slide, base_mpp=config.base_mpp, base_magnification=config.base_magnification)
    ann: AnnotationSource | None = None
    try:
        ds = slide.downsample_for(downsample=config.downsample, magnification=config.magnification, mpp=config.mpp)
        _check_not_upsampled(slide, config, ds)
        ann = load_annotations(config.annotations, label_map=config.label_map, label_channel=config.label_channel)
        ann.check_within(slide.dimensions)
        classes = ann.check_classes(config.classes) if config.classes else ann.default_classes()
        if not classes:
            raise InvalidInputError(
                f"{Path(config.annotations).name} has no annotation classes to extract"
            )
        if not config.classes and len(classes) > 1 and hasattr(ann, "present_labels"):
            _refuse_every_label(ann, classes, Path(config.annotations).name)
        exclude = (
            ann.check_classes(config.exclude_classes, excluding=True)
            if config.exclude_classes
            else [c for c in ann.default_exclusions() if c not in classes]
        )
    except BaseException:
        slide.close()
        if ann is not None and hasattr(ann, "close"):
            ann.close()
        raise
    params = {
        "format_version": FORMAT_VERSION,
        "slide": str(Path(config.slide).resolve()),
        "slide_hash": slide.properties.get("openslide.quickhash-1") or _file_digest(Path(config.slide)),
        "annotations": str(Path(config.annotations).resolve()),
        "annotations_sha256": _file_digest(Path(config.annotations)),
        "classes": classes,
        "exclude_classes": exclude,
        "label_map": {str(k): v for k, v in sorted((config.label_map or {}).items())},
        "label_channel": config.label_channel,
        "scale": ScaleRequest(config.downsample, config.magnification, config.mpp).describe(),
        "downsample": ds,
        "base_mpp": slide.mpp,
        "base_magnification": slide.magnification,
        "size": config.size,
        "stride": config.stride or config.size,
        "fraction": list(config.fraction) if config.fraction else None,
        "tissue_threshold": config.tissue_threshold,
    }
    return _Prepared(slide, ann, classes, exclude, ds, params)


def _refuse_every_label(ann: AnnotationSource, classes: list[str], name: str) -> None:
    """A label mask holding several classes, and no --classes: taking them all as foreground
    would make stroma and benign tissue "tumour" without a word (PANDA holds 1 = stroma,
    2 = benign, 3-5 = Gleason)."""
    labels = ", ".join(str(v) for v in ann.present_labels())  # type: ignore[attr-defined]
    raise InvalidInputError(
        f"{name} is a label mask holding {len(classes)} classes ({', '.join(classes)}; labels present: {labels}): "
        f"say which make the mask, e.g. --classes {classes[-1]} (or name labels with --label-map 3=tumour ...)"
    )


def label_note(ann: AnnotationSource, classes: Sequence[str]) -> str | None:
    """For a label mask: which label values the classes took (None for vector annotations)."""
    labels_of = getattr(ann, "labels_of", None)
    if labels_of is None:
        return None
    present = ann.present_labels()  # type: ignore[attr-defined]
    taken = ", ".join(str(v) for v in labels_of(classes)) or "none"
    return f"labels {taken} taken as foreground (present: {', '.join(str(v) for v in present)})"


def _check_not_upsampled(slide: Slide, config: PatchConfig, ds: float) -> None:
    """Refuse a scale finer than the slide's level 0 (see MIN_DOWNSAMPLE)."""
    floor = 1.0 if config.downsample is not None else MIN_DOWNSAMPLE
    if ds >= floor - 1e-9:
        return
    if config.magnification is not None:
        asked = f"--magnification {config.magnification:g}"
        limit = f"ask for at most {slide.magnification:g}x"
    elif config.mpp is not None:
        asked = f"--mpp {config.mpp:g}"
        limit = f"ask for at least {slide.mpp:.4g} µm/px"
    else:
        asked = f"--downsample {config.downsample:g}"
        limit = "ask for a downsample of at least 1"  # the slide's scale plays no part
    base = ", ".join(
        b for b in (
            f"{slide.magnification:g}x" if slide.magnification is not None else "",
            f"{slide.mpp:.4g} µm/px" if slide.mpp is not None else "",
        ) if b
    ) or "scale not recorded"
    fix = "" if config.downsample is not None else (
        ", or correct the slide's scale with --base-magnification / --base-mpp if it is wrong"
    )
    raise InvalidInputError(
        f"{asked} is finer than level 0 of {Path(config.slide).name} ({base}): its patches would "
        f"be the slide's pixels upsampled {1 / ds:.3g}x; {limit}{fix}"
    )


def _check_out_dir(out: Path, params: dict[str, Any]) -> bool:
    """True when ``out`` is already this very dataset; raises when it is something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    previous = _load_params(out / PARAMS_FILE)
    if previous is None:
        if any(out.iterdir()):
            raise InvalidInputError(f"--out {out} exists, is not empty and is not a patch dataset")
        return False
    diffs = _params_differences(previous, params)
    if diffs:
        raise InvalidInputError(
            f"--out {out} holds a dataset made with other arguments ({'; '.join(diffs[:3])}); "
            "choose another --out or delete it"
        )
    return True


def extract_patches(config: PatchConfig, *, progress: bool = True, overview: bool = True) -> PatchSummary:
    """Write (or finish writing) the patch dataset of ``config`` (see the module docstring).

    ``overview=False`` skips ``overview.png`` (matplotlib costs seconds; benchmarks and tests
    of the pipeline itself do not need the picture).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    prep = _prepare(config)
    slide, ann, ds = prep.slide, prep.annotations, prep.downsample
    out = Path(config.out)
    summary = PatchSummary(out=out, downsample=ds, mpp=slide.mpp_at(ds), classes=prep.classes,
                           labels=label_note(ann, prep.classes))
    try:
        if _check_out_dir(out, prep.params):
            summary.already_complete = True
            summary.n_written = len(load_patch_dataset(out))
            summary.seconds = time.perf_counter() - start
            return summary
        stage = staging_dir(out)
        if stage.exists():
            previous = _load_params(stage / PARAMS_FILE)
            if previous is not None and (diffs := _params_differences(previous, prep.params)):
                raise InvalidInputError(
                    f"an interrupted run in {stage} used other arguments ({'; '.join(diffs[:3])}); "
                    "re-run it with those arguments to finish it, or delete that folder"
                )
        try:
            (stage / "images").mkdir(parents=True, exist_ok=True)
            (stage / "masks").mkdir(exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot create the output folder beside {out}: {exc}") from exc
        _write_text_atomic(stage / PARAMS_FILE, json.dumps(prep.params, indent=2, sort_keys=True) + "\n")

        done = _read_journal(stage / JOURNAL_FILE, repair=True)
        for stem, row in list(done.items()):  # a kept patch whose files went missing is redone
            if row["kept"] == "1" and not (
                (stage / "images" / f"{stem}.png").is_file() and (stage / "masks" / f"{stem}.png").is_file()
            ):
                del done[stem]
        tissue = detect_tissue(slide)
        extent = config.size * ds
        step = (config.stride or config.size) * ds
        positions = list(grid_positions(slide.dimensions, extent, step))
        summary.n_grid = len(positions)
        candidates = [(x, y, f) for x, y in positions if (f := tissue.fraction(x, y, extent)) >= config.tissue_threshold]
        summary.n_tissue = len(candidates)
        slide_stem = Path(config.slide).name.split(".")[0]
        lo, hi = config.fraction if config.fraction else (0.0, 1.0)
        mag = None if slide.magnification is None else slide.magnification / ds

        journal_new = not (stage / JOURNAL_FILE).is_file() or (stage / JOURNAL_FILE).stat().st_size == 0
        with (stage / JOURNAL_FILE).open("a", newline="", encoding="utf-8") as jf:
            writer = csv.writer(jf)
            if journal_new:
                writer.writerow(JOURNAL_COLUMNS)
            bar = tqdm(candidates, desc=f"patches {slide_stem}", unit="pos", disable=not progress)
            for x, y, tissue_fraction in bar:
                stem = f"{slide_stem}_x{x:06d}_y{y:06d}"
                if stem in done:
                    summary.n_resumed += 1
                    continue
                mask = ann.rasterise(x, y, config.size, config.size, ds, prep.classes, prep.exclude)
                fraction = float(mask.mean())
                kept = lo <= fraction <= hi
                if kept:
                    rgb = slide.read_scaled(x, y, config.size, config.size, ds)
                    _write_png(stage / "images" / f"{stem}.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                    _write_png(stage / "masks" / f"{stem}.png", mask.astype(np.uint8) * 255)
                else:
                    summary.n_rejected += 1
                writer.writerow([
                    stem, int(kept), x, y, _fmt(ds, 10), _fmt(slide.mpp_at(ds)), _fmt(mag),
                    config.size, f"{fraction:.6f}", f"{tissue_fraction:.6f}",
                ])
                jf.flush()
        rows = _read_journal(stage / JOURNAL_FILE)
        kept_rows = [r for r in rows.values() if r["kept"] == "1"]
        if not kept_rows:
            shutil.rmtree(stage)  # nothing to resume: the same arguments give nothing again
            raise InvalidInputError(_why_empty(config, summary, len(rows), slide.dimensions))
        drawing = Overview(tissue, extent, ann, prep.classes, prep.exclude, config, ds) if overview else None
        _finalise(stage, out, kept_rows, str(Path(config.slide).name), drawing)
        summary.n_written = len(kept_rows)
        summary.n_rejected = len(rows) - len(kept_rows)
    finally:
        slide.close()
        close = getattr(ann, "close", None)
        if close:
            close()
    summary.seconds = time.perf_counter() - start
    return summary


def _why_empty(config: PatchConfig, summary: PatchSummary, n_judged: int, dimensions: tuple[int, int]) -> str:
    """Why no patch was kept, and what to change: an empty dataset is no result."""
    ds, size = summary.downsample, config.size
    if summary.n_grid == 0:
        w, h = dimensions
        return (f"no patch: the {w}x{h} slide is {w / ds:.0f}x{h / ds:.0f} px at downsample {ds:g}, smaller than one "
                f"{size}-px patch; use a smaller --downsample / larger --magnification, or a smaller --size")
    if summary.n_tissue == 0:
        return (f"no patch: none of the {summary.n_grid} grid positions has a tissue fraction of at least "
                f"--tissue-threshold {config.tissue_threshold:g}; lower it, or check the slide")
    lo, hi = config.fraction if config.fraction else (0.0, 1.0)
    return (f"no patch: all {n_judged} patches on tissue have an annotation fraction outside --fraction {lo:g} {hi:g} "
            f"(classes {', '.join(summary.classes)}); widen --fraction, or check --classes and the annotations")


def _finalise(
    stage: Path,
    out: Path,
    kept_rows: Sequence[dict[str, str]],
    slide_name: str,
    overview: Overview | None,
) -> None:
    """Manifest + overview into the staging folder, then the staging folder becomes ``out``."""
    kept_rows = sorted(kept_rows, key=lambda r: (int(r["y"]), int(r["x"])))
    # Leftovers of an interrupted run (a temp file, an image whose mask never came) go.
    kept = {r["stem"] for r in kept_rows}
    for sub in ("images", "masks"):
        for f in (stage / sub).iterdir():
            if f.name.startswith(".") or f.stem not in kept:
                f.unlink()
    def write_manifest(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for r in kept_rows:
                writer.writerow([r["stem"], slide_name, *(r[c] for c in MANIFEST_COLUMNS[2:])])

    atomic_write(stage / MANIFEST_FILE, write_manifest)
    if overview is not None:
        _write_overview(stage / OVERVIEW_FILE, overview, kept_rows, slide_name)
    (stage / JOURNAL_FILE).unlink()
    if out.exists():  # an empty folder the user made; rename() cannot replace it
        out.rmdir()
    replace_dir(stage, out)


class Overview(NamedTuple):
    """What overview.png draws besides the kept patches."""

    tissue: TissueMask
    extent: float  # patch side, level-0 px
    annotations: AnnotationSource
    classes: list[str]
    exclude: list[str]
    config: PatchConfig
    downsample: float  # of the patches


ANNOTATION_COLOUR = "magenta"  # overview.png: the annotation's outline
TISSUE_COLOUR = "tab:blue"


def _write_overview(path: Path, overview: Overview, rows: Sequence[dict[str, str]], slide_name: str) -> None:
    """Thumbnail with the tissue outline (blue), the annotation outline (magenta) and the kept
    patches coloured by mask fraction, with a legend and a colour bar."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it was
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    tissue, extent = overview.tissue, overview.extent
    h, w = tissue.mask.shape
    shrink = max(1.0, max(h, w) / OVERVIEW_MAX_SIDE)  # a picture, not a measurement
    size = (max(1, round(w / shrink)), max(1, round(h / shrink)))
    thumb = cv2.resize(tissue.thumbnail, size, interpolation=cv2.INTER_AREA)
    tissue_small = cv2.resize(tissue.mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    d = tissue.downsample * w / size[0]
    annotation = overview.annotations.rasterise(0, 0, size[0], size[1], d, overview.classes, overview.exclude)
    fig_w = 8.0
    fig = Figure(figsize=(fig_w, max(2.5, min(24.0, fig_w * h / w))), dpi=100)
    ax = fig.subplots()
    ax.imshow(thumb)
    if tissue_small.min() < 0.5 < tissue_small.max():
        ax.contour(tissue_small, levels=[0.5], colors=TISSUE_COLOUR, linewidths=0.6)
    if annotation.any():
        ax.contour(annotation.astype(np.float32), levels=[0.5], colors=ANNOTATION_COLOUR, linewidths=1.2)
    cmap = colormaps["viridis"]
    for r in rows:
        frac = float(r["tumour_fraction"])
        ax.add_patch(Rectangle((int(r["x"]) / d, int(r["y"]) / d), extent / d, extent / d,
                               fill=False, edgecolor=cmap(frac), linewidth=0.8))
    config = overview.config
    handles = [
        Line2D([], [], color=TISSUE_COLOUR, lw=1, label=f"tissue (patches need {config.tissue_threshold:g} of it)"),
        Line2D([], [], color=ANNOTATION_COLOUR, lw=1.5, label=f"annotation: {', '.join(overview.classes)}"),
        Line2D([], [], color=cmap(0.5), lw=1, label=f"kept patch ({config.size} px), colour = annotation fraction"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)
    bar = fig.colorbar(ScalarMappable(cmap=cmap), ax=ax, fraction=0.03, pad=0.01)
    bar.set_label("annotation fraction of the patch", fontsize=7)
    ax.set_title(f"{slide_name}: {len(rows)} patches of {config.size} px at downsample {overview.downsample:g}",
                 fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def discard_staging(out: Path) -> None:
    """Remove an interrupted run's staging folder (to start over with other arguments)."""
    stage = staging_dir(Path(out))
    if stage.exists():
        shutil.rmtree(stage)
