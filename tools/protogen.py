"""Regenerate the gRPC Python code and descriptor set from ``segmentation.proto``.

The generated files are committed (the serving install has no grpcio-tools), so they can go
stale when someone edits the .proto and forgets to regenerate; ``tests/test_proto.py`` compiles
the .proto afresh and fails when the committed files disagree. Run::

    python tools/protogen.py          # rewrite the generated files
    python tools/protogen.py --check  # exit 1 if they are stale

Needs ``grpcio-tools`` (the ``test`` extra), imported only when run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_REL = "histosam/v1/segmentation.proto"
GENERATED = (
    "histosam/v1/segmentation_pb2.py",
    "histosam/v1/segmentation_pb2.pyi",
    "histosam/v1/segmentation_pb2_grpc.py",
    "histosam/v1/segmentation.desc",
)


def compile_proto(out_dir: Path, proto_root: Path = PROTO_ROOT) -> dict[str, Path]:
    """Run protoc (from grpcio-tools) into ``out_dir``; return generated file -> path."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the install
        from histosam.backend.core.errors import HistosamError

        raise HistosamError("grpcio-tools is not installed: pip install grpcio-tools") from exc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir = Path(out_dir)
    (out_dir / "histosam" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "--include_imports",
        f"--descriptor_set_out={out_dir / GENERATED[3]}",
        str(proto_root / PROTO_REL),
    ]
    rc = protoc.main(args)
    if rc != 0:
        from histosam.backend.core.errors import HistosamError

        raise HistosamError(f"protoc failed (exit {rc}) on {proto_root / PROTO_REL}")
    return {rel: out_dir / rel for rel in GENERATED}


def stale_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files whose committed bytes differ from a fresh compile (empty = up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_proto(Path(tmp), proto_root)
        return [
            rel
            for rel, path in fresh.items()
            if not (proto_root / rel).is_file() or (proto_root / rel).read_bytes() != path.read_bytes()
        ]


def write_generated(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Compile and replace the committed files atomically (each via a temp file beside it)."""
    from histosam.backend.core.atomic import write_bytes

    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_proto(Path(tmp), proto_root)
        for rel, path in fresh.items():
            write_bytes(proto_root / rel, path.read_bytes())
        return list(fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/protogen.py", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for rel in stale:
            print(f"stale: {PROTO_ROOT / rel}")
        if not stale:
            print("generated files are up to date")
        return 1 if stale else 0
    for rel in write_generated():
        print(f"wrote {PROTO_ROOT / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
