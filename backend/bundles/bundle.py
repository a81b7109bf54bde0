"""Model bundles: a folder with encoder.onnx, decoder.onnx and manifest.json.

The serving side only ever sees bundles (never PyTorch checkpoints, never pickles). Every
file's sha256 is in the manifest and is checked when a bundle is loaded, so a truncated copy
or a swapped file is refused at start with a clear error instead of serving wrong masks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histosam.backend.bundles.catalog import BUNDLE_FORMAT, sha256_file
from histosam.backend.core.atomic import is_temporary, write_text
from histosam.backend.core.errors import BundleError
from histosam.backend.core.transforms import ImageTransform

MANIFEST = "manifest.json"
FORMAT = BUNDLE_FORMAT


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file in ``folder`` (but the manifest) and write atomically."""
    folder = Path(folder)
    manifest["files"] = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not is_temporary(p)
    }
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n", durable=True)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["model"])

    @property
    def transform(self) -> ImageTransform:
        norm = self.manifest["normalisation"]
        return ImageTransform(int(self.manifest["input_size"]), tuple(norm["mean"]), tuple(norm["std"]),
                              int(self.manifest.get("mask_dilation", 0)))

    @property
    def edge_snap(self) -> bool:
        """Whether these weights' masks are edge-snapped by default (histosam.backend.postprocess.edge_snap)."""
        return bool(self.manifest.get("edge_snap", False))

    @property
    def model_sha256(self) -> str:
        """One hash for the whole bundle: the digest of its files' digests."""
        files = self.manifest["files"]
        return hashlib.sha256("".join(f"{k}:{files[k]}" for k in sorted(files)).encode()).hexdigest()

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    def graph_inputs(self, graph: str) -> list[str]:
        return list(self.manifest["graphs"][graph]["inputs"])

    def encoder_outputs(self) -> list[str]:
        return list(self.manifest["graphs"]["encoder"]["outputs"])


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and (by default) verify a bundle; every problem is one BundleError line."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a model bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "input_size", "normalisation", "graphs", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks {key!r}")
    for graph in ("encoder", "decoder"):
        if graph not in manifest["graphs"]:
            raise BundleError(f"{manifest_path} names no {graph} graph")
    if verify:
        for rel, expected in manifest["files"].items():
            file = path / rel
            if not file.is_file():
                raise BundleError(f"bundle {path}: {rel} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"bundle {path}: {rel} does not match the manifest sha256 "
                    f"(expected {expected[:12]}..., got {actual[:12]}...): re-export or re-copy it"
                )
    return Bundle(path, manifest)
