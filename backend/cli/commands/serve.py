"""`histosam serve`: the gRPC segmentation server (see histosam.backend.serving.server).

Binds loopback by default and, with no --models, serves the default model (its cached bundle;
exported on first run where torch is installed). Settings may come from ``--config FILE``
(YAML, keys = the long option names); flags given on the command line win. SIGTERM or Ctrl-C
stop it gracefully: health turns NOT_SERVING, running calls get --grace-seconds to finish.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC segmentation server",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    S = argparse.SUPPRESS  # absent flags stay absent, so a config file's values are not overridden
    p.add_argument("--config", type=Path, default=S, help="YAML file of settings (keys: the long option names)")
    p.add_argument("--host", default=S, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=S, help="port (default 50051; 0 picks a free one)")
    p.add_argument("--models", type=Path, default=S, metavar="DIR",
                   help="a model bundle, or a folder of bundles (default: the embedded default model)")
    p.add_argument("--default-model", default=S, metavar="NAME", help="model used when a request names none")
    p.add_argument("--slide-root", type=Path, action="append", default=S, metavar="DIR",
                   help="folder whose slides clients may open by path (repeatable; none: slides disabled)")
    p.add_argument("--token-file", type=Path, default=S, metavar="F",
                   help="require 'authorization: Bearer TOKEN' with the token in this file")
    p.add_argument("--tls-cert", type=Path, default=S, metavar="F", help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=S, metavar="F", help="PEM private key (with --tls-cert)")
    p.add_argument("--threads", type=int, default=S, metavar="N", help="concurrent RPCs (default 8)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=S, metavar="N",
                   help="calls admitted at once, running or queued (default 32); more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-concurrent-encodes", type=int, default=S, metavar="N",
                   help="image encodes running at once (default 2): bounds the encoder's working memory")
    p.add_argument("--max-concurrent-clicks", type=int, default=S, metavar="N",
                   help="clicks computed at once across sessions (default 0: one per CPU core); more wait their turn")
    p.add_argument("--ort-threads", type=int, default=S, metavar="N",
                   help="onnxruntime intra-op threads per session (default: 1 for the decoder, onnxruntime's "
                   "choice for the encoder)")
    p.add_argument("--cpu", dest="prefer_gpu", action="store_false", default=S,
                   help="use the CPU provider even when CUDA is available")
    p.add_argument("--cache-bytes", type=int, default=S, metavar="N",
                   help="memory budget of the image embeddings and the sessions' click histories (default 1 GiB)")
    p.add_argument("--session-idle-seconds", type=float, default=S, metavar="S",
                   help="drop sessions idle this long (default 1800)")
    p.add_argument("--max-sessions", type=int, default=S, metavar="N", help="open sessions kept (default 128)")
    p.add_argument("--max-pixels", type=int, default=S, metavar="N",
                   help="largest image or region, in pixels (default 4096*4096)")
    p.add_argument("--max-message-bytes", type=int, default=S, metavar="N",
                   help="largest request/response (default 64 MiB)")
    p.add_argument("--max-points", type=int, default=S, metavar="N", help="points per click (default 100)")
    p.add_argument("--grace-seconds", type=float, default=S, metavar="S",
                   help="time running calls get to finish on shutdown (default 5)")
    p.add_argument("--propagation", nargs="?", const="on", choices=("on", "off", "auto"), default=S,
                   help="what a click that does not choose gets: spread over its colour region by a random walker "
                   "seeded by the clicks, the model's mask as its prior (on; for tumour regions with soft borders), "
                   "the model's mask alone (off; for crisp glands), or spread once the model is unsure of the image "
                   "or ignores a correction click (auto, the default). A bare --propagation means on; a client may "
                   "choose per click either way")
    p.add_argument("--propagation-config", type=Path, default=S, metavar="F",
                   help="YAML of click-propagation settings (default: the shipped propagation.yaml)")
    p.add_argument("--edge-snap", nargs="?", const="on", choices=("model", "on", "off"), default=S,
                   help="snap mask edges onto the image's colour edges: for the models whose bundle asks for it "
                   "(model, the default: the shipped default model), for every model (on; a bare --edge-snap), or "
                   "never (off: the model's raw masks, faster per click)")
    p.add_argument("--edge-snap-config", type=Path, default=S, metavar="F",
                   help="YAML of edge-snap settings (default: the shipped edge_snap.yaml)")
    p.add_argument("--log-level", default=S, choices=LOG_LEVELS,
                   help="INFO (default): every request with its status and latency; WARNING: only problems")
    p.set_defaults(func=run)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SETTING_FLAGS = (
    "host", "port", "models", "default_model", "slide_root", "token_file", "tls_cert", "tls_key", "threads",
    "max_concurrent_rpcs", "max_concurrent_encodes", "max_concurrent_clicks", "ort_threads", "prefer_gpu", "cache_bytes", "session_idle_seconds", "max_sessions", "max_pixels",
    "max_message_bytes", "max_points", "grace_seconds", "propagation", "propagation_config",
    "edge_snap", "edge_snap_config",
)


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a ``--config`` file, paths made relative to the file; their values are
    checked by ServerSettings (the one settings loader), every mistake in one line."""
    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.core.settings import read_yaml_mapping

    data = read_yaml_mapping(path, "config")
    base = Path(path).resolve().parent
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        # Relative paths in a config file are relative to the file, not to the working directory.
        # (Anything but text is left for ServerSettings to refuse.)
        if key in ("models", "models_dir", "token_file", "tls_cert", "tls_key", "propagation_config",
                   "edge_snap_config") and isinstance(value, str):
            value = base / Path(value).expanduser()
        elif key in ("slide_root", "slide_roots") and isinstance(value, str | list):
            values = [value] if isinstance(value, str) else value
            value = [base / Path(v).expanduser() if isinstance(v, str) else v for v in values]
        if key == "cpu":
            if not isinstance(value, bool):
                raise InvalidInputError(f"server setting cpu must be true or false, got {value!r}")
            key, value = "prefer_gpu", not value
        out[key] = value
    return out


def settings_from_args(args: argparse.Namespace):
    from histosam.backend.serving.server import ServerSettings

    merged: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        merged.update(read_config(args.config))
    for flag in SETTING_FLAGS:
        if hasattr(args, flag):
            merged[flag] = getattr(args, flag)
    merged.pop("log_level", None)  # the CLI's logging, not a server setting (see log_level_from_args)
    return ServerSettings.from_mapping(merged)


def log_level_from_args(args: argparse.Namespace) -> str:
    """--log-level, else the config file's log-level, else INFO."""
    from histosam.backend.core.errors import InvalidInputError

    level = getattr(args, "log_level", None)
    if level is None and getattr(args, "config", None) is not None:
        level = read_config(args.config).get("log_level")
    level = str(level or "INFO").upper()
    if level not in LOG_LEVELS:
        raise InvalidInputError(f"log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:

    settings = settings_from_args(args)
    level = log_level_from_args(args)
    # Our own handler on the "histosam" logger (not basicConfig): removed again on return, so
    # running the command in-process (tests, notebooks) leaves the logging setup as it was.
    logger = logging.getLogger("histosam")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level))
    try:
        return _serve(settings)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _serve(settings) -> int:
    import dataclasses

    from histosam.backend.postprocess.edge_snap import EdgeSnapSettings
    from histosam.backend.postprocess.propagation import PropagationSettings
    from histosam.backend.serving.server import SegmentationServer, check_tls_pair
    from histosam.export.cache import default_bundle

    # Everything a user may have mistyped is checked before a first start's export (minutes).
    if settings.tls_cert is not None and settings.tls_key is not None:
        check_tls_pair(Path(settings.tls_cert), Path(settings.tls_key))
    settings.resolve_token()
    PropagationSettings.load(settings.propagation_config)
    EdgeSnapSettings.load(settings.edge_snap_config)
    if not settings.bundles and settings.models_dir is None:  # exported here, never by the server
        settings = dataclasses.replace(settings, bundles=(default_bundle(),))
    server = SegmentationServer(settings)
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        assert server.models is not None
        secure = "TLS" if settings.tls_cert else "plaintext"
        auth = "token required" if server.servicer and server.servicer.token_required else "no token"
        print(f"histosam serve: listening on {server.address} ({secure}, {auth})", flush=True)
        print(f"histosam serve: models {', '.join(server.models.names)} (default {server.models.default_name}); "
              f"providers {', '.join(server.providers)}", flush=True)
        roots = ", ".join(str(r) for r in settings.slide_roots)
        print(f"histosam serve: slides readable by path under {roots}" if roots else
              "histosam serve: slides by path off (--slide-root DIR allows them); images are sent as pixels",
              flush=True)
        spread = server.servicer.propagation
        print(f"histosam serve: click propagation {settings.propagation} by default, clients may choose per click "
              f"(gamma {spread.gamma:g}, beta {spread.beta:g}, {spread.working_side} px walker grid, "
              f"auto below confidence {spread.auto_confidence:g} or after {spread.auto_ignored_clicks} ignored "
              "click(s))", flush=True)
        snap = server.servicer.edge_snap
        snapped = [m for m in server.models.names if server.servicer.snaps_edges(server.models.get(m))]
        print(f"histosam serve: edge snapping for {', '.join(snapped)} (band {snap.band:g} low-res px, beta "
              f"{snap.beta:g}, smoothing {snap.smoothing:g}, {snap.working_side} px working copy; --edge-snap off "
              "turns it off)" if snapped else "histosam serve: edge snapping off", flush=True)
        if not _is_loopback(settings.host) and not (settings.tls_cert and server.servicer.token_required):
            print("histosam serve: warning: listening beyond this machine without TLS and a token",
                  file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print(f"histosam serve: stopping (grace {settings.grace_seconds:g} s)", flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("histosam serve: stopped", flush=True)
    return 0
