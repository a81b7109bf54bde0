"""The shared numpy transforms: geometry must match SAM's ResizeLongestSide exactly."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.predictor import prompt_arrays
from histosam.backend.core.transforms import ImageTransform, preprocess_shape, validate_rgb

SAM = ImageTransform(1024, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
LITE = ImageTransform(256, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0))


@pytest.mark.parametrize(("hw", "expected"), [((700, 900), (796, 1024)), ((333, 1200), (284, 1024)),
                                                ((1024, 1024), (1024, 1024)), ((900, 700), (1024, 796))])
def test_preprocess_shape_matches_sam_rounding(hw, expected):
    # segment_anything.utils.transforms.ResizeLongestSide.get_preprocess_shape
    from segment_anything.utils.transforms import ResizeLongestSide

    assert preprocess_shape(*hw, 1024) == expected == ResizeLongestSide.get_preprocess_shape(*hw, 1024)


def test_apply_image_pads_bottom_right_and_normalises():
    img = np.full((100, 50, 3), 255, np.uint8)
    x = LITE.apply_image(img)
    assert x.shape == (1, 3, 256, 256) and x.dtype == np.float32
    assert np.allclose(x[0, :, :, :128], 1.0)  # resized region: 255/255
    assert np.all(x[0, :, :, 128:] == 0.0)  # right padding
    y = SAM.apply_image(np.zeros((10, 20, 3), np.uint8))
    assert np.allclose(y[0, 0, 0, 0], -123.675 / 58.395)


def test_coords_and_boxes_scale_with_the_resized_image():
    coords = LITE.apply_coords(np.array([[50.0, 100.0]]), (100, 200))
    assert np.allclose(coords, [[64.0, 128.0]])
    box = LITE.apply_boxes(np.array([0, 0, 200, 100]), (100, 200))
    assert np.allclose(box, [0, 0, 256, 128])


def test_logits_back_to_original_size_and_crop():
    low = np.full((256, 256), -5.0, np.float32)
    low[:, :128] = 5.0  # left half of the padded frame = the whole 100x50 image
    out = LITE.logits_to_original(low, (100, 50))
    assert out.shape == (100, 50)
    assert (out > 0).all()


def test_mask_to_low_res_letterboxes_like_the_image():
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True
    low = LITE.mask_to_low_res(mask)
    assert low.shape == (256, 256)
    assert low[:128, :128].mean() > 0.98 and low[:, 130:].sum() == 0 and low[130:].sum() == 0


def test_validate_rgb_errors():
    with pytest.raises(InvalidInputError, match="uint8"):
        validate_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InvalidInputError, match="HxWx3"):
        validate_rgb(np.zeros((4, 4, 5), np.uint8))
    assert validate_rgb(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)
    assert validate_rgb(np.zeros((4, 4, 4), np.uint8)).shape == (4, 4, 3)


def test_prompt_arrays_padding_box_and_errors():
    pts, lbl = prompt_arrays([[1, 2]], [1], None)
    assert lbl.tolist() == [1, -1] and pts.shape == (2, 2)
    pts, lbl = prompt_arrays(None, None, [10, 20, 0, 5])  # corners are sorted
    assert lbl.tolist() == [2, 3] and pts.tolist() == [[0, 5], [10, 20]]
    with pytest.raises(InvalidInputError):
        prompt_arrays([[np.nan, 1]], [1], None)
    with pytest.raises(InvalidInputError):
        prompt_arrays(None, None, None)
    with pytest.raises(InvalidInputError):
        prompt_arrays([[1, 1]], [1, 0], None)


def test_mask_dilation_grows_the_mask_by_whole_low_res_pixels_and_leaves_the_logits():
    from histosam.backend.core.transforms import LOW_RES

    low = np.full((LOW_RES, LOW_RES), -5.0, np.float32)
    low[100:140, 60:90] = 5.0
    plain = ImageTransform(256, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    calibrated = ImageTransform(256, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), mask_dilation=1)
    before = low.copy()
    base = plain.mask_from_logits(low, (512, 512))  # 1 low-res pixel = 2 image pixels here
    grown = calibrated.mask_from_logits(low, (512, 512))
    assert np.array_equal(low, before)  # the mask prompt fed back stays the model's own
    assert np.array_equal(base, plain.logits_to_original(low, (512, 512)) > 0)
    rows, cols = np.nonzero(base)
    rows2, cols2 = np.nonzero(grown)
    assert grown[base].all() and grown.sum() > base.sum()  # only grows
    assert rows.min() - rows2.min() == 2 and rows2.max() - rows.max() == 2
    assert cols.min() - cols2.min() == 2 and cols2.max() - cols.max() == 2
    with pytest.raises(InvalidInputError, match="mask_dilation"):
        ImageTransform(256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), mask_dilation=-1)
