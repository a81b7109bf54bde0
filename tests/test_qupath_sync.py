"""QuPath <-> histosam sync: scripts install, GeoJSON predictions merge, patches from exports.

The GeoJSON route (what QuPath exports and imports natively) runs end to end here on a real
slide. The project route needs paquo and a QuPath installation (PAQUO_QUPATH_DIR); QuPath
cannot be installed on these machines, so those tests skip unless both are present.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from histosam.backend.cli import main
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.geometry import (
    PolygonXY,
    annotation_feature,
    feature_collection,
    polygons_to_mask,
)
from histosam.backend.qupath.install import (
    ENTRY_SCRIPTS,
    PLACEHOLDER,
    QUPATH_JARS,
    SETTINGS_FILE,
    install_scripts,
)
from histosam.backend.qupath.sync import (
    PREDICTION_NAME,
    is_prediction,
    match_entry,
    merge_predictions_geojson,
    uri_to_path,
)
from histosam.backend.wsi.patches import load_patch_dataset

REPO = Path(__file__).resolve().parents[1]
PANDA = "panda-006f6aa3.tiff"  # 2048 x 7680 level 0


def square(x0: float, y0: float, side: float, hole: float = 0.0) -> PolygonXY:
    """A square, with a square hole of half-side ``hole`` in its middle when asked."""
    ext = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)
    cx, cy = x0 + side / 2, y0 + side / 2
    holes = [np.array([[cx - hole, cy - hole], [cx + hole, cy - hole], [cx + hole, cy + hole],
                       [cx - hole, cy + hole]], float)] if hole else []
    return PolygonXY(ext, holes)


def user_export() -> dict:
    """A QuPath export: a tumour outline with a hole, a stroma region, a point, an old prediction."""
    tumour = annotation_feature([square(200, 1000, 800, hole=100)], class_name="Tumor")
    tumour["id"] = "8f0c-user-tumour"
    tumour["properties"]["measurements"] = {"Area µm^2": 123.5}
    stroma = annotation_feature([square(1200, 3000, 500)], class_name="Stroma", name="stroma by hand")
    point = {"type": "Feature", "id": "p1", "geometry": {"type": "Point", "coordinates": [300, 300]},
             "properties": {"objectType": "annotation", "classification": {"name": "Positive"}}}
    old = annotation_feature([square(1000, 6000, 300)], class_name="Tumor", name=PREDICTION_NAME)
    return feature_collection([tumour, stroma, point, old])


def predictions() -> dict:
    """What `histosam client ... --geojson-out` writes: unnamed Tumor annotations."""
    return feature_collection([
        annotation_feature([square(1000, 5000, 400)], measurements={"predicted IoU": 0.91}),
        annotation_feature([square(100, 100, 300), square(600, 100, 200)], measurements={"predicted IoU": 0.8}),
    ])


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------- install-scripts


def test_install_scripts_fills_in_the_folder_and_keeps_user_settings(tmp_path, capsys):
    qupath = tmp_path / "QuPath" / "v0.5"
    (qupath / "extensions").mkdir(parents=True)
    (qupath / "extensions" / "grpc-api-1.70.0.jar").write_bytes(b"PK")
    assert main(["qupath", "install-scripts", "--qupath-dir", str(qupath), "--server", "gpu-box:50051"]) == 0
    out = capsys.readouterr().out
    dest = qupath / "scripts" / "histosam"
    assert "io.grpc:grpc-api:1.70.0  [found grpc-api-1.70.0.jar]" in out
    assert "io.grpc:grpc-netty-shaded:1.70.0  [missing]" in out
    desc = REPO / "protos" / "histosam" / "v1" / "segmentation.desc"
    assert (dest / "segmentation.desc").read_bytes() == desc.read_bytes()
    assert (dest / "HistosamClient.groovy").read_bytes() == (REPO / "qupath-scripts" / "HistosamClient.groovy").read_bytes()
    for name in ENTRY_SCRIPTS:
        text = (dest / name).read_text()
        assert PLACEHOLDER not in text and f"def histosamDir = '{dest}'  // HISTOSAM_SCRIPTS_DIR" in text
    settings = (dest / SETTINGS_FILE).read_text()
    assert re.search(r"^server = gpu-box:50051$", settings, re.M)
    # Reinstall: the user's edits and own files stay; --server updates only that key.
    (dest / SETTINGS_FILE).write_text(settings + "class_name = Carcinoma\n")
    (dest / "my_notes.txt").write_text("mine")
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    report = install_scripts(dest, token_file=token)
    assert report.kept == ["my_notes.txt"] and (dest / "my_notes.txt").read_text() == "mine"
    settings = (dest / SETTINGS_FILE).read_text()
    assert "class_name = Carcinoma" in settings and f"token_file = {token}" in settings
    assert "server = gpu-box:50051" in settings
    assert not any(p.name.startswith(".") for p in dest.parent.iterdir())  # no staging left behind


def test_install_scripts_dry_run_and_bad_destination(tmp_path):
    report = install_scripts(tmp_path / "new", dry_run=True)
    assert not (tmp_path / "new").exists() and "HistosamClient.groovy" in report.written
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a folder"):
        install_scripts(tmp_path / "file")
    assert main(["qupath", "install-scripts", "--dest", str(tmp_path / "x"), "--token-file", str(tmp_path / "none")]) == 2


def test_the_readme_lists_exactly_the_jars_the_installer_names():
    readme = (REPO / "qupath-scripts" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.-]+:[\w.-]+:[\w.-]+)` \|", readme, re.M))
    assert listed == {j.coordinates for j in QUPATH_JARS}
    for jar in QUPATH_JARS:
        assert jar.file_name in readme


# --------------------------------------------------------------------------- GeoJSON merge


def test_merge_keeps_user_features_replaces_old_predictions_and_backs_up(tmp_path):
    export = write(tmp_path / "slide.geojson", user_export())
    original = export.read_bytes()
    preds = write(tmp_path / "pred.geojson", predictions())
    plan = merge_predictions_geojson(export, preds)
    assert plan.written and (plan.kept, plan.replaced, plan.added) == (3, 1, 2)
    assert plan.added_by_class == {"Tumor": 2}
    assert plan.backup is not None and plan.backup.read_bytes() == original
    merged = json.loads(export.read_text())
    assert merged["type"] == "FeatureCollection"
    assert merged["features"][:3] == user_export()["features"][:3]  # untouched, in order
    new = merged["features"][3:]
    assert [f["properties"]["name"] for f in new] == [PREDICTION_NAME] * 2
    assert all(f["properties"]["classification"]["name"] == "Tumor" for f in new)
    assert new[0]["properties"]["measurements"] == {"predicted IoU": 0.91}
    assert new[1]["geometry"]["type"] == "MultiPolygon"
    # Importing again replaces the predictions instead of piling them up.
    again = merge_predictions_geojson(export, preds, backup=False)
    assert (again.kept, again.replaced, again.added, again.backup) == (3, 2, 2, None)
    assert json.loads(export.read_text()) == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["slide.geojson", "pred.geojson", plan.backup.name])


def test_merge_dry_run_writes_nothing_and_out_keeps_the_export(tmp_path):
    export = write(tmp_path / "slide.geojson", user_export()["features"])  # QuPath's older list form
    before = export.read_bytes()
    preds = write(tmp_path / "pred.geojson", predictions())
    plan = merge_predictions_geojson(export, preds, dry_run=True)
    assert not plan.written and plan.added == 2 and export.read_bytes() == before
    assert "would merge" in plan.describe()
    out = tmp_path / "for_qupath.geojson"
    plan = merge_predictions_geojson(export, preds, out=out, classes=["Stroma"])
    assert export.read_bytes() == before and plan.added == 0 and plan.backup is None
    merged = json.loads(out.read_text())
    assert isinstance(merged, list) and merged == user_export()["features"][:3]


def test_merge_refuses_predictions_without_area_and_bad_files(tmp_path):
    export = write(tmp_path / "slide.geojson", user_export())
    before = export.read_bytes()
    points = write(tmp_path / "points.geojson", {"type": "Feature", "properties": {},
                                                 "geometry": {"type": "Point", "coordinates": [1, 2]}})
    with pytest.raises(InvalidInputError, match="no polygon"):
        merge_predictions_geojson(export, points)
    cells = write(tmp_path / "cells.geojson", [dict(annotation_feature([square(0, 0, 5)]),
                                                    properties={"objectType": "cell"})])
    with pytest.raises(InvalidInputError, match="cell, not an annotation"):
        merge_predictions_geojson(export, cells)
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        merge_predictions_geojson(export, tmp_path / "broken.geojson")
    with pytest.raises(NotFoundError):
        merge_predictions_geojson(export, tmp_path / "missing.geojson")
    assert export.read_bytes() == before
    assert is_prediction({"properties": {"name": f"{PREDICTION_NAME}: 2"}}) and not is_prediction({"properties": {}})


def test_import_predictions_cli_geojson_route(tmp_path, capsys):
    export = write(tmp_path / "slide.geojson", user_export())
    preds = write(tmp_path / "pred.geojson", predictions())
    before = export.read_bytes()
    assert main(["qupath", "import-predictions", "--geojson", str(preds), "--into", str(export), "--dry-run"]) == 0
    assert "2 prediction(s) (2 Tumor) would merge" in capsys.readouterr().out and export.read_bytes() == before
    assert main(["qupath", "import-predictions", "--geojson", str(preds), "--into", str(export)]) == 0
    assert "1 earlier prediction(s) replaced; backup" in capsys.readouterr().out
    assert main(["qupath", "import-predictions", "--geojson", str(tmp_path / "nope.geojson"), "--into", str(export)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


@pytest.mark.skipif(importlib.util.find_spec("paquo") is not None, reason="paquo is installed: the real test runs")
def test_project_route_without_paquo_says_what_to_install(tmp_path, capsys):
    project = tmp_path / "project.qpproj"
    project.write_text("{}")
    preds = write(tmp_path / "pred.geojson", predictions())
    code = main(["qupath", "import-predictions", "--geojson", str(preds), "--project", str(project)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "pip install 'histosam[qupath]'" in err and "PAQUO_QUPATH_DIR" in err


def test_matching_predictions_files_to_project_images(tmp_path):
    names = ["slide-1.svs", "slide-2.svs", "other.ndpi"]
    assert match_entry(names, Path("slide-1.svs.geojson")) == "slide-1.svs"
    assert match_entry(names, Path("slide-2.geojson")) == "slide-2.svs"
    assert match_entry(names, Path("whatever.json"), image="other.ndpi") == "other.ndpi"
    with pytest.raises(InvalidInputError, match="matches 0 images"):
        match_entry(names, Path("unknown.geojson"))
    with pytest.raises(NotFoundError, match="no image 'x'"):
        match_entry(names, Path("a.geojson"), image="x")
    assert uri_to_path("file:/data/slides/a%20b.svs") == Path("/data/slides/a b.svs")
    assert uri_to_path("https://example.org/a.svs") is None


# --------------------------------------------------------------------------- patches from an export


def test_export_patches_from_a_qupath_geojson_export(tmp_path, data_dir, capsys):
    slide = data_dir / "slides" / PANDA
    export = write(tmp_path / "panda.geojson", user_export())
    merge_predictions_geojson(export, write(tmp_path / "pred.geojson", predictions()), backup=False)
    out = tmp_path / "patches"
    args = ["qupath", "export-patches", "--slide", str(slide), "--geojson", str(export), "--classes", "Tumor",
            "--downsample", "8", "--size", "64", "--tissue-threshold", "0", "--no-progress", "--no-overview",
            "--out"]
    assert main([*args, str(out)]) == 0
    assert "patches in" in capsys.readouterr().out
    records = load_patch_dataset(out)
    assert records
    user_tumour = [square(200, 1000, 800, hole=100)]
    predicted = [square(1000, 5000, 400), square(100, 100, 300), square(600, 100, 200)]
    rows = {r["stem"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    seen_tumour = False
    for rec in records:
        row = rows[rec.stem]
        x, y, ds = float(row["x"]), float(row["y"]), float(row["downsample"])
        mask = cv2.imread(str(rec.mask_path), cv2.IMREAD_GRAYSCALE) > 0
        expected = polygons_to_mask(user_tumour, mask.shape, origin=(x, y), downsample=ds)
        assert np.array_equal(mask, expected), rec.stem  # predictions and Stroma left out, hole kept
        seen_tumour |= bool(mask.any())
    assert seen_tumour
    used = json.loads((tmp_path / "patches.annotations.geojson").read_text())
    assert not any(is_prediction(f) for f in used["features"])
    # With the predictions: the predicted squares are in the masks too.
    out2 = tmp_path / "with_predictions"
    assert main([*args, str(out2), "--include-predictions"]) == 0
    rows2 = {r["stem"]: r for r in csv.DictReader((out2 / "manifest.csv").open())}
    gained = 0
    for rec in load_patch_dataset(out2):
        row = rows2[rec.stem]
        x, y, ds = float(row["x"]), float(row["y"]), float(row["downsample"])
        mask = cv2.imread(str(rec.mask_path), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(mask, polygons_to_mask(user_tumour + predicted, mask.shape, origin=(x, y), downsample=ds))
        gained += int(mask.any() and not polygons_to_mask(user_tumour, mask.shape, origin=(x, y), downsample=ds).any())
    assert gained > 0
    # Unknown class: one line, nothing written.
    assert main([*args, str(tmp_path / "none"), "--classes", "Tumour"]) == 2
    assert "unknown class 'Tumour'" in capsys.readouterr().err
    assert not any(p.name.startswith("none") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- the paquo route


def _paquo_ready() -> bool:
    return importlib.util.find_spec("paquo") is not None and bool(os.environ.get("PAQUO_QUPATH_DIR"))


@pytest.mark.slow
@pytest.mark.skipif(not _paquo_ready(), reason="needs paquo and QuPath (PAQUO_QUPATH_DIR); QuPath is not installable here")
def test_project_import_and_export_through_paquo(tmp_path, data_dir):  # pragma: no cover - needs QuPath
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject
    from shapely.geometry import Polygon

    from histosam.backend.qupath.sync import (
        export_patches_from_project,
        import_predictions_into_project,
    )

    folder = tmp_path / "project"
    with QuPathProject(folder, mode="x") as qp:
        entry = qp.add_image(data_dir / "slides" / PANDA)
        entry.hierarchy.add_annotation(Polygon([(200, 1000), (1000, 1000), (1000, 1800), (200, 1800)]),
                                       path_class=QuPathPathClass("Tumor"))
        name = entry.image_name
    preds = write(tmp_path / f"{Path(name).stem}.geojson", predictions())
    plans, backup = import_predictions_into_project(folder, [preds], dry_run=True)
    assert plans[0].added == 2 and backup is None
    plans, backup = import_predictions_into_project(folder, [preds])
    assert backup is not None and backup.is_dir()
    with QuPathProject(folder, mode="r") as qp:
        anns = list(qp.images[0].hierarchy.annotations)
    assert sum((a.name or "").startswith(PREDICTION_NAME) for a in anns) == 2 and len(anns) == 3
    results = export_patches_from_project(folder, tmp_path / "patches", ["Tumor"], downsample=8, size=64,
                                          tissue_threshold=0, progress=False, overview=False)
    assert results and load_patch_dataset(results[0][1].out)

