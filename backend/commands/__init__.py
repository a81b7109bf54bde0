"""CLI subcommands, one module each (see histosam.backend.cli)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("histosam.server")


def default_bundle(cache_dir: Path | None = None) -> Path:
    """The default model's bundle: from the cache, else exported now (needs the torch extra).

    Commands call this before they build a server, so the serving layer itself never imports
    the exporter (or torch): a serving-only install serves a cached default bundle.
    """
    from histosam.backend.bundle import MANIFEST
    from histosam.backend.catalog import cached_bundle_path
    from histosam.backend.errors import BundleError

    target = cached_bundle_path("default", cache_dir=cache_dir)
    if (target / MANIFEST).is_file():
        return target
    try:
        from histosam.export.exporter import ensure_bundle  # imports torch: only when needed
    except ImportError as exc:  # not installed, or installed but broken (e.g. a missing CUDA library)
        what = f"{exc.name} is not installed" if isinstance(exc, ModuleNotFoundError) else f"torch cannot be imported ({exc})"
        raise BundleError(
            f"no default model bundle at {target} and {what} to export one: "
            "run `histosam export --out DIR` where the torch extra is installed and serve with --models DIR"
        ) from None
    log.info("exporting the default model bundle into %s (first run only)", target)
    return ensure_bundle("default", cache_dir=cache_dir)
