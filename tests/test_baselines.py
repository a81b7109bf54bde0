"""GrabCut and random-walker baselines: the Predictor contract, and that clicks help on real
ocdc patches."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.predictor import Predictor
from histosam.backend.evaluation.baselines import BASELINES, GrabCutPredictor, RandomWalkerPredictor
from histosam.backend.evaluation.loop import EvalConfig, evaluate_sample, select_samples
from histosam.backend.evaluation.metrics import padded_curve


@pytest.fixture(scope="module")
def ocdc_samples(data_dir):
    return select_samples([data_dir / "patches" / "ocdc"], (0.2, 0.8), limit=3).samples


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_follows_the_predictor_contract(name, ocdc_samples):
    sample = ocdc_samples[0]
    image = sample.image()
    pred = BASELINES[name]()
    assert isinstance(pred, Predictor) and pred.name == name
    pred.set_image(image)
    ys, xs = np.nonzero(sample.mask)
    inside = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    ys, xs = np.nonzero(~sample.mask)
    outside = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    out = pred.predict(points=np.array([inside, outside], np.float32), labels=np.array([1, 0]),
                       mask_logits=np.zeros((256, 256), np.float32))
    assert out.mask.shape == sample.mask.shape and out.mask.dtype == bool
    assert out.low_res_logits.shape == (256, 256) and out.low_res_logits.dtype == np.float32
    # clicks are hard seeds: the clicked pixels carry the clicked label
    assert out.mask[inside[1], inside[0]] and not out.mask[outside[1], outside[0]]
    assert 0 < out.mask.mean() < 1
    # the logits agree with the mask (ocdc patches are square: the letterbox is the full frame)
    assert sample.mask.shape[0] == sample.mask.shape[1]
    assert (out.low_res_logits > 0).mean() == pytest.approx(out.mask.mean(), abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_clicks_improve_the_mask_on_real_patches(name, ocdc_samples):
    """IoU after 5 RITM clicks beats IoU after 1 on most of three ocdc patches."""
    config = EvalConfig(max_clicks=5, target_iou=1.0)
    better = 0
    for s in ocdc_samples:
        result = evaluate_sample(BASELINES[name](), s.image(), s.mask, config, s.name)
        curve = padded_curve(result.ious, 5)
        better += curve[4] > curve[0]
    assert better >= 2


def test_box_limits_the_mask(ocdc_samples):
    sample = ocdc_samples[0]
    h, w = sample.mask.shape
    ys, xs = np.nonzero(sample.mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4])
    click = np.array([[xs[0] + w // 4, ys[0] + h // 4]], np.float32)
    box = np.array([w // 4, h // 4, 3 * w // 4, 3 * h // 4], np.float32)
    for cls in (GrabCutPredictor, RandomWalkerPredictor):
        pred = cls()
        pred.set_image(sample.image())
        mask = pred.predict(points=click, labels=np.array([1]), box=box).mask
        margin = 8  # upsampling from the working copy blurs the edge by a few pixels
        assert not mask[: h // 4 - margin].any() and not mask[3 * h // 4 + margin :].any()
        assert not mask[:, : w // 4 - margin].any() and not mask[:, 3 * w // 4 + margin :].any()


def test_random_walker_is_a_function_of_the_clicks(ocdc_samples):
    """Same clicks, same mask, whatever was asked before (no hidden state leaks)."""
    sample = ocdc_samples[1]
    ys, xs = np.nonzero(sample.mask)
    ny, nx = np.nonzero(~sample.mask)
    pts = np.array([[xs[0], ys[0]], [nx[-1], ny[-1]]], np.float32)
    rw = RandomWalkerPredictor()
    rw.set_image(sample.image())
    first = rw.predict(points=pts, labels=np.array([1, 0])).mask
    rw.predict(points=pts[::-1], labels=np.array([0, 1]))
    again = rw.predict(points=pts, labels=np.array([1, 0])).mask
    np.testing.assert_array_equal(first, again)


def test_bad_calls_are_clear_errors():
    pred = GrabCutPredictor()
    with pytest.raises(InvalidInputError, match="set_image"):
        pred.predict(points=np.array([[1, 1]]), labels=np.array([1]))
    pred.set_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InvalidInputError):
        pred.predict()
    with pytest.raises(InvalidInputError):
        pred.predict(points=np.array([[np.nan, 1]]), labels=np.array([1]))
    with pytest.raises(InvalidInputError):
        pred.predict(points=np.array([[1, 1]]), labels=np.array([1, 0]))
    with pytest.raises(InvalidInputError):
        pred.set_image(np.zeros((32, 32), np.float32))
