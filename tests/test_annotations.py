"""Annotation readers (ASAP, PAIP/Aperio, GeoJSON, label masks) and their common rasteriser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.wsi.annotations import (
    LabelMaskAnnotations,
    VectorAnnotations,
    load_annotations,
    parse_label_map,
)

# Level-0 rectangles [x0, x1) x [y0, y1): (class, x0, y0, x1, y1)
TUMOUR = (100.0, 60.0, 300.0, 220.0)
HOLE = (150.0, 100.0, 200.0, 140.0)  # non-tumour inside the tumour outline
OTHER = (400.0, 300.0, 460.0, 380.0)


def rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def expected_mask(rects_in, rects_out, x, y, w, h, ds):
    """Pixel-centre sampling of axis-aligned rectangles: the reference rasterisation."""
    cx = x + (np.arange(w) + 0.5) * ds
    cy = y + (np.arange(h) + 0.5) * ds

    def inside(r):
        x0, y0, x1, y1 = r
        return ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]

    m = np.zeros((h, w), bool)
    for r in rects_in:
        m |= inside(r)
    for r in rects_out:
        m &= ~inside(r)
    return m


def write_asap(path: Path, decimal_comma: bool = False) -> Path:
    def coords(pts):
        fmt = (lambda v: f"{v:.1f}".replace(".", ",")) if decimal_comma else (lambda v: f"{v:.1f}")
        # Order attributes deliberately shuffled: readers must sort by Order.
        items = [f'<Coordinate Order="{i}" X="{fmt(px)}" Y="{fmt(py)}" />' for i, (px, py) in enumerate(pts)]
        return "".join(items[::-1])

    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        f'<Annotation Name="A0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58"><Coordinates>{coords(rect(*TUMOUR))}</Coordinates></Annotation>'
        f'<Annotation Name="A1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E"><Coordinates>{coords(rect(*HOLE))}</Coordinates></Annotation>'
        f'<Annotation Name="A2" Type="Rectangle" PartOfGroup="_1" Color="#F4FA58"><Coordinates>{coords(rect(*OTHER))}</Coordinates></Annotation>'
        '<Annotation Name="D" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>'
        '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000" />'
        '</AnnotationGroups></ASAP_Annotations>'
    )
    return path


def write_paip(path: Path) -> Path:
    def region(rid, pts, negative=0, kind=0):
        verts = "".join(f'<Vertex X="{px}" Y="{py}" Z="0"/>' for px, py in pts)
        return (f'<Region Id="{rid}" Type="{kind}" NegativeROA="{negative}" Analyze="1">'
                f"<Attributes/><Vertices>{verts}</Vertices></Region>")

    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><Annotations MicronsPerPixel="0.252100">'
        '<Annotation Id="1" Name="" LineColor="65280"><Attributes/><Regions>'
        "<RegionAttributeHeaders/>"
        f"{region(1, rect(*TUMOUR))}{region(2, rect(*HOLE), negative=1)}"
        f"{region(3, [OTHER[:2], OTHER[2:]], kind=2)}"  # an ellipse by its bounding box
        "</Regions></Annotation>"
        '<Annotation Id="2" Name="whole tumour" LineColor="255"><Regions>'
        f"{region(1, rect(0, 0, 50, 50))}{region(2, [(1, 1), (9, 9)], kind=4)}"  # + a ruler
        "</Regions></Annotation></Annotations>"
    )
    return path


def write_geojson(path: Path) -> Path:
    def ring(r):
        pts = [list(p) for p in rect(*r)]
        return pts + [pts[0]]

    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(TUMOUR), ring(HOLE)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[ring(OTHER)]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring((0, 0, 50, 50))]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


# Frames (x, y, out_w, out_h, downsample) around TUMOUR that stay clear of OTHER.
FRAMES = [(0, 0, 90, 60, 4.0), (90, 55, 64, 48, 3.0), (140, 95, 70, 50, 1.0), (96.5, 57.25, 33, 29, 7.5)]


@pytest.mark.parametrize("frame", FRAMES)
def test_all_vector_formats_rasterise_the_same_way(tmp_path, frame):
    x, y, w, h, ds = frame
    want = expected_mask([TUMOUR], [HOLE], x, y, w, h, ds)
    asap = load_annotations(write_asap(tmp_path / "a.xml"))
    paip = load_annotations(write_paip(tmp_path / "p.xml"))
    geo = load_annotations(write_geojson(tmp_path / "g.geojson"))
    assert np.array_equal(asap.rasterise(x, y, w, h, ds, ["_0"], ["_2"]), want)
    assert np.array_equal(paip.rasterise(x, y, w, h, ds, ["1"]), want)  # NegativeROA cut out
    assert np.array_equal(geo.rasterise(x, y, w, h, ds, ["Tumor"]), want)  # GeoJSON hole


def test_asap_groups_and_camelyon_exclusion_defaults(tmp_path):
    ann = load_annotations(write_asap(tmp_path / "a.xml", decimal_comma=True))
    assert isinstance(ann, VectorAnnotations) and ann.format == "asap"
    assert ann.classes == ["_0", "_1", "_2"]
    assert ann.default_classes() == ["_0", "_1"] and ann.default_exclusions() == ["_2"]
    m = ann.rasterise(0, 0, 100, 80, 5.0, ann.default_classes(), ann.default_exclusions())
    assert np.array_equal(m, expected_mask([TUMOUR, OTHER], [HOLE], 0, 0, 100, 80, 5.0))
    with pytest.raises(InvalidInputError, match=r"unknown class 'Tumor'.*'_0', '_1', '_2'"):
        ann.check_classes(["Tumor"])


def test_paip_layers_and_shapes(tmp_path):
    ann = load_annotations(write_paip(tmp_path / "p.xml"))
    assert ann.format == "aperio" and ann.classes == ["1", "whole tumour"]
    ellipse = ann.rasterise(OTHER[0], OTHER[1], 60, 80, 1.0, ["1"])
    # The ellipse fills its bounding box's middle but not its corners.
    assert ellipse[40, 30] and ellipse[5, 30] and not ellipse[2, 2] and not ellipse[77, 57]
    assert 0.7 < ellipse.mean() < 0.85  # pi/4 of the box
    whole = ann.rasterise(0, 0, 60, 60, 1.0, ["whole tumour"])
    assert whole.sum() == 50 * 50


def test_geojson_classes(tmp_path):
    ann = load_annotations(write_geojson(tmp_path / "g.json"))
    assert ann.classes == ["Stroma", "Tumor"] and ann.default_exclusions() == []
    both = ann.rasterise(0, 0, 500, 400, 1.0, ["Tumor", "Stroma"])
    assert both.sum() == 50 * 50 + (200 * 160 - 50 * 40) + 60 * 80


def test_annotations_outside_the_slide_are_refused(tmp_path):
    ann = load_annotations(write_geojson(tmp_path / "g.json"))
    ann.check_within((1000, 1000))  # fine
    ann.check_within((450, 370))  # OTHER pokes out by a few pixels: annotators do that
    with pytest.raises(InvalidInputError, match="outside the 300x200 slide"):
        ann.check_within((300, 200))  # OTHER lies wholly outside
    with pytest.raises(InvalidInputError, match="outside"):
        ann.check_within((100, 100))


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.xml", "<ASAP_Annotations><Annotations><Annotation", "not valid XML"),
        ("other.xml", "<Slides><Slide/></Slides>", "unknown XML annotation format"),
        ("nan.xml", '<ASAP_Annotations><Annotations><Annotation PartOfGroup="_0"><Coordinates>'
                    '<Coordinate Order="0" X="abc" Y="1"/></Coordinates></Annotation></Annotations>'
                    "</ASAP_Annotations>", "not a number"),
        ("bad.geojson", '{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ("weird.json", '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": 7}}', "a Polygon needs"),
        ("mask.tiff", "garbage", "cannot read"),
    ],
)
def test_corrupt_files_give_one_clear_error(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        load_annotations(path)


def test_missing_file(tmp_path):
    with pytest.raises(NotFoundError):
        load_annotations(tmp_path / "nope.xml")


def test_label_map_parsing():
    assert parse_label_map(["3=tumour", "4=tumour,5=tumour"]) == {3: "tumour", 4: "tumour", 5: "tumour"}
    assert parse_label_map(None) is None
    with pytest.raises(InvalidInputError):
        parse_label_map(["three=tumour"])


def test_synthetic_label_mask_at_half_the_slide_resolution(tmp_path):
    labels = np.zeros((100, 150), np.uint8)  # a mask stored at 1/2 of a 300x200 slide
    labels[10:40, 20:60] = 3
    labels[50:90, 100:140] = 1
    rgb = np.stack([labels, np.zeros_like(labels), np.zeros_like(labels)], -1)
    path = tmp_path / "labels.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(64, 64), photometric="rgb", compression="zlib")
        tw.write(rgb[::2, ::2], tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1)
    ann = load_annotations(path, label_map={3: "tumour", 1: "benign"})
    assert isinstance(ann, LabelMaskAnnotations) and ann.classes == ["benign", "tumour"]
    ann.check_within((300, 200))
    # Level-0 slide rectangle of label 3: x 40..120, y 20..80.
    m = ann.rasterise(0, 0, 75, 50, 4.0, ["tumour"])
    assert np.array_equal(m, expected_mask([(40, 20, 120, 80)], [], 0, 0, 75, 50, 4.0))
    with pytest.raises(InvalidInputError, match="unknown class 'stroma'"):
        ann.check_classes(["stroma"])
    with pytest.raises(InvalidInputError, match="another slide"):
        ann.check_within((300, 300))
    plain = load_annotations(path)
    assert plain.classes == ["1", "3"]
    with pytest.raises(InvalidInputError, match="present: 0, 1, 3"):
        plain.check_classes(["tumour"])
    # Classes of which the mask holds none are refused; a class of the scheme this mask lacks is
    # not, when another class asked for is there (a slide without Gleason 5 still has its 3).
    assert plain.check_classes(["3", "03", "0"]) == ["3", "0"]
    with pytest.raises(InvalidInputError, match=r"unknown class '9'; this file has: '1', '3' \(labels present: 0, 1, 3"):
        plain.check_classes(["9"])
    assert plain.check_classes(["3", "9"]) == ["3", "9"]
    with pytest.raises(InvalidInputError, match="unknown classes '9', '0'"):  # background proves nothing
        plain.check_classes(["9", "0"])
    assert plain.check_classes(["7"], excluding=True) == ["7"]  # excluding what is absent is harmless
    assert ann.check_classes(["tumour", "benign"]) == ["tumour", "benign"]
    partly = load_annotations(path, label_map={3: "tumour", 5: "tumour", 9: "necrosis"})
    # Every map name is a class (a class only in specks too small for the presence check is kept).
    assert partly.classes == ["necrosis", "tumour"] and partly.labels_of(["tumour"]) == [3, 5]
    assert partly.check_classes(["tumour"]) == ["tumour"]  # one of its labels is enough
    with pytest.raises(InvalidInputError, match=r"unknown class 'necrosis'; this file has: 'tumour' .*'necrosis' is label 9"):
        partly.check_classes(["necrosis"])


def _write_pyramid(path: Path, labels: np.ndarray, factors=(1, 4), channel: int = 0) -> Path:
    """Labels in ``channel`` of an RGB tiled TIFF, one level per factor (nearest, by striding)."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., channel] = labels
    with tifffile.TiffWriter(path) as tw:
        for i, f in enumerate(factors):
            tw.write(np.ascontiguousarray(rgb[::f, ::f]), tile=(64, 64), photometric="rgb",
                     compression="zlib", subfiletype=min(i, 1))
    return path


def test_present_labels_read_a_coarse_level_when_the_mask_is_big_enough(tmp_path, monkeypatch):
    from histosam.backend.wsi import annotations

    labels = np.zeros((512, 512), np.uint8)
    labels[100:300, 100:300] = 3
    labels[401, 401] = 7  # one level-0 pixel, not on the 4x level's grid (every 4th pixel)
    path = _write_pyramid(tmp_path / "m.tiff", labels)
    # 512x512 is under PRESENT_LABELS_MIN_PIXELS: level 0 is read and the speck is found.
    assert load_annotations(path).present_labels() == [0, 3, 7]
    # With the 128x128 level big enough it is read instead: the speck, under one of its pixels, is
    # missed (the documented cost), the real region is not.
    monkeypatch.setattr(annotations, "PRESENT_LABELS_MIN_PIXELS", 128 * 128)
    coarse = load_annotations(path)
    assert coarse.present_labels() == [0, 3]
    with pytest.raises(InvalidInputError, match="unknown class '7'"):
        coarse.check_classes(["7"])
    # A single-level mask is sampled down to at most PRESENT_LABELS_MAX_PIXELS.
    monkeypatch.setattr(annotations, "PRESENT_LABELS_MAX_PIXELS", 64 * 64)
    single = load_annotations(_write_pyramid(tmp_path / "one.tiff", labels, factors=(1,)))
    assert single.present_labels() == [0, 3]


def test_label_channel_chooses_where_the_labels_are(tmp_path):
    labels = np.zeros((256, 256), np.uint8)
    labels[20:120, 30:90] = 4
    path = _write_pyramid(tmp_path / "g.tiff", labels, channel=1)
    green = load_annotations(path, label_channel=1, label_map={4: "tumour"})
    assert green.classes == ["tumour"] and green.check_classes(["tumour"]) == ["tumour"]
    green.check_within((256, 256))
    assert green.rasterise(0, 0, 64, 64, 4.0, ["tumour"]).sum() == 25 * 15
    red = load_annotations(path, label_channel=0, label_map={4: "tumour"})
    assert red.classes == ["tumour"]  # the map's names; that none of them is in this channel is what check_classes says
    with pytest.raises(InvalidInputError, match=r"this file has: no classes \(label map 4=tumour; labels present: 0;"):
        red.check_classes(["tumour"])


def test_panda_label_mask_matches_the_labels(data_dir):
    import openslide

    path = data_dir / "slides" / "panda-006f6aa3_mask.tiff"
    ann = load_annotations(path)
    assert ann.format == "label-mask"
    ann.check_within((2048, 7680))
    assert {"1", "3", "4"} <= set(ann.classes)
    x, y, size, ds = 512, 3000, 200, 2.0
    got = ann.rasterise(x, y, size, size, ds, ["3", "4", "5"])
    raw = np.asarray(openslide.OpenSlide(str(path)).read_region((x, y), 0, (400, 400)))[..., 0]
    want = np.isin(raw[1::2, 1::2], [3, 4, 5])  # the label under each output pixel centre
    assert np.array_equal(got, want)
    assert 0 < got.mean() < 1
    named = load_annotations(path, label_map={3: "tumour", 4: "tumour", 5: "tumour"})
    named.check_within((2048, 7680))
    assert np.array_equal(named.rasterise(x, y, size, size, ds, ["tumour"]), got)
