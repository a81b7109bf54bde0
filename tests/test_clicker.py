"""The RITM evaluation clicker and the training click sampler, on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.ndimage import distance_transform_edt

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.evaluation.clicker import (
    Click,
    next_click,
    padded_distance,
    sample_training_click,
)


def brute_force_distance(region: np.ndarray) -> np.ndarray:
    """Distance of each region pixel to the nearest pixel outside it, the frame outside the
    image counting as outside: an independent O(n^2) reference for ``padded_distance``."""
    h, w = region.shape
    outside = [(y, x) for y in range(-1, h + 1) for x in range(-1, w + 1)
               if not (0 <= y < h and 0 <= x < w) or not region[y, x]]
    out = np.zeros((h, w))
    for y, x in zip(*np.nonzero(region), strict=True):
        out[y, x] = min(np.hypot(y - oy, x - ox) for oy, ox in outside)
    return out


def test_padded_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        region = rng.random((9, 11)) < 0.7
        np.testing.assert_allclose(padded_distance(region), brute_force_distance(region))


def test_first_click_on_empty_prediction_is_the_most_interior_pixel():
    gt = np.zeros((12, 12), bool)
    gt[2:9, 3:10] = True  # 7x7 square, centre (5, 6)
    click = next_click(gt, np.zeros_like(gt))
    assert click == Click(5, 6, True)
    assert click.xy == (6, 5) and click.label == 1


def test_first_maximum_in_row_major_order():
    gt = np.zeros((10, 10), bool)
    gt[2:4, 2:8] = True  # 2 rows thick: every pixel has distance 1; the first is (2, 2)
    assert next_click(gt, np.zeros_like(gt)) == Click(2, 2, True)


def test_a_tie_gives_a_negative_click():
    gt = np.zeros((10, 20), bool)
    pred = np.zeros((10, 20), bool)
    gt[2:7, 2:7] = True  # false negatives: 5x5 square, centre (4, 4)
    pred[2:7, 12:17] = True  # false positives: same square shifted, centre (4, 14)
    assert next_click(gt, pred) == Click(4, 14, False)


def test_positive_when_false_negatives_are_deeper():
    gt = np.zeros((12, 20), bool)
    pred = np.zeros((12, 20), bool)
    gt[1:8, 1:8] = True  # 7x7 missed square: depth 4
    pred[1:6, 12:17] = True  # 5x5 false-positive square: depth 3
    assert next_click(gt, pred) == Click(4, 4, True)
    pred[1:10, 11:20] = True  # now the false positives are 9x9: depth 5
    assert next_click(gt, pred) == Click(5, 15, False)


def test_a_clicked_pixel_is_never_chosen_again():
    gt = np.zeros((12, 12), bool)
    gt[2:9, 3:10] = True
    pred = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    seen = set()
    for _ in range(10):
        click = next_click(gt, pred, clicked)
        assert (click.y, click.x) not in seen
        seen.add((click.y, click.x))
        clicked[click.y, click.x] = True
    # With only the centre clicked, the click is the first remaining maximum (row-major).
    clicked[:] = False
    clicked[5, 6] = True
    dt = brute_force_distance(gt)
    dt[5, 6] = 0
    expected = np.unravel_index(np.argmax(dt), dt.shape)
    click = next_click(gt, pred, clicked)
    assert (click.y, click.x) == expected and (click.y, click.x) != (5, 6)


def test_none_when_every_error_pixel_was_clicked_or_prediction_is_perfect():
    gt = np.zeros((6, 6), bool)
    gt[2, 2] = True
    assert next_click(gt, gt.copy()) is None
    clicked = np.zeros_like(gt)
    clicked[2, 2] = True
    assert next_click(gt, np.zeros_like(gt), clicked) is None


def test_padding_changes_the_chosen_click():
    """The object fills the left 8 columns and touches three image edges.

    Without padding the edges would not count as background and the 'most interior' pixel
    would be the top-left corner (8 px from the object's only real border); with padding it
    is (3, 3), four pixels from the top and left edges and from the border at column 8.
    """
    gt = np.zeros((20, 20), bool)
    gt[:, :8] = True
    unpadded = distance_transform_edt(gt)
    assert np.unravel_index(np.argmax(unpadded), gt.shape) == (0, 0)
    assert next_click(gt, np.zeros_like(gt)) == Click(3, 3, True)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(InvalidInputError):
        next_click(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(InvalidInputError):
        next_click(np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((3, 3), bool))


# --------------------------------------------------------------------------- training sampler

masks = arrays(bool, st.tuples(st.integers(1, 14), st.integers(1, 14)))


@settings(max_examples=100, deadline=None)
@given(gt=masks, data=st.data(), seed=st.integers(0, 2**32 - 1), first=st.booleans())
def test_training_click_always_lies_in_the_error_region_it_chose(gt, data, seed, first):
    rng = np.random.default_rng(seed)
    if first:
        out = sample_training_click(gt, None, rng)
        if not gt.any():
            assert out is None
            return
        y, x, positive = out
        assert positive and gt[y, x]
        dt = padded_distance(gt)
        assert dt[y, x] >= dt.max() / 2
        return
    pred = data.draw(arrays(bool, gt.shape))
    out = sample_training_click(gt, pred, rng)
    fn, fp = gt & ~pred, ~gt & pred
    if not fn.any() and not fp.any():
        assert out is None
        return
    y, x, positive = out
    region = fn if positive else fp
    assert region[y, x]
    assert positive == (fn.sum() >= fp.sum())
    dt = padded_distance(region)
    assert dt[y, x] >= dt.max() / 2


def test_training_clicks_vary_and_stay_interior():
    gt = np.zeros((40, 40), bool)
    gt[5:35, 5:35] = True
    rng = np.random.default_rng(1)
    clicks = {sample_training_click(gt, None, rng)[:2] for _ in range(50)}
    assert len(clicks) > 10  # random, not always the same pixel
    for y, x in clicks:  # at least half the maximum depth (15) from the border
        assert 12 <= y <= 27 and 12 <= x <= 27


def scipy_padded_distance(region: np.ndarray) -> np.ndarray:
    """The transform the clicker used before OpenCV's (scipy's exact EDT): the reference."""
    return distance_transform_edt(np.pad(np.asarray(region, bool), 1))[1:-1, 1:-1]


def _predictions(gt: np.ndarray) -> list[np.ndarray]:
    """Imperfect predictions of ``gt`` of the kinds a model makes: shifted, grown, shrunk, empty."""
    import cv2

    kernel = np.ones((9, 9), np.uint8)
    u8 = gt.view(np.uint8)
    return [np.zeros_like(gt), np.roll(gt, (7, -5), axis=(0, 1)),
            cv2.dilate(u8, kernel).astype(bool), cv2.erode(u8, kernel).astype(bool), ~gt]


@pytest.mark.slow
def test_clicks_on_every_shared_patch_set_are_those_of_the_scipy_transform(data_dir):
    """OpenCV's transform gives scipy's distances bit for bit, so every click is the same."""
    from histosam.backend.evaluation.loop import read_mask

    sets = sorted(p for p in (data_dir / "patches").iterdir() if (p / "masks").is_dir())
    assert sets
    for folder in sets:
        for path in sorted((folder / "masks").iterdir())[:4]:  # every set; its first patches (all: see notes)
            gt = read_mask(path)
            for pred in _predictions(gt):
                for region in (gt & ~pred, ~gt & pred):
                    assert np.array_equal(padded_distance(region), scipy_padded_distance(region)), path
                clicked = np.zeros_like(gt)
                for _ in range(3):
                    click = next_click(gt, pred, clicked)
                    dt_fn = scipy_padded_distance(gt & ~pred)
                    dt_fp = scipy_padded_distance(~gt & pred)
                    dt_fn[clicked] = dt_fp[clicked] = 0
                    if dt_fn.max() == 0 and dt_fp.max() == 0:
                        assert click is None
                        break
                    positive = dt_fn.max() > dt_fp.max()
                    y, x = np.unravel_index(int(np.argmax(dt_fn if positive else dt_fp)), gt.shape)
                    assert click == Click(int(y), int(x), bool(positive)), path
                    clicked[y, x] = True
