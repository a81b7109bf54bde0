"""Region annotations of a slide, from any of four formats, as masks of any region.

Formats (``load_annotations`` picks by content):

* CAMELYON16 / ASAP XML (``<ASAP_Annotations>``): class = ``PartOfGroup``. CAMELYON16 marks
  tissue *inside* tumour outlines that is not tumour with group ``_2`` (or ``Exclusion``);
  those are excluded by default.
* PAIP2019 / Aperio ImageScope XML (``<Annotations><Annotation><Regions>``): class = the
  annotation layer's ``Name``, or its ``Id`` when unnamed (PAIP layers are unnamed: classes
  ``"1"``, ``"2"``, ...). Regions with ``NegativeROA="1"`` are cut out of their own layer;
  ellipse regions (2 vertices) become 64-gons.
* QuPath GeoJSON (FeatureCollection / Feature / list; Polygon and MultiPolygon with holes):
  class = ``classification.name`` (``Unclassified`` when absent).
* Label-mask images (pyramidal TIFF, e.g. PANDA): class = the label value as a string, or a
  name given by a label map (``{3: "tumour", 4: "tumour", 5: "tumour"}``); the label is one
  channel (default 0, the R of OpenSlide's RGBA). At least one of the classes asked for must be
  one the mask holds (a label value present, or a map name with a label present), checked on a
  coarse level.

Vector coordinates are level-0 pixels. Every format rasterises through the same call,
``rasterise(x, y, out_w, out_h, downsample, classes)``, with the frame of ``geometry``:
output pixel (u, v) is the level-0 square at ``(x + u*d, y + v*d)`` of side d, inside when
its centre is (even-odd over rings, holes cut out); vector formats share
``geometry.polygons_to_mask``, label masks sample the label under each pixel centre.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.geometry import PolygonXY, geojson_to_polygons, polygons_to_mask

EXCLUSION_CLASS_NAMES = frozenset({"_2", "exclusion"})
# How far (fraction of the slide's longest side) a vertex may lie outside the slide before the
# file is taken to belong to another slide or another level: annotators draw a little past an
# edge, a wrong file is off by far more.
OUTSIDE_TOLERANCE = 0.05
VECTOR_SUFFIXES = {".xml", ".json", ".geojson"}
# Which labels a label mask holds (what its classes are checked against) is read from one
# pyramid level, not level 0, so a mistyped class fails in well under a second even on a
# gigapixel mask: the coarsest level with at least PRESENT_LABELS_MIN_PIXELS pixels (level 0
# when the whole mask is smaller). A label present only in regions smaller than one pixel of
# that level can be missed (refused only when no other class asked for is held): a PANDA mask
# (~0.5 µm/px, levels 1, 4, 16) is read at 16x, ~8 µm a pixel, far below an annotated tumour
# region; a smaller minimum would pick levels where small regions vanish. A mask with no such
# level (one huge level 0) is sampled at most PRESENT_LABELS_MAX_PIXELS pixels, nearest.
PRESENT_LABELS_MIN_PIXELS = 1_000_000
PRESENT_LABELS_MAX_PIXELS = 16_000_000


class AnnotationSource(Protocol):
    """What the patch pipeline needs from annotations of any format."""

    path: Path
    format: str

    @property
    def classes(self) -> list[str]: ...

    def default_classes(self) -> list[str]: ...

    def default_exclusions(self) -> list[str]: ...

    def check_classes(self, classes: Iterable[str], excluding: bool = False) -> list[str]: ...

    def check_within(self, slide_dimensions: tuple[int, int]) -> None: ...

    def rasterise(
        self,
        x: float,
        y: float,
        out_width: int,
        out_height: int,
        downsample: float,
        classes: Sequence[str],
        exclude: Sequence[str] = (),
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Region:
    """One annotated polygon (level-0 coordinates). ``negative``: cut out of its class."""

    class_name: str
    polygon: PolygonXY
    negative: bool = False


def _unknown_class_error(path: Path, unknown: Sequence[str], known: Sequence[str]) -> InvalidInputError:
    return InvalidInputError(
        f"{path.name}: unknown class{'es' if len(unknown) > 1 else ''} "
        f"{', '.join(repr(c) for c in unknown)}; this file has: "
        f"{', '.join(repr(c) for c in known) or 'no classes'}"
    )


@dataclass
class VectorAnnotations:
    """Polygon annotations (ASAP XML, Aperio/PAIP XML, GeoJSON)."""

    path: Path
    format: str
    regions: list[Region]
    _bounds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bounds = (
            np.array([r.polygon.bounds() for r in self.regions], np.float64)
            if self.regions
            else np.zeros((0, 4))
        )

    @property
    def classes(self) -> list[str]:
        return sorted({r.class_name for r in self.regions})

    def default_exclusions(self) -> list[str]:
        return [c for c in self.classes if c.lower() in EXCLUSION_CLASS_NAMES] if self.format == "asap" else []

    def default_classes(self) -> list[str]:
        excluded = set(self.default_exclusions())
        return [c for c in self.classes if c not in excluded]

    def check_classes(self, classes: Iterable[str], excluding: bool = False) -> list[str]:
        """Named classes must all exist in the file (a class name is free text: absent = a typo)."""
        wanted = list(dict.fromkeys(str(c) for c in classes))
        unknown = [c for c in wanted if c not in self.classes]
        if unknown:
            raise _unknown_class_error(self.path, unknown, self.classes)
        return wanted

    def check_within(self, slide_dimensions: tuple[int, int]) -> None:
        """Refuse annotations that cannot belong to a slide of this size (see OUTSIDE_TOLERANCE)."""
        if not self.regions:
            return
        w, h = slide_dimensions
        tol = OUTSIDE_TOLERANCE * max(w, h)
        b = self._bounds
        disjoint = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= w) | (b[:, 1] >= h)
        beyond = (b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > w + tol) | (b[:, 3] > h + tol)
        bad = np.flatnonzero(disjoint | beyond)
        if bad.size:
            i = int(bad[0])
            x0, y0, x1, y1 = (round(float(v)) for v in b[i])
            raise InvalidInputError(
                f"{self.path.name}: {bad.size} annotation(s) lie outside the {w}x{h} slide, e.g. "
                f"{self.regions[i].class_name!r} at x {x0}..{x1}, y {y0}..{y1} (level-0 pixels); "
                "wrong slide, or coordinates not at level 0?"
            )

    def rasterise(
        self,
        x: float,
        y: float,
        out_width: int,
        out_height: int,
        downsample: float,
        classes: Sequence[str],
        exclude: Sequence[str] = (),
    ) -> np.ndarray:
        """Bool mask: inside a region of ``classes``, minus negative regions, minus ``exclude``."""
        if not self.regions:
            return np.zeros((out_height, out_width), bool)
        x1, y1 = x + out_width * downsample, y + out_height * downsample
        b = self._bounds
        near = (b[:, 0] < x1) & (b[:, 2] > x) & (b[:, 1] < y1) & (b[:, 3] > y)
        want, drop = set(classes), set(exclude)
        pos, neg = [], []
        for i in np.flatnonzero(near):
            r = self.regions[i]
            if r.class_name in want and not r.negative:
                pos.append(r.polygon)
            elif (r.class_name in want and r.negative) or r.class_name in drop:
                neg.append(r.polygon)
        shape, origin = (out_height, out_width), (x, y)
        mask = polygons_to_mask(pos, shape, origin=origin, downsample=downsample)
        if neg and mask.any():
            mask &= ~polygons_to_mask(neg, shape, origin=origin, downsample=downsample)
        return mask


class LabelMaskAnnotations:
    """A label image in slide geometry (e.g. PANDA ``*_mask.tiff``), read region by region.

    The mask may be stored at a different size than the slide (a mask at 1/4 resolution);
    level-0 slide coordinates are scaled by ``mask size / slide size`` once the slide is known
    (``check_within``).
    """

    format = "label-mask"

    def __init__(
        self,
        path: Path,
        label_map: Mapping[int, str] | None = None,
        channel: int = 0,
    ) -> None:
        from histosam.backend.wsi.slides import Slide

        self.path = path
        if channel not in (0, 1, 2):
            raise InvalidInputError(f"label channel must be 0, 1 or 2, got {channel}")
        self.channel = channel
        try:
            self.slide = Slide(path)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"annotation file {path.name} is not XML or GeoJSON and not a readable label-mask "
                f"image ({exc})"
            ) from exc
        self.label_map = {int(k): str(v) for k, v in (label_map or {}).items()}
        for k in self.label_map:
            if not 0 <= k <= 255:
                raise InvalidInputError(f"label {k} in the label map is not in 0..255")
        self._scale = (1.0, 1.0)
        self._present: list[int] | None = None

    def present_labels(self) -> list[int]:
        """Labels the mask holds, read cheaply (see PRESENT_LABELS_MIN_PIXELS for what is missed)."""
        if self._present is None:
            s = self.slide
            # Any level: nearest sampling never blends labels, and a mask whose size does not divide
            # evenly has levels at 3.999x, not 4x (skipping them read gigapixel level 0).
            big = [
                i for i in range(s.level_count)
                if s.level_dimensions[i][0] * s.level_dimensions[i][1] >= PRESENT_LABELS_MIN_PIXELS
            ]
            level = max(big, key=lambda i: s.level_downsamples[i]) if big else 0
            w0, h0 = s.dimensions
            d = max(s.level_downsamples[level], math.sqrt(w0 * h0 / PRESENT_LABELS_MAX_PIXELS))
            img = s.read_scaled(
                0, 0, max(1, math.floor(w0 / d)), max(1, math.floor(h0 / d)), d,
                interpolation="nearest", channels="rgba",
            )
            counts = np.bincount(img[..., self.channel].ravel(), minlength=256)
            self._present = [int(v) for v in np.flatnonzero(counts)]
        return self._present

    def _held(self) -> dict[str, list[int]]:
        """The classes the mask holds -> their labels in it (label-map names, else label values)."""
        present = self.present_labels()
        if not self.label_map:
            return {str(v): [v] for v in present if v != 0}  # 0 is background
        held: dict[str, list[int]] = {}
        for label, name in sorted(self.label_map.items()):
            if label in present:
                held.setdefault(name, []).append(label)
        return dict(sorted(held.items()))

    @property
    def classes(self) -> list[str]:
        """Every class the mask may hold: the map's names (each is rasterised by its labels, so a
        class only in regions too small for the coarse presence check is not dropped), else the
        label values present."""
        if self.label_map:
            return sorted(set(self.label_map.values()))
        return list(self._held())

    def default_exclusions(self) -> list[str]:
        return []

    def default_classes(self) -> list[str]:
        return self.classes

    def labels_of(self, classes: Iterable[str]) -> list[int]:
        out: list[int] = []
        for c in classes:
            if self.label_map:
                out.extend(k for k, v in self.label_map.items() if v == c)
            else:
                out.append(int(c))
        return sorted(set(out))

    def check_classes(self, classes: Iterable[str], excluding: bool = False) -> list[str]:
        """The classes as asked; an error for a class no label mask could hold, or for classes of
        which this mask holds none.

        Without a label map a class is a label value (0-255); with one, a name of the map. Label
        values are a fixed scheme across a cohort (PANDA: Gleason 3, 4, 5 = tumour), so a class
        this slide lacks is no typo (a slide without Gleason 5 still has its 3 and 4): only asking
        for classes none of which the mask holds is refused, since every patch would be empty.
        Exclusions (``excluding``) need not be present: excluding nothing is harmless.
        """
        wanted = list(dict.fromkeys(str(c).strip() for c in classes))
        if self.label_map:
            names = set(self.label_map.values())
            malformed = [c for c in wanted if c not in names]
            held = set(self._held())
        else:
            wanted = [str(int(c)) if c.isascii() and c.isdigit() else c for c in wanted]
            malformed = [c for c in wanted if not (c.isascii() and c.isdigit() and 0 <= int(c) <= 255)]
            held = {str(v) for v in self.present_labels()}
        if malformed:
            raise self._unknown_class_error(malformed)
        wanted = list(dict.fromkeys(wanted))  # "3" and "03" are one class
        asked = [c for c in wanted if c != "0"]  # background is everywhere: it proves nothing
        if not excluding and asked and not held.intersection(asked):
            raise self._unknown_class_error(wanted)
        return wanted

    def _unknown_class_error(self, unknown: Sequence[str]) -> InvalidInputError:
        present = ", ".join(str(v) for v in self.present_labels()) or "none"
        if self.label_map:
            mapped = []
            for c in unknown:
                labels = sorted(k for k, v in self.label_map.items() if v == c)
                if labels:
                    mapped.append(f"{c!r} is label {', '.join(str(k) for k in labels)}")
            label_map = ", ".join(f"{k}={v}" for k, v in sorted(self.label_map.items()))
            note = f"label map {label_map}; labels present: {present}"
            if mapped:
                note += f"; {'; '.join(mapped)}"
        else:
            note = (
                f"labels present: {present}; classes are label values unless --label-map names "
                "them, e.g. --label-map 3=tumour 4=tumour 5=tumour --classes tumour, a class that "
                "needs only one of its labels present"
            )
        error = _unknown_class_error(self.path, unknown, list(self._held()))
        return InvalidInputError(f"{error} ({note})")

    def check_within(self, slide_dimensions: tuple[int, int]) -> None:
        """The mask must cover the slide's shape (same aspect ratio, within 2 %)."""
        sw, sh = slide_dimensions
        mw, mh = self.slide.dimensions
        sx, sy = mw / sw, mh / sh
        if abs(sx / sy - 1) > 0.02:
            raise InvalidInputError(
                f"{self.path.name}: the {mw}x{mh} label mask does not have the shape of the "
                f"{sw}x{sh} slide; is it the mask of another slide?"
            )
        self._scale = (sx, sy)

    def rasterise(
        self,
        x: float,
        y: float,
        out_width: int,
        out_height: int,
        downsample: float,
        classes: Sequence[str],
        exclude: Sequence[str] = (),
    ) -> np.ndarray:
        labels = self.labels_of(classes)
        if not labels:
            return np.zeros((out_height, out_width), bool)
        sx, _ = self._scale
        region = self.slide.read_scaled(
            x * sx, y * self._scale[1], out_width, out_height, downsample * sx,
            interpolation="nearest", channels="rgba", integral_levels_only=True,
        )
        mask = np.isin(region[..., self.channel], labels)
        dropped = self.labels_of(exclude)
        if dropped:
            mask &= ~np.isin(region[..., self.channel], dropped)
        return mask

    def close(self) -> None:
        self.slide.close()


# --------------------------------------------------------------------------- readers


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InvalidInputError(f"{path.name} is not valid XML: {exc}") from exc


def _number(text: str | None, where: str) -> float:
    if text is None:
        raise InvalidInputError(f"{where}: a vertex has no coordinate")
    try:
        # Some ASAP exports wrote the locale's decimal comma ("1234,5").
        value = float(text.strip().replace(",", "."))
    except ValueError as exc:
        raise InvalidInputError(f"{where}: {text!r} is not a number") from exc
    if not math.isfinite(value):
        raise InvalidInputError(f"{where}: coordinate {text!r} is not finite")
    return value


def read_asap_xml(path: Path, root: ET.Element | None = None) -> VectorAnnotations:
    """CAMELYON16 / ASAP XML: ``Annotation`` elements with ordered ``Coordinate`` children."""
    root = _parse_xml(path) if root is None else root
    if root.tag != "ASAP_Annotations":
        raise InvalidInputError(f"{path.name}: not an ASAP annotation file (root <{root.tag}>)")
    regions: list[Region] = []
    for i, ann in enumerate(root.iter("Annotation")):
        where = f"{path.name}: annotation {ann.get('Name') or i}"
        kind = (ann.get("Type") or "Polygon").lower()
        group = ann.get("PartOfGroup")
        class_name = group if group and group != "None" else "Unclassified"
        coords = sorted(
            ann.iter("Coordinate"), key=lambda c: _number(c.get("Order") or "0", where)
        )
        pts = np.array([[_number(c.get("X"), where), _number(c.get("Y"), where)] for c in coords])
        if kind in ("dot", "pointset", "measurement") or len(pts) < 3:
            continue  # no area
        regions.append(Region(class_name, PolygonXY(exterior=pts)))
    return VectorAnnotations(path, "asap", regions)


def _ellipse(p0: np.ndarray, p1: np.ndarray, n: int = 64) -> np.ndarray:
    c, r = (p0 + p1) / 2, np.abs(p1 - p0) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c[0] + r[0] * np.cos(t), c[1] + r[1] * np.sin(t)], axis=1)


def read_aperio_xml(path: Path, root: ET.Element | None = None) -> VectorAnnotations:
    """PAIP2019 / Aperio ImageScope XML: layers of ``Region``s with ``Vertex`` children."""
    root = _parse_xml(path) if root is None else root
    if root.tag != "Annotations":
        raise InvalidInputError(f"{path.name}: not an Aperio/PAIP annotation file (root <{root.tag}>)")
    regions: list[Region] = []
    for li, layer in enumerate(root.findall("Annotation")):
        class_name = (layer.get("Name") or "").strip() or (layer.get("Id") or str(li + 1))
        for ri, region in enumerate(layer.iter("Region")):
            where = f"{path.name}: layer {class_name!r} region {region.get('Id') or ri}"
            pts = np.array(
                [[_number(v.get("X"), where), _number(v.get("Y"), where)] for v in region.iter("Vertex")]
            ).reshape(-1, 2)
            if region.get("Type") == "2" and len(pts) == 2:  # ellipse by its bounding box
                pts = _ellipse(pts[0], pts[1])
            if len(pts) < 3:
                continue  # arrows, rulers, points
            negative = region.get("NegativeROA", "0").strip() == "1"
            regions.append(Region(class_name, PolygonXY(exterior=pts), negative=negative))
    return VectorAnnotations(path, "aperio", regions)


def read_geojson(path: Path) -> VectorAnnotations:
    """QuPath GeoJSON: each Polygon / MultiPolygon part with its holes, by classification."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path.name} is not valid JSON: {exc}") from exc
    try:
        polys = geojson_to_polygons(obj)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path.name}: {exc}") from exc
    return VectorAnnotations(path, "geojson", [Region(p.class_name, p.polygon) for p in polys])


def load_annotations(
    path: str | Path,
    *,
    label_map: Mapping[int, str] | None = None,
    label_channel: int = 0,
) -> AnnotationSource:
    """Read an annotation file of any supported format (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"annotation file {path} does not exist")
    if not path.is_file():
        raise InvalidInputError(f"annotation file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".xml":
        root = _parse_xml(path)
        if root.tag == "ASAP_Annotations":
            return read_asap_xml(path, root)
        if root.tag == "Annotations":
            return read_aperio_xml(path, root)
        raise InvalidInputError(
            f"{path.name}: unknown XML annotation format <{root.tag}> (expected ASAP "
            "<ASAP_Annotations> or Aperio/PAIP <Annotations>)"
        )
    if suffix in (".json", ".geojson"):
        return read_geojson(path)
    return LabelMaskAnnotations(path, label_map=label_map, channel=label_channel)


def parse_label_map(items: Sequence[str] | None) -> dict[int, str] | None:
    """CLI ``3=tumour 4=tumour`` -> {3: 'tumour', 4: 'tumour'}."""
    if not items:
        return None
    out: dict[int, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, name = part.partition("=")
            if not sep or not key.strip().isdigit() or not name.strip():
                raise InvalidInputError(f"label map entry {part!r} is not LABEL=NAME (e.g. 3=tumour)")
            out[int(key)] = name.strip()
    return out
