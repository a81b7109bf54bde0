"""`histosam export`: a model (registry name or shipped fine-tune) -> ONNX bundle.

Needs the torch extra; `--check DIR` re-runs the parity check on an existing bundle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to an ONNX bundle (encoder + decoder + manifest)")
    p.add_argument("--model", default="default", help="registry name or shipped fine-tune (default: %(default)s)")
    p.add_argument("--checkpoint", help="weights file for models that need one (vit_b/l/h, mobile_sam)")
    p.add_argument("--decoder-weights", help="fine-tuned decoder weights (.safetensors) from histosam train")
    p.add_argument("--out", type=Path, help="bundle folder to write (atomically)")
    p.add_argument("--name", help="the model name the bundle is served and listed under (default: the model's own "
                   "name; with --decoder-weights: the --out folder's name, so a fine-tune is not taken for its base)")
    p.add_argument("--quantize", choices=["int8", "fp16"], help="quantise the graphs (parity loss is reported, not enforced)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch/ONNX parity check")
    p.add_argument("--check", type=Path, metavar="DIR", help="only re-check parity of an existing bundle")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histosam.backend.core.errors import InvalidInputError
    from histosam.export.exporter import export_bundle
    from histosam.training.models.registry import resolve_source

    if args.check:
        from histosam.backend.bundles.bundle import load_bundle
        from histosam.export.parity import check_parity
        from histosam.training.models.loading import load_model_from_source

        bundle = load_bundle(args.check)
        report = check_parity(load_model_from_source(bundle.manifest["source"]), args.check, progress=True)
        _print_parity(report)
        return 0 if report["passed"] or report["quantized"] else 1
    if args.out is None:
        raise InvalidInputError("--out DIR is required (or --check DIR)")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInputError(f"--out {args.out} exists and is not a folder")
    try:  # before the export, which takes minutes: an unwritable --out fails now, in one line
        args.out.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--out {args.out} cannot be created: {exc.strerror or exc}") from None
    source = resolve_source(args.model, args.checkpoint, args.decoder_weights)
    name = args.name.strip() if args.name is not None else (args.out.resolve().name if args.decoder_weights else None)
    if name is not None:
        flag = "--name" if args.name is not None else f"--out {args.out} (its folder name names the bundle)"
        if not name or any(c in name for c in "/\\\n"):
            raise InvalidInputError(f"{flag}: give a non-empty name without slashes or newlines (--name NAME)")
        if name == "default":
            raise InvalidInputError(f"{flag}: 'default' is how clients ask for the server's default model; "
                                    "choose another name (--name NAME)")
        source = {**source, "name": name}
    manifest = export_bundle(source, args.out, opset=args.opset, quantize=args.quantize, check=not args.no_check)
    print(f"wrote {args.out} ({manifest['model']}, opset {args.opset}, quantize={args.quantize})")
    if "parity" in manifest:
        _print_parity(manifest["parity"])
    return 0


def _print_parity(report: dict) -> None:
    summary = {k: v for k, v in report.items() if k != "cases"}
    print("parity: " + json.dumps(summary))
