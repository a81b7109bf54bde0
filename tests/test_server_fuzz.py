"""Hostile input, property-based: whatever a client sends, the server answers with a proper
status (never UNKNOWN or INTERNAL) and keeps answering valid requests.

Random bytes and broken images, NaN/inf/huge coordinates, thousands of points, empty lists,
giant strings, slide paths with ``..``; and the shapes that once broke it (issue 22): extreme
aspect ratios, huge finite floats, zigzag and self-intersecting rings, high-bit-depth PNGs.
One real server (tiny random SAM) with small limits, bounded ``max_examples`` so the module
stays fast.
"""

from __future__ import annotations

import math

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histosam.backend.serving.model_store import ModelStore
from histosam.backend.serving.server import SegmentationServer, ServerSettings
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
}
H, W = 96, 128
MAX_POINTS = 16
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, print_blob=True)


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def _image() -> np.ndarray:
    img = np.full((H, W, 3), 225, np.uint8)
    cv2.circle(img, (60, 50), 25, (120, 40, 150), -1)
    return img


IMAGE = _image()
VALID_ENCODINGS = [png(IMAGE), cv2.imencode(".jpg", IMAGE)[1].tobytes(), cv2.imencode(".tiff", IMAGE)[1].tobytes()]


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    (root / "fake.svs").write_bytes(b"not a slide at all")
    (root / "sub").mkdir()
    (root / "loop").symlink_to(root / "loop")  # a symlink loop
    models = ModelStore.load([tiny_bundle], threads=1)
    s = ServerSettings(port=0, threads=4, max_pixels=256 * 256, max_message_bytes=1 << 20, max_points=MAX_POINTS,
                       slide_roots=(root,))
    with SegmentationServer(s, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=VALID_ENCODINGS[0]), timeout=30).session_id
        stub.channel = channel
        yield stub, sid


def answer(call, request) -> grpc.StatusCode:
    """The status of one call; fails the test on UNKNOWN/INTERNAL or a multi-line message."""
    try:
        call(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in PROPER, (code, details[:500])
        assert "Traceback" not in details and "\n" not in details, details[:500]
        return code


def still_serving(stub, sid: str) -> None:
    reply = stub.Click(pb.ClickRequest(session_id=sid, points=[pb.Point(x=60, y=50, positive=True)]), timeout=30)
    assert reply.num_points == 1 and reply.width == W


# --------------------------------------------------------------------------- strategies

any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-308, -1e308, 1e308, 2.0**63, -(2.0**63), 5e-324, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-10, max_value=W + 10),
)
giant_text = st.one_of(st.text(max_size=64), st.integers(1, 200_000).map(lambda n: "x" * n),
                       st.integers(1, 2_000_000).map(lambda n: "é" * n))


@st.composite
def broken_images(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "prefixed", "empty-ish"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=4096))
    good = draw(st.sampled_from(VALID_ENCODINGS))
    if kind == "truncated":
        return good[: draw(st.integers(1, len(good) - 1))]
    if kind == "flipped":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "prefixed":  # a real magic number, then garbage
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF89a", b"BM"]))
        return magic + draw(st.binary(max_size=512))
    return draw(st.sampled_from([b"\x00", b"\x89PNG", b"\xff\xd8", b"II*\x00\x08\x00\x00\x00"]))


points = st.lists(st.builds(pb.Point, x=any_float, y=any_float, positive=st.booleans()), max_size=MAX_POINTS + 4)
boxes = st.one_of(st.none(), st.builds(pb.Box, x0=any_float, y0=any_float, x1=any_float, y1=any_float))
polygons = st.lists(st.builds(pb.Polygon, exterior=st.lists(any_float, max_size=12),
                              holes=st.lists(st.builds(pb.Ring, xy=st.lists(any_float, max_size=8)), max_size=2)),
                    max_size=3)


# --------------------------------------------------------------------------- properties


@FUZZ
@given(data=broken_images())
def test_broken_images_are_refused_properly(served, data):
    stub, sid = served
    answer(stub.OpenImage, pb.OpenImageRequest(encoded_image=data))
    still_serving(stub, sid)


@FUZZ
@given(frame=st.builds(pb.Frame, origin_x=any_float, origin_y=any_float, downsample=any_float),
       model=st.one_of(st.just(""), st.just("default"), giant_text))
def test_frames_and_model_names(served, frame, model):
    stub, sid = served
    code = answer(stub.OpenImage, pb.OpenImageRequest(encoded_image=VALID_ENCODINGS[0], frame=frame, model=model))
    if code == grpc.StatusCode.OK:
        assert model in ("", "default", "tiny_sam")
    still_serving(stub, sid)


@FUZZ
@given(pts=points, box=boxes, tolerance=any_float, min_area=st.one_of(st.none(), any_float),
       polys=polygons, mask_png=st.one_of(st.just(b""), broken_images()), want_mask=st.booleans())
def test_clicks_with_extreme_prompts(served, pts, box, tolerance, min_area, polys, mask_png, want_mask):
    stub, sid = served
    request = pb.ClickRequest(session_id=sid, points=pts, simplify_tolerance=tolerance, want_mask_png=want_mask,
                              mask_prompt_polygons=polys, mask_prompt_png=mask_png)
    if box is not None:
        request.box.CopyFrom(box)
    if min_area is not None:
        request.min_area = min_area
    code = answer(stub.Click, request)
    if len(pts) > MAX_POINTS:  # refused: too many points (or an earlier field was already wrong)
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    still_serving(stub, sid)


@settings(FUZZ, max_examples=30)
@given(session_id=giant_text, n=st.integers(0, 5000))
def test_unknown_sessions_giant_ids_and_thousands_of_points(served, session_id, n):
    stub, sid = served
    many = [pb.Point(x=float(i % W), y=float(i % H), positive=bool(i % 2)) for i in range(n)]
    code = answer(stub.Click, pb.ClickRequest(session_id=session_id, points=many))
    assert code != grpc.StatusCode.OK  # no session has that id
    code = answer(stub.Click, pb.ClickRequest(session_id=sid, points=many))
    assert code == (grpc.StatusCode.RESOURCE_EXHAUSTED if n > MAX_POINTS else
                    grpc.StatusCode.OK if n else grpc.StatusCode.INVALID_ARGUMENT)
    closed = answer(stub.CloseImage, pb.CloseImageRequest(session_id=session_id))
    assert closed == (grpc.StatusCode.RESOURCE_EXHAUSTED if len(session_id.encode()) > 1 << 20 else grpc.StatusCode.OK)
    still_serving(stub, sid)


slide_paths = st.one_of(
    giant_text,
    st.lists(st.sampled_from(["..", ".", "sub", "fake.svs", "", "/", "etc", "passwd", "\x00", "~", "%2e%2e"]),
             max_size=40).map("/".join),
    st.sampled_from(["../../../etc/passwd", "/etc/passwd", "sub/../../fake.svs", "fake.svs", "/", "sub",
                     "fake.svs\x00.png", "\\..\\..\\windows", "//server/share/x.svs", "loop", "loop/x.svs",
                     "x" * 300, "sub/" * 2000 + "fake.svs", "/" + "a" * 5000]),
)


@FUZZ
@given(path=slide_paths, x=any_float, y=any_float, w=any_float, h=any_float, downsample=any_float)
def test_slide_regions_with_hostile_paths_and_numbers(served, path, x, y, w, h, downsample):
    stub, sid = served
    region = pb.SlideRegion(slide_path=path, x=x, y=y, width=w, height=h, downsample=downsample)
    code = answer(stub.OpenImage, pb.OpenImageRequest(slide_region=region))
    assert code != grpc.StatusCode.OK  # the only file under the root is not a slide
    still_serving(stub, sid)


def test_bytes_that_are_no_protobuf_message(served):
    """Undecodable request bytes, straight onto the wire: a proper status, and the server lives."""
    stub, sid = served
    rng = np.random.default_rng(0)
    seen = set()
    for method in ("OpenImage", "Click", "CloseImage", "GetServerInfo"):
        raw = stub.channel.unary_unary(f"/histosam.v1.Segmentation/{method}")
        for _ in range(10):
            payload = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
            try:
                raw(payload, timeout=10)
                seen.add(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                seen.add(exc.code())
                assert exc.code() in PROPER, (method, exc.code(), exc.details())
    assert seen - {grpc.StatusCode.OK}
    still_serving(stub, sid)


def test_requests_that_once_crashed_the_server(served):
    """Regressions found while fuzzing: each used to end in INTERNAL."""
    stub, sid = served
    huge = pb.Polygon(exterior=[-1e308, -1e308, 1e308, -1e308, 1e308, 1e308])
    code = answer(stub.Click, pb.ClickRequest(session_id=sid, points=[pb.Point(x=5, y=5, positive=True)],
                                              mask_prompt_polygons=[huge]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for region in (pb.SlideRegion(slide_path="fake.svs", width=1e308, height=1, downsample=5e-324),
                   pb.SlideRegion(slide_path="fake.svs", width=1e308, height=1e308)):
        assert answer(stub.OpenImage, pb.OpenImageRequest(slide_region=region)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for path in ("x" * 300, "sub/" * 2000 + "fake.svs", "loop/x.svs"):
        region = pb.SlideRegion(slide_path=path, width=10, height=10)
        assert answer(stub.OpenImage, pb.OpenImageRequest(slide_region=region)) == grpc.StatusCode.INVALID_ARGUMENT
    raw = stub.channel.unary_unary("/histosam.v1.Segmentation/Click")
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in info.value.details()
    still_serving(stub, sid)


# --------------------------------------------------------------------------- shapes that once broke it

huge_finite = st.one_of(
    st.floats(min_value=1e15, max_value=1.7976931348623157e308),
    st.floats(min_value=-1.7976931348623157e308, max_value=-1e15),
    st.sampled_from([1e29, 1e30, 1e200, 1.7976931348623157e308, -1.7976931348623157e308, 2.0**1023]),
)


@st.composite
def high_depth_png(draw, shape: tuple[int, int] | None = None) -> bytes:
    """A 16-bit (or 8-bit) grey, RGB or RGBA PNG, random or blocky content."""
    h, w = shape if shape is not None else (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    channels = draw(st.sampled_from([1, 3, 4]))
    dtype = draw(st.sampled_from([np.uint16, np.uint16, np.uint8]))
    top = int(np.iinfo(dtype).max)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "blocks", "low-bits", "alpha-only"]))
    size = (h, w, channels) if channels > 1 else (h, w)
    if kind == "random":
        arr = rng.integers(0, top + 1, size, dtype=np.int64).astype(dtype)
    elif kind == "low-bits":  # 16-bit values under 256: zero once cut to 8 bits
        arr = rng.integers(0, 256, size, dtype=np.int64).astype(dtype)
    else:
        arr = np.zeros(size, dtype)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        arr[y:, x:] = top
        if kind == "alpha-only" and channels == 4:
            arr[..., :3] = 0
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


@st.composite
def extreme_aspect(draw) -> tuple[int, int]:
    thin = draw(st.integers(1, 4))
    long = draw(st.integers(300, 16000 // thin))
    return (thin, long) if draw(st.booleans()) else (long, thin)


@st.composite
def hostile_ring(draw) -> pb.Polygon:
    """Zigzags across (and beyond) the image, self-intersecting stars and bowties, repeated
    and collinear vertices."""
    kind = draw(st.sampled_from(["zigzag", "star", "bowtie", "repeated", "collinear"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "zigzag":
        n = draw(st.integers(3, 3000))
        reach = draw(st.sampled_from([1.0, 10.0, 1e6, 1e9]))
        xs = np.linspace(-reach if draw(st.booleans()) else 0, W + reach, n)
        ys = np.where(np.arange(n) % 2, -reach, H + reach)
        if draw(st.booleans()):
            xs, ys = ys * (W / H), xs * (H / W)  # vertical teeth
        xy = np.stack([xs, ys], 1)
    elif kind == "star":
        n = draw(st.integers(3, 400))
        xy = rng.uniform((-20, -20), (W + 20, H + 20), (n, 2))  # random order: edges cross each other
    elif kind == "bowtie":
        xy = np.array([[0, 0], [W, H], [W, 0], [0, H]], np.float64) + rng.uniform(-5, 5, (4, 2))
    elif kind == "repeated":
        xy = np.repeat(rng.uniform(0, (W, H), (draw(st.integers(1, 5)), 2)), draw(st.integers(2, 50)), axis=0)
    else:
        t = np.linspace(0, 1, draw(st.integers(3, 100)))
        xy = np.stack([t * W, t * H], 1)
    return pb.Polygon(exterior=xy.ravel().tolist())


@settings(FUZZ, max_examples=25)
@given(shape=extreme_aspect(), data=st.data())
def test_extreme_aspect_ratios_and_bit_depths_open_and_click(served, shape, data):
    stub, sid = served
    encoded = data.draw(high_depth_png(shape))
    request = pb.OpenImageRequest(encoded_image=encoded)
    code = answer(stub.OpenImage, request)
    if min(shape) < 2:  # under 2 pixels a side is refused by name
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert code == grpc.StatusCode.OK  # within max_pixels: every such image opens
    opened = stub.OpenImage(request, timeout=30)
    h, w = shape
    point = pb.Point(x=data.draw(st.floats(0, w)), y=data.draw(st.floats(0, h)), positive=True)
    click = pb.ClickRequest(session_id=opened.session_id, points=[point], want_mask_png=True,
                            propagation=data.draw(st.sampled_from([pb.PROPAGATION_OFF, pb.PROPAGATION_ON])))
    assert answer(stub.Click, click) == grpc.StatusCode.OK
    still_serving(stub, sid)


@FUZZ
@given(frame=st.builds(pb.Frame, origin_x=st.one_of(huge_finite, any_float), origin_y=st.one_of(huge_finite, any_float),
                       downsample=st.one_of(huge_finite, any_float)),
       tolerance=st.one_of(huge_finite, any_float), min_area=st.one_of(huge_finite, any_float),
       box=st.builds(pb.Box, x0=huge_finite, y0=huge_finite, x1=huge_finite, y1=huge_finite))
def test_huge_finite_numbers(served, frame, tolerance, min_area, box):
    stub, sid = served
    code = answer(stub.OpenImage, pb.OpenImageRequest(encoded_image=VALID_ENCODINGS[0], frame=frame))
    target = sid
    if code == grpc.StatusCode.OK:
        target = stub.OpenImage(pb.OpenImageRequest(encoded_image=VALID_ENCODINGS[0], frame=frame), timeout=30).session_id
        f = frame if frame.downsample else pb.Frame(origin_x=frame.origin_x, origin_y=frame.origin_y, downsample=1.0)
        x, y = f.origin_x + 60 * f.downsample, f.origin_y + 50 * f.downsample
        reply = None
        try:
            reply = stub.Click(pb.ClickRequest(session_id=target, points=[pb.Point(x=x, y=y, positive=True)]), timeout=30)
        except grpc.RpcError as exc:  # a point that rounds outside the image in a huge frame
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        if reply is not None:
            coords = [c for p in reply.polygons for c in p.exterior]
            assert all(math.isfinite(c) for c in coords)
    request = pb.ClickRequest(session_id=target, points=[pb.Point(x=60, y=50, positive=True)],
                              simplify_tolerance=tolerance, min_area=min_area)
    answer(stub.Click, request)
    request = pb.ClickRequest(session_id=sid, simplify_tolerance=abs(tolerance))
    request.box.CopyFrom(box)
    answer(stub.Click, request)
    still_serving(stub, sid)


@FUZZ
@given(rings=st.lists(hostile_ring(), min_size=1, max_size=3), with_point=st.booleans())
def test_zigzag_and_self_intersecting_mask_prompts(served, rings, with_point):
    stub, sid = served
    points = [pb.Point(x=60, y=50, positive=True)] if with_point else []
    request = pb.ClickRequest(session_id=sid, points=points, mask_prompt_polygons=rings)
    if not with_point:
        request.box.CopyFrom(pb.Box(x0=10, y0=10, x1=100, y1=80))
    answer(stub.Click, request)
    still_serving(stub, sid)


@FUZZ
@given(data=st.data(), right_size=st.booleans())
def test_high_bit_depth_mask_prompts(served, data, right_size):
    stub, sid = served
    mask = data.draw(high_depth_png((H, W) if right_size else None))
    code = answer(stub.Click, pb.ClickRequest(session_id=sid, points=[pb.Point(x=60, y=50, positive=True)],
                                              mask_prompt_png=mask))
    if right_size:
        assert code == grpc.StatusCode.OK
    still_serving(stub, sid)
