"""The default model's bundle for the commands that serve it: from the cache, else exported.

Torch-free to import: a serving-only install finds the cached bundle here, and only a missing
one imports the exporter (and torch). It lives in the export layer, not in serving: the server
itself never exports (histosam.backend.serving.model_store reads the cache only).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("histosam.server")


def default_bundle(cache_dir: Path | None = None) -> Path:
    """The default model's bundle: from the cache, else exported now (needs the torch extra).

    ``histosam serve`` and the serving benchmark call this before they build a server."""
    from histosam.backend.bundles.bundle import MANIFEST
    from histosam.backend.bundles.catalog import cached_bundle_path
    from histosam.backend.core.errors import BundleError

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
