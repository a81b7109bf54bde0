"""Edge snapping: the model's mask edge moved onto the image's colour edge within a thin band."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from histosam.backend.bundles.onnx_predictor import OnnxPredictor
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.evaluation.metrics import iou
from histosam.backend.postprocess.edge_snap import (
    DEFAULT_CONFIG,
    EdgeSnappingPredictor,
    EdgeSnapSettings,
    snap_mask,
    working_lab,
)

H, W = 256, 256  # one low-res pixel = one pixel: the band is ``band`` pixels wide on each side


def gland(h: int = H, w: int = W, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A purple disk (the object) on pink noise; and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * min(h, w)) ** 2
    img = np.where(inside[..., None], np.array([120, 60, 150]), np.array([230, 170, 200])).astype(np.float64)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), inside


def settings(**kw) -> EdgeSnapSettings:
    return EdgeSnapSettings(**{"band": 4.0, "beta": 5.0, "smoothing": 0.0, "working_side": 512, **kw})


def test_shipped_settings_load_and_bad_settings_are_one_clear_error(tmp_path):
    shipped = EdgeSnapSettings.load()
    assert DEFAULT_CONFIG.is_file() and shipped == EdgeSnapSettings.load(DEFAULT_CONFIG) == EdgeSnapSettings()
    custom = tmp_path / "s.yaml"
    custom.write_text("band: 2\nsmoothing: 0\n")
    assert EdgeSnapSettings.load(custom) == EdgeSnapSettings(band=2.0, smoothing=0.0)
    for text, message in (("bnad: 1\n", "unknown edge-snap setting"), ("band: -1\n", "positive"),
                          ("beta: 0\n", "positive"), ("smoothing: -1\n", "positive"), ("beta: x\n", "must be a number"),
                          ("working_side: 8\n", "at least 16"), ("- 1\n", "mapping"), ("a: [\n", "not valid YAML")):
        custom.write_text(text)
        with pytest.raises(InvalidInputError, match=message):
            EdgeSnapSettings.load(custom)
    with pytest.raises(NotFoundError, match="cannot read edge-snap config"):
        EdgeSnapSettings.load(tmp_path / "missing.yaml")


def test_a_mask_a_few_pixels_off_snaps_onto_the_colour_edge_and_nothing_else_moves():
    img, truth = gland()
    s = settings()
    for shifted in (np.roll(truth, 3, axis=1), cv2.erode(truth.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0,
                    cv2.dilate(truth.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0):
        snapped = snap_mask(working_lab(img, s), shifted, np.zeros((0, 2)), np.zeros(0), s)
        assert iou(shifted, truth) < 0.97 and iou(snapped, truth) > 0.99
        far = cv2.dilate((shifted != cv2.erode(shifted.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
                         .astype(np.uint8), np.ones((11, 11), np.uint8)) == 0  # farther than the 4-px band
        assert np.array_equal(snapped[far], shifted[far])


def test_the_edge_moves_at_most_the_band_and_clicks_are_pinned():
    img, truth = gland()
    s = settings(band=2.0)
    far_off = np.roll(truth, 10, axis=1)  # 10 px off: farther than the 2-px band
    snapped = snap_mask(working_lab(img, s), far_off, np.zeros((0, 2)), np.zeros(0), s)
    changed = snapped != far_off
    assert changed.any()
    dist = cv2.distanceTransform((far_off == cv2.erode(far_off.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
                                 .astype(np.uint8), cv2.DIST_L2, 5)
    assert dist[changed].max() <= 3  # within the band (2 px, the disk's rounding)
    # A negative click on the object's rim, inside the band, stays background; a positive one outside stays object.
    s4 = settings()
    mask = np.roll(truth, 2, axis=1)
    ys, xs = np.nonzero(truth & ~cv2.erode(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool))
    neg = (float(xs[0]), float(ys[0]))
    snapped = snap_mask(working_lab(img, s4), mask, np.array([neg]), np.array([0]), s4)
    assert not snapped[int(neg[1]), int(neg[0])]
    assert snap_mask(working_lab(img, s4), mask, np.array([neg, (1e9, np.nan)]), np.array([0, 2]), s4)[
        int(neg[1]), int(neg[0])] == snapped[int(neg[1]), int(neg[0])]  # box corners / padding are not clicks


def test_an_empty_or_full_mask_is_returned_as_is():
    img, _ = gland()
    s = settings()
    for mask in (np.zeros((H, W), bool), np.ones((H, W), bool)):
        assert np.array_equal(snap_mask(working_lab(img, s), mask, np.array([[5.0, 5.0]]), np.array([1]), s), mask)


def test_a_large_image_snaps_on_a_bounded_copy_and_keeps_its_size():
    img, truth = gland(900, 1400)
    s = settings(working_side=256)
    lab = working_lab(img, s)
    assert max(lab.shape[:2]) == 256 and lab.dtype == np.uint8
    shifted = np.roll(truth, 8, axis=1)  # 8 px = 1.5 low-res px here
    snapped = snap_mask(lab, shifted, np.zeros((0, 2)), np.zeros(0), s)
    assert snapped.shape == truth.shape
    assert iou(snapped, truth) > iou(shifted, truth) + 0.01
    assert EdgeSnapSettings(smoothing=2.0) and not np.array_equal(
        working_lab(img, EdgeSnapSettings(smoothing=2.0)), working_lab(img, EdgeSnapSettings(smoothing=0.0)))


@pytest.mark.slow
def test_snapping_predictor_wraps_a_real_bundle(tiny_bundle):
    img, truth = gland()
    inner = OnnxPredictor.from_bundle(tiny_bundle, threads=1)
    wrapped = EdgeSnappingPredictor(inner, EdgeSnapSettings())
    with pytest.raises(InvalidInputError, match="set_image"):
        wrapped.predict(points=np.array([[5.0, 5.0]]), labels=np.array([1]))
    wrapped.set_image(img)
    inner.set_image(img)
    pts, labels = np.array([[128.0, 128.0], [10.0, 10.0]]), np.array([1, 0])
    p, q = wrapped.predict(points=pts, labels=labels), inner.predict(points=pts, labels=labels)
    assert np.array_equal(p.low_res_logits, q.low_res_logits)  # the model's own state goes on
    assert np.array_equal(p.mask, snap_mask(working_lab(img, EdgeSnapSettings()), q.mask, pts, labels, EdgeSnapSettings()))
    assert wrapped.name.endswith("+edge-snap") and wrapped.transform == inner.transform


def test_serve_flags_and_config_file_turn_edge_snapping_on(tmp_path):
    from histosam.backend.cli import build_parser
    from histosam.backend.cli.commands.serve import settings_from_args
    from histosam.backend.serving.server import ServerSettings

    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])).edge_snap == "model"  # as each model's bundle asks
    assert settings_from_args(parser.parse_args(["serve", "--edge-snap"])).edge_snap == "on"
    assert settings_from_args(parser.parse_args(["serve", "--edge-snap", "off"])).edge_snap == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--edge-snap", "always"])
    (tmp_path / "s.yaml").write_text("band: 2\n")
    (tmp_path / "serve.yaml").write_text("edge_snap: false\nedge_snap_config: s.yaml\n")
    from_file = settings_from_args(parser.parse_args(["serve", "--config", str(tmp_path / "serve.yaml")]))
    assert from_file.edge_snap == "off" and from_file.edge_snap_config == tmp_path / "s.yaml"
    assert ServerSettings(edge_snap=True).edge_snap == "on"
    with pytest.raises(InvalidInputError, match="edge_snap must be one of model, on, off"):
        ServerSettings.from_mapping({"edge_snap": "yes"})


@pytest.mark.slow
def test_evaluate_edge_snap_both_runs_each_and_records_the_settings(tiny_bundle, tmp_path):
    from histosam.backend.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(2):
        img, truth = gland(seed=i)
        cv2.imwrite(str(data / "images" / f"g{i}.png"), img[..., ::-1])
        cv2.imwrite(str(data / "masks" / f"g{i}.png"), truth.astype(np.uint8) * 255)
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(tiny_bundle), "--data", str(data), "--max-clicks", "3", "--out", str(out),
               "--edge-snap", "both", "--propagation", "off", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    keys = sorted(results["runs"])
    assert len(keys) == 2 and keys[0] + "+edge-snap" == keys[1]
    assert results["config"]["edge_snap"] == "both"
    assert results["config"]["edge_snap_settings"]["band"] == EdgeSnapSettings().band


def test_snapping_opens_no_hole_but_the_ones_negative_clicks_ask_for():
    """A gland with a small white lumen near its edge, inside the band: a negative click on the lumen
    makes it a hole (the user asked for it); without that click the snapped mask has no hole the
    model's mask did not have, and the centre of a hole the model left, beyond the band, stays a hole."""
    from scipy.ndimage import binary_fill_holes

    img, truth = gland()
    yy, xx = np.mgrid[:H, :W]
    lumen_xy = (W / 2 + 0.3 * H - 14.0, H / 2)
    lumen = np.hypot(yy - lumen_xy[1], xx - lumen_xy[0]) < 6
    img[lumen] = (250, 250, 250)
    s = settings(band=20.0)
    lab = working_lab(img, s)
    asked = snap_mask(lab, truth, np.array([lumen_xy]), np.array([0]), s)
    hole = binary_fill_holes(asked) & ~asked
    assert hole[int(lumen_xy[1]), int(lumen_xy[0])] and iou(hole, lumen) > 0.8  # obeyed, as a hole
    plain = snap_mask(lab, truth, np.array([[W / 2, H / 2]]), np.array([1]), s)
    assert not (binary_fill_holes(plain) & ~plain).any() and plain[lumen].all()
    r = np.hypot(yy - H / 2, xx - W / 2)
    holed = truth & ~(r < 30)  # the model left a hole whose centre is farther than the band from any edge
    assert not snap_mask(lab, holed, np.zeros((0, 2)), np.zeros(0), s)[r < 9].any()
