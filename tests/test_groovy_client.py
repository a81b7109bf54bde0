"""The QuPath scripts' client (qupath-scripts/HistosamClient.groovy) against a real server.

Groovy 2.4 and grpc-java 1.41 from Debian (``apt-get install groovy libgrpc-java
libprotobuf-java libnetty-java libguava-java libperfmark-java``, JAVA_HOME = a JDK 17) run
tests/groovy/histosam_client_checks.groovy, which loads the client exactly as the QuPath
scripts do and records what it saw; this module starts the servers, hands the driver its
checks, then replays every request with the Python client and compares. One JVM runs all
checks (JVM start-up costs seconds). Locally the module skips without Groovy; in CI (CI set)
a missing Groovy or jar is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from histosam.backend.core.geometry import PolygonXY, polygons_to_mask
from histosam.backend.qupath.install import install_scripts
from histosam.backend.qupath.ping import (
    DEBIAN_JARS,
    DEBIAN_PACKAGES,
    JAVA_SHARE,
    classpath,
    java_home,
)
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.model_store import ModelStore
from histosam.backend.serving.server import SegmentationServer, ServerSettings
from histosam.v1 import segmentation_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "qupath-scripts"
DRIVER = REPO / "tests" / "groovy" / "histosam_client_checks.groovy"
DESCRIPTOR = REPO / "protos" / "histosam" / "v1" / "segmentation.desc"
TOKEN = "groovy-test-token"
MAX_PIXELS = 600 * 600
H, W = 300, 400


def _unavailable(why: str):
    message = f"{why}: apt-get install {DEBIAN_PACKAGES} (and set JAVA_HOME to a JDK 17)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def groovy_env() -> dict:
    groovy = shutil.which("groovy")
    if groovy is None:
        _unavailable("groovy is not installed")
    missing = [j for j in DEBIAN_JARS if not (JAVA_SHARE / f"{j}.jar").is_file()]
    if missing:
        _unavailable(f"jars missing from {JAVA_SHARE}: {', '.join(missing)}")
    home = java_home()
    if home is None:
        _unavailable("no JDK found for groovy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOSAM_")}
    env["JAVA_HOME"] = home
    return {"groovy": groovy, "env": env,
            "classpath": classpath(None)}


def run_groovy(groovy_env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([groovy_env["groovy"], "-cp", groovy_env["classpath"], str(DRIVER), *args],
                          env=groovy_env["env"], capture_output=True, text=True, timeout=timeout)


def run_checks(groovy_env: dict, out_dir: Path, checks: list[dict]) -> dict:
    spec = {"scripts_dir": str(SCRIPTS), "out_dir": str(out_dir), "descriptor": str(DESCRIPTOR), "checks": checks}
    spec_file = out_dir / "spec.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    proc = run_groovy(groovy_env, str(spec_file))
    if proc.returncode != 0:
        pytest.fail(f"the groovy driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "results.json").read_text())


def synthetic(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 230, np.uint8)
    for _ in range(max(6, h * w // 20000)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(15, 70)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_lists(polygons: list[PolygonXY]) -> list:
    return [[p.exterior.tolist(), [h.tolist() for h in p.holes]] for p in polygons]


def groovy_lists(rings: list[dict]) -> list:
    return [[r["exterior"], r["holes"]] for r in rings]


def rings_to_polygons(rings: list[dict]) -> list[PolygonXY]:
    return [PolygonXY(np.asarray(r["exterior"], float), [np.asarray(h, float) for h in r["holes"]]) for r in rings]


def check(results: dict, name: str) -> dict:
    r = results[name]
    assert r["ok"], f"groovy check {name} failed: {r.get('error')}\n{r.get('trace')}"
    return r


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tiny_bundle):
    models = ModelStore.load([tiny_bundle], threads=1)
    settings = ServerSettings(port=0, threads=4, ort_threads=1, token=TOKEN, max_pixels=MAX_PIXELS, propagation="off")
    srv = SegmentationServer(settings, models=models)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def python_client(server):
    with SegmentationClient(server.address, token=TOKEN, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def silent_server():
    """A socket that accepts connections (backlog) but never speaks HTTP/2."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("groovy_images")
    small, slide = folder / "small.png", folder / "slide.png"
    cv2.imwrite(str(small), synthetic(H, W, seed=1))
    cv2.imwrite(str(slide), synthetic(900, 1200, seed=2))
    return {"small": small, "slide": slide}


FRAME = (1000.0, 2000.0, 2.5)
P1 = (1000 + 200 * 2.5, 2000 + 150 * 2.5, True)
P2 = (1000 + 60 * 2.5, 2000 + 40 * 2.5, False)
P3 = (1000 + 320 * 2.5, 2000 + 220 * 2.5, True)
BOX = (1000 + 40 * 2.5, 2000 + 30 * 2.5, 1000 + 300 * 2.5, 2000 + 250 * 2.5)
REFINE_RINGS = [{"exterior": [[1250.0, 2200.0], [1750.0, 2200.0], [1750.0, 2600.0], [1250.0, 2600.0]],
                 "holes": [[[1400.0, 2300.0], [1500.0, 2300.0], [1500.0, 2400.0], [1400.0, 2400.0]]]}]
R1, R2, OUTSIDE = (300.0, 300.0, True), (500.0, 400.0, False), (1100.0, 850.0, True)
REGION = {"x": 100, "y": 50, "width": 800, "height": 600}  # 480,000 px > MAX_PIXELS: auto downsample


@pytest.fixture(scope="module")
def results(groovy_env, server, silent_server, images, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("groovy_out")
    settings_dir = tmp_path_factory.mktemp("settings")
    (settings_dir / "histosam.properties").write_text(
        "server = file-host:1\ntoken = file-token\ntimeout_seconds = 5\n# comment\nclass_name = Stroma\n")
    token_file = settings_dir / "token.txt"
    token_file.write_text("  from-a-file  \n")
    bad_dir = tmp_path_factory.mktemp("bad_settings")
    (bad_dir / "histosam.properties").write_text("sever = x:1\n")
    spread_dir = tmp_path_factory.mktemp("spread_settings")
    (spread_dir / "histosam.properties").write_text("propagation = sometimes\n")
    url_dir = tmp_path_factory.mktemp("url_settings")
    (url_dir / "histosam.properties").write_text("server = http://127.0.0.1:50051\n")
    v6_dir = tmp_path_factory.mktemp("v6_settings")
    (v6_dir / "histosam.properties").write_text("server = ::1\n")
    portless_dir = tmp_path_factory.mktemp("portless_settings")
    (portless_dir / "histosam.properties").write_text("server = 127.0.0.1\n")
    nan_dir = tmp_path_factory.mktemp("nan_settings")
    (nan_dir / "histosam.properties").write_text("timeout_seconds = soon\n")
    home = tmp_path_factory.mktemp("home")  # no ~/.histosam there
    live = {"server": server.address, "token": TOKEN}
    dead = f"127.0.0.1:{free_port()}"
    pts = [list(P1)]
    checks = [
        {"name": "parse", "kind": "parse_scripts",
         "files": [str(p) for p in sorted(SCRIPTS.glob("*.groovy"))] + [str(DRIVER)]},
        {"name": "settings_precedence", "kind": "settings", "script_dir": str(settings_dir),
         "sys": {"histosam.server": "sys-host:2", "user.home": str(home)},
         "env": {"HISTOSAM_TOKEN": "env-token", "HISTOSAM_TLS": "yes"}},
        {"name": "settings_defaults", "kind": "settings", "script_dir": str(home), "sys": {"user.home": str(home)}},
        {"name": "settings_token_file", "kind": "settings", "script_dir": str(home),
         "sys": {"user.home": str(home), "histosam.token_file": str(token_file)}},
        {"name": "settings_unknown_key", "kind": "settings", "script_dir": str(bad_dir), "sys": {"user.home": str(home)}},
        {"name": "settings_bad_number", "kind": "settings", "script_dir": str(nan_dir), "sys": {"user.home": str(home)}},
        {"name": "settings_bad_propagation", "kind": "settings", "script_dir": str(spread_dir),
         "sys": {"user.home": str(home)}},
        {"name": "settings_server_url", "kind": "settings", "script_dir": str(url_dir), "sys": {"user.home": str(home)}},
        {"name": "settings_server_bare_ipv6", "kind": "settings", "script_dir": str(v6_dir),
         "sys": {"user.home": str(home)}},
        {"name": "settings_server_no_port", "kind": "settings", "script_dir": str(portless_dir),
         "sys": {"user.home": str(home)}},
        {"name": "settings_propagation_on", "kind": "settings", "script_dir": str(home),
         "sys": {"user.home": str(home)}, "env": {"HISTOSAM_PROPAGATION": "On"}},
        {"name": "settings_propagation_auto", "kind": "settings", "script_dir": str(home),
         "sys": {"user.home": str(home), "histosam.propagation": "auto"}},
        {"name": "encode_click", "kind": "encode", "method": "Click", "request": {
            "session_id": "s-1", "points": [{"x": 1.5, "y": 2.25, "positive": True}, {"x": 3, "y": 4, "positive": False}],
            "box": {"x0": 1, "y0": 2, "x1": 30, "y1": 40}, "min_area": 0, "want_mask_png": True,
            "simplify_tolerance": 0.5, "propagation": "PROPAGATION_ON",
            "mask_prompt_polygons": [{"exterior": [0, 0, 10, 0, 10, 10], "holes": [{"xy": [2, 2, 3, 2, 3, 3]}]}]}},
        {"name": "encode_typo", "kind": "encode", "method": "Click", "request": {"sesion_id": "s-1"}},
        {"name": "encode_bad_enum", "kind": "encode", "method": "Click", "request": {"propagation": "SOMETIMES"}},
        {"name": "session", "kind": "session", **live, "image": str(images["small"]), "frame": list(FRAME), "steps": [
            {"points": pts, "min_area": 16},
            {"points": pts + [list(P2)], "min_area": 16},
            {"points": pts + [list(P2), list(P3)], "want_mask": True},
            {"points": [], "box": list(BOX), "want_mask": True},
            {"points": pts, "mask_rings": REFINE_RINGS, "min_area": 16},
            {"points": pts, "close_first": True, "min_area": 16},
            {"points": pts, "simplify": 1.0, "min_area": 16},
            {"points": pts + [list(P2)], "propagation": "on", "want_mask": True},
            {"points": pts + [list(P2)], "propagation": "off", "want_mask": True},
            {"points": pts + [list(P2)], "propagation": "auto", "want_mask": True},
        ]},
        {"name": "region", "kind": "region_session", **live, "slide": str(images["slide"]), "region": REGION,
         "settings": {"simplify": 0},
         "updates": [[list(R1)], [list(R1)], [list(R1), list(OUTSIDE)], [list(R1), list(R2)], [list(R2)], []]},
        {"name": "refine", "kind": "region_session", **live, "slide": str(images["slide"]), "region": REGION,
         "settings": {"simplify": 0, "downsample": 2},
         "mask_rings": [{"exterior": [[250, 250], [450, 250], [450, 420], [250, 420]], "holes": []}],
         "updates": [[], [list(R1)], []]},
        {"name": "boxes", "kind": "boxes", **live, "slide": str(images["slide"]),
         "settings": {"simplify": 0},
         "boxes": [[100, 120, 200, 150], [5000, 5000, 10, 10], [600, 400, 300, 300]]},
        {"name": "channel", "kind": "channel_reuse", **live},
        {"name": "wrong_token", "kind": "error", "server": server.address, "token": "not-the-token"},
        {"name": "no_token", "kind": "error", "server": server.address},
        {"name": "down", "kind": "error", "server": dead, "settings": {"timeout_seconds": 20}},
        {"name": "silent", "kind": "error", "server": silent_server, "settings": {"timeout_seconds": 1}},
        {"name": "geometry", "kind": "geometry",
         "downsample": [[4000, 3000, 0, 2048, 0], [800, 600, 0, 2048, MAX_PIXELS], [500, 500, 3, 2048, 0],
                        [100, 100, 0, 2048, 0]],
         "padded": [[10, 10, 100, 100, 0.25, 1000, 1000], [900, 900, 200, 200, 0.5, 1000, 1000],
                    [5000, 5000, 10, 10, 0.25, 1000, 1000]],
         "ring": [[0, 0], [10, 0], [10, 10]],
         "rings": [{"exterior": [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], "holes": [[[2, 2], [4, 2], [4, 4], [2, 4]]]},
                   {"exterior": [[20, 20], [30, 20], [30, 22]], "holes": []}],
         "prompt_steps": [[[1, 1, True]], [[1, 1, True], [2, 2, False]], [[2, 2, False], [1, 1, True]],
                          [[2, 2, False]], [[2, 2, False], [1, 1, True]], [[2, 2, False], [1, 1, True], [5, 5, True]]]},
    ]
    t0 = time.perf_counter()
    res = run_checks(groovy_env, out, checks)
    res["_dead"] = dead
    res["_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- tests


def test_every_script_parses_under_groovy_24(results):
    files = check(results, "parse")["files"]
    expected = {p.name for p in SCRIPTS.glob("*.groovy")} | {DRIVER.name}
    assert set(files) == expected and len(expected) >= 6
    assert all(v == "ok" for v in files.values()), files


def test_settings_precedence_file_env_and_system_properties(results, tmp_path):
    r = check(results, "settings_precedence")
    assert r["target"] == "sys-host:2" and r["origins"]["server"] == "system property histosam.server"
    assert r["token"] == "env-token" and r["origins"]["token"] == "environment variable HISTOSAM_TOKEN"
    assert r["tls"] is True
    assert r["timeout_ms"] == 5000 and r["origins"]["timeout_seconds"].endswith("histosam.properties")
    assert r["values"]["class_name"] == "Stroma"
    assert r["descriptor"].endswith("segmentation.desc")
    d = check(results, "settings_defaults")
    assert d["target"] == "localhost:50051" and d["token"] is None and d["tls"] is False
    assert set(d["origins"].values()) == {"default"}
    assert d["max_message_bytes"] == 64 << 20 and d["timeout_ms"] == 30000
    assert check(results, "settings_token_file")["token"] == "from-a-file"


def test_settings_errors_name_the_problem(results):
    unknown = results["settings_unknown_key"]
    assert not unknown["ok"] and "unknown setting(s) sever" in unknown["error"] and "server" in unknown["error"]
    bad = results["settings_bad_number"]
    assert not bad["ok"] and "timeout_seconds must be a number" in bad["error"] and "soon" in bad["error"]
    spread = results["settings_bad_propagation"]
    assert not spread["ok"] and "propagation must be server, on, off or auto" in spread["error"]
    assert "sometimes" in spread["error"]
    url = results["settings_server_url"]
    assert not url["ok"] and "must be HOST:PORT (e.g. 127.0.0.1:50051), not a URL" in url["error"]
    portless = results["settings_server_no_port"]
    assert not portless["ok"] and "has no port: use HOST:PORT, e.g. 127.0.0.1:50051" in portless["error"]
    v6 = results["settings_server_bare_ipv6"]
    assert not v6["ok"] and "needs brackets, e.g. [::1]:50051" in v6["error"]
    assert check(results, "settings_propagation_on")["propagation"] == "PROPAGATION_ON"
    assert check(results, "settings_propagation_auto")["propagation"] == "PROPAGATION_AUTO"
    assert check(results, "settings_defaults")["propagation"] == "PROPAGATION_SERVER_DEFAULT"


def test_dynamic_message_is_what_python_protobuf_reads(results):
    r = check(results, "encode_click")
    msg = pb.ClickRequest.FromString(Path(r["file"]).read_bytes())
    assert msg.session_id == "s-1"
    assert [(p.x, p.y, p.positive) for p in msg.points] == [(1.5, 2.25, True), (3.0, 4.0, False)]
    assert msg.HasField("box") and (msg.box.x0, msg.box.y1) == (1.0, 40.0)
    assert msg.HasField("min_area") and msg.min_area == 0.0  # proto3 optional: presence survives
    assert msg.want_mask_png and msg.simplify_tolerance == 0.5
    assert list(msg.mask_prompt_polygons[0].exterior) == [0, 0, 10, 0, 10, 10]
    assert list(msg.mask_prompt_polygons[0].holes[0].xy) == [2, 2, 3, 2, 3, 3]
    assert msg.propagation == pb.PROPAGATION_ON
    bad_enum = results["encode_bad_enum"]
    assert not bad_enum["ok"] and "has no value SOMETIMES" in bad_enum["error"] and "PROPAGATION_ON" in bad_enum["error"]
    typo = results["encode_typo"]
    assert not typo["ok"] and "has no field 'sesion_id'" in typo["error"]


def test_clicks_give_the_python_clients_polygons_and_the_servers_mask(results, python_client, images):
    r = check(results, "session")
    assert (r["width"], r["height"]) == (W, H)
    assert tuple(r["frame"][k] for k in ("origin_x", "origin_y", "downsample")) == FRAME
    steps = r["steps"]
    session = python_client.open_image(images["small"], frame=FRAME)
    assert session.cache_hit  # the Groovy side's image, byte for byte
    pts = [P1]
    expected = [
        session.click(pts, min_area=16),
        session.click(pts + [P2], min_area=16),
        session.click(pts + [P2, P3], min_area=0, want_mask=True),
        session.click([], box=BOX, min_area=0, want_mask=True),
        session.click(pts, min_area=16, mask_prompt_polygons=rings_to_polygons(REFINE_RINGS)),
        session.click(pts, min_area=16),
        session.click(pts, min_area=16, simplify_tolerance=1.0),
        session.click(pts + [P2], min_area=0, want_mask=True, propagation=True),
        session.click(pts + [P2], min_area=0, want_mask=True),  # the server's default: off
        session.click(pts + [P2], min_area=0, want_mask=True, propagation="auto"),
    ]
    for i, (got, want) in enumerate(zip(steps, expected, strict=True)):
        assert groovy_lists(got["rings"]) == as_lists(want.polygons), f"step {i}"
        assert got["predicted_iou"] == pytest.approx(want.predicted_iou, abs=1e-6)
        assert got["mask_pixels"] == want.mask_pixels
    assert [s["num_points"] for s in steps[:4]] == [1, 2, 3, 0]
    assert steps[0]["rings"], "the first click found nothing"
    assert steps[4]["rings"] != steps[0]["rings"]  # the mask prompt is used
    assert steps[5]["reopened"] and r["reopen_count"] == 1 and steps[5]["rings"] == steps[0]["rings"]
    assert not steps[0]["reopened"]
    for i in (2, 3):  # exact pixel outlines: rasterised back they are the server's mask
        mask = cv2.imread(steps[i]["mask"], cv2.IMREAD_UNCHANGED) > 0
        raster = polygons_to_mask(rings_to_polygons(steps[i]["rings"]), (H, W), origin=FRAME[:2], downsample=FRAME[2])
        assert mask.any() and np.array_equal(raster, mask)
        assert steps[i]["area"] == pytest.approx(mask.sum() * FRAME[2] ** 2)
    assert [s["propagated"] for s in steps] == [w.propagated for w in expected]
    assert [s["propagated"] for s in steps[:9]] == [False] * 7 + [True, False]
    spread, alone = (cv2.imread(steps[i]["mask"], cv2.IMREAD_UNCHANGED) > 0 for i in (7, 8))
    assert not np.array_equal(spread, alone)  # the walker changed the mask; "off" is the model's own
    assert r["closed"]


def test_region_session_tracks_points_undo_and_the_pixel_limit(results, python_client):
    r = check(results, "region")
    (sent,) = r["sent"]
    img = cv2.imread(sent["file"])
    assert img.shape[0] * img.shape[1] <= MAX_PIXELS < REGION["width"] * REGION["height"]
    assert sent["downsample"] == pytest.approx(REGION["width"] / img.shape[1])
    assert (sent["origin_x"], sent["origin_y"]) == (REGION["x"], REGION["y"])
    frame = (sent["origin_x"], sent["origin_y"], sent["downsample"])
    assert r["frame"]["downsample"] == pytest.approx(frame[2])
    u = r["updates"]
    assert [x["changed"] for x in u] == [True, False, False, True, True, True]
    assert u[2]["ignored"] == 1 and u[3]["ignored"] == 0
    assert [p for p in u[4]["prompt"]] == [{"x": R2[0], "y": R2[1], "positive": False}]
    assert u[5]["cleared"] and u[5]["rings"] == []
    session = python_client.open_image(Path(sent["file"]).read_bytes(), frame=frame)
    for i, points in ((0, [R1]), (3, [R1, R2]), (4, [R2])):
        want = session.click(points, min_area=16)
        assert groovy_lists(u[i]["rings"]) == as_lists(want.polygons), f"update {i}"
    assert u[0]["rings"]


def test_refine_sends_the_shape_and_restores_it_without_points(results, python_client):
    r = check(results, "refine")
    (sent,) = r["sent"]
    assert sent["downsample"] == pytest.approx(2.0)
    u = r["updates"]
    assert [x["changed"] for x in u] == [False, True, True]  # no points at first: nothing to send
    mask_rings = [{"exterior": [[250, 250], [450, 250], [450, 420], [250, 420]], "holes": []}]
    assert u[2]["restored"] and u[2]["rings"] == mask_rings
    session = python_client.open_image(Path(sent["file"]).read_bytes(),
                                       frame=(sent["origin_x"], sent["origin_y"], sent["downsample"]))
    want = session.click([R1], min_area=16, mask_prompt_polygons=rings_to_polygons(mask_rings))
    assert groovy_lists(u[1]["rings"]) == as_lists(want.polygons)


def test_batch_boxes_one_region_each_and_a_bad_box_does_not_stop_the_rest(results, python_client):
    r = check(results, "boxes")
    ok, bad, ok2 = r["results"]
    assert "outside the image" in bad["error"]
    assert r["progress"] == [[1, 3], [2, 3], [3, 3]]
    assert len(r["sent"]) == 2
    for result, sent in zip((ok, ok2), r["sent"], strict=True):
        x, y, w, h = result["box"]
        region = result["region"]  # the box grown by the margin (0.25 of its size), clipped
        assert region["x"] == max(0, np.floor(x - 0.25 * w)) and region["width"] <= 1.5 * w + 2
        frame = (sent["origin_x"], sent["origin_y"], sent["downsample"])
        session = python_client.open_image(Path(sent["file"]).read_bytes(), frame=frame)
        want = session.click([], box=(x, y, x + w, y + h), min_area=16)
        assert groovy_lists(result["rings"]) == as_lists(want.polygons)
        assert result["predicted_iou"] == pytest.approx(want.predicted_iou, abs=1e-6)


def test_one_channel_per_server_for_the_session(results):
    r = check(results, "channel")
    assert r["same"] and r["separate"] and r["store_size"] == 1
    assert r["shared_open_after_close"] and r["own_closed_after_close"] and r["own_was_open"]


def test_wrong_or_missing_token_is_unauthenticated(results):
    wrong = check(results, "wrong_token")
    assert wrong["raised"] and wrong["status"] == "UNAUTHENTICATED"
    assert "UNAUTHENTICATED" in wrong["message"] and "the token sent was refused" in wrong["message"]
    assert "histosam.token" in wrong["message"]
    missing = check(results, "no_token")
    assert missing["status"] == "UNAUTHENTICATED" and "none was sent" in missing["message"]


def test_server_down_fails_fast_with_a_clear_message(results):
    down = check(results, "down")
    assert down["raised"] and down["status"] == "UNAVAILABLE"
    assert results["_dead"] in down["message"] and "not reachable" in down["message"]
    assert "histosam serve" in down["message"] and "histosam.server" in down["message"]
    assert down["seconds"] < 15  # refused at once, well inside its 20 s deadline


def test_unresponsive_server_hits_the_deadline(results):
    silent = check(results, "silent")
    assert silent["raised"] and silent["status"] == "DEADLINE_EXCEEDED"
    assert "did not answer GetServerInfo within 1 s" in silent["message"]
    assert 0.8 < silent["seconds"] < 15


def test_geometry_and_prompt_helpers(results):
    g = check(results, "geometry")
    auto, limited, fixed, small = g["downsample"]
    assert auto == pytest.approx(4000 / 2048)
    assert round(800 / limited) * round(600 / limited) <= MAX_PIXELS and limited < 1.2
    assert fixed == 3.0 and small == 1.0
    p1, p2, outside = g["padded"]
    assert p1 == {"x": 0.0, "y": 0.0, "width": 135.0, "height": 135.0}
    assert p2 == {"x": 800.0, "y": 800.0, "width": 200.0, "height": 200.0}
    assert "outside the image" in outside["error"]
    assert g["closed"] == [[0, 0], [10, 0], [10, 10], [0, 0]] and g["opened"] == [[0, 0], [10, 0], [10, 10]]
    assert g["area"] == pytest.approx(100 - 4 + 10)
    assert g["bounds"] == [0, 0, 30, 22]
    assert g["polygons"][0] == {"exterior": [0, 0, 10, 0, 10, 10, 0, 10], "holes": [{"xy": [2, 2, 4, 2, 4, 4, 2, 4]}]}
    assert g["round_trip"][0]["exterior"] == [[0, 0], [10, 0], [10, 10], [0, 10]]
    steps = g["prompts"]
    assert [s["changed"] for s in steps] == [True, True, False, True, True, True]
    assert steps[2]["points"] == [[1, 1, True], [2, 2, False]]  # first-seen order kept
    assert steps[4]["points"] == [[2, 2, False], [1, 1, True]]  # re-added: to the end
    assert steps[5]["points"][-1] == [5, 5, True]


def test_installed_scripts_exit_non_zero_with_one_line_when_the_server_is_down(groovy_env, tmp_path):
    installed = install_scripts(tmp_path / "scripts").dest  # the layout a QuPath user gets
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    proc = run_groovy(groovy_env, "--ping", str(installed), dead, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not reachable" in lines[0] and dead in lines[0]
    assert proc.stdout.strip() == ""
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_real_lite_medsam_through_groovy(groovy_env, lite_bundle, data_dir, tmp_path):
    """The real default model: a click on tumour in a real OCDC patch, Groovy vs Python."""
    image = sorted((data_dir / "patches" / "ocdc" / "images").glob("*"))[0]
    truth = cv2.imread(str(sorted((data_dir / "patches" / "ocdc" / "masks").glob("*"))[0]), cv2.IMREAD_GRAYSCALE) > 127
    ys, xs = np.nonzero(cv2.erode(truth.astype(np.uint8), np.ones((25, 25), np.uint8)))
    assert len(xs), "no tumour pixel to click on"
    k = len(xs) // 2
    click = [float(xs[k]) + 0.5, float(ys[k]) + 0.5, True]
    models = ModelStore.load([lite_bundle], threads=1)
    with SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=2), models=models) as srv:
        res = run_checks(groovy_env, tmp_path, [{
            "name": "lite", "kind": "session", "server": srv.address, "image": str(image), "frame": [0, 0, 1],
            "settings": {"open_timeout_seconds": 600}, "steps": [{"points": [click], "want_mask": True}]}])
        with SegmentationClient(srv.address, timeout=120) as client:
            want = client.open_image(image).click([tuple(click)], min_area=0, want_mask=True)
    step = check(res, "lite")["steps"][0]
    assert groovy_lists(step["rings"]) == as_lists(want.polygons)
    mask = cv2.imread(step["mask"], cv2.IMREAD_UNCHANGED) > 0
    assert np.array_equal(polygons_to_mask(rings_to_polygons(step["rings"]), mask.shape), mask)
    assert mask.any() and step["mask_pixels"] == mask.sum()  # the model's quality is evaluate's business


def test_qupath_ping_runs_the_scripts_client_against_a_server(groovy_env, server, tmp_path, capsys):
    """`histosam qupath ping`: the user's headless check of Groovy, the jars and the scripts."""
    from histosam.backend.cli import main

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    code = main(["qupath", "ping", "--server", server.address, "--token-file", str(token)])
    out = capsys.readouterr()
    assert code == 0, out.err
    (line,) = [x for x in out.out.splitlines() if x.strip()]
    assert f"at {server.address} answers the QuPath client: models tiny_sam" in line
    # The installed layout, with its own settings file (the token lives there): the same answer.
    installed = install_scripts(tmp_path / "scripts", server=server.address, token_file=token).dest
    assert main(["qupath", "ping", "--scripts", str(installed)]) == 0
    assert "models tiny_sam" in capsys.readouterr().out
    # A wrong token: the client's own one-line message, exit 1.
    token.write_text("not-the-token\n")
    assert main(["qupath", "ping", "--server", server.address, "--token-file", str(token)]) == 1
    out = capsys.readouterr()
    (line,) = [x for x in out.err.splitlines() if x.strip()]
    assert "UNAUTHENTICATED" in line and out.out == ""
