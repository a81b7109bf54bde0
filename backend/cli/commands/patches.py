"""`histosam patches`: a whole slide + its annotations -> images/ + masks/ + manifest.csv.

Also provides the arguments and runner of `histosam bench patches` (registered in
``commands/bench.py``), which runs the same extraction into a throw-away folder and reports
patches per second and peak memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_patch_arguments(p: argparse.ArgumentParser, *, out_required: bool = True, out_help: str | None = None) -> None:
    """The extraction arguments shared by `patches` and `bench patches`."""
    p.add_argument("--slide", type=Path, required=True, help="whole-slide image (anything OpenSlide reads)")
    p.add_argument(
        "--annotations", type=Path, required=True,
        help="ASAP/CAMELYON16 XML, Aperio/PAIP2019 XML, QuPath GeoJSON, or a label-mask TIFF",
    )
    p.add_argument("--classes", nargs="+", help="annotation classes that make the mask (default: all but exclusions)")
    p.add_argument(
        "--exclude-classes", nargs="+",
        help="classes cut out of the mask (default: CAMELYON16 '_2'/'Exclusion' groups)",
    )
    scale = p.add_mutually_exclusive_group(required=True)
    scale.add_argument("--magnification", type=float, help="objective power of the patches, e.g. 5 or 10")
    scale.add_argument("--mpp", type=float, help="µm per pixel of the patches")
    scale.add_argument("--downsample", type=float, help="level-0 pixels per patch pixel")
    p.add_argument("--size", type=int, default=400, help="patch side in pixels (default: %(default)s)")
    p.add_argument("--stride", type=int, help="grid step in patch pixels (default: --size)")
    p.add_argument(
        "--fraction", type=float, nargs=2, metavar=("LO", "HI"),
        help="keep patches whose mask fraction is in [LO, HI], e.g. 0.2 0.8 (default: keep all)",
    )
    p.add_argument(
        "--tissue-threshold", type=float, default=0.25,
        help="minimum tissue fraction of a patch; background is skipped (default: %(default)s)",
    )
    p.add_argument("--base-mpp", type=float, help="level-0 µm/px when the slide does not record it")
    p.add_argument("--base-magnification", type=float, help="level-0 objective power when the slide does not record it")
    p.add_argument(
        "--label-map", nargs="+", metavar="LABEL=NAME",
        help="class names of a label mask's values, e.g. 3=tumour 4=tumour 5=tumour",
    )
    p.add_argument("--label-channel", type=int, default=0, help="channel of a label mask holding the label (default: 0)")
    p.add_argument("--out", type=Path, required=out_required,
                   help=out_help or "output dataset folder (written atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, out: Path):  # -> PatchConfig
    from histosam.backend.wsi.annotations import parse_label_map
    from histosam.backend.wsi.patches import PatchConfig

    return PatchConfig(
        slide=args.slide,
        annotations=args.annotations,
        out=out,
        size=args.size,
        stride=args.stride,
        magnification=args.magnification,
        mpp=args.mpp,
        downsample=args.downsample,
        classes=tuple(args.classes) if args.classes else None,
        exclude_classes=tuple(args.exclude_classes) if args.exclude_classes else None,
        fraction=tuple(args.fraction) if args.fraction else None,
        tissue_threshold=args.tissue_threshold,
        base_mpp=args.base_mpp,
        base_magnification=args.base_magnification,
        label_map=parse_label_map(args.label_map),
        label_channel=args.label_channel,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "patches",
        help="extract image/mask patches from a slide and its annotations",
        description=(
            "Tile a whole slide at a magnification or µm/px, skip background, keep patches "
            "whose annotation fraction is in range, and write images/, masks/ and manifest.csv "
            "(the dataset format of `histosam evaluate` and `histosam train`). Re-running with "
            "the same arguments resumes an interrupted run."
        ),
    )
    add_patch_arguments(p)
    p.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from histosam.backend.wsi.patches import extract_patches

    config = config_from_args(args, args.out)
    summary = extract_patches(config, progress=not args.no_progress, overview=not args.no_overview)
    if summary.already_complete:
        print(f"{summary.out}: already complete ({summary.n_written} patches), nothing to do")
        return 0
    mpp = f", {summary.mpp:.3f} µm/px" if summary.mpp else ""
    labels = f": {summary.labels}" if summary.labels else ""
    print(
        f"{summary.out}: {summary.n_written} patches (downsample {summary.downsample:g}{mpp}, "
        f"classes {', '.join(summary.classes)}{labels}); {summary.n_grid} grid positions, "
        f"{summary.n_tissue} on tissue, {summary.n_rejected} outside the fraction range, "
        f"{summary.n_resumed} done by an earlier run; {summary.seconds:.1f} s"
    )
    return 0


# --------------------------------------------------------------------------- bench


def register_bench(p: argparse.ArgumentParser) -> None:
    """Patch extraction from a slide: patches per second and peak memory.

    The registry entry of `histosam bench patches` (see commands/bench.py): adds the
    extraction arguments and sets ``bench_func``.
    """
    add_patch_arguments(p, out_required=False, out_help="write the measurements to this JSON file (the patches "
                        "themselves go to a temporary folder that is removed)")
    p.set_defaults(bench_func=run_bench)
    p.description = (
        "Extract patches into a temporary folder and report patches per second and peak "
        "memory (tracemalloc peak of Python/numpy allocations, and the process's ru_maxrss); "
        "--out FILE writes the numbers as JSON."
    )


def run_bench(args: argparse.Namespace) -> int:
    import resource
    import tempfile
    import time
    import tracemalloc

    from histosam.backend.wsi.patches import extract_patches

    with tempfile.TemporaryDirectory(prefix="histosam-bench-patches-") as tmp:
        config = config_from_args(args, Path(tmp) / "patches")
        tracemalloc.start()
        t0 = time.perf_counter()
        summary = extract_patches(config, progress=not args.no_progress, overview=False)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "bench": "patches",
        "slide": str(args.slide),
        "annotations": str(args.annotations),
        "downsample": summary.downsample,
        "size": args.size,
        "grid_positions": summary.n_grid,
        "tissue_positions": summary.n_tissue,
        "patches_written": summary.n_written,
        "seconds": round(seconds, 3),
        "patches_per_second": round(summary.n_written / seconds, 3) if seconds > 0 else None,
        "positions_per_second": round(summary.n_tissue / seconds, 3) if seconds > 0 else None,
        "peak_traced_mib": round(peak / 2**20, 2),
        "peak_rss_mib": round(rss_kib / 1024, 1),
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.out:
        out = Path(args.out)
        from histosam.backend.core.atomic import write_json

        write_json(out, result, indent=2)
    return 0
