"""`histosam train --config CONFIG.yaml [--out DIR] [--resume]`: fine-tune a SAM decoder.

Works alone or under ``torchrun --nproc_per_node N histosam train ...`` (DDP). Writes into
``--out``: checkpoint.pt (resumable), best.safetensors / last.safetensors (decoder weights for
``--decoder-weights`` or the registry), metrics.csv and metrics.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune the mask decoder (and more) with simulated clicks")
    p.add_argument("--config", type=Path, required=True, help="YAML config, e.g. training/configs/refine_hq.yaml")
    p.add_argument("--out", type=Path, help="output folder (default: runs/CONFIG_NAME)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--max-minutes", type=float, help="stop (checkpointed, validated) after this wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from histosam.training.config import load_config
    from histosam.training.trainer import train

    cfg = load_config(args.config)
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if args.max_minutes is not None:
        cfg = dataclasses.replace(cfg, max_minutes=args.max_minutes)
    cfg.validate()
    out = args.out or Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result["history"]:
        print(json.dumps({"out": result["out"], "best": result["best"], "last": result["history"][-1]}))
    return 0
