"""`histosam client info|open|click`: talk to a running server, for scripting and debugging.

Each command prints one JSON object. ``click`` either opens an image itself (``--image`` or
``--slide ... --region``) and clicks once, or clicks on an existing ``--session``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="query a running histosam server (info, open, click)")
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT", help="default: %(default)s")
    p.add_argument("--token-file", type=Path, metavar="F", help="file holding the server's token")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", type=Path, metavar="F", help="PEM root certificate(s) to trust (implies --tls)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="deadline per call (default 30)")
    actions = p.add_subparsers(dest="client_command", metavar="ACTION")

    actions.add_parser("info", help="server version, models, providers and limits")

    op = actions.add_parser("open", help="open an image or slide region; prints the session")
    _source_arguments(op, required=True)

    cp = actions.add_parser("click", help="segment with points and/or a box; prints polygons")
    cp.add_argument("--session", metavar="ID", help="an open session (else give an image or slide region)")
    _source_arguments(cp, required=False)
    cp.add_argument("--point", action="append", default=[], metavar="X,Y[,+|-]",
                    help="a click in client coordinates, positive unless it ends in ',-' (repeat, in order)")
    cp.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box prompt in client coordinates")
    cp.add_argument("--simplify", type=float, default=0.0, metavar="T", help="simplification tolerance, image pixels")
    cp.add_argument("--min-area", type=float, metavar="A", help="drop components below A image pixels (default: server's, 16)")
    cp.add_argument("--refine-mask", type=Path, metavar="PNG", help="image-sized mask of an annotation to refine")
    cp.add_argument("--propagation", choices=("on", "off", "auto"),
                    help="click propagation for this answer (default: the server's)")
    cp.add_argument("--mask-out", type=Path, metavar="PNG", help="write the mask PNG here")
    cp.add_argument("--geojson-out", type=Path, metavar="F", help="write a QuPath-importable GeoJSON here")
    cp.add_argument("--close", action="store_true", help="close the session afterwards")
    p.set_defaults(func=run, _client_parser=p)


def _source_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--image", type=Path, metavar="FILE", help="PNG, JPEG or TIFF to send")
    group.add_argument("--slide", metavar="PATH", help="slide path as the server sees it (needs --region)")
    p.add_argument("--region", type=float, nargs=4, metavar=("X", "Y", "W", "H"), help="level-0 rectangle of --slide")
    p.add_argument("--downsample", type=float, default=1.0, help="for --slide (default 1)")
    p.add_argument("--frame", type=float, nargs=3, metavar=("OX", "OY", "DS"),
                   help="client frame: client = origin + pixel * downsample")
    p.add_argument("--model", default="", help="model name (default: the server's default)")


def _parse_floats(text: str, n: int | tuple[int, ...], what: str) -> list[float]:
    from histosam.backend.errors import InvalidInputError

    counts = (n,) if isinstance(n, int) else n
    parts = [s.strip() for s in text.split(",")]
    try:
        values = [float(s) for s in parts]
    except ValueError:
        raise InvalidInputError(f"{what} {text!r}: expected {counts[0]} comma-separated numbers") from None
    if len(values) not in counts:
        raise InvalidInputError(f"{what} {text!r}: expected {counts[0]} comma-separated numbers")
    return values


def parse_point(text: str) -> tuple[float, float, bool]:
    """'x,y' or 'x,y,+' (positive) / 'x,y,-' (negative)."""
    from histosam.backend.errors import InvalidInputError

    parts = [s.strip() for s in text.split(",")]
    positive = True
    if len(parts) == 3:
        sign = parts.pop()
        if sign not in ("+", "-", "1", "0", "pos", "neg"):
            raise InvalidInputError(f"point {text!r}: the third part must be + or -")
        positive = sign in ("+", "1", "pos")
    x, y = _parse_floats(",".join(parts), 2, "point")
    return x, y, positive


def _check_click_args(args: argparse.Namespace) -> None:
    from histosam.backend.errors import InvalidInputError

    if args.session and (args.image is not None or args.slide is not None):
        raise InvalidInputError("--session continues an open session and --image/--slide open a new one: give one")
    for flag, path in (("--mask-out", args.mask_out), ("--geojson-out", args.geojson_out)):
        if path is None:
            continue
        if path.is_dir():
            raise InvalidInputError(f"{flag} {path} is a folder; give a file name")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise InvalidInputError(f"{flag} {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise InvalidInputError(f"{flag} {path} is not writable")


def _open(client, args: argparse.Namespace):
    from histosam.backend.errors import InvalidInputError

    if args.downsample <= 0 or (args.frame is not None and args.frame[2] <= 0):
        raise InvalidInputError("--downsample and the --frame downsample must be positive")

    if args.image is not None:
        return client.open_image(args.image, model=args.model, frame=args.frame)
    if args.slide is not None:
        if args.region is None:
            raise InvalidInputError("--slide needs --region X Y W H")
        x, y, w, h = args.region
        return client.open_slide_region(args.slide, x, y, w, h, args.downsample, model=args.model, frame=args.frame)
    raise InvalidInputError("give --session, --image or --slide")


def _session_json(session) -> dict[str, Any]:
    r = session.response
    return {
        "session_id": r.session_id, "width": r.width, "height": r.height, "model": r.model,
        "cache_hit": r.cache_hit, "decode_image_seconds": r.decode_image_seconds, "encode_seconds": r.encode_seconds,
        "frame": {"origin_x": r.frame.origin_x, "origin_y": r.frame.origin_y, "downsample": r.frame.downsample},
    }


def run(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from histosam.backend.client import ImageSession, SegmentationClient
    from histosam.v1 import segmentation_pb2 as pb

    if not args.client_command:
        args._client_parser.print_help()
        return 2
    with SegmentationClient(args.server, token_file=args.token_file, timeout=args.timeout,
                            tls=args.tls, root_certificates=args.tls_ca) as client:
        if args.client_command == "info":
            # snake_case, like the open and click answers (and the proto's own field names).
            out = MessageToDict(client.info(), always_print_fields_with_no_presence=True,
                                preserving_proto_field_name=True)
        elif args.client_command == "open":
            out = _session_json(_open(client, args))
        else:
            _check_click_args(args)  # before the click: a bad output path must not lose its answer
            if args.session:
                session = ImageSession(client, pb.OpenImageRequest(), pb.OpenImageResponse(session_id=args.session))
            else:
                session = _open(client, args)
            out = _click(client, session, args)
            if not args.session:
                out["session"] = _session_json(session)
            if args.close:
                session.close()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _click(client, session, args: argparse.Namespace) -> dict[str, Any]:
    from histosam.backend.atomic import write_bytes, write_text
    from histosam.backend.errors import NotFoundError
    from histosam.backend.geometry import annotation_feature, feature_collection

    points = [parse_point(p) for p in args.point]
    box = _parse_floats(args.box, 4, "box") if args.box else None
    refine = None
    if args.refine_mask is not None:
        try:
            refine = args.refine_mask.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"cannot read {args.refine_mask}: {exc.strerror}") from None
    started = time.perf_counter()
    result = client.click(session, points, box=box, want_mask=args.mask_out is not None,
                          simplify_tolerance=args.simplify, min_area=args.min_area, mask_prompt_png=refine,
                          propagation=args.propagation)
    round_trip = time.perf_counter() - started  # what the user waits: decode + snapping/propagation + wire
    if args.mask_out is not None:
        write_bytes(args.mask_out, result.mask_png)
    if args.geojson_out is not None:
        features = [annotation_feature(result.polygons, measurements={"predicted IoU": result.predicted_iou})] \
            if result.polygons else []
        write_text(args.geojson_out, json.dumps(feature_collection(features)))
    return {
        "session_id": session.session_id,
        "predicted_iou": result.predicted_iou,
        "num_points": result.num_points,
        "decoded_steps": result.decoded_steps,
        "decode_seconds": result.decode_seconds,
        "round_trip_seconds": round_trip,
        "mask_pixels": result.mask_pixels,
        "reopened": result.reopened,
        "propagated": result.propagated,
        "polygons": [
            {"exterior": p.exterior.tolist(), "holes": [h.tolist() for h in p.holes]} for p in result.polygons
        ],
    }
