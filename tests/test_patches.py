"""Patch extraction: real slides, fraction filter, atomic output, resume, bad input, CLI, bench."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import histosam.backend.wsi.patches as patches
from histosam.backend.cli import main
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.wsi.patches import (
    MANIFEST_COLUMNS,
    PatchConfig,
    extract_patches,
    load_patch_dataset,
    staging_dir,
)
from histosam.backend.wsi.slides import Slide


def read_manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def geojson_rect(path: Path, x0, y0, x1, y1, name="Tumor") -> Path:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}]}))
    return path


@pytest.fixture
def synthetic_slide(tmp_path) -> Path:
    """768x512 two-level slide at 0.5 µm/px: textured pink tissue on white glass."""
    rng = np.random.default_rng(0)
    img = np.full((512, 768, 3), 245, np.uint8)
    tissue = np.clip(rng.normal((210, 120, 170), 12, (384, 640, 3)), 0, 255).astype(np.uint8)
    img[64:448, 64:704] = tissue
    path = tmp_path / "synthetic.tiff"
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate((1, 2)):
            tw.write(np.ascontiguousarray(img[::d, ::d]), tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(2e4 / d, 2e4 / d), resolutionunit="CENTIMETER", subfiletype=min(i, 1))
    return path


@pytest.fixture
def synthetic_config(tmp_path, synthetic_slide) -> PatchConfig:
    ann = geojson_rect(tmp_path / "tumour.geojson", 200, 100, 520, 380)
    return PatchConfig(slide=synthetic_slide, annotations=ann, out=tmp_path / "out", size=32,
                       magnification=10, fraction=(0.1, 0.9), tissue_threshold=0.5)


@pytest.fixture
def synthetic_label_mask(tmp_path) -> Path:
    """Label mask of ``synthetic_slide`` (two levels): 1 over the tissue, 3 in a rectangle.

    The labels are in channel 1 (G); channel 0 (R) holds 0 and 7 (outside the tissue), so a
    wrong --label-channel sees other classes.
    """
    labels = np.zeros((512, 768), np.uint8)
    labels[64:448, 64:704] = 1
    labels[100:380, 200:520] = 3
    red = np.where(labels == 0, 7, 0).astype(np.uint8)
    rgb = np.ascontiguousarray(np.stack([red, labels, np.zeros_like(labels)], -1))
    path = tmp_path / "synthetic_mask.tiff"
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate((1, 2)):
            tw.write(np.ascontiguousarray(rgb[::d, ::d]), tile=(64, 64), photometric="rgb", compression="zlib",
                     subfiletype=min(i, 1))
    return path


def test_panda_patches_at_10x_with_fraction_filter(data_dir, tmp_path):
    slides = data_dir / "slides"
    config = PatchConfig(
        slide=slides / "panda-006f6aa3.tiff", annotations=slides / "panda-006f6aa3_mask.tiff",
        out=tmp_path / "panda", size=256, magnification=10, fraction=(0.2, 0.8),
        # This mask holds 0, 1, 3, 4: ask for Gleason 3-5 by name (a bare "5" is refused).
        label_map={3: "tumour", 4: "tumour", 5: "tumour"}, classes=("tumour",),
    )
    summary = extract_patches(config, progress=False, overview=False)
    assert summary.downsample == 2.0 and summary.mpp == pytest.approx(0.972, abs=0.002)
    assert summary.n_written > 3 and summary.n_rejected > 0
    assert summary.n_grid > summary.n_tissue  # glass around the biopsy is skipped
    rows = read_manifest(config.out)
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) == summary.n_written
    records = load_patch_dataset(config.out)
    assert [r.stem for r in records] == [r["stem"] for r in rows]
    labels = Slide(config.annotations)
    for row, rec in zip(rows, records, strict=True):
        mask = read_mask(rec.mask_path)
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
        fraction = (mask > 0).mean()
        assert fraction == pytest.approx(float(row["tumour_fraction"]), abs=1e-6)
        assert 0.2 <= fraction <= 0.8
        assert row["slide"] == "panda-006f6aa3.tiff" and float(row["downsample"]) == 2.0
        assert cv2.imread(str(rec.image_path)).shape == (256, 256, 3)
    # One patch against an independent read: labels under the pixel centres of level 0.
    row = rows[0]
    x, y = int(row["x"]), int(row["y"])
    raw = labels.read_scaled(x, y, 512, 512, 1.0, interpolation="nearest", channels="rgba")[..., 0]
    want = np.isin(raw[1::2, 1::2], [3, 4, 5])
    assert np.array_equal(read_mask(records[0].mask_path) > 0, want)
    image = cv2.cvtColor(cv2.imread(str(records[0].image_path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(image, Slide(config.slide).read_scaled(x, y, 256, 256, 2.0))


def test_cli_on_the_cmu_slide_writes_a_dataset_then_finds_it_complete(data_dir, tmp_path, capsys):
    slide = data_dir / "slides" / "cmu-1-small-region.svs"
    ann = geojson_rect(tmp_path / "cmu.geojson", 600, 900, 1500, 2100)
    out = tmp_path / "cmu"
    args = ["patches", "--slide", str(slide), "--annotations", str(ann), "--magnification", "5",
            "--size", "128", "--stride", "96", "--fraction", "0.05", "1", "--out", str(out), "--no-progress",
            "--no-overview"]
    assert main(args) == 0
    assert "patches (downsample 4" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"images", "masks", "manifest.csv", "params.json"}
    assert not staging_dir(out).exists()
    rows = read_manifest(out)
    assert rows and all(float(r["tumour_fraction"]) >= 0.05 for r in rows)
    assert all(float(r["mpp"]) == pytest.approx(4 * 0.499) and r["magnification"] == "5" for r in rows)
    assert len(load_patch_dataset(out)) == len(rows)
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out


def test_overview_png_shows_the_patches(synthetic_config):
    extract_patches(synthetic_config, progress=False, overview=True)
    picture = cv2.imread(str(synthetic_config.out / "overview.png"))
    assert picture is not None and picture.shape[0] > 100 and picture.std() > 10


def test_tcga_slide_needs_a_base_magnification(data_dir, tmp_path, capsys):
    slide = data_dir / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    ann = geojson_rect(tmp_path / "t.geojson", 1000, 1000, 3000, 2500)
    out = tmp_path / "tcga"
    args = ["patches", "--slide", str(slide), "--annotations", str(ann), "--magnification", "2.5",
            "--size", "128", "--out", str(out), "--no-progress", "--no-overview"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--base-magnification" in err
    assert not out.exists() and not staging_dir(out).exists()
    assert main([*args, "--base-magnification", "20"]) == 0
    assert len(load_patch_dataset(out)) > 0


def test_resume_after_an_interruption_finishes_the_same_dataset(synthetic_config, tmp_path, monkeypatch):
    clean = extract_patches(
        PatchConfig(**{**synthetic_config.__dict__, "out": tmp_path / "clean"}), progress=False, overview=False
    )
    assert clean.n_written > 10

    real_write, calls = patches._write_png, {"n": 0}

    def crash_after_some(path, image):
        calls["n"] += 1
        if calls["n"] > 9:  # the 5th image: mid-patch (image written, mask not yet)
            raise KeyboardInterrupt
        real_write(path, image)

    monkeypatch.setattr(patches, "_write_png", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        extract_patches(synthetic_config, progress=False, overview=False)
    monkeypatch.setattr(patches, "_write_png", real_write)
    out, stage = synthetic_config.out, staging_dir(synthetic_config.out)
    assert not out.exists() and stage.is_dir()  # nothing half-written where readers look
    with (stage / "journal.csv").open("a") as fh:
        fh.write("synthetic_x000999_y0")  # a line torn by the crash

    resumed = extract_patches(synthetic_config, progress=False, overview=False)
    assert resumed.n_resumed >= 4 and not stage.exists()
    assert read_manifest(out) == read_manifest(tmp_path / "clean")
    for rec, ref in zip(load_patch_dataset(out), load_patch_dataset(tmp_path / "clean"), strict=True):
        assert rec.image_path.read_bytes() == ref.image_path.read_bytes()
        assert rec.mask_path.read_bytes() == ref.mask_path.read_bytes()


def test_resuming_with_other_arguments_is_refused(synthetic_config, monkeypatch):
    monkeypatch.setattr(patches, "_write_png", lambda path, image: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_patches(synthetic_config, progress=False, overview=False)
    monkeypatch.undo()
    other = PatchConfig(**{**synthetic_config.__dict__, "size": 48})
    with pytest.raises(InvalidInputError, match="interrupted run .* other arguments"):
        extract_patches(other, progress=False, overview=False)
    extract_patches(synthetic_config, progress=False, overview=False)  # same arguments: finishes
    with pytest.raises(InvalidInputError, match="made with other arguments"):
        extract_patches(other, progress=False, overview=False)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"slide": Path("missing.svs")}, NotFoundError, "does not exist"),
        ({"annotations": "corrupt"}, InvalidInputError, "not valid JSON"),
        ({"annotations": "outside"}, InvalidInputError, "outside the 768x512 slide"),
        ({"classes": ("Necrosis",)}, InvalidInputError, "unknown class 'Necrosis'"),
        ({"fraction": (0.8, 0.2)}, InvalidInputError, "--fraction"),
        ({"magnification": None}, InvalidInputError, "exactly one"),
        ({"magnification": 80}, InvalidInputError,
         r"--magnification 80 is finer than level 0 of synthetic.tiff \(20x, 0.5 µm/px\).*upsampled 4x; ask for at most 20x"),
        ({"magnification": None, "mpp": 0.1}, InvalidInputError, r"--mpp 0.1 is finer .*\(20x, 0.5 µm/px\).*at least 0.5 µm/px"),
        ({"magnification": None, "downsample": 0.5}, InvalidInputError, r"--downsample 0.5 is finer .*at least 1"),
        ({"out": "file"}, InvalidInputError, "not a folder"),
    ],
)
def test_bad_input_fails_before_anything_is_written(synthetic_config, tmp_path, change, error, match):
    values = dict(change)
    if values.get("annotations") == "corrupt":
        values["annotations"] = tmp_path / "corrupt.geojson"
        values["annotations"].write_text('{"type": "FeatureCollection", "features": [{')
    if values.get("annotations") == "outside":
        values["annotations"] = geojson_rect(tmp_path / "far.geojson", 5000, 5000, 6000, 6000)
    if values.get("out") == "file":
        values["out"] = tmp_path / "a-file"
        values["out"].write_text("x")
    config = PatchConfig(**{**synthetic_config.__dict__, **values})
    with pytest.raises(error, match=match):
        extract_patches(config, progress=False, overview=False)
    assert not staging_dir(config.out).exists()
    assert not synthetic_config.out.exists()


def test_load_patch_dataset_reads_plain_folders_and_reports_damage(data_dir, tmp_path):
    records = load_patch_dataset(data_dir / "patches" / "ocdc")
    assert len(records) == 10
    assert all(r.image_path.stem == r.mask_path.stem == r.stem for r in records)
    stem, image_path, mask_path = records[0]  # a plain (stem, image, mask) tuple too
    assert image_path.parent.name == "images" and mask_path.parent.name == "masks"
    with pytest.raises(NotFoundError):
        load_patch_dataset(tmp_path / "nothing")
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "d" / "images" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="without a partner"):
        load_patch_dataset(tmp_path / "d")
    (tmp_path / "d" / "manifest.csv").write_text("stem,x\nb,1\n")
    with pytest.raises(InvalidInputError, match="no image or mask"):
        load_patch_dataset(tmp_path / "d")


def test_bench_reports_speed_and_memory(synthetic_config, tmp_path, capsys):
    out = tmp_path / "bench" / "patches.json"
    rc = main(["bench", "patches", "--slide", str(synthetic_config.slide), "--annotations",
               str(synthetic_config.annotations), "--magnification", "10", "--size", "32",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "patches" and result["patches_written"] > 0
    assert result["patches_per_second"] > 0 and result["peak_traced_mib"] > 0 and result["peak_rss_mib"] > 0
    assert "patches_per_second" in capsys.readouterr().out


# --------------------------------------------------------------------------- label-mask classes, scale


def _cli_patches(slide: Path, ann: Path, out: Path, *extra: str) -> list[str]:
    return ["patches", "--slide", str(slide), "--annotations", str(ann), "--out", str(out),
            "--no-progress", "--no-overview", *extra]


def test_panda_label_mask_unknown_class_fails_naming_the_classes(data_dir, tmp_path, capsys):
    """A class no label mask could hold, or classes this mask holds none of, are refused before
    anything is written; a class of the scheme this slide happens to lack is not (PANDA's Gleason
    5 is absent from this mask, its 3 and 4 are there)."""
    slides = data_dir / "slides"
    slide, mask = slides / "panda-006f6aa3.tiff", slides / "panda-006f6aa3_mask.tiff"
    out = tmp_path / "panda"
    scale = ["--magnification", "5", "--size", "256"]
    tumour_map = ["--label-map", "1=benign", "3=tumour", "4=tumour", "5=tumour"]
    for bad, named in [
        (["--classes", "9"], "unknown class '9'"),  # none of the classes asked for is in this mask
        (["--classes", "5", "9"], "unknown classes '5', '9'"),
        (["--classes", "3", "tumour"], "unknown class 'tumour'"),  # not a label value, and no map names it
        ([*tumour_map, "--classes", "tumor"], "unknown class 'tumor'; this file has: 'benign', 'tumour'"),
    ]:
        assert main(_cli_patches(slide, mask, out, *scale, *bad)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and named in err, err
        assert "labels present: 0, 1, 3, 4" in err
        assert not out.exists() and not staging_dir(out).exists()
        assert list(tmp_path.iterdir()) == []

    # Valid classes work, by value and by label-map name (labels 3, 4, 5 by one name): same masks.
    assert main(_cli_patches(slide, mask, out, *scale, "--classes", "3", "4", "5", "--exclude-classes", "2")) == 0
    named = tmp_path / "named"
    assert main(_cli_patches(slide, mask, named, *scale, *tumour_map, "--classes", "tumour",
                             "--exclude-classes", "benign")) == 0
    assert "classes tumour" in capsys.readouterr().out
    by_value, by_name = load_patch_dataset(out), load_patch_dataset(named)
    assert len(by_value) == len(by_name) > 3
    assert sum(read_mask(r.mask_path).any() for r in by_name) > 0
    for a, b in zip(by_value, by_name, strict=True):
        assert a.stem == b.stem and np.array_equal(read_mask(a.mask_path), read_mask(b.mask_path))


def test_panda_magnification_above_the_slides_is_refused(data_dir, tmp_path, capsys):
    slides = data_dir / "slides"
    out = tmp_path / "panda"
    args = _cli_patches(slides / "panda-006f6aa3.tiff", slides / "panda-006f6aa3_mask.tiff", out,
                        "--classes", "3", "--size", "256")
    assert main([*args, "--magnification", "80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--magnification 80 is finer than level 0" in err
    assert "(20x, 0.4862 µm/px)" in err and "upsampled 4x" in err and "at most 20x" in err
    assert main([*args, "--mpp", "0.25"]) == 2
    assert "at least 0.4862 µm/px" in capsys.readouterr().err
    assert not out.exists() and not staging_dir(out).exists()


def test_synthetic_label_mask_classes_channel_and_map(synthetic_slide, synthetic_label_mask, tmp_path):
    base = {"slide": synthetic_slide, "annotations": synthetic_label_mask, "size": 32, "magnification": 10,
            "tissue_threshold": 0.5, "label_channel": 1}

    def run(name, **change):
        return extract_patches(PatchConfig(**{**base, "out": tmp_path / name, **change}), progress=False,
                               overview=False)

    for change, match in [
        ({"classes": ("9",)}, r"unknown class '9'; this file has: '1', '3' \(labels present: 0, 1, 3;"),
        ({"classes": ("9", "5")}, r"unknown classes '9', '5'; this file has: '1', '3'"),
        ({"classes": ("tumour",)}, r"unknown class 'tumour'.*--label-map"),
        # Channel 0 holds 0 and 7, not the labels: the error shows what that channel has.
        ({"classes": ("3",), "label_channel": 0}, r"unknown class '3'; this file has: '7' \(labels present: 0, 7;"),
        ({"classes": ("tumour",), "label_map": {5: "tumour"}},
         r"unknown class 'tumour'; this file has: no classes \(label map 5=tumour; labels present: 0, 1, 3; "
         r"'tumour' is label 5\)"),
        ({"classes": ("tumor",), "label_map": {3: "tumour", 5: "tumour"}},
         r"unknown class 'tumor'; this file has: 'tumour' \(label map 3=tumour, 5=tumour"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            run("bad", **change)
        assert not (tmp_path / "bad").exists() and not staging_dir(tmp_path / "bad").exists()

    plain = run("plain", classes=("3", "5"), exclude_classes=("2",))  # 5 and 2 absent: harmless
    named = run("named", classes=("tumour",), label_map={3: "tumour", 5: "tumour", 1: "tissue"},
                exclude_classes=("tissue",))
    default = run("default", label_map={3: "tumour", 5: "tumour"})  # no --classes: the map's names held
    assert plain.classes == ["3", "5"] and named.classes == default.classes == ["tumour"]
    assert plain.n_written == named.n_written == default.n_written > 10
    masks = [[read_mask(r.mask_path) for r in load_patch_dataset(tmp_path / n)] for n in ("plain", "named", "default")]
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(*masks, strict=True))
    assert any(m.all() for m in masks[0]) and any(not m.any() for m in masks[0])


def test_scale_near_level_0_is_allowed(synthetic_config, tmp_path):
    """µm/px a little finer than the slide's (scanners differ from nominal) is not refused."""
    near = PatchConfig(**{**synthetic_config.__dict__, "magnification": None, "mpp": 0.47, "fraction": None})
    summary = extract_patches(near, progress=False, overview=False)
    assert summary.downsample == pytest.approx(0.94) and summary.n_written > 0
    level0 = PatchConfig(**{**synthetic_config.__dict__, "magnification": 20, "fraction": None,
                            "out": tmp_path / "level0"})
    assert extract_patches(level0, progress=False, overview=False).downsample == 1.0


def test_qupath_export_patches_refuses_a_magnification_above_the_slides(synthetic_slide, tmp_path, capsys):
    ann = geojson_rect(tmp_path / "t.geojson", 200, 100, 520, 380)
    out = tmp_path / "qp"
    rc = main(["qupath", "export-patches", "--slide", str(synthetic_slide), "--geojson", str(ann),
               "--classes", "Tumor", "--magnification", "40", "--size", "32", "--out", str(out),
               "--no-progress", "--no-overview"])
    assert rc == 2
    assert "--magnification 40 is finer than level 0 of synthetic.tiff (20x" in capsys.readouterr().err
    assert not out.exists() and not staging_dir(out).exists()
    assert not (tmp_path / "qp.annotations.geojson").exists()  # not even the annotations it used
