"""The working copy and the click rule that edge snapping, propagation and the baselines share."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.core.working_grid import WorkingGrid
from histosam.backend.evaluation.baselines import RandomWalkerPredictor
from histosam.backend.postprocess.propagation import ImageGraph, PropagationSettings


def test_grid_never_enlarges_and_keeps_two_pixels_a_side():
    assert WorkingGrid.for_size(100, 120, 160) == WorkingGrid((100, 120), (100, 120))
    assert not WorkingGrid.for_size(100, 120, 160).scaled
    assert WorkingGrid.for_size(512, 512, 160).small_hw == (160, 160)
    assert WorkingGrid.for_size(1000, 3, 160).small_hw == (160, 2)  # a sliver still has an edge


def test_a_click_lands_on_the_working_pixel_under_its_centre():
    grid = WorkingGrid((512, 512), (160, 160))  # 3.2 full pixels per working pixel
    # Pixel 3 spans [3, 4): its centre 3.5 lies in working pixel 1 ([3.2, 6.4)); its left edge
    # 3.0 lies in working pixel 0: the old floor(x * s) rule put the click one pixel off.
    assert grid.pixel(3, 3) == (1, 1)
    assert grid.pixel(0, 0) == (0, 0)
    assert grid.pixel(511, 511) == (159, 159)
    assert grid.pixel(-40, 9999) == (0, 159)  # clamped, never out of the copy
    assert grid.radius(5.0) == 2 and grid.radius(0.1) == 1
    identity = WorkingGrid((64, 80), (64, 80))
    assert all(identity.pixel(x, y) == (x, y) for x, y in [(0, 0), (7, 3), (79, 63)])


@pytest.mark.parametrize("h, w", [(512, 512), (300, 437), (97, 1000)])
def test_propagation_and_the_baselines_seed_the_same_pixel(h, w):
    rng = np.random.default_rng(h + w)
    rgb = rng.integers(0, 255, (h, w, 3), np.uint8)
    settings = PropagationSettings(working_side=160, click_radius=5.0)
    graph = ImageGraph.from_image(rgb, settings)
    walker = RandomWalkerPredictor(max_side=160, click_radius=5.0)
    walker.set_image(rgb)
    for x, y in rng.integers(0, [w, h], (20, 2)):
        pins = graph._pins(np.array([[x, y]], np.float64), np.array([1]))
        fg, _ = walker._seeds(np.array([[x, y]], np.float64), np.array([True]), None)
        assert fg.shape == pins.shape
        assert np.array_equal(fg, pins == 1), (x, y)
        cx, cy = walker._to_small(float(x), float(y))
        assert pins[cy, cx] == 1
