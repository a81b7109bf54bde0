"""Masks <-> polygons <-> GeoJSON: exact pixel-corner tracing, frames, holes, QuPath format."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.geometry import (
    PolygonXY,
    annotation_feature,
    geojson_to_mask,
    geojson_to_polygons,
    mask_to_geojson,
    mask_to_polygons,
    polygons_to_mask,
    ring_area,
    valid_polygon,
)
from histosam.backend.evaluation.metrics import iou


def random_masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        if k % 2:  # smoother blobs as well as salt-and-pepper (diagonal contacts, 1-px holes)
            m = cv2.medianBlur(m.astype(np.uint8) * 255, 3) > 0
        yield m


def test_round_trip_is_exact_for_any_mask_in_any_frame():
    origin, ds = (1234.5, -77.0), 3.0
    for m in random_masks(200):
        polys = mask_to_polygons(m, origin=origin, downsample=ds)
        back = polygons_to_mask(polys, m.shape, origin=origin, downsample=ds)
        assert np.array_equal(back, m)
        # Pixel-corner outlines: polygon area is exactly the pixel count (times ds^2).
        assert sum(p.area for p in polys) == pytest.approx(m.sum() * ds * ds)


def test_single_pixel_is_a_unit_square_on_pixel_corners():
    m = np.zeros((4, 5), bool)
    m[2, 3] = True
    (poly,) = mask_to_polygons(m)
    assert poly.holes == []
    assert sorted(map(tuple, poly.exterior)) == [(3, 2), (3, 3), (4, 2), (4, 3)]


def test_frame_places_the_outline_in_client_coordinates():
    m = np.zeros((20, 20), bool)
    m[3:7, 2:6] = True  # columns 2..5, rows 3..6
    (poly,) = mask_to_polygons(m, origin=(1000, 2000), downsample=4)
    assert poly.bounds() == (1008.0, 2012.0, 1024.0, 2028.0)
    assert poly.area == 16 * 16


def test_holes_and_islands_in_holes():
    m = np.zeros((30, 30), bool)
    m[2:28, 2:28] = True
    m[8:22, 8:22] = False  # hole
    m[12:18, 12:18] = True  # island inside the hole
    m[0, 29] = True  # a separate speck
    polys = mask_to_polygons(m)
    assert len(polys) == 3
    outer, island, speck = polys  # largest first
    assert len(outer.holes) == 1 and abs(ring_area(outer.holes[0])) == 14 * 14
    assert island.holes == [] and island.area == 36
    assert speck.area == 1
    assert np.array_equal(polygons_to_mask(polys, m.shape), m)


def test_diagonal_contact_is_one_component_and_its_hole_is_exact():
    m = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1]], bool)
    polys = mask_to_polygons(m)
    assert len(polys) == 1
    (hole,) = polys[0].holes
    assert abs(ring_area(hole)) == 1.0  # a square pixel, not a diamond


def test_min_area_drops_specks_and_fills_small_holes():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[10:12, 10:12] = False  # 4-px hole
    m[20:26, 20:26] = False  # 36-px hole
    m[0, 0] = m[0, 2] = True  # 1-px specks
    polys = mask_to_polygons(m, min_area=10)
    assert len(polys) == 1
    assert [abs(ring_area(h)) for h in polys[0].holes] == [36.0]
    expected = m.copy()
    expected[10:12, 10:12] = True
    expected[0, 0] = expected[0, 2] = False
    assert np.array_equal(polygons_to_mask(polys, m.shape), expected)


def test_simplification_reduces_vertices_and_keeps_iou():
    m = np.zeros((600, 600), np.uint8)
    cv2.circle(m, (300, 300), 250, 1, -1)
    cv2.circle(m, (300, 300), 90, 0, -1)
    m = m.astype(bool)
    exact = mask_to_polygons(m)
    simple = mask_to_polygons(m, simplify_tolerance=1.0)
    n_exact = sum(len(p.exterior) + sum(map(len, p.holes)) for p in exact)
    n_simple = sum(len(p.exterior) + sum(map(len, p.holes)) for p in simple)
    assert n_simple < n_exact / 3
    assert iou(polygons_to_mask(simple, m.shape), m) >= 0.99


@pytest.mark.parametrize("shape", ["pixel", "plus", "ring", "disk5"])
def test_geojson_round_trip_of_small_shapes(shape):
    m = np.zeros((16, 16), np.uint8)
    if shape == "pixel":
        m[7, 7] = 1
    elif shape == "plus":
        m[6:9, 7] = 1
        m[7, 6:9] = 1
    elif shape == "ring":
        m[4:11, 4:11] = 1
        m[7, 7] = 0
    else:
        cv2.circle(m, (8, 8), 5, 1, -1)
    origin, ds = (5000.0, 7000.0), 8.0
    fc = mask_to_geojson(m, origin=origin, downsample=ds, predicted_iou=0.9)
    text = json.dumps(fc)  # what goes over the wire / into a file
    back = geojson_to_mask(json.loads(text), m.shape, origin=origin, downsample=ds)
    assert iou(back, m.astype(bool)) >= 0.99


def test_geojson_is_what_qupath_imports():
    m = np.zeros((10, 10), bool)
    m[1:3, 1:3] = True
    m[6:9, 6:9] = True
    fc = mask_to_geojson(m, class_name="Tumor", color=(255, 0, 0), name="click 1", predicted_iou=0.87)
    assert fc["type"] == "FeatureCollection"
    (feat,) = fc["features"]
    props = feat["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Tumor", "color": [255, 0, 0]}
    assert props["name"] == "click 1"
    assert props["measurements"] == {"predicted IoU": pytest.approx(0.87)}
    geom = feat["geometry"]
    assert geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 2
    for polygon in geom["coordinates"]:
        for ring in polygon:
            assert ring[0] == ring[-1]  # GeoJSON rings are closed
    split = mask_to_geojson(m, merge=False)
    assert [f["geometry"]["type"] for f in split["features"]] == ["Polygon", "Polygon"]
    assert mask_to_geojson(np.zeros((4, 4), bool))["features"] == []


def test_geojson_reader_accepts_qupath_variants():
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]
    far = [[[20, 20], [30, 20], [30, 30], [20, 20]]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]},
         "properties": {"classification": {"name": "Tumor", "colorRGB": -65536}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [far]},
         "properties": {"classification": {"names": ["Tumor", "Grade 3"]}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "detection"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": None},
    ]
    for obj in ({"type": "FeatureCollection", "features": features}, features):
        polys = geojson_to_polygons(obj)
        assert [p.class_name for p in polys] == ["Tumor", "Tumor: Grade 3", "Unclassified"]
        assert len(polys[0].polygon.holes) == 1 and len(polys[0].polygon.exterior) == 4
    m = geojson_to_mask(features, (12, 12), classes=["Tumor"])
    assert m.sum() == 100 - 4
    assert not m[2:4, 2:4].any()


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 1], [2, 3], [4, 5]]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, float("nan")], [2, 2]]]}},
        {"type": "Feature", "geometry": {"type": "Hexagon", "coordinates": []}},
        {"type": "FeatureCollection"},
        {"hello": "world"},
    ],
)
def test_geojson_reader_rejects_malformed_input(bad):
    with pytest.raises(InvalidInputError):
        geojson_to_polygons(bad)


def test_bad_masks_and_frames_are_refused():
    with pytest.raises(InvalidInputError):
        mask_to_polygons(np.zeros((4, 4, 3), bool))
    with pytest.raises(InvalidInputError):
        mask_to_polygons(np.ones((4, 4), bool), downsample=0)
    with pytest.raises(InvalidInputError):
        annotation_feature([])
    assert mask_to_polygons(np.zeros((0, 5), bool)) == []


def test_even_odd_fill_handles_polygons_partly_outside_and_any_orientation():
    poly = PolygonXY(exterior=np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]]))
    m = polygons_to_mask([poly], (10, 10))
    assert m[:5, :5].all() and m.sum() == 25
    reversed_poly = PolygonXY(exterior=poly.exterior[::-1])
    assert np.array_equal(polygons_to_mask([reversed_poly], (10, 10)), m)


def test_valid_polygon_refuses_what_simplification_can_break():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    hole = np.array([[2, 2], [2, 4], [4, 4], [4, 2]], float)
    assert valid_polygon(square, [hole])
    assert not valid_polygon(square, [hole + 20])  # a hole outside its exterior
    assert not valid_polygon(square, [hole + [7, 0]])  # a hole crossing the exterior
    assert not valid_polygon(np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float), [])  # a bow tie
    assert not valid_polygon(square, [hole, hole + [1, 1]])  # two holes overlapping
    assert not valid_polygon(square[:2], [])  # a line


@pytest.mark.slow
def test_simplified_polygons_keep_holes_inside_their_exterior_on_real_masks(data_dir):
    """Douglas-Peucker simplifies each ring on its own, which on real masks moves holes across
    their exterior; such a polygon keeps its exact outline, every other one is simplified."""
    from histosam.backend.evaluation.loop import read_mask

    changed = 0
    for folder in sorted(p for p in (data_dir / "patches").iterdir() if (p / "masks").is_dir()):
        for path in sorted((folder / "masks").iterdir())[:8]:
            mask = read_mask(path)
            exact = {p.exterior.tobytes() for p in mask_to_polygons(mask)}
            for tolerance in (0.5, 2.0):
                for polygon in mask_to_polygons(mask, simplify_tolerance=tolerance):
                    if not valid_polygon(polygon.exterior, polygon.holes):
                        assert polygon.exterior.tobytes() in exact, path  # kept exact
                        changed += 1
    assert changed  # the shared sets hold such masks: the check above ran on some
