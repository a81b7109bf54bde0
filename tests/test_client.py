"""The Python client and the `histosam client` / `histosam serve` commands, on real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from serve_helpers import startup_text

from histosam.backend.cli import main as cli_main
from histosam.backend.core.errors import HistosamError, InvalidInputError, NotFoundError
from histosam.backend.core.geometry import PolygonXY, polygons_to_mask
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.server import SegmentationServer, ServerSettings
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def synthetic_rgb(h: int = 240, w: int = 320) -> np.ndarray:
    img = np.full((h, w, 3), 225, np.uint8)
    cv2.circle(img, (160, 120), 60, (150, 40, 120), -1)
    cv2.rectangle(img, (20, 20), (80, 70), (60, 90, 160), -1)
    return img


@pytest.fixture(scope="module")
def server(models):
    srv = SegmentationServer(ServerSettings(port=0, threads=4, max_points=6, propagation="off"), models=models)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("client") / "image.png"
    cv2.imwrite(str(path), synthetic_rgb()[..., ::-1])
    return path


@pytest.fixture
def client(server):
    with SegmentationClient(server.address, timeout=30) as c:
        yield c


def test_open_from_path_bytes_and_array(client, image_file):
    by_path = client.open_image(image_file, frame=(10.0, 20.0, 2.0))
    assert (by_path.width, by_path.height) == (320, 240)
    assert by_path.frame == (10.0, 20.0, 2.0)
    by_bytes = client.open_image(image_file.read_bytes())
    assert by_bytes.cache_hit and by_bytes.frame == (0.0, 0.0, 1.0)
    by_array = client.open_image(synthetic_rgb())
    assert (by_array.width, by_array.height) == (320, 240)
    info = client.info()
    assert info.default_model == "tiny_sam" and info.limits.max_points == 6
    assert client.health() == "SERVING"


def test_click_result_polygons_and_mask(client, image_file):
    image = client.open_image(image_file, frame=(10.0, 20.0, 2.0))
    result = image.click([(10 + 160 * 2, 20 + 120 * 2)], want_mask=True, min_area=0)
    assert result.num_points == 1 and result.decoded_steps == 1 and not result.reopened
    assert result.polygons and all(isinstance(p, PolygonXY) for p in result.polygons)
    mask = result.mask
    assert mask is not None and mask.shape == (240, 320) and mask.sum() == result.mask_pixels
    raster = polygons_to_mask(result.polygons, mask.shape, origin=(10.0, 20.0), downsample=2.0)
    assert np.array_equal(raster, mask)
    two = image.click([(330, 260, True), (60, 60, False)], box=(20, 30, 600, 480))
    assert two.num_points == 2 and two.mask is None
    undo = image.click([(330, 260, True)], box=(20, 30, 600, 480))
    assert undo.num_points == 1
    spread = image.click([(330, 260, True)], box=(20, 30, 600, 480), propagation="on")
    assert spread.propagated and not undo.propagated and spread.decoded_steps == 0  # no re-decode
    with pytest.raises(InvalidInputError, match="propagation must be on, off, auto"):
        image.click([(330, 260, True)], propagation="sometimes")
    assert image.close() and not image.close()


def test_click_reopens_after_the_session_is_gone(client, server, image_file):
    image = client.open_image(image_file)
    points = [(100.0, 100.0, True), (200.0, 150.0, False)]
    before = image.click(points, min_area=0)
    old_id = image.session_id
    # The server drops the session (as expiry or eviction would); the client re-opens once.
    with grpc.insecure_channel(server.address) as channel:
        assert pb_grpc.SegmentationStub(channel).CloseImage(pb.CloseImageRequest(session_id=old_id), timeout=10).closed
    after = image.click(points, min_area=0)
    assert after.reopened and image.reopen_count == 1 and image.session_id != old_id
    assert image.cache_hit  # the embedding was still cached: no encoder ran
    assert after.decoded_steps == 2  # the new session replays the history...
    assert after.response.polygons == before.response.polygons  # ...to the same answer
    assert after.predicted_iou == before.predicted_iou


def test_click_reopens_after_a_server_restart(models, image_file):
    first = SegmentationServer(ServerSettings(port=0, threads=2), models=models)
    port = first.start()
    try:
        with SegmentationClient(f"127.0.0.1:{port}", timeout=20) as client:
            image = client.open_image(image_file)
            before = image.click([(50.0, 60.0)], min_area=0)
            first.stop(0)
            second = SegmentationServer(ServerSettings(port=port, threads=2), models=models)
            second.start()
            try:
                client.wait_ready(20)
                after = image.click([(50.0, 60.0)], min_area=0)
                assert after.reopened and not image.cache_hit  # a new server: encoded again
                assert after.response.polygons == before.response.polygons
            finally:
                second.stop(0)
    finally:
        first.stop(0)


def test_errors_map_to_histosam_errors(client, server, image_file):
    with pytest.raises(NotFoundError) as info:
        client.open_image(image_file, model="nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "unknown model" in str(info.value)
    with pytest.raises(InvalidInputError):
        client.open_image(b"not an image")
    image = client.open_image(image_file)
    with pytest.raises(InvalidInputError, match="outside the image"):
        image.click([(1000.0, 5.0)])
    with pytest.raises(HistosamError) as info:
        image.click([(5.0, 5.0)] * 7)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(InvalidInputError, match="is \\(x, y\\)"):
        image.click([(1.0, 2.0, True, 4.0)])
    # Every call has a deadline: encoding a fresh image takes far longer than 2 ms.
    noise = np.random.default_rng(1).integers(0, 255, (500, 500, 3), np.uint8)
    with SegmentationClient(server.address, open_timeout=0.002) as hurried, pytest.raises(HistosamError) as info:
        hurried.open_image(noise)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "in time" in str(info.value)
    with SegmentationClient("127.0.0.1:1", timeout=5) as nowhere, pytest.raises(HistosamError) as info:
        nowhere.info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "cannot reach" in str(info.value)


def test_token_client(models, tmp_path, image_file):
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    with SegmentationServer(ServerSettings(port=0, threads=2, token_file=token_file), models=models) as srv:
        with SegmentationClient(srv.address, timeout=10) as anonymous:
            assert anonymous.health() == "SERVING"  # health is exempt
            with pytest.raises(HistosamError) as info:
                anonymous.info()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with SegmentationClient(srv.address, timeout=10, token_file=token_file) as authed:
            assert authed.info().token_required
            assert authed.open_image(image_file).click([(5, 5)]).num_points == 1


# --------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_client_info_open_click(server, image_file, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "info")
    assert code == 0 and json.loads(out)["default_model"] == "tiny_sam"
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "open", "--image", str(image_file),
                           "--frame", "100", "200", "4")
    opened = json.loads(out)
    assert code == 0 and opened["width"] == 320 and opened["frame"]["downsample"] == 4
    mask_out, geojson_out = tmp_path / "mask.png", tmp_path / "out.geojson"
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "click", "--json", "--image", str(image_file),
                           "--point", "160,120", "--point", "60,40,-", "--box", "0,0,300,200", "--min-area", "0",
                           "--mask-out", str(mask_out), "--geojson-out", str(geojson_out), "--close")
    clicked = json.loads(out)
    assert code == 0 and clicked["num_points"] == 2 and clicked["session"]["cache_hit"]
    assert clicked["round_trip_seconds"] >= clicked["decode_seconds"] > 0
    assert "decode_image_seconds" in clicked["session"]
    mask = cv2.imread(str(mask_out), cv2.IMREAD_GRAYSCALE) > 0
    assert mask.shape == (240, 320) and mask.sum() == clicked["mask_pixels"]
    polygons = [PolygonXY(np.array(p["exterior"]), [np.array(h) for h in p["holes"]]) for p in clicked["polygons"]]
    assert np.array_equal(polygons_to_mask(polygons, mask.shape), mask)
    features = json.loads(geojson_out.read_text())["features"]
    assert features and features[0]["properties"]["objectType"] == "annotation"
    # On an existing session by id.
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "click", "--json", "--session",
                           opened["session_id"], "--point", "500,600")
    assert code == 0 and json.loads(out)["num_points"] == 1 and not json.loads(out)["propagated"]
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "click", "--json", "--session",
                           opened["session_id"], "--point", "500,600", "--propagation", "on")
    assert code == 0 and json.loads(out)["propagated"] and json.loads(out)["decoded_steps"] == 0
    # Errors: one line, the error's exit code.
    code, _, err = run_cli(capsys, "client", "--server", server.address, "click", "--session", "gone",
                           "--point", "1,1")
    assert code == NotFoundError.exit_code and "re-open" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "client", "--server", server.address, "click", "--image", str(image_file),
                           "--point", "1,x")
    assert code == InvalidInputError.exit_code and "point" in err


def test_cli_serve_config_flags_and_sigterm(tiny_bundle, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"port: 0\nmodels: {tiny_bundle}\nmax-points: 5\nthreads: 2\nort-threads: 1\n"
                      "session_idle_seconds: 60\npropagation: auto\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "histosam.backend.cli", "serve", "--config", str(config), "--max-points", "3",
         "--grace-seconds", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        text = startup_text(proc, 60)
        assert "listening on 127.0.0.1:" in text and "CPUExecutionProvider" in text, (text, proc.stderr.read())
        address = text.split("listening on ")[1].split()[0]
        with SegmentationClient(address, timeout=10) as client:
            info = client.info()
            assert info.limits.max_points == 3  # the flag beats the config file's 5
            assert info.limits.session_idle_seconds == 60  # from the config file
            assert info.propagation_default == pb.PROPAGATION_AUTO
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert "click propagation auto by default" in text
        assert "edge snapping off" in text  # the tiny bundle does not ask for it (the shipped default does)
        assert "slides by path off (--slide-root DIR allows them)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_refuses_bad_settings_with_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", "--models", str(tmp_path / "missing"), "--port", "0")
    assert code == NotFoundError.exit_code and "does not exist" in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "bad.yaml"
    config.write_text("prot: 5\n")
    code, _, err = run_cli(capsys, "serve", "--config", str(config))
    assert code == InvalidInputError.exit_code and "unknown server setting" in err


def test_session_ids_never_read_as_command_line_options():
    """Ids are pasted into `histosam client click --session ID`: one starting with '-' would be
    taken for an option (urlsafe base64 ids did that 1 time in 64)."""
    import numpy as np

    from histosam.backend.serving.sessions import Embedding, Frame, SessionStore

    store = SessionStore(idle_seconds=60, max_sessions=4096)
    embedding = Embedding({"x": np.zeros(1, np.float32)}, 4, 4)
    ids = [store.create(None, embedding, Frame()).session_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and i[0] != "-" and all(c in "0123456789abcdef" for c in i) for i in ids)


def test_cli_click_refuses_bad_outputs_and_mixed_sources_before_clicking(server, image_file, tmp_path, capsys):
    base = ["client", "--server", server.address]
    opened = json.loads(run_cli(capsys, *base, "open", "--image", str(image_file))[1])
    session = opened["session_id"]
    cases = [
        (["--session", session, "--image", str(image_file)], "give one"),
        (["--session", session, "--mask-out", str(tmp_path)], "is a folder"),
        (["--session", session, "--geojson-out", str(tmp_path / "missing" / "a.geojson")], "does not exist"),
    ]
    for extra, message in cases:
        code, out, err = run_cli(capsys, *base, "click", "--point", "160,120", *extra)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and not out
    # Nothing reached the session: its first click still starts from one point.
    code, out, _ = run_cli(capsys, *base, "click", "--json", "--session", session, "--point", "160,120")
    assert code == 0 and json.loads(out)["num_points"] == 1
    code, _, err = run_cli(capsys, *base, "open", "--slide", "x.svs", "--region", "0", "0", "10", "10",
                           "--downsample", "0")
    assert code != 0 and "--downsample" in err


def test_cli_output_into_a_closed_pipe_is_no_traceback(server):
    proc = subprocess.Popen([sys.executable, "-m", "histosam.backend.cli", "client", "--server", server.address,
                             "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the answer is written (`... | head -0`)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err


def test_serve_on_a_busy_port_says_so_in_one_line(tiny_bundle, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli_main(["serve", "--models", str(tiny_bundle), "--port", str(port)])
    err = capsys.readouterr().err
    assert code != 0 and "in use" in err and "Traceback" not in err
