"""The server's model store: verified bundles, one shared encoder/decoder pair per model.

onnxruntime sessions are thread-safe and expensive (graph optimisation, weights in memory), so
each model gets exactly one ``OnnxEncoder`` and one ``OnnxDecoder`` that every request shares.
Bundles are verified (sha256 of every file) when the store is built, so a corrupt copy stops
the server at start instead of serving wrong masks.

The default model needs no flag: ``histosam export`` / ``ensure_bundle("default")`` caches its
bundle under ``$HISTOSAM_HOME/bundles`` (or ``$XDG_CACHE_HOME/histosam/bundles``), and the
server reads it from there *without torch*. When the cache holds none, ``histosam serve``
exports one before it builds the server (histosam.export.cache.default_bundle; needs the
``torch`` extra); this module never imports the exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histosam.backend.bundles.bundle import MANIFEST, Bundle, load_bundle
from histosam.backend.bundles.catalog import (
    BASE_MODELS,
    DEFAULT_MODEL,
    NEEDS_CHECKPOINT,
    SHIPPED,
    cached_bundle_path,
)
from histosam.backend.bundles.onnx_predictor import OnnxDecoder, OnnxEncoder, available_providers
from histosam.backend.core.errors import BundleError, NotFoundError
from histosam.backend.core.transforms import ImageTransform

log = logging.getLogger("histosam.server")

def default_bundle_path(cache_dir: Path | None = None) -> Path:
    """The default model's cached bundle; BundleError when the cache holds none.

    The cache folder's name is computed torch-free from the default weights' recorded sha256,
    the histosam version and the bundle format (histosam.backend.bundles.catalog), so a server never
    serves an export of other weights. Exporting one is the ``serve`` command's job (before it
    builds the server): the serving layer never imports the exporter.
    """
    target = cached_bundle_path("default", cache_dir=cache_dir)
    if not (target / MANIFEST).is_file():
        raise BundleError(
            f"no default model bundle at {target}: run `histosam export` where the torch extra is installed, "
            "or serve with --models DIR"
        )
    return target


def discover_bundles(models_dir: Path) -> list[Path]:
    """``models_dir`` itself if it is a bundle, else its sub-folders that are bundles (sorted)."""
    models_dir = Path(models_dir)
    if models_dir.is_file():
        where = models_dir.parent if models_dir.name in BUNDLE_FILES else None
        raise BundleError(
            f"--models {models_dir} is a file; give the bundle folder that holds manifest.json"
            + (f" ({where})" if where is not None else ", or a folder of bundles")
        )
    if not models_dir.is_dir():
        raise NotFoundError(f"models folder {models_dir} does not exist{_name_hint(str(models_dir))}")
    if (models_dir / MANIFEST).is_file():
        return [models_dir]
    found = sorted(p for p in models_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    if not found:
        raise BundleError(f"{models_dir} holds no model bundle (no */{MANIFEST})")
    return found


# Files of a bundle folder: --models naming one of them means the folder.
BUNDLE_FILES = (MANIFEST, "encoder.onnx", "decoder.onnx")


def _name_hint(text: str) -> str:
    """For ``--models NAME``: --models takes folders; a model name is exported into one first."""
    if text in ("default", DEFAULT_MODEL):
        return " (the default model needs no --models: `histosam serve` alone serves it)"
    if text in (*BASE_MODELS, *SHIPPED):
        checkpoint = " --checkpoint FILE" if text in NEEDS_CHECKPOINT else ""
        return (f" (--models takes bundle folders; for the model {text!r} export one first: "
                f"histosam export --model {text}{checkpoint} --out {text}, then --models {text})")
    return ""


@dataclass
class LoadedModel:
    """One bundle with its shared onnxruntime sessions."""

    bundle: Bundle
    encoder: OnnxEncoder
    decoder: OnnxDecoder
    providers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def sha256(self) -> str:
        return self.bundle.model_sha256

    @property
    def transform(self) -> ImageTransform:
        return self.bundle.transform


# Nice value added to the server's encoder threads: an encode yields the CPU to clicks (each a few
# tens of ms) instead of holding every core for its whole second; on an idle machine it runs as fast.
# Mild on purpose: on a host shared with other busy processes a lowered encode also yields to them
# (at +5, one OpenImage on this 2-core machine at load 14 took 25 s).
ENCODER_NICENESS = 3


def load_model(path: Path, providers: list[str] | None = None, threads: int | None = None,
               serving: bool = False) -> LoadedModel:
    """A bundle's sessions. ``serving``: tuned for a server's many concurrent sessions, i.e. the
    decoder on one intra-op thread unless ``threads`` says otherwise (a click is small; clicks of
    different sessions run in parallel on the cores instead), the encoder at lower priority
    (``ENCODER_NICENESS``), and no intra-op thread busy-waiting."""
    bundle = load_bundle(path)  # verifies every file's sha256
    if not serving:
        encoder = OnnxEncoder(bundle, providers, threads)
        decoder = OnnxDecoder(bundle, providers, threads)
    else:
        encoder = OnnxEncoder(bundle, providers, threads, niceness=ENCODER_NICENESS, spinning=False)
        decoder = OnnxDecoder(bundle, providers, threads or 1, spinning=False)
    return LoadedModel(bundle, encoder, decoder, list(encoder.session.get_providers()))


class ModelStore:
    """Models by name; ``""`` and ``"default"`` name the default model."""

    def __init__(self, models: Iterable[LoadedModel], default: str | None = None) -> None:
        self._models: dict[str, LoadedModel] = {}
        for model in models:
            if model.name in self._models:
                raise BundleError(
                    f"two bundles are both named {model.name!r} ({self._models[model.name].bundle.path} "
                    f"and {model.bundle.path}): serve one of them, or change one manifest's \"model\""
                )
            self._models[model.name] = model
        if not self._models:
            raise BundleError("no model to serve")
        if default is None:
            default = next(iter(self._models))
        if default not in self._models:
            raise NotFoundError(f"default model {default!r} is not among the served models: {', '.join(self.names)}")
        self.default_name = default

    @classmethod
    def load(
        cls,
        bundles: Sequence[Path],
        default: str | None = None,
        prefer_gpu: bool = True,
        threads: int | None = None,
        serving: bool = False,
    ) -> ModelStore:
        providers = available_providers(prefer_gpu)
        models = []
        for path in bundles:
            model = load_model(Path(path), providers, threads, serving)
            log.info("model %s (%s) from %s on %s", model.name, model.sha256[:12], path, ", ".join(model.providers))
            models.append(model)
        return cls(models, default)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def default(self) -> LoadedModel:
        return self._models[self.default_name]

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def get(self, name: str) -> LoadedModel:
        if not name or name == "default":
            return self.default
        try:
            return self._models[name]
        except KeyError:
            raise NotFoundError(f"unknown model {name!r}; this server has: {', '.join(self.names)}") from None

    @property
    def providers(self) -> list[str]:
        """Providers actually running (the default model's; every model gets the same list)."""
        return list(self.default.providers)
