"""IoU, NoC, NoF, mIoU per click and click obedience, on values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.evaluation.metrics import (
    error_closed,
    iou,
    miou_per_click,
    noc,
    nof,
    obedience,
    padded_curve,
    setbacks,
    threshold_key,
)


def test_iou_on_known_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared -> 2 / 4
    assert iou(a, b) == pytest.approx(0.5)
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    third = np.zeros((1, 3), bool)
    third[0, 0] = True
    assert iou(third, np.ones((1, 3), bool)) == float(np.float32(1) / np.float32(3))
    with pytest.raises(ValueError):
        iou(a, np.zeros((4, 5), bool))


def test_noc_is_the_first_click_reaching_the_threshold():
    curve = [0.5, 0.82, 0.86, 0.84, 0.91]
    assert noc(curve, 0.80, 20) == 2
    assert noc(curve, 0.85, 20) == 3
    assert noc(curve, 0.90, 20) == 5
    assert noc(curve, 0.95, 20) == 20  # never reached: max clicks
    assert noc([0.9], 0.90, 20) == 1  # >= , not >
    assert noc(curve, 0.90, 3) == 3  # clicks beyond max_clicks do not count


def test_nof_counts_noc_equal_to_max_clicks_as_failure():
    # reached exactly at the last click (NoC 5 of 5) still counts as a failure (RITM)
    nocs = [noc([0.1, 0.2, 0.3, 0.4, 0.95], 0.9, 5), noc([0.95], 0.9, 5), noc([0.1] * 5, 0.9, 5)]
    assert nocs == [5, 1, 5]
    assert nof(nocs, 5) == (2, pytest.approx(2 / 3))
    assert nof([], 5) == (0, 0.0)


def test_miou_pads_stopped_curves_with_their_last_value():
    np.testing.assert_allclose(padded_curve([0.3, 0.9], 4), [0.3, 0.9, 0.9, 0.9])
    np.testing.assert_allclose(padded_curve([], 3), [0, 0, 0])
    curve = miou_per_click([[0.5, 1.0], [0.1, 0.2, 0.3, 0.4]], 4)
    np.testing.assert_allclose(curve, [0.3, 0.6, 0.65, 0.7])


def test_obedience_splits_positive_and_negative_clicks():
    out = obedience([True, False, True, True], [True, True, False, False])
    assert out == {"positive": 0.5, "negative": 1.0}
    assert obedience([True], [True]) == {"positive": 1.0, "negative": None}


def test_setbacks_count_clicks_that_lose_more_than_a_tenth_of_iou():
    # 0.8 -> 0.65 (-0.15) is a setback, 0.65 -> 0.6 (-0.05) and 0.7 -> 0.61 (-0.09) are not; the first
    # click of each curve has nothing before it, and a stopped curve is not padded.
    out = setbacks([[0.5, 0.8, 0.65, 0.6, 0.7, 0.61], [0.9], [0.4, 0.2, 0.95]])
    assert out == {"drop": 0.1, "clicks": 7, "count": 2, "share": 2 / 7}
    assert setbacks([[0.3]])["share"] is None
    assert setbacks([[0.8, 0.75]], drop=0.02)["count"] == 1


def test_threshold_keys():
    assert [threshold_key(t) for t in (0.8, 0.85, 0.9)] == ["80", "85", "90"]


def test_error_closed_is_the_share_of_the_remaining_error_removed():
    curve = [0.72, 0.75, 0.8, 0.86]
    # 0.72 -> 0.86: 0.14 of the 0.28 left after click 1
    assert error_closed(curve, 1, 4) == pytest.approx(0.5)
    assert error_closed([0.2, 0.5], 1, 2) == pytest.approx(0.375)  # same gain, worse start
    assert error_closed([0.8, 0.6], 1, 2) == pytest.approx(-1.0)  # later clicks made it worse
    assert error_closed([1.0, 1.0], 1, 2) is None  # nothing left to close
    assert error_closed(curve, 1, 5) is None  # curve too short
    assert error_closed(curve, 3, 3) is None
