"""Shared fixtures: real data folder, and real ONNX bundles exported once per session.

``tiny_bundle`` is a randomly initialised SAM of the real classes (fast); ``lite_bundle`` is
the embedded LiteMedSAM, exported through the same code path users run (cached under
HISTOSAM_HOME so repeated local runs skip the export).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Development tools (tools/protogen.py) are not installed; tests import them from the tree.
sys.path.insert(0, str(REPO / "tools"))


def _data_dir() -> Path:
    env = os.environ.get("HISTOSAM_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or $HISTOSAM_DATA); tests that need it skip when it is absent."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set HISTOSAM_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    pytest.importorskip("torch")
    from histosam.training.models.registry import build_model

    return build_model("tiny_sam")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model) -> Path:
    """A tiny SAM bundle, exported without the (separately tested) parity check."""
    from histosam.export.exporter import export_bundle
    from histosam.training.models.registry import resolve_source

    out = tmp_path_factory.mktemp("bundles") / "tiny_sam"
    export_bundle(resolve_source("tiny_sam"), out, check=False, model=tiny_model, progress=False)
    return out


@pytest.fixture(scope="module")
def models(tiny_bundle):
    """The tiny bundle loaded as a server's model store (one onnxruntime thread)."""
    from histosam.backend.serving.model_store import ModelStore

    return ModelStore.load([tiny_bundle], threads=1)


@pytest.fixture(scope="session")
def lite_bundle() -> Path:
    """The real LiteMedSAM bundle (zero-shot weights), exported with its parity check."""
    pytest.importorskip("torch")
    from histosam.export.exporter import ensure_bundle

    return ensure_bundle("lite_medsam")
