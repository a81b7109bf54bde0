"""`histosam train --config CONFIG.yaml [--train-data DIR ...] [--val-data DIR ...] [--out DIR] [--resume]`.

Fine-tunes a SAM decoder (and more) with simulated clicks; ``--train-data`` / ``--val-data``
point a shipped recipe (e.g. ``training/configs/own_tissue.yaml``) at a user's own patches.

Works alone or under ``torchrun --nproc_per_node N -m histosam.backend.cli train ...`` (DDP; torchrun
wants a script or ``-m module``, not the ``histosam`` console entry). Writes into
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
    p.add_argument("--train-data", nargs="+", metavar="DIR",
                   help="patch folders (images/ + masks/, e.g. from `histosam patches`) to train on instead of the config's")
    p.add_argument("--val-data", nargs="+", metavar="DIR",
                   help="validation folders, never trained on, instead of the config's")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--max-minutes", type=float, help="stop (checkpointed, validated) after this wall time")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from histosam.training.config import load_config
    from histosam.training.trainer import train

    cfg = load_config(args.config, validate=False)  # checked below, after the overrides
    # Data folders differ per user and machine; the recipe stays in the file.
    if args.train_data is not None:
        cfg = dataclasses.replace(cfg, train_data=[str(d) for d in args.train_data])
    if args.val_data is not None:
        cfg = dataclasses.replace(cfg, val_data=[str(d) for d in args.val_data])
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
