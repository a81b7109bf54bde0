"""`histosam bench NAME ...`: speed and memory measurements, printed and written as JSON.

Benchmarks, not unit tests, hold the project's speed/memory targets. Each bench is one entry
of ``BENCHES``: ``name -> "module:function"``, where ``function(parser)`` adds the bench's
arguments to its own sub-parser and sets ``bench_func`` (a callable ``(args) -> int``) with
``parser.set_defaults``. The module must be light to import (no torch, no onnxruntime at
import time): heavy imports belong inside the bench function. To add a bench, add one line.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "patches": "histosam.backend.cli.commands.patches:register_bench",
    "serve": "histosam.benchmarks.serve:register_bench",
    "load": "histosam.benchmarks.load:register_bench",
    "decoders": "histosam.benchmarks.decoders:register_bench",
    "predictor": "histosam.benchmarks.predictor:register_bench",
}


def _resolve(target: str):
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed and peak memory, written as JSON")
    benches = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, target in BENCHES.items():
        try:
            configure = _resolve(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):  # bench not built in this tree
                continue
            raise
        bp = benches.add_parser(name, help=(configure.__doc__ or "").strip().splitlines()[0] if configure.__doc__ else None)
        configure(bp)
    p.set_defaults(func=run, _bench_parser=p)


def run(args: argparse.Namespace) -> int:
    bench_func = getattr(args, "bench_func", None)
    if bench_func is None:
        args._bench_parser.print_help()
        return 2
    return int(bench_func(args) or 0)
