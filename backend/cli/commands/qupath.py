"""`histosam qupath`: install the QuPath scripts; patches out of QuPath, predictions into it.

    histosam qupath install-scripts --qupath-dir ~/QuPath/v0.5 [--server HOST:PORT] [--token-file F]
    histosam qupath export-patches --slide S --geojson EXPORT.geojson --classes Tumor --mpp 1 --out DIR
    histosam qupath export-patches --project P.qpproj --classes Tumor --mpp 1 --out DIR      (paquo)
    histosam qupath import-predictions --geojson PRED.geojson --into EXPORT.geojson [--dry-run]
    histosam qupath import-predictions --geojson S1.geojson S2.geojson --project P.qpproj    (paquo)
    histosam qupath ping [--server HOST:PORT] [--token-file F] [--scripts DIR] [--jars DIR]

The logic lives in ``histosam.backend.qupath.install`` and ``histosam.backend.qupath.sync``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qupath", help="QuPath scripts and QuPath <-> histosam annotation sync",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="qupath_action", metavar="ACTION", required=True)

    inst = actions.add_parser(
        "install-scripts", help="put the QuPath scripts, the service descriptor and a settings file in place",
        description="Copy HistosamClient.groovy, HistosamQuPath.groovy, the three histosam_*.groovy scripts, "
                    "segmentation.desc and histosam.properties into one folder (replaced atomically; an existing "
                    "histosam.properties is kept), and list the grpc-java jars QuPath needs.")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--qupath-dir", type=Path, metavar="DIR",
                       help="QuPath user folder (e.g. ~/QuPath/v0.5): scripts go to DIR/scripts/histosam and the "
                            "jars are checked in DIR/extensions")
    where.add_argument("--dest", type=Path, metavar="DIR", help="install into exactly this folder")
    inst.add_argument("--server", metavar="HOST:PORT", help="server address written into histosam.properties")
    inst.add_argument("--token-file", type=Path, metavar="F", help="token file written into histosam.properties")
    inst.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    inst.set_defaults(func=run_install)

    png = actions.add_parser(
        "ping", help="check the QuPath side without QuPath: the scripts' Groovy client asks a server for its info",
        description="Run HistosamClient.groovy (the client the QuPath scripts use) under Groovy on the grpc-java "
                    "jars, with the settings the scripts would read, against a server: one line and exit 0 when "
                    "it answers, the client's own message and exit 1 when not. Needs groovy and a JDK.")
    png.add_argument("--server", metavar="HOST:PORT", help="default: the scripts' settings (localhost:50051)")
    png.add_argument("--token-file", type=Path, metavar="F", help="file holding the server's token")
    png.add_argument("--tls", action="store_true", help="connect with TLS")
    png.add_argument("--scripts", type=Path, metavar="DIR",
                     help="an installed scripts folder, with its histosam.properties (default: this histosam's scripts)")
    png.add_argument("--jars", type=Path, metavar="DIR",
                     help="folder of the grpc-java jars, e.g. a copy of QuPath's extensions folder plus the guava "
                          "QuPath ships (default: Debian's packaged grpc-java in /usr/share/java)")
    png.add_argument("--timeout", type=float, default=10.0, metavar="S", help="deadline of the call (default 10)")
    png.set_defaults(func=run_ping)

    exp = actions.add_parser(
        "export-patches", help="annotations of chosen classes -> a patch dataset (images/, masks/, manifest.csv)",
        description="From a slide and the GeoJSON QuPath exported for it, or from a QuPath project (paquo), "
                    "write the whole-slide pipeline's patch dataset. Predictions histosam imported are left out "
                    "unless --include-predictions.")
    src = exp.add_mutually_exclusive_group(required=True)
    src.add_argument("--project", type=Path, metavar="P.qpproj", help="QuPath project (needs paquo and QuPath)")
    src.add_argument("--slide", type=Path, metavar="S", help="the slide (with --geojson)")
    exp.add_argument("--geojson", type=Path, metavar="F", help="QuPath's GeoJSON export of the slide's annotations")
    exp.add_argument("--images", nargs="+", metavar="NAME", help="project images to export (default: all)")
    exp.add_argument("--classes", nargs="+", required=True, help="annotation classes that make the mask")
    exp.add_argument("--include-predictions", action="store_true", help="also use histosam's imported predictions")
    scale = exp.add_mutually_exclusive_group(required=True)
    scale.add_argument("--magnification", type=float, help="objective power of the patches")
    scale.add_argument("--mpp", type=float, help="µm per pixel of the patches")
    scale.add_argument("--downsample", type=float, help="level-0 pixels per patch pixel")
    exp.add_argument("--size", type=int, default=400, help="patch side in pixels (default: %(default)s)")
    exp.add_argument("--stride", type=int, help="grid step in patch pixels (default: --size)")
    exp.add_argument("--fraction", type=float, nargs=2, metavar=("LO", "HI"), help="keep patches with mask fraction in range")
    exp.add_argument("--tissue-threshold", type=float, default=0.25, help="minimum tissue fraction (default: %(default)s)")
    exp.add_argument("--base-mpp", type=float, help="level-0 µm/px when the slide does not record it")
    exp.add_argument("--base-magnification", type=float, help="level-0 objective power when the slide does not record it")
    exp.add_argument("--out", type=Path, required=True, help="dataset folder (a project: one sub-folder per image)")
    exp.add_argument("--no-progress", action="store_true")
    exp.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    exp.set_defaults(func=run_export)

    imp = actions.add_parser(
        "import-predictions", help="add predicted annotations to a QuPath GeoJSON export or project",
        description="Predicted features (named 'histosam prediction') replace earlier histosam predictions; the "
                    "user's own annotations are never changed. The target is backed up, then replaced atomically.")
    imp.add_argument("--geojson", type=Path, nargs="+", required=True, metavar="F",
                     help="predictions (e.g. from `histosam client ... --geojson-out`); with --project, each file "
                          "goes to the image it is named after")
    dst = imp.add_mutually_exclusive_group(required=True)
    dst.add_argument("--into", type=Path, metavar="EXPORT.geojson",
                     help="QuPath GeoJSON export to merge into (then File > Import objects in QuPath)")
    dst.add_argument("--project", type=Path, metavar="P.qpproj", help="QuPath project (needs paquo and QuPath)")
    imp.add_argument("--out", type=Path, metavar="F", help="with --into: write here instead of replacing --into")
    imp.add_argument("--image", metavar="NAME", help="with --project: the image entry (else matched by file name)")
    imp.add_argument("--class-name", default="Tumor", help="class of predictions that have none (default: %(default)s)")
    imp.add_argument("--classes", nargs="+", help="with --into: import only predictions of these classes")
    imp.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    imp.add_argument("--no-backup", action="store_true", help="with --into: do not keep a backup of the replaced file")
    imp.set_defaults(func=run_import)


def run_install(args: argparse.Namespace) -> int:
    from histosam.backend.qupath.install import (
        ALREADY_IN_QUPATH,
        QUPATH_JARS,
        check_jars,
        check_qupath_dir,
        default_dest,
        install_scripts,
    )

    note = check_qupath_dir(args.qupath_dir) if args.qupath_dir is not None else None
    dest = args.dest if args.dest is not None else default_dest(args.qupath_dir)
    if note:
        print(note)
    report = install_scripts(dest, server=args.server, token_file=args.token_file, dry_run=args.dry_run)
    verb = "would write" if args.dry_run else "wrote"
    print(f"{report.dest}: {verb} {', '.join(report.written)}"
          + (f"; kept {', '.join(report.kept)}" if report.kept else ""))
    print("QuPath needs these jars in its extensions folder (Edit > Preferences > Extensions directory):")
    found = dict((j.coordinates, p) for j, p in check_jars(args.qupath_dir / "extensions")) if args.qupath_dir else {}
    for jar in QUPATH_JARS:
        state = ""
        if args.qupath_dir:
            state = f"  [found {found[jar.coordinates].name}]" if found.get(jar.coordinates) else "  [missing]"
        print(f"  {jar.coordinates}{state}")
    print(f"  (already in QuPath, do not add: {', '.join(ALREADY_IN_QUPATH)})")
    print(f"Run {report.dest / 'histosam_interactive.groovy'} from QuPath's script editor.")
    return 0


def run_ping(args: argparse.Namespace) -> int:
    import sys

    from histosam.backend.qupath.ping import ping

    result = ping(server=args.server, token_file=args.token_file, tls=args.tls, scripts=args.scripts,
                  jars=args.jars, timeout=args.timeout)
    print(result.line, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _patch_options(args: argparse.Namespace) -> dict:
    return {
        "size": args.size, "stride": args.stride, "magnification": args.magnification, "mpp": args.mpp,
        "downsample": args.downsample, "fraction": tuple(args.fraction) if args.fraction else None,
        "tissue_threshold": args.tissue_threshold, "base_mpp": args.base_mpp,
        "base_magnification": args.base_magnification,
    }


def run_export(args: argparse.Namespace) -> int:
    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.qupath.sync import (
        export_patches_from_geojson,
        export_patches_from_project,
    )

    common = {"include_predictions": args.include_predictions, "progress": not args.no_progress,
              "overview": not args.no_overview, **_patch_options(args)}
    if args.slide is not None:
        if args.geojson is None:
            raise InvalidInputError("--slide needs --geojson (the annotations QuPath exported for it)")
        if args.images:
            raise InvalidInputError("--images goes with --project")
        results = [(args.slide.name, export_patches_from_geojson(args.slide, args.geojson, args.out, args.classes,
                                                                 **common))]
    else:
        if args.geojson is not None:
            raise InvalidInputError("--geojson goes with --slide, not --project")
        results = export_patches_from_project(args.project, args.out, args.classes, images=args.images, **common)
    for name, summary in results:
        done = "already complete" if summary.already_complete else f"{summary.seconds:.1f} s"
        print(f"{name}: {summary.n_written} patches in {summary.out} (downsample {summary.downsample:g}, "
              f"classes {', '.join(summary.classes)}; {done})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.qupath.sync import (
        import_predictions_into_project,
        merge_predictions_geojson,
    )

    if args.into is not None:
        if args.image:
            raise InvalidInputError("--image goes with --project")
        if len(args.geojson) != 1:
            raise InvalidInputError("--into merges one predictions file; give one --geojson")
        plan = merge_predictions_geojson(args.into, args.geojson[0], out=args.out, default_class=args.class_name,
                                         classes=args.classes, dry_run=args.dry_run, backup=not args.no_backup)
        print(plan.describe())
        return 0
    if args.out is not None or args.classes or args.no_backup:
        raise InvalidInputError("--out, --classes and --no-backup go with --into")
    plans, backup = import_predictions_into_project(args.project, args.geojson, image=args.image,
                                                    default_class=args.class_name, dry_run=args.dry_run)
    verb = "would add" if args.dry_run else "added"
    for p in plans:
        print(f"{p.image}: {verb} {p.added} prediction(s) from {p.geojson.name}; {p.kept} annotation(s) kept, "
              f"{p.replaced} earlier prediction(s) replaced")
    if backup is not None:
        print(f"backup of the project: {backup}")
    return 0
