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
