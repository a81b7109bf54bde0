"""A new user's first hour (issue 21): what the README's commands do with ordinary mistakes and
ordinary questions. Each test drives the real command (in-process, or as a subprocess where
what matters is everything the process prints) against a real server or real files."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import tifffile

from histosam.backend.cli import main
from histosam.backend.core.errors import (
    BundleError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from histosam.backend.evaluation.overlay import POSITIVE_BGR
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.image_sources import resolve_slide_path
from histosam.backend.serving.server import SegmentationServer, ServerSettings

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "histosam.backend.cli"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_process(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GRPC_VERBOSITY", None)  # what a user's shell has: nothing
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout, env=env)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def synthetic_rgb(h: int = 240, w: int = 320) -> np.ndarray:
    img = np.full((h, w, 3), 225, np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (150, 40, 120), -1)
    return img


@pytest.fixture(scope="module")
def server(models):
    srv = SegmentationServer(ServerSettings(port=0, threads=4), models=models)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("first_hour") / "image.png"
    cv2.imwrite(str(path), synthetic_rgb()[..., ::-1])
    return path


def tiled_slide(path: Path, h: int = 512, w: int = 768, tissue: bool = True) -> Path:
    """A two-level tiled TIFF OpenSlide reads: tissue-coloured noise on glass (or glass alone)."""
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 245, np.uint8)
    if tissue:
        img[64:h - 64, 64:w - 64] = np.clip(rng.normal((210, 120, 170), 12, (h - 128, w - 128, 3)), 0, 255)
    with tifffile.TiffWriter(path) as tw:
        for i, d in enumerate((1, 2)):
            tw.write(np.ascontiguousarray(img[::d, ::d]), tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(2e4 / d, 2e4 / d), resolutionunit="CENTIMETER", subfiletype=min(i, 1))
    return path


def geojson_rect(path: Path, x0, y0, x1, y1, name="Tumor") -> Path:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}]}))
    return path


def dataset(folder: Path, n: int, side: int = 96) -> Path:
    """images/ + masks/ of ``n`` synthetic patches: a dark disc (the object) on a light ground."""
    rng = np.random.default_rng(5)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        img = np.clip(rng.normal(215, 10, (side, side, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((side, side), np.uint8)
        centre = (int(rng.integers(30, side - 30)), int(rng.integers(30, side - 30)))
        cv2.circle(mask, centre, int(rng.integers(12, 24)), 255, -1)
        img[mask > 0] = (110, 50, 130)
        cv2.imwrite(str(folder / "images" / f"p{i:03d}.png"), img)
        cv2.imwrite(str(folder / "masks" / f"p{i:03d}.png"), mask)
    return folder


# --------------------------------------------------------------------------- 2: README set-up


def test_readme_names_the_cpu_build_of_the_pinned_torch_and_keeps_two_set_up_commands():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    readme = (REPO / "README.md").read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    torch_pins = [p for p in pins if p.startswith(("torch==", "torchvision=="))]
    cpu_line = next(line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert all(pin in cpu_line for pin in torch_pins), (cpu_line, torch_pins)
    assert "2.7 GB" in readme and "CUDA" in readme
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert len(commands) == 2, commands
    assert commands[0] == 'pip install -e ".[torch]" && histosam serve'
    assert commands[1] == 'pip install -e ".[test]" && python -m pytest -q'


# --------------------------------------------------------------------------- 3: slide paths


def test_a_slide_path_as_the_user_typed_it_opens_and_a_refusal_names_the_accepted_forms(
        models, tmp_path, monkeypatch, capsys):
    (tmp_path / "data" / "slides").mkdir(parents=True)
    tiled_slide(tmp_path / "data" / "slides" / "s.tiff")
    monkeypatch.chdir(tmp_path)  # the user's shell, in which both commands are typed
    settings = ServerSettings(port=0, threads=2, slide_roots=(Path("data/slides"),))
    with SegmentationServer(settings, models=models) as srv:
        code, out, err = run_cli(capsys, "client", "--server", srv.address, "-q", "open", "--slide",
                                 "data/slides/s.tiff", "--region", "64", "64", "256", "256")
        assert code == 0, err
        assert json.loads(out)["width"] == 256
        # The Python client sends the path as given: the server resolves it against its roots too.
        with SegmentationClient(srv.address, timeout=30) as client:
            for given in ("data/slides/s.tiff", "s.tiff", str(tmp_path / "data" / "slides" / "s.tiff")):
                assert client.open_slide_region(given, 64, 64, 128, 128).width == 128
    with pytest.raises(PermissionDeniedError, match=r"outside the server's slide roots \(slides/\): give it relative "
                       r"to a root \('slide.svs', 'folder/slide.svs'\) or as an absolute path inside one"):
        resolve_slide_path("../elsewhere.svs", [Path("data/slides")])
    with pytest.raises(NotFoundError, match="relative to a root"):
        resolve_slide_path("data/slides/missing.tiff", [Path("data/slides")])


# --------------------------------------------------------------------------- 4: click output, overlays


def test_click_prints_one_line_unless_json_and_draws_an_overlay(server, image_file, tmp_path, capsys):
    base = ["client", "--server", server.address, "-q", "click", "--image", str(image_file)]
    code, out, _ = run_cli(capsys, *base, "--point", "160,120", "--min-area", "0")
    line = one_line(out)
    assert code == 0 and "polygon(s)" in line and "predicted IoU" in line and "session " in line
    code, out, _ = run_cli(capsys, *base, "--point", "160,120", "--min-area", "0", "--json")
    answer = json.loads(out)
    assert code == 0 and answer["num_points"] == 1 and "polygons" in answer
    overlay = tmp_path / "overlay.png"
    code, out, _ = run_cli(capsys, *base, "--point", "160,120", "--point", "20,20,-", "--overlay-out", str(overlay))
    assert code == 0 and str(overlay) in one_line(out)
    picture = cv2.imread(str(overlay))
    assert picture.shape == (240, 320, 3)
    assert np.abs(picture[120, 160].astype(int) - POSITIVE_BGR).max() < 30  # the positive click, drawn
    assert not np.array_equal(picture, cv2.imread(str(image_file)))
    # Without the image here there is nothing to draw on: said before the click.
    code, _, err = run_cli(capsys, "client", "--server", server.address, "click", "--session", "abc",
                           "--point", "1,1", "--overlay-out", str(tmp_path / "o2.png"))
    assert code == InvalidInputError.exit_code and "--overlay-out" in one_line(err)


def test_evaluate_writes_an_overlay_per_image_on_request(tmp_path, capsys):
    data = dataset(tmp_path / "d", 2)
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(capsys, "evaluate", "--backend", "grabcut", "--data", str(data), "--max-clicks", "2",
                              "--out", str(out), "--overlays", "--no-progress")
    assert code == 0 and "overlays" in stdout
    pictures = sorted((out / "overlays" / "grabcut").glob("*.png"))
    assert [p.name for p in pictures] == ["d_p000.png", "d_p001.png"]
    assert cv2.imread(str(pictures[0])).shape == (96, 96, 3)


# --------------------------------------------------------------------------- 5: TLS in one line


def test_a_bad_certificate_is_one_line_naming_it(tmp_path):
    from test_server_security import _self_signed

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    key, cert = _self_signed(tmp_path, "a")
    other_key, _ = _self_signed(tmp_path, "b")
    for cert_file, key_file, message in [(junk, key, "is not a PEM certificate"),
                                         (cert, junk, "is not a PEM private key"),
                                         (cert, other_key, "the key does not belong to the certificate")]:
        proc = run_process("serve", "--port", "0", "--tls-cert", str(cert_file), "--tls-key", str(key_file))
        assert proc.returncode == InvalidInputError.exit_code
        assert message in one_line(proc.stderr) and "cannot listen" not in proc.stderr
        assert proc.stdout == ""


def test_tls_mismatches_between_client_and_server_are_one_honest_line(models, server, tmp_path):
    from test_server_security import _self_signed

    key, cert = _self_signed(tmp_path, "server")
    proc = run_process("client", "--server", server.address, "--tls", "--timeout", "10", "info")
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and "does not speak TLS" in line and "drop --tls" in line
    assert "verification context" not in line
    settings = ServerSettings(port=0, threads=2, tls_cert=cert, tls_key=key)
    with SegmentationServer(settings, models=models) as tls_server:
        target = f"localhost:{tls_server.port}"
        proc = run_process("client", "--server", target, "--timeout", "10", "info")
        assert proc.returncode == 1 and "add --tls" in one_line(proc.stderr)
        proc = run_process("client", "--server", target, "--tls", "--timeout", "10", "info")
        assert proc.returncode == 1 and "certificate is not trusted" in one_line(proc.stderr)
        proc = run_process("client", "--server", target, "--tls-ca", str(cert), "--timeout", "10", "info")
        assert proc.returncode == 0 and json.loads(proc.stdout)["default_model"] == "tiny_sam"
        proc = run_process("client", "--server", target, "--tls-ca", str(key), "info")
        assert proc.returncode == InvalidInputError.exit_code and "holds no PEM certificate" in one_line(proc.stderr)


# --------------------------------------------------------------------------- 6: --models


def test_serve_models_names_a_file_or_a_model_name_helpfully(tiny_bundle, capsys):
    code, _, err = run_cli(capsys, "serve", "--port", "0", "--models", str(tiny_bundle / "manifest.json"))
    assert code == BundleError.exit_code and f"is a file; give the bundle folder that holds manifest.json " \
        f"({tiny_bundle})" in one_line(err)
    code, _, err = run_cli(capsys, "serve", "--port", "0", "--models", "vit_h")
    assert code == NotFoundError.exit_code
    assert "histosam export --model vit_h --checkpoint FILE --out vit_h, then --models vit_h" in one_line(err)


# --------------------------------------------------------------------------- 8: evaluate keeps its work


def test_evaluate_keeps_finished_images_on_ctrl_c_and_resumes(tmp_path, capsys):
    data = dataset(tmp_path / "d", 16)
    out = tmp_path / "eval"
    args = ["evaluate", "--backend", "random_walker", "--data", str(data), "--max-clicks", "8", "--full-curve",
            "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    progress = out / "per_image.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    line = one_line(err)
    assert "interrupted" in line and "--resume" in line and str(progress) in line
    kept = [json.loads(x) for x in progress.read_text().splitlines()]
    assert 2 <= len(kept) < 16 and not (out / "results.json").exists()

    # The same --out again: refused unless the user says what to do with it.
    code, _, err = run_cli(capsys, *args)
    assert code == InvalidInputError.exit_code and "--resume continues" in one_line(err)
    assert len(progress.read_text().splitlines()) == len(kept)  # nothing lost by the refusal
    code, _, err = run_cli(capsys, *[a if a != "8" else "7" for a in args], "--resume")
    assert code == InvalidInputError.exit_code and "max_clicks" in one_line(err)  # other arguments

    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    samples = results["runs"]["random_walker"]["samples"]
    assert len(samples) == 16 and results["runs"]["random_walker"]["n"] == 16
    for record in kept:  # the kept images were not evaluated again: their timings are the first run's
        name = record["sample"].split("/")[1]
        sample = next(s for s in samples if s["name"] == name)
        assert sample["decoder_ms"] == [t * 1e3 for t in record["runs"]["random_walker"]["decoder_s"]]
    assert sorted(p.name for p in out.iterdir()) == ["miou_per_click.png", "results.json", "table.md"]
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == InvalidInputError.exit_code and "finished evaluation" in one_line(err)
    code, _, _ = run_cli(capsys, *args, "--limit", "3", "--force")
    assert code == 0 and json.loads((out / "results.json").read_text())["n"] == 3


# --------------------------------------------------------------------------- 9, 10, 13, 17: patches


def test_patches_that_write_nothing_fail_saying_why(tmp_path, capsys):
    slide = tiled_slide(tmp_path / "s.tiff")
    glass = tiled_slide(tmp_path / "glass.tiff", tissue=False)
    ann = geojson_rect(tmp_path / "t.geojson", 200, 100, 520, 380)
    base = ["patches", "--annotations", str(ann), "--size", "32", "--no-progress", "--no-overview"]
    for extra, why in [([str(slide), "--downsample", "100000"], "smaller than one 32-px patch"),
                       ([str(glass), "--downsample", "2"], "--tissue-threshold"),
                       ([str(slide), "--downsample", "2", "--fraction", "0.3", "0.31"], "outside --fraction 0.3 0.31")]:
        out = tmp_path / "out"
        code, stdout, err = run_cli(capsys, *base, "--slide", *extra, "--out", str(out))
        assert code == InvalidInputError.exit_code and why in one_line(err) and stdout == ""
        assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_label_mask_with_several_labels_needs_classes_and_the_taken_labels_are_named(tmp_path, capsys):
    slide = tiled_slide(tmp_path / "s.tiff")
    labels = np.zeros((512, 768), np.uint8)
    labels[64:448, 64:704] = 1  # e.g. stroma
    labels[100:380, 200:520] = 3  # e.g. tumour
    mask = tmp_path / "mask.tiff"
    with tifffile.TiffWriter(mask) as tw:
        for i, d in enumerate((1, 2)):
            rgb = np.repeat(labels[::d, ::d, None], 3, axis=2)
            tw.write(np.ascontiguousarray(rgb), tile=(64, 64), photometric="rgb", compression="zlib",
                     subfiletype=min(i, 1))
    base = ["patches", "--slide", str(slide), "--annotations", str(mask), "--magnification", "10", "--size", "32",
            "--tissue-threshold", "0.5", "--no-progress", "--no-overview"]
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "all"))
    line = one_line(err)
    assert code == InvalidInputError.exit_code and "--classes" in line and "labels present: 0, 1, 3" in line
    assert not (tmp_path / "all").exists()
    code, out, err = run_cli(capsys, *base, "--classes", "3", "--out", str(tmp_path / "three"))
    assert code == 0, err
    assert "labels 3 taken as foreground (present: 0, 1, 3)" in out


def test_bench_patches_help_says_out_is_a_json_file(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "patches", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    out_help = help_text.rsplit("--out OUT", 1)[1]  # the option list, not the usage line
    assert out_help.lstrip().startswith("write the measurements to this JSON file")


def test_overview_draws_the_annotation_and_a_legend(tmp_path):
    from histosam.backend.wsi.patches import PatchConfig, extract_patches

    slide = tiled_slide(tmp_path / "s.tiff")
    config = PatchConfig(slide=slide, annotations=geojson_rect(tmp_path / "t.geojson", 200, 100, 520, 380),
                         out=tmp_path / "out", size=32, magnification=10, fraction=(0.1, 0.9), tissue_threshold=0.5)
    extract_patches(config, progress=False, overview=True)
    picture = cv2.cvtColor(cv2.imread(str(config.out / "overview.png")), cv2.COLOR_BGR2RGB).astype(int)
    magenta = np.abs(picture - (255, 0, 255)).max(axis=2) < 40  # the annotation's outline and legend entry
    assert magenta.sum() > 200
    ys, xs = np.nonzero(magenta)
    assert xs.max() - xs.min() > 100 and ys.max() - ys.min() > 100  # a drawn rectangle, not one legend line


# --------------------------------------------------------------------------- 11: QuPath folder


def test_install_scripts_refuses_a_qupath_folder_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "QuPath" / "v0.5"
    code, _, err = run_cli(capsys, "qupath", "install-scripts", "--qupath-dir", str(missing))
    assert code == InvalidInputError.exit_code and "does not exist" in one_line(err) and "--dest" in err
    assert not (tmp_path / "QuPath").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run_cli(capsys, "qupath", "install-scripts", "--qupath-dir", str(empty))
    assert code == 0 and "may not be QuPath's user folder" in out.splitlines()[0]
    assert (empty / "scripts" / "histosam" / "HistosamClient.groovy").is_file()


# --------------------------------------------------------------------------- 12: files named


def test_client_errors_name_the_token_file_and_the_image_file(server, tmp_path, capsys):
    missing = tmp_path / "token.txt"
    code, _, err = run_cli(capsys, "client", "--server", server.address, "--token-file", str(missing), "info")
    assert code == NotFoundError.exit_code and f"cannot read the token file {missing}" in one_line(err)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    code, _, err = run_cli(capsys, "client", "--server", server.address, "-q", "open", "--image", str(text))
    line = one_line(err)
    assert code == InvalidInputError.exit_code and str(text) in line and "PNG, JPEG or TIFF" in line
    assert not re.search(r"[A-Z][a-z]+Error\)?$", line)  # no Python class name at the end


# --------------------------------------------------------------------------- 14, 16: open says what happens


def test_open_reports_progress_and_says_when_the_model_sees_far_fewer_pixels(server, image_file, tmp_path, capsys):
    fresh = tmp_path / "fresh.png"  # not in the server's cache yet: it is encoded
    cv2.imwrite(str(fresh), synthetic_rgb(200, 300))
    code, _, err = run_cli(capsys, "client", "--server", server.address, "open", "--image", str(fresh))
    assert code == 0 and "opening" in err and "encoded in" in err and "note:" not in err
    code, _, err = run_cli(capsys, "client", "--server", server.address, "open", "--image", str(fresh))
    assert code == 0 and "cached, no encode" in err
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), synthetic_rgb(300, 2400))
    code, _, err = run_cli(capsys, "client", "--server", server.address, "open", "--image", str(wide))
    note = next(line for line in err.splitlines() if "note:" in line)
    assert code == 0 and "at 256 px on its longest side, 9x fewer" in note
    code, _, err = run_cli(capsys, "client", "--server", server.address, "-q", "open", "--image", str(wide))
    assert code == 0 and err == ""


def test_benches_report_progress_on_stderr(tmp_path, capsys):
    pytest.importorskip("torch")
    code, out, err = run_cli(capsys, "bench", "decoders", "--model", "tiny_sam", "--variants", "stock", "--rounds", "1",
                             "--threads", "1", "--out", str(tmp_path / "d.json"))
    assert code == 0 and "stock" in out
    assert "exporting decoder stock (1/1)" in err and "timing 1 clicks" in err
    code, out, err = run_cli(capsys, "bench", "predictor", "--model", "tiny_sam", "--encodes", "1", "--clicks", "1",
                             "--size", "64", "64", "--threads", "1", "--out", str(tmp_path / "p.json"))
    assert code == 0 and "encoder" in out
    assert "encoder 1/1" in err and "clicks 1-1 of 1" in err


# --------------------------------------------------------------------------- 15: request log


def test_every_request_is_logged_with_its_status_and_latency(server, caplog):
    caplog.set_level(logging.INFO, logger="histosam.server")
    with SegmentationClient(server.address, timeout=10) as client:
        client.info()
        with pytest.raises(NotFoundError):
            client.open_image(synthetic_rgb(), model="nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "histosam.server"]
    assert any(re.match(r"GetServerInfo OK \d+\.\d ms from ipv[46]:", m) for m in lines), lines
    assert any(re.match(r"OpenImage NOT_FOUND: .*unknown model.* \d+\.\d ms from ", m) for m in lines), lines


def test_the_log_level_comes_from_the_flag_or_the_config_file(tmp_path):
    from histosam.backend.cli import build_parser
    from histosam.backend.cli.commands.serve import log_level_from_args

    config = tmp_path / "serve.yaml"
    config.write_text("log-level: warning\nport: 0\n")
    parser = build_parser()
    assert log_level_from_args(parser.parse_args(["serve"])) == "INFO"
    assert log_level_from_args(parser.parse_args(["serve", "--config", str(config)])) == "WARNING"
    assert log_level_from_args(parser.parse_args(["serve", "--config", str(config), "--log-level", "DEBUG"])) == "DEBUG"


# --------------------------------------------------------------------------- 18: numbers stay numbers


def test_client_info_prints_64_bit_integers_as_numbers(server, capsys):
    code, out, _ = run_cli(capsys, "client", "--server", server.address, "info")
    info = json.loads(out)
    assert code == 0
    assert all(isinstance(v, int | float) for v in info["limits"].values()), info["limits"]
    assert isinstance(info["limits"]["max_pixels"], int) and isinstance(info["cache_used_bytes"], int)


# --------------------------------------------------------------------------- 19: reflection v1


def test_reflection_answers_under_v1_and_v1alpha(server):
    from grpc_reflection.v1alpha import reflection_pb2 as r

    with grpc.insecure_channel(server.address) as channel:
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            # v1's messages are v1alpha's under another package: the same bytes on the wire.
            call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                         request_serializer=r.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=r.ServerReflectionResponse.FromString)
            listed, described = call(iter([
                r.ServerReflectionRequest(list_services=""),
                r.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ]), timeout=10)
            names = {s.name for s in listed.list_services_response.service}
            assert {"histosam.v1.Segmentation", "grpc.reflection.v1.ServerReflection"} <= names, service
            assert described.file_descriptor_response.file_descriptor_proto, described.error_response


# --------------------------------------------------------------------------- 20: qupath ping


def test_qupath_ping_without_groovy_says_what_to_install(tmp_path, monkeypatch, capsys):
    """(With Groovy, tests/test_groovy_client.py runs the ping against a live server.)"""
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without groovy
    code, out, err = run_cli(capsys, "qupath", "ping", "--server", "127.0.0.1:1")
    line = one_line(err)
    assert code == NotFoundError.exit_code and "groovy is not installed" in line and "apt-get install" in line
    assert out == ""
