"""Region reading: scale metadata, level choice, resizing, errors (real and synthetic slides)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from histosam.backend.core.errors import InvalidInputError, NotFoundError, ResourceLimitError
from histosam.backend.wsi.slides import Slide, mpp_from_properties, nominal_magnification

LEVEL_COLOURS = [(200, 60, 120), (60, 160, 90), (40, 70, 200)]


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float | None) -> Path:
    """A generic tiled pyramidal TIFF (one page per level), with or without resolution tags."""
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(levels):
            ds = levels[0].shape[1] / img.shape[1]
            kwargs = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * ds)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(img, tile=(64, 64), photometric="rgb", compression="zlib",
                     subfiletype=0 if i == 0 else 1, **kwargs)
    return path


def gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx + yy) % 256)], -1).astype(np.uint8)


@pytest.fixture
def marked_pyramid(tmp_path) -> Path:
    """Levels 1 and 2 are flat colours unlike level 0: a read shows which level served it."""
    base = gradient_image(512, 768)
    levels = [base] + [np.full((512 // d, 768 // d, 3), LEVEL_COLOURS[i], np.uint8) for i, d in ((1, 2), (2, 4))]
    return write_pyramid(tmp_path / "marked.tiff", levels, mpp=0.25)


def test_resolution_tags_give_mpp_and_magnification(marked_pyramid, tmp_path):
    s = Slide(marked_pyramid)
    assert s.mpp == pytest.approx(0.25)
    assert s.slide_objective_power is None
    assert s.magnification == 40.0  # from µm/px: 0.25 µm/px is a 40x scan
    assert s.downsample_for(magnification=10) == pytest.approx(4.0)
    assert s.downsample_for(mpp=1.0) == pytest.approx(4.0)
    assert s.mpp_at(4.0) == pytest.approx(1.0)

    bare = Slide(write_pyramid(tmp_path / "bare.tiff", [gradient_image(128, 128)], mpp=None))
    assert bare.mpp is None and bare.magnification is None
    with pytest.raises(InvalidInputError, match="--base-magnification"):
        bare.downsample_for(magnification=10)
    with pytest.raises(InvalidInputError, match="--base-mpp"):
        bare.downsample_for(mpp=1.0)
    assert Slide(bare.path, base_magnification=20).downsample_for(magnification=5) == 4.0
    assert Slide(bare.path, base_mpp=0.5).downsample_for(magnification=10) == pytest.approx(2.0)


def test_best_level_is_the_coarsest_not_coarser_than_asked(marked_pyramid):
    s = Slide(marked_pyramid)
    assert s.level_downsamples == (1.0, 2.0, 4.0)
    assert [s.best_level(d) for d in (0.5, 1, 1.9, 2, 3.9, 4, 64)] == [0, 0, 0, 1, 1, 2, 2]
    # The region comes from the chosen level (flat colour), not from a resized level 0.
    assert (s.read_region(100, 100, 200, 200, downsample=2) == LEVEL_COLOURS[1]).all()
    assert (s.read_region(100, 100, 200, 200, downsample=3) == LEVEL_COLOURS[1]).all()
    assert (s.read_region(100, 100, 200, 200, downsample=8) == LEVEL_COLOURS[2]).all()
    assert s.read_region(100, 100, 200, 200, downsample=8).shape == (25, 25, 3)
    assert s.read_region(0, 0, 400, 300, magnification=10).shape == (75, 100, 3)


def test_resizing_from_level_zero_matches_area_average(tmp_path):
    base = gradient_image(300, 400)
    s = Slide(write_pyramid(tmp_path / "one.tiff", [base], mpp=0.5))
    got = s.read_scaled(40, 20, 50, 60, 2.0)
    want = cv2.resize(base[20:140, 40:140], (50, 60), interpolation=cv2.INTER_AREA)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # Exact sampling for labels: the pixel under each output pixel centre.
    near = s.read_scaled(41, 21, 30, 20, 3.0, interpolation="nearest")
    assert np.array_equal(near, base[22:82:3, 42:132:3])


def test_outside_the_slide_reads_white_and_huge_regions_are_refused(marked_pyramid):
    s = Slide(marked_pyramid)
    region = s.read_region(-100, -100, 200, 200, downsample=1)
    assert (region[:100, :100] == 255).all()
    assert not (region[100:, 100:] == 255).all()
    with pytest.raises(ResourceLimitError):
        s.read_scaled(0, 0, 30_000, 30_000, 1.0)
    with pytest.raises(InvalidInputError):
        s.read_scaled(0, 0, 0, 10, 1.0)


def test_large_reads_are_done_block_by_block(tmp_path, monkeypatch):
    base = gradient_image(256, 320)
    s = Slide(write_pyramid(tmp_path / "blocks.tiff", [base], mpp=0.5))
    whole = s.read_scaled(0, 0, 320, 256, 1.0)
    import histosam.backend.wsi.slides as slides

    monkeypatch.setattr(slides, "MAX_BLOCK_PIXELS", 64 * 64)  # force many blocks
    assert np.array_equal(s.read_scaled(0, 0, 320, 256, 1.0), whole)
    assert np.array_equal(whole, base)


def test_missing_and_unreadable_slides(tmp_path):
    with pytest.raises(NotFoundError):
        Slide(tmp_path / "nope.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(InvalidInputError, match="cannot read slide"):
        Slide(junk)
    with pytest.raises(InvalidInputError):
        Slide(tmp_path)
    ok = write_pyramid(tmp_path / "ok.tiff", [gradient_image(64, 64)], None)
    with pytest.raises(InvalidInputError, match="base_mpp"):
        Slide(ok, base_mpp=-1)


def test_metadata_helpers():
    assert mpp_from_properties({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}) == 0.5
    assert mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "20000"}) == 0.5
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}) is None
    assert mpp_from_properties({}) is None
    assert nominal_magnification(0.486) == 20.0
    assert nominal_magnification(0.2525) == 40.0
    assert nominal_magnification(0.227) == 40.0  # Hamamatsu 40x
    assert nominal_magnification(1.414) == pytest.approx(10 / 1.414)  # between 5x and 10x


# --------------------------------------------------------------------------- real slides


def test_real_slide_metadata(data_dir):
    slides = data_dir / "slides"
    panda = Slide(slides / "panda-006f6aa3.tiff")
    # PANDA: µm/px from TIFF resolution tags, no objective power -> 20x (README: 0.486 at 20x).
    assert panda.mpp == pytest.approx(0.486, abs=0.001)
    assert panda.slide_objective_power is None and panda.magnification == 20.0
    assert panda.level_downsamples == (1.0, 4.0, 16.0)
    assert panda.downsample_for(magnification=10) == 2.0

    cmu = Slide(slides / "cmu-1-small-region.svs")
    assert cmu.slide_objective_power == 20.0 and cmu.mpp == pytest.approx(0.499)

    tcga = Slide(slides / "tcga-cr-7395-01a-01-ts1.svs")
    assert tcga.mpp is None and tcga.magnification is None
    with pytest.raises(InvalidInputError, match="neither an objective power nor µm/px"):
        tcga.read_region(0, 0, 400, 400, magnification=10)
    tcga = Slide(slides / "tcga-cr-7395-01a-01-ts1.svs", base_magnification=20)
    region = tcga.read_region(1000, 1000, 800, 600, magnification=10)  # JP2K, level 1 (2.0005)
    assert region.shape == (300, 400, 3)
    assert tcga.best_level(2.0) == 1
    assert region.std() > 10  # tissue, not blank


def test_real_slide_region_matches_openslide_level_zero(data_dir):
    import openslide

    path = data_dir / "slides" / "panda-006f6aa3.tiff"
    s = Slide(path)
    got = s.read_region(512, 3000, 800, 800, magnification=10)
    raw = np.asarray(openslide.OpenSlide(str(path)).read_region((512, 3000), 0, (800, 800)))[..., :3]
    want = cv2.resize(raw, (400, 400), interpolation=cv2.INTER_AREA)
    assert got.shape == (400, 400, 3)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0
    # At 1.25x the coarsest level (16) serves it.
    assert s.read_region(0, 0, 2048, 7680, magnification=1.25).shape == (480, 128, 3)


def test_label_mask_nearest_read_matches_level_zero_labels(data_dir):
    import openslide

    path = data_dir / "slides" / "panda-006f6aa3_mask.tiff"
    s = Slide(path)
    got = s.read_scaled(1001, 3003, 150, 150, 2.0, interpolation="nearest", channels="rgba")[..., 0]
    full = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 3000), 0, (400, 400)))[..., 0]
    assert np.array_equal(got, full[4:304:2, 2:302:2])
    # Reads for labels never interpolate: only labels that exist in the mask come back.
    coarse = s.read_scaled(1002, 3002, 100, 100, 5.0, interpolation="nearest", channels="rgba",
                           integral_levels_only=True)[..., 0]
    assert set(np.unique(coarse)) <= {0, 1, 3, 4, 5}
