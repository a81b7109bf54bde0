"""Move annotations between QuPath and histosam: training patches out, predictions in.

Two routes, one behaviour:

* **GeoJSON** (always available; QuPath exports and imports it natively, File > Export /
  Import objects): ``export_patches_from_geojson`` turns a slide plus its exported
  annotations into a patch dataset (the whole-slide pipeline's format, ``histosam.backend.
  patches``); ``merge_predictions_geojson`` adds predicted features to an exported file that
  QuPath then imports.
* **QuPath project** through paquo (``pip install 'histosam[qupath]'`` and a QuPath
  installation, ``PAQUO_QUPATH_DIR``): the same, reading / writing the project's image
  entries directly. paquo is imported only when used: importing it starts a JVM.

Predictions are told apart from the user's annotations by their name: every predicted
feature is named ``histosam prediction`` (a suffix such as ``: Tumor`` may follow). Importing
again replaces the previous predictions and never touches anything else; exporting patches
leaves predictions out unless asked (unreviewed model output is not training data). Every
write is atomic (a temporary file or folder beside the target, then ``os.replace``) and keeps
a timestamped backup of what it replaced; ``dry_run`` reports the plan and writes nothing.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histosam.backend.core.atomic import replace_dir, write_text
from histosam.backend.core.errors import HistosamError, InvalidInputError, NotFoundError
from histosam.backend.core.geometry import (
    DEFAULT_CLASS_NAME,
    NON_REGION_OBJECT_TYPES,
    UNCLASSIFIED,
    geojson_to_polygons,
    geometry_polygons,
)

PREDICTION_NAME = "histosam prediction"


# --------------------------------------------------------------------------- GeoJSON files


def _load_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"GeoJSON file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path.name} is not valid JSON: {exc}") from exc


def _features_of(obj: Any, path: Path) -> tuple[str, list[dict[str, Any]]]:
    """('collection' | 'list' | 'feature', features) of a QuPath GeoJSON export."""
    if isinstance(obj, list):
        kind, features = "list", obj
    elif isinstance(obj, Mapping) and obj.get("type") == "FeatureCollection":
        kind, features = "collection", obj.get("features")
    elif isinstance(obj, Mapping) and obj.get("type") == "Feature":
        kind, features = "feature", [obj]
    else:
        raise InvalidInputError(f"{path.name}: not a GeoJSON FeatureCollection, Feature or list of Features")
    if not isinstance(features, list) or not all(isinstance(f, Mapping) for f in features):
        raise InvalidInputError(f"{path.name}: 'features' must be a list of objects")
    return kind, list(features)


def _properties(feature: Mapping[str, Any]) -> Mapping[str, Any]:
    props = feature.get("properties")
    return props if isinstance(props, Mapping) else {}


def is_prediction(feature: Mapping[str, Any]) -> bool:
    """A feature histosam imported (by its name), as opposed to one a person drew."""
    name = _properties(feature).get("name")
    return isinstance(name, str) and name.startswith(PREDICTION_NAME)


def feature_class(feature: Mapping[str, Any]) -> str:
    cls = _properties(feature).get("classification")
    if isinstance(cls, Mapping) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str) and cls:
        return cls
    return UNCLASSIFIED


def prediction_features(
    path: Path,
    *,
    default_class: str = DEFAULT_CLASS_NAME,
    classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The polygon features of a predictions file, marked as histosam predictions.

    Features without area (points, lines) and detections are refused rather than silently
    dropped: a predictions file holding them is probably the wrong file.
    """
    path = Path(path)
    _, features = _features_of(_load_json(path), path)
    out = []
    for i, feature in enumerate(features):
        props = dict(_properties(feature))
        if str(props.get("objectType", "annotation")).lower() in NON_REGION_OBJECT_TYPES:
            raise InvalidInputError(f"{path.name}: feature {i} is a {props['objectType']}, not an annotation")
        polygons = geometry_polygons(feature.get("geometry"), f"{path.name}: feature {i}")
        if not polygons:
            raise InvalidInputError(f"{path.name}: feature {i} has no polygon (predictions must be areas)")
        if "classification" not in props:
            props["classification"] = {"name": default_class}
        cls = feature_class({"properties": props})
        if classes is not None and cls not in classes:
            continue
        name = props.get("name")
        props["name"] = name if isinstance(name, str) and name.startswith(PREDICTION_NAME) else PREDICTION_NAME
        props["objectType"] = "annotation"
        out.append({"type": "Feature", "geometry": feature["geometry"], "properties": props})
    return out


@dataclass
class MergePlan:
    """What a merge does (or would do, with ``dry_run``)."""

    target: Path
    kept: int = 0  # the user's features, written back unchanged
    replaced: int = 0  # earlier histosam predictions removed
    added: int = 0
    added_by_class: dict[str, int] = field(default_factory=dict)
    backup: Path | None = None
    written: bool = False

    def describe(self) -> str:
        classes = ", ".join(f"{n} {c}" for c, n in sorted(self.added_by_class.items())) or "none"
        verb = "merged into" if self.written else "would merge into"
        return (f"{self.added} prediction(s) ({classes}) {verb} {self.target}; {self.kept} of the user's "
                f"feature(s) kept unchanged, {self.replaced} earlier prediction(s) replaced"
                + (f"; backup {self.backup}" if self.backup else ""))


def backup_path(target: Path) -> Path:
    """``NAME.bak-YYYYmmdd-HHMMSS`` beside ``target`` (a counter when that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = target.with_name(f"{target.name}.bak-{stamp}")
    n = 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.bak-{stamp}-{n}")
        n += 1
    return candidate


def merge_predictions_geojson(
    existing: Path,
    predictions: Path,
    *,
    out: Path | None = None,
    default_class: str = DEFAULT_CLASS_NAME,
    classes: Sequence[str] | None = None,
    dry_run: bool = False,
    backup: bool = True,
) -> MergePlan:
    """Merge predicted features into a QuPath GeoJSON export, for File > Import objects.

    The user's features are written back exactly as read, in their order; earlier histosam
    predictions are replaced by the new ones. ``out`` (default: ``existing`` itself) is
    written atomically after the file it replaces is copied to a timestamped backup.
    """
    existing, predictions = Path(existing), Path(predictions)
    target = Path(out) if out is not None else existing
    obj = _load_json(existing)
    kind, features = _features_of(obj, existing)
    new = prediction_features(predictions, default_class=default_class, classes=classes)
    users = [f for f in features if not is_prediction(f)]
    plan = MergePlan(target=target, kept=len(users), replaced=len(features) - len(users), added=len(new),
                     added_by_class=dict(Counter(feature_class(f) for f in new)))
    if dry_run:
        return plan
    merged = users + new
    if kind == "collection":
        result: Any = dict(obj)
        result["features"] = merged
    elif kind == "list":
        result = merged
    else:
        result = {"type": "FeatureCollection", "features": merged}
    if not target.parent.is_dir():
        raise NotFoundError(f"folder {target.parent} does not exist")
    if backup and target.exists():
        plan.backup = backup_path(target)
        shutil.copy2(target, plan.backup)
    write_text(target, json.dumps(result, indent=1) + "\n")
    plan.written = True
    return plan


def user_annotations_geojson(
    source: Path,
    dest: Path,
    *,
    include_predictions: bool = False,
    classes: Sequence[str] = (),
) -> int:
    """Copy ``source`` to ``dest`` without histosam predictions; the number of features left out.

    ``classes`` must all be present among the region annotations kept (checked before
    anything is written). ``dest`` is written only when its content changes, so a patch
    dataset made from it can resume (the patch pipeline guards a resume with its digest).
    """
    source, dest = Path(source), Path(dest)
    obj = _load_json(source)
    kind, features = _features_of(obj, source)
    keep = features if include_predictions else [f for f in features if not is_prediction(f)]
    try:
        present = sorted({p.class_name for p in geojson_to_polygons(keep)})
    except InvalidInputError as exc:
        raise InvalidInputError(f"{source.name}: {exc}") from None
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise InvalidInputError(
            f"{source.name}: unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"its region annotations{'' if include_predictions else ' (predictions left out)'} have: "
            f"{', '.join(map(repr, present)) or 'none'}"
        )
    text = json.dumps({"type": "FeatureCollection", "features": keep}, indent=1) + "\n"
    if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
        write_text(dest, text)
    return len(features) - len(keep)


def export_patches_from_geojson(
    slide: Path,
    geojson: Path,
    out: Path,
    classes: Sequence[str],
    *,
    include_predictions: bool = False,
    progress: bool = True,
    overview: bool = True,
    **patch_options: Any,
):  # -> PatchSummary
    """A slide + its QuPath GeoJSON export -> a patch dataset of the annotations of ``classes``.

    The features actually used (the export without histosam predictions, unless
    ``include_predictions``) are kept beside the dataset as ``OUT.annotations.geojson``:
    the dataset's params.json points at that file.
    """
    from histosam.backend.wsi.patches import PatchConfig, extract_patches

    out = Path(out)
    if not classes:
        raise InvalidInputError("choose the annotation classes that make the mask (--classes)")
    if not out.parent.is_dir():
        raise NotFoundError(f"folder {out.parent} does not exist")
    used = out.with_name(f"{out.name}.annotations.geojson")
    existed = used.exists()
    user_annotations_geojson(geojson, used, include_predictions=include_predictions, classes=classes)
    config = PatchConfig(slide=Path(slide), annotations=used, out=out, classes=tuple(classes), **patch_options)
    try:
        return extract_patches(config, progress=progress, overview=overview)
    except HistosamError:
        if not existed and not out.exists():
            used.unlink(missing_ok=True)  # a refused run (bad scale, unknown class) leaves nothing behind
        raise


# --------------------------------------------------------------------------- QuPath projects


def _paquo_project_class():
    """paquo's QuPathProject, imported on first use (it starts a JVM running QuPath)."""
    try:
        from paquo.projects import QuPathProject
    except ImportError as exc:
        if "paquo" in str(exc):
            raise HistosamError(
                "reading QuPath projects needs paquo and QuPath: pip install 'histosam[qupath]' and set "
                "PAQUO_QUPATH_DIR to the QuPath installation; or export GeoJSON from QuPath and use "
                "--slide/--geojson"
            ) from None
        raise
    except Exception as exc:  # paquo raises its own errors when it cannot find QuPath
        raise HistosamError(f"paquo cannot start QuPath ({exc}); set PAQUO_QUPATH_DIR to the QuPath folder") from None
    return QuPathProject


def _project_file(project: Path) -> Path:
    project = Path(project)
    path = project / "project.qpproj" if project.is_dir() else project
    if path.suffix != ".qpproj" or not path.is_file():
        raise NotFoundError(f"QuPath project {project} not found (give the .qpproj file or its folder)")
    return path


def uri_to_path(uri: str) -> Path | None:
    """A ``file:`` URI as a local path (None for other schemes)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def match_entry(names: Sequence[str], geojson: Path, image: str | None = None) -> str:
    """The image entry a predictions file belongs to: ``image``, or the file's stem."""
    if image is not None:
        if image not in names:
            raise NotFoundError(f"no image {image!r} in the project; it has: {', '.join(names)}")
        return image
    stem = geojson.name
    for suffix in (".geojson", ".json"):
        stem = stem.removesuffix(suffix)
    candidates = [n for n in names if n == stem or Path(n).stem == stem or n.split(".")[0] == stem.split(".")[0]]
    if len(candidates) != 1:
        raise InvalidInputError(
            f"{geojson.name} matches {len(candidates)} images of the project ({', '.join(candidates) or 'none'}); "
            f"name the file after the image or give --image (images: {', '.join(names)})"
        )
    return candidates[0]


@dataclass
class ProjectImport:
    image: str
    geojson: Path
    kept: int
    replaced: int
    added: int


def import_predictions_into_project(
    project: Path,
    geojson_files: Sequence[Path],
    *,
    image: str | None = None,
    default_class: str = DEFAULT_CLASS_NAME,
    dry_run: bool = False,
) -> tuple[list[ProjectImport], Path | None]:
    """Add predicted annotations to the matching image entries of a QuPath project.

    The project folder is copied beside itself, the copy is changed through paquo, and the
    copy replaces the project (the original becomes the timestamped backup), so a failure
    half-way leaves the project as it was. Returns the per-image plan and the backup folder.
    """
    qpproj = _project_file(project)
    QuPathProject = _paquo_project_class()
    folder = qpproj.parent
    if image is not None and len(geojson_files) != 1:
        raise InvalidInputError("--image goes with exactly one --geojson file")
    predictions = {Path(f): prediction_features(Path(f), default_class=default_class) for f in geojson_files}
    with QuPathProject(qpproj, mode="r") as qp:
        names = [e.image_name for e in qp.images]
        plans = []
        for f, feats in predictions.items():
            entry = next(e for e in qp.images if e.image_name == match_entry(names, f, image))
            anns = list(entry.hierarchy.annotations)
            old = sum(1 for a in anns if (a.name or "").startswith(PREDICTION_NAME))
            plans.append(ProjectImport(entry.image_name, f, len(anns) - old, old, len(feats)))
    if dry_run:
        return plans, None
    stage = folder.with_name(f".{folder.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(folder, stage)
    try:
        with QuPathProject(stage / qpproj.name, mode="r+") as qp:
            for plan in plans:
                entry = next(e for e in qp.images if e.image_name == plan.image)
                hierarchy = entry.hierarchy
                for ann in list(hierarchy.annotations):
                    if (ann.name or "").startswith(PREDICTION_NAME):
                        hierarchy.annotations.discard(ann)
                hierarchy.load_geojson(predictions[plan.geojson])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    backup = backup_path(folder)
    replace_dir(stage, folder, backup=backup, durable=True)
    return plans, backup


def export_patches_from_project(
    project: Path,
    out: Path,
    classes: Sequence[str],
    *,
    images: Sequence[str] | None = None,
    include_predictions: bool = False,
    progress: bool = True,
    overview: bool = True,
    **patch_options: Any,
) -> list[tuple[str, Any]]:
    """Each chosen image of a project -> ``OUT/<image name>/`` patch dataset (one per slide)."""
    qpproj = _project_file(project)
    QuPathProject = _paquo_project_class()
    out = Path(out)
    work: list[tuple[str, Path, list[dict[str, Any]]]] = []
    with QuPathProject(qpproj, mode="r") as qp:
        names = [e.image_name for e in qp.images]
        wanted = list(images) if images else names
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise NotFoundError(f"no image {', '.join(map(repr, unknown))} in the project; it has: {', '.join(names)}")
        for entry in qp.images:
            if entry.image_name not in wanted:
                continue
            slide = uri_to_path(entry.uri)
            if slide is None or not slide.is_file():
                raise NotFoundError(f"image {entry.image_name!r}: its file {entry.uri} is not a readable local file")
            work.append((entry.image_name, slide, entry.hierarchy.to_geojson()))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, slide, features in work:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        exported = out / f".{stem}.qupath.geojson"
        write_text(exported, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
        summary = export_patches_from_geojson(slide, exported, out / stem, classes,
                                              include_predictions=include_predictions, progress=progress,
                                              overview=overview, **patch_options)
        results.append((name, summary))
    return results
