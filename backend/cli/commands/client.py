"""`histosam client info|open|click`: talk to a running server, for scripting and debugging.

``info`` and ``open`` print one JSON object; ``click`` prints a one-line summary (``--json``: the
whole answer, polygons included). ``click`` either opens an image itself (``--image`` or
``--slide ... --region``) and clicks once, or clicks on an existing ``--session``. Progress and
notes go to stderr, so stdout stays the answer.
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines or notes on stderr")
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
    cp.add_argument("--overlay-out", type=Path, metavar="PNG",
                    help="write the mask over the image, clicks drawn, here (needs --image, or a --slide this "
                    "machine can read)")
    cp.add_argument("--json", action="store_true", help="print the whole answer as JSON (polygons included) "
                    "instead of a one-line summary")
    cp.add_argument("--close", action="store_true", help="close the session afterwards")
    p.set_defaults(func=run, _client_parser=p)


def _source_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--image", type=Path, metavar="FILE", help="PNG, JPEG or TIFF to send")
    group.add_argument("--slide", metavar="PATH",
                       help="slide path: relative to one of the server's --slide-root folders, or absolute under one "
                       "(a relative path that exists here is sent as its absolute path to a server on this machine); "
                       "needs --region")
    p.add_argument("--region", type=float, nargs=4, metavar=("X", "Y", "W", "H"), help="level-0 rectangle of --slide")
    p.add_argument("--downsample", type=float, default=1.0,
                   help="for --slide: level-0 pixels per image pixel (default 1; a note says when the model "
                   "sees far fewer pixels than that)")
    p.add_argument("--frame", type=float, nargs=3, metavar=("OX", "OY", "DS"),
                   help="client frame: client = origin + pixel * downsample")
    p.add_argument("--model", default="", help="model name (default: the server's default)")


def _parse_floats(text: str, n: int | tuple[int, ...], what: str) -> list[float]:
    from histosam.backend.core.errors import InvalidInputError

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
    from histosam.backend.core.errors import InvalidInputError

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
    """Everything that can be wrong with the arguments, before a click reaches the session."""
    from histosam.backend.core.errors import InvalidInputError

    if args.session and (args.image is not None or args.slide is not None):
        raise InvalidInputError("--session continues an open session and --image/--slide open a new one: give one")
    args.points = [parse_point(p) for p in args.point]
    args.box_values = _parse_floats(args.box, 4, "box") if args.box else None
    if args.overlay_out is not None and args.image is None and not (args.slide and Path(args.slide).is_file()):
        raise InvalidInputError("--overlay-out draws over the image, which is only here with --image FILE or a "
                                "--slide path this machine can read (a --session keeps no pixels on the client)")
    for flag, path in (("--mask-out", args.mask_out), ("--geojson-out", args.geojson_out),
                       ("--overlay-out", args.overlay_out)):
        if path is None:
            continue
        if path.is_dir():
            raise InvalidInputError(f"{flag} {path} is a folder; give a file name")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise InvalidInputError(f"{flag} {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise InvalidInputError(f"{flag} {path} is not writable")


# A note is printed when the model sees the opened image this many times smaller on its longest
# side: its answer is then much coarser than the pixels sent (polygons are upsampled masks).
COARSE_RATIO = 8.0


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"histosam client: {text}", file=sys.stderr, flush=True)


def slide_path_to_send(slide: str, server: str) -> str:
    """``slide`` as the server should see it: a relative path that exists here is made absolute
    when the server runs on this machine (its slide roots then contain it, whatever the two
    working folders); anything else goes as given, resolved against the server's roots."""
    from histosam.backend.cli.commands.serve import _is_loopback

    path = Path(slide)
    host = server.rsplit(":", 1)[0] if ":" in server else server
    if not path.is_absolute() and path.is_file() and _is_loopback(host):
        return str(path.absolute())
    return slide


def _open(client, args: argparse.Namespace):
    from histosam.backend.core.errors import InvalidInputError

    if args.downsample <= 0 or (args.frame is not None and args.frame[2] <= 0):
        raise InvalidInputError("--downsample and the --frame downsample must be positive")

    if args.image is not None:
        what = str(args.image)
        open_call = lambda: client.open_image(args.image, model=args.model, frame=args.frame)  # noqa: E731
    elif args.slide is not None:
        if args.region is None:
            raise InvalidInputError("--slide needs --region X Y W H")
        x, y, w, h = args.region
        slide = slide_path_to_send(args.slide, args.server)
        what = f"{args.slide} region {w:g}x{h:g} at downsample {args.downsample:g}"
        open_call = lambda: client.open_slide_region(slide, x, y, w, h, args.downsample,  # noqa: E731
                                                     model=args.model, frame=args.frame)
    else:
        raise InvalidInputError("give --session, --image or --slide")
    _note(args, f"opening {what} on {args.server}: the server decodes and encodes it "
          "(a new image takes seconds on a CPU; a cached one is instant)...")
    started = time.perf_counter()
    session = open_call()
    r = session.response
    done = "cached, no encode" if r.cache_hit else f"encoded in {r.encode_seconds:.1f} s"
    _note(args, f"opened {r.width}x{r.height} px with model {r.model} ({done}; {time.perf_counter() - started:.1f} s "
          "in all)")
    _note_coarse(client, args, session)
    return session


def _note_coarse(client, args: argparse.Namespace, session) -> None:
    """Say so when the model sees the image far smaller than it was sent (a whole region at
    downsample 1): the answer is only as fine as the model's input."""
    if args.quiet:
        return
    r = session.response
    sizes = {m.name: m.input_size for m in client.info().models}
    side = sizes.get(r.model)
    longest = max(r.width, r.height)
    if not side or longest <= COARSE_RATIO * side:
        return
    ratio = longest / side
    hint = (f"--downsample {args.downsample * ratio / 2:.3g} reads about twice what it sees" if args.slide is not None
            else "send a smaller image (or a slide region at a larger --downsample)")
    _note(args, f"note: model {r.model} sees this {r.width}x{r.height} image at {side} px on its longest side, "
          f"{ratio:.0f}x fewer pixels a side: detail finer than ~{ratio:.0f} px is lost; {hint}")


def _session_json(session) -> dict[str, Any]:
    r = session.response
    return {
        "session_id": r.session_id, "width": r.width, "height": r.height, "model": r.model,
        "cache_hit": r.cache_hit, "decode_image_seconds": r.decode_image_seconds, "encode_seconds": r.encode_seconds,
        "frame": {"origin_x": r.frame.origin_x, "origin_y": r.frame.origin_y, "downsample": r.frame.downsample},
    }


def message_json(message) -> dict[str, Any]:
    """A protobuf message as JSON-ready values, snake_case like the open and click answers;
    64-bit integers stay numbers (protobuf's JSON mapping writes them as strings)."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
    return _numbers(message.DESCRIPTOR, data)


def _numbers(descriptor, data: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf.descriptor import FieldDescriptor

    wide = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            data[f.name] = [_numbers(f.message_type, v) for v in value] if isinstance(value, list) \
                else _numbers(f.message_type, value)
        elif f.type in wide:
            data[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def run(args: argparse.Namespace) -> int:
    from histosam.backend.serving.client import ImageSession, SegmentationClient
    from histosam.v1 import segmentation_pb2 as pb

    if not args.client_command:
        args._client_parser.print_help()
        return 2
    with SegmentationClient(args.server, token_file=args.token_file, timeout=args.timeout,
                            tls=args.tls, root_certificates=args.tls_ca) as client:
        if args.client_command == "info":
            out = message_json(client.info())
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
            if not args.json:
                print(click_summary(out))
                return 0
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def click_summary(out: dict[str, Any]) -> str:
    """One line for a click's answer (the polygons themselves: --json, --geojson-out)."""
    polygons = out["polygons"]
    vertices = sum(len(p["exterior"]) + sum(len(h) for h in p["holes"]) for p in polygons)
    holes = sum(len(p["holes"]) for p in polygons)
    spread = ", propagated" if out["propagated"] else ""
    again = ", session re-opened" if out["reopened"] else ""
    written = f"; wrote {', '.join(out['written'])}" if out.get("written") else ""
    return (f"{len(polygons)} polygon(s) ({vertices} vertices, {holes} hole(s)), {out['mask_pixels']} mask px, "
            f"predicted IoU {out['predicted_iou']:.3f}; {out['num_points']} point(s){spread}{again}; decode "
            f"{out['decode_seconds'] * 1e3:.0f} ms, round trip {out['round_trip_seconds'] * 1e3:.0f} ms; "
            f"session {out['session_id']}{written}")


def _click(client, session, args: argparse.Namespace) -> dict[str, Any]:
    from histosam.backend.core.atomic import write_bytes, write_text
    from histosam.backend.core.errors import NotFoundError
    from histosam.backend.core.geometry import annotation_feature, feature_collection

    points, box = args.points, args.box_values
    refine = None
    if args.refine_mask is not None:
        try:
            refine = args.refine_mask.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"cannot read {args.refine_mask}: {exc.strerror}") from None
    started = time.perf_counter()
    want_mask = args.mask_out is not None or args.overlay_out is not None
    result = client.click(session, points, box=box, want_mask=want_mask,
                          simplify_tolerance=args.simplify, min_area=args.min_area, mask_prompt_png=refine,
                          propagation=args.propagation)
    round_trip = time.perf_counter() - started  # what the user waits: decode + snapping/propagation + wire
    written = []
    if args.mask_out is not None:
        write_bytes(args.mask_out, result.mask_png)
        written.append(str(args.mask_out))
    if args.geojson_out is not None:
        features = [annotation_feature(result.polygons, measurements={"predicted IoU": result.predicted_iou})] \
            if result.polygons else []
        write_text(args.geojson_out, json.dumps(feature_collection(features)))
        written.append(str(args.geojson_out))
    if args.overlay_out is not None:
        _write_overlay(args, session, result, points)
        written.append(str(args.overlay_out))
    return {
        "written": written,
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


def _overlay_pixels(args: argparse.Namespace, session):
    """The opened image's RGB pixels, read here (--image, or a --slide this machine reads)."""
    import cv2

    from histosam.backend.core.errors import InvalidInputError

    if args.image is not None:
        bgr = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InvalidInputError(f"--overlay-out: cannot read {args.image} here")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    from histosam.backend.wsi.slides import open_slide

    x, y, _, _ = args.region
    with open_slide(Path(args.slide)) as slide:
        return slide.read_scaled(x, y, session.width, session.height, args.downsample)


def _write_overlay(args: argparse.Namespace, session, result, points) -> None:
    from histosam.backend.evaluation.overlay import draw_overlay, write_png

    rgb = _overlay_pixels(args, session)
    ox, oy, ds = session.frame
    pixels = [((px - ox) / ds, (py - oy) / ds, positive) for px, py, positive in points]
    write_png(args.overlay_out, draw_overlay(rgb, result.mask, pixels))
