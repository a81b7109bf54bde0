"""The gRPC server, end to end: a real server on a free loopback port, real onnxruntime.

One server per module (tiny random SAM: fast) serves most tests; tests that need other
settings (token, short idle time, restarts) start their own servers on the same loaded models.
The real default model (LiteMedSAM) runs in the ``slow`` tests at the end.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histosam.backend.bundles.catalog import cached_bundle_path
from histosam.backend.core.errors import HistosamError, InvalidInputError, NotFoundError
from histosam.backend.core.geometry import PolygonXY, mask_to_polygons, polygons_to_mask
from histosam.backend.evaluation.metrics import iou
from histosam.backend.postprocess.propagation import (
    ImageGraph,
    PropagationSettings,
    auto_propagates,
    click_ignored,
    model_confidence,
)
from histosam.backend.serving.model_store import ModelStore, default_bundle_path
from histosam.backend.serving.server import (
    DEFAULT_MIN_AREA,
    SERVICE_NAME,
    SegmentationServer,
    SegmentationServicer,
    ServerSettings,
)
from histosam.backend.serving.sessions import Embedding, EmbeddingCache, Frame, SessionStore
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTOSAM_DATA") or REPO.parent / "shared" / "data")
CMU = "cmu-1-small-region.svs"
MAX_PIXELS = 600 * 600
MAX_MESSAGE = 1 << 20
MAX_POINTS = 8
H, W = 300, 400


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def synthetic_image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 230, np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(10, 50)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return img


def decode_png_mask(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) > 0


def polygons_of(reply: pb.ClickResponse) -> list[PolygonXY]:
    return [
        PolygonXY(np.asarray(p.exterior).reshape(-1, 2), [np.asarray(r.xy).reshape(-1, 2) for r in p.holes])
        for p in reply.polygons
    ]


def status_of(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def pts(*xy_pos) -> list[pb.Point]:
    return [pb.Point(x=x, y=y, positive=p) for x, y, p in xy_pos]


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slide_root")
    outside = root.parent / "outside.svs"
    outside.write_bytes(b"not a slide")
    (root / "escape.svs").symlink_to(outside)
    (root / "not_a_slide.svs").write_bytes(b"not a slide either")
    return root


@pytest.fixture(scope="module")
def server(models, slide_root):
    roots = (slide_root,) + ((DATA / "slides",) if (DATA / "slides").is_dir() else ())
    # propagation off: these tests compare served masks with the model's own (test_served_default.py
    # checks what a server started without options does).
    settings = ServerSettings(port=0, threads=4, ort_threads=1, slide_roots=roots, max_pixels=MAX_PIXELS, propagation="off",
                              max_message_bytes=MAX_MESSAGE, max_points=MAX_POINTS)
    srv = SegmentationServer(settings, models=models)
    srv.start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.SegmentationStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def image_png() -> bytes:
    return png(synthetic_image())


def open_image(stub, data: bytes, frame: pb.Frame | None = None, model: str = "") -> pb.OpenImageResponse:
    return stub.OpenImage(pb.OpenImageRequest(encoded_image=data, frame=frame, model=model), timeout=60)


# --------------------------------------------------------------------------- basics


def test_info_reports_models_providers_and_limits(stub, models):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert [m.name for m in info.models] == ["tiny_sam"]
    assert info.models[0].is_default and info.default_model == "tiny_sam"
    assert info.models[0].sha256 == models.default.sha256
    assert info.providers[-1] == "CPUExecutionProvider"
    assert info.limits.max_pixels == MAX_PIXELS and info.limits.max_points == MAX_POINTS
    assert info.limits.max_message_bytes == MAX_MESSAGE
    assert info.limits.max_concurrent_rpcs > 0 and info.limits.max_concurrent_encodes > 0
    assert info.version and not info.token_required and info.slides_enabled


def test_open_defaults_frame_and_reopen_is_a_cache_hit(stub, server):
    data = png(synthetic_image(seed=11))
    first = open_image(stub, data)
    assert (first.width, first.height) == (W, H)
    assert not first.cache_hit and first.encode_seconds > 0
    assert (first.frame.origin_x, first.frame.origin_y, first.frame.downsample) == (0, 0, 1)
    misses = server.servicer.cache.misses
    frame = pb.Frame(origin_x=1000, origin_y=2000, downsample=2.5)
    second = open_image(stub, data, frame)
    assert second.cache_hit and second.encode_seconds == 0
    assert server.servicer.cache.misses == misses  # no encoder ran
    assert second.session_id != first.session_id
    assert second.frame == frame  # echoed back


def test_jpeg_tiff_grey_and_rgba_images_open(stub):
    import io

    import tifffile

    rgb = synthetic_image(120, 160, seed=3)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, rgb, compression="zlib")
    grey = cv2.imencode(".png", rgb[..., 0])[1].tobytes()
    rgba = cv2.imencode(".png", np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 128, np.uint8)]))[1].tobytes()
    jpeg = cv2.imencode(".jpg", rgb[..., ::-1])[1].tobytes()
    for data in (jpeg, tiff.getvalue(), grey, rgba):
        opened = open_image(stub, data)
        assert (opened.width, opened.height) == (160, 120)
    gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"  # a format PIL knows but the server refuses
    code, details = status_of(stub.OpenImage, pb.OpenImageRequest(encoded_image=gif))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "PNG, JPEG or TIFF" in details


def test_concurrent_opens_of_one_image_encode_once(stub, server):
    data = png(synthetic_image(seed=12))
    misses = server.servicer.cache.misses
    replies: list[pb.OpenImageResponse] = []

    def go():
        replies.append(open_image(stub, data))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4
    assert server.servicer.cache.misses == misses + 1
    assert sum(not r.cache_hit for r in replies) == 1


def test_polygons_in_client_coordinates_match_the_mask_png(stub, image_png):
    frame = pb.Frame(origin_x=1000.0, origin_y=2000.0, downsample=2.5)
    session = open_image(stub, image_png, frame)
    click = (1000 + 200 * 2.5, 2000 + 150 * 2.5, True)
    reply = stub.Click(pb.ClickRequest(session_id=session.session_id, points=pts(click), want_mask_png=True,
                                       min_area=0), timeout=30)
    mask = decode_png_mask(reply.mask_png)
    assert mask.shape == (H, W) and (reply.width, reply.height) == (W, H)
    assert reply.mask_pixels == mask.sum() > 0 and reply.num_points == 1
    polygons = polygons_of(reply)
    assert polygons
    for poly in polygons:  # every vertex inside the image's client-coordinate extent
        for ring in [poly.exterior, *poly.holes]:
            assert ring[:, 0].min() >= 1000 and ring[:, 0].max() <= 1000 + W * 2.5
            assert ring[:, 1].min() >= 2000 and ring[:, 1].max() <= 2000 + H * 2.5
    raster = polygons_to_mask(polygons, (H, W), origin=(1000.0, 2000.0), downsample=2.5)
    assert iou(raster, mask) > 0.999
    # Specks below the default minimum area (16 image pixels) are dropped.
    default = stub.Click(pb.ClickRequest(session_id=session.session_id, points=pts(click)), timeout=30)
    assert len(default.polygons) < len(polygons)
    assert all(p.area / 2.5**2 >= DEFAULT_MIN_AREA for p in polygons_of(default))


def test_undo_retry_and_changed_history(stub, image_png):
    sid = open_image(stub, image_png).session_id
    p1, p2, p3 = (100.0, 100.0, True), (250.0, 120.0, False), (300.0, 200.0, True)

    def click(*points):
        return stub.Click(pb.ClickRequest(session_id=sid, points=pts(*points), min_area=0), timeout=30)

    r1 = click(p1)
    r2 = click(p1, p2)
    r3 = click(p1, p2, p3)
    assert (r1.decoded_steps, r2.decoded_steps, r3.decoded_steps) == (1, 1, 1)
    undo = click(p1, p2)  # a shorter list: answered from the history
    assert undo.decoded_steps == 0 and undo.decode_seconds == 0
    assert undo.polygons == r2.polygons and undo.predicted_iou == r2.predicted_iou
    retry = click(p1, p2, p3)
    assert retry.decoded_steps == 0 and retry.polygons == r3.polygons
    changed = click((101.0, 100.0, True), p2, p3)  # an earlier point moved: the chain restarts
    assert changed.decoded_steps == 3
    # A new session on the same image replays the missing steps to the very same answer.
    fresh = open_image(stub, image_png).session_id
    replay = stub.Click(pb.ClickRequest(session_id=fresh, points=pts(p1, p2, p3), min_area=0), timeout=30)
    assert replay.decoded_steps == 3
    assert replay.polygons == r3.polygons and replay.predicted_iou == r3.predicted_iou


def test_box_alone_box_with_points_and_clipping(stub, image_png):
    sid = open_image(stub, image_png).session_id
    box = pb.Box(x0=300, y0=250, x1=50, y1=40)  # corners in any order
    alone = stub.Click(pb.ClickRequest(session_id=sid, box=box, want_mask_png=True, min_area=0), timeout=30)
    assert alone.num_points == 0 and alone.decoded_steps == 1
    with_point = stub.Click(pb.ClickRequest(session_id=sid, box=box, points=pts((150, 150, True))), timeout=30)
    assert with_point.num_points == 1 and with_point.decoded_steps == 1  # box-only step from history
    clipped = stub.Click(pb.ClickRequest(session_id=sid, box=pb.Box(x0=-50, y0=-50, x1=300, y1=250)), timeout=30)
    assert clipped.decoded_steps == 1
    code, details = status_of(stub.Click, pb.ClickRequest(session_id=sid, box=pb.Box(x0=500, y0=0, x1=600, y1=50)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not overlap" in details


def test_refine_with_mask_prompt_png_or_polygons(stub, image_png):
    frame = pb.Frame(origin_x=50.0, origin_y=80.0, downsample=2.0)
    sid = open_image(stub, image_png, frame).session_id
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, (200, 150), 60, 255, -1)
    point = pts((50 + 200 * 2.0, 80 + 150 * 2.0, True))
    plain = stub.Click(pb.ClickRequest(session_id=sid, points=point, min_area=0), timeout=30)
    by_png = stub.Click(pb.ClickRequest(session_id=sid, points=point, min_area=0,
                                        mask_prompt_png=cv2.imencode(".png", mask)[1].tobytes()), timeout=30)
    polys = mask_to_polygons(mask > 0, origin=(50.0, 80.0), downsample=2.0)
    by_polys = stub.Click(pb.ClickRequest(
        session_id=sid, points=point, min_area=0,
        mask_prompt_polygons=[pb.Polygon(exterior=p.exterior.ravel().tolist()) for p in polys]), timeout=30)
    assert by_png.decoded_steps == 1 and by_polys.decoded_steps == 1
    # Same shape given two ways -> the same prompt logits -> the same answer; and it is used.
    assert by_png.polygons == by_polys.polygons and by_png.predicted_iou == by_polys.predicted_iou
    assert (by_png.polygons, by_png.predicted_iou) != (plain.polygons, plain.predicted_iou)
    small = cv2.imencode(".png", mask[:100, :100])[1].tobytes()
    code, details = status_of(stub.Click, pb.ClickRequest(session_id=sid, points=point, mask_prompt_png=small))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "100x100" in details
    both = pb.ClickRequest(session_id=sid, points=point, mask_prompt_png=cv2.imencode(".png", mask)[1].tobytes(),
                           mask_prompt_polygons=[pb.Polygon(exterior=[0, 0, 10, 0, 10, 10])])
    assert status_of(stub.Click, both)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_close_frees_the_session(stub, image_png):
    sid = open_image(stub, image_png).session_id
    assert stub.CloseImage(pb.CloseImageRequest(session_id=sid), timeout=10).closed
    code, details = status_of(stub.Click, pb.ClickRequest(session_id=sid, points=pts((10, 10, True))))
    assert code == grpc.StatusCode.NOT_FOUND and "re-open" in details
    assert not stub.CloseImage(pb.CloseImageRequest(session_id=sid), timeout=10).closed


def test_concurrent_clicks_match_sequential_answers(stub, image_png):
    rng = np.random.default_rng(5)
    sequences = [[(float(x), float(y), True) for x, y in zip(rng.uniform(0, W, 3), rng.uniform(0, H, 3),
                                                            strict=True)] for _ in range(3)]
    expected = []
    for seq in sequences:
        sid = open_image(stub, image_png).session_id
        expected.append([stub.Click(pb.ClickRequest(session_id=sid, points=pts(*seq[:k])), timeout=30).polygons
                         for k in range(1, 4)])
    got: dict[int, list] = {}

    def worker(i: int) -> None:
        sid = open_image(stub, image_png).session_id
        got[i] = [stub.Click(pb.ClickRequest(session_id=sid, points=pts(*sequences[i][:k])), timeout=30).polygons
                  for k in range(1, 4)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(3)] == expected


# --------------------------------------------------------------------------- errors


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (a decompression-bomb shape)."""
    raw = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()
    ihdr_at = raw.index(b"IHDR")
    body = struct.pack(">II", width, height) + raw[ihdr_at + 12: ihdr_at + 17]
    chunk = b"IHDR" + body
    return raw[:ihdr_at] + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[ihdr_at + 21:]


def test_error_statuses_and_the_server_keeps_serving(stub, image_png, slide_root):
    sid = open_image(stub, image_png).session_id
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    TOO_BIG, DENIED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED
    region = pb.SlideRegion
    cases = [
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=b"definitely not an image"), INVALID, "cannot be decoded"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=image_png[: len(image_png) // 2]), INVALID, "corrupt"),
        (stub.OpenImage, pb.OpenImageRequest(), INVALID, "needs a source"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=image_png, frame=pb.Frame(downsample=-1)), INVALID, "positive"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=image_png, model="nope"), NOT_FOUND, "unknown model"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=png_header_claiming(5000, 5000)), TOO_BIG, "exceeds"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=png_header_claiming(100_000, 100_000)), TOO_BIG, "large"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=png(synthetic_image(700, 700))), TOO_BIG, "600"),
        (stub.OpenImage, pb.OpenImageRequest(encoded_image=b"\0" * (MAX_MESSAGE + 10)), TOO_BIG, ""),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path=str(slide_root / "escape.svs"),
                                                                 width=100, height=100)), DENIED, "outside"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path=f"{slide_root}/../outside.svs",
                                                                 width=100, height=100)), DENIED, "outside"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="../outside.svs",
                                                                 width=100, height=100)), DENIED, "outside"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="/etc/hostname",
                                                                 width=100, height=100)), DENIED, "outside"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="missing.svs",
                                                                 width=100, height=100)), NOT_FOUND, "does not exist"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="not_a_slide.svs",
                                                                 width=100, height=100)), INVALID, "cannot read"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="not_a_slide.svs", width=math.nan,
                                                                 height=100)), INVALID, "finite"),
        (stub.OpenImage, pb.OpenImageRequest(slide_region=region(slide_path="not_a_slide.svs",
                                                                 width=10_000, height=10_000)), TOO_BIG, "exceeds"),
        (stub.Click, pb.ClickRequest(session_id="no-such-session", points=pts((1, 1, True))), NOT_FOUND, "re-open"),
        (stub.Click, pb.ClickRequest(session_id=sid), INVALID, "at least one point or a box"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((math.nan, 5, True))), INVALID, "non-finite"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((5, math.inf, True))), INVALID, "non-finite"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((W + 5, 5, True))), INVALID, "outside the image"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((-1, 5, True))), INVALID, "outside the image"),
        (stub.Click, pb.ClickRequest(session_id=sid, box=pb.Box(x0=math.nan, x1=5, y1=5)), INVALID, "non-finite"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts(*[(5, 5, True)] * (MAX_POINTS + 1))), TOO_BIG, "limit"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((5, 5, True)), min_area=-1), INVALID, "min_area"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((5, 5, True)), simplify_tolerance=math.nan),
         INVALID, "simplify_tolerance"),
        (stub.Click, pb.ClickRequest(session_id=sid, points=pts((5, 5, True)),
                                     mask_prompt_polygons=[pb.Polygon(exterior=[0, 0, 1])]), INVALID, "even number"),
    ]
    for call, request, expected_code, fragment in cases:
        code, details = status_of(call, request)
        assert code == expected_code, (request, details)
        assert fragment in details, (fragment, details)
        assert "\n" not in details and "Traceback" not in details
    # Still serving, and the session survived every bad click.
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).models
    assert stub.Click(pb.ClickRequest(session_id=sid, points=pts((5, 5, True))), timeout=30).num_points == 1


def test_idle_sessions_expire(models, image_png):
    settings = ServerSettings(port=0, threads=2, session_idle_seconds=0.3)
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        sid = open_image(stub, image_png).session_id
        assert stub.Click(pb.ClickRequest(session_id=sid, points=pts((5, 5, True))), timeout=30).num_points == 1
        deadline = time.monotonic() + 10
        while stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).open_sessions and time.monotonic() < deadline:
            time.sleep(0.1)  # the sweeper drops it without any request touching it
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).open_sessions == 0
        code, details = status_of(stub.Click, pb.ClickRequest(session_id=sid, points=pts((5, 5, True))))
        assert code == grpc.StatusCode.NOT_FOUND and "re-open" in details


def test_token_health_and_reflection(models, tmp_path):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    settings = ServerSettings(port=0, threads=4, token_file=token_file)
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        request = pb.GetServerInfoRequest()
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),),
                         (("x-histosam-token", "s3cret-toke"),)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.GetServerInfo(request, timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret-token"),)
        assert stub.GetServerInfo(request, timeout=10, metadata=good).token_required
        assert stub.GetServerInfo(request, timeout=10, metadata=(("x-histosam-token", "s3cret-token"),)).models
        # Slides are off on this server: PERMISSION_DENIED says how to turn them on.
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenImage(pb.OpenImageRequest(slide_region=pb.SlideRegion(slide_path="a.svs", width=1, height=1)),
                           timeout=10, metadata=good)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--slide-root" in info.value.details()

        # Health needs no token.
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection (with the token, like any other call): grpcurl-style listing and lookup.
        authed = grpc.intercept_channel(channel, _MetadataInterceptor(good))
        db = ProtoReflectionDescriptorDatabase(authed)
        services = set(db.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        service = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        assert {m.name for m in service.methods} == {"GetServerInfo", "OpenImage", "Click", "CloseImage"}
        with pytest.raises(grpc.RpcError) as info:  # and without the token: refused
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Stopped: health is no longer reachable.
    with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata):
        self.metadata = tuple(metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_Details(client_call_details, self.metadata), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(_Details(client_call_details, self.metadata), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = tuple(details.metadata or ()) + tuple(metadata)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def test_tls_server_and_port_conflicts(models, tmp_path):
    openssl = subprocess.run(["which", "openssl"], capture_output=True, text=True).stdout.strip()
    if not openssl:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    settings = ServerSettings(port=0, threads=2, tls_cert=cert, tls_key=key)
    with SegmentationServer(settings, models=models) as srv:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(srv.address, creds) as channel:
            info = pb_grpc.SegmentationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.default_model == "tiny_sam"
        with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.SegmentationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=3)
        # The port is taken: a second server on it fails with one clear error.
        with pytest.raises(HistosamError, match="cannot listen"):
            SegmentationServer(ServerSettings(port=srv.port, threads=1), models=models).start()


def test_clicks_spread_through_propagation_by_default_or_per_click(models, server, image_png, tmp_path):
    """The served mask is the decoder's answer refined by the click-seeded random walker.

    The server's default decides unless the click chooses; either way the history keeps the
    model's own logits, so switching propagation never re-decodes a step.
    """
    img = synthetic_image()
    points = np.array([[100.0, 100.0], [250.0, 120.0]])
    labels = np.array([1, 0])
    model = models.default
    features = model.encoder(img)
    first, _ = model.decoder(features, (H, W), points[:1], labels[:1], None, None)
    second, _ = model.decoder(features, (H, W), points, labels, None, first)
    graph = ImageGraph.from_image(img, PropagationSettings.load())
    expected = {True: graph.refine(second, model.transform, points, labels),
                False: model.transform.logits_to_original(second, (H, W)) > 0,
                "correction": graph.refine(second, model.transform, points, labels, spread="correction")}
    assert not np.array_equal(expected[True], expected[False])  # the walker did change something
    always_unsure = tmp_path / "unsure.yaml"
    always_unsure.write_text("auto_confidence: 1.0\n")  # every answer counts as unsure: auto = on
    never_unsure = tmp_path / "sure.yaml"
    never_unsure.write_text("auto_confidence: 1.0e-9\nauto_ignored_clicks: 0\nauto_when_sure: own\n")  # auto = off
    spreading = SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation=True), models=models)
    auto = SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation="auto",
                                             propagation_config=always_unsure), models=models)
    sure = SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation="auto",
                                             propagation_config=never_unsure), models=models)
    for srv in (spreading, auto, sure):
        srv.start()
    choices = {None: pb.PROPAGATION_SERVER_DEFAULT, True: pb.PROPAGATION_ON, False: pb.PROPAGATION_OFF}
    defaults = {True: pb.PROPAGATION_ON, False: pb.PROPAGATION_OFF}
    try:
        for srv, default in ((spreading, True), (server, False)):  # the module's server has the default: off
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SegmentationStub(channel)
                assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).propagation_default == defaults[default]
                sid = open_image(stub, image_png).session_id
                for k, choice in enumerate((None, not default, default, None)):
                    request = pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True), (250.0, 120.0, False)),
                                              want_mask_png=True, min_area=0, propagation=choices[choice])
                    reply = stub.Click(request, timeout=30)
                    on = default if choice is None else choice
                    assert reply.propagated is on
                    assert iou(decode_png_mask(reply.mask_png), expected[on]) > 0.999, (default, choice)
                    assert reply.decoded_steps == (2 if k == 0 else 0)  # switching never re-decodes
                box_only = stub.Click(pb.ClickRequest(session_id=sid, box=pb.Box(x0=60, y0=60, x1=160, y1=160),
                                                      propagation=pb.PROPAGATION_ON), timeout=30)
                assert not box_only.propagated  # no clicks to spread: the model's answer
                with pytest.raises(grpc.RpcError) as err:
                    stub.Click(pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True)), propagation=7),
                               timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "propagation 7 is not one of" in err.value.details()
        # auto: the model's confidence in its answer to the first point (0.05 shipped), or the
        # second (negative) click ignored by the model's answer to it, spread the clicks; else
        # (shipped) only the clicks' corrections spread, or the model's own mask (auto_when_sure: own)
        shipped = PropagationSettings.load()
        unsure = auto_propagates(model_confidence(first, model.transform, (H, W), 4.0),
                                 int(click_ignored(second, model.transform, (H, W), points[1], 0)), shipped)
        assert shipped.auto_when_sure == "correction"
        for srv, request_choice, on, answer in ((server, pb.PROPAGATION_AUTO, True, True if unsure else "correction"),
                                                (auto, pb.PROPAGATION_SERVER_DEFAULT, True, True),
                                                (sure, pb.PROPAGATION_AUTO, False, False)):
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SegmentationStub(channel)
                sid = open_image(stub, image_png).session_id
                request = pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True), (250.0, 120.0, False)),
                                          want_mask_png=True, min_area=0, propagation=request_choice)
                reply = stub.Click(request, timeout=30)
                assert reply.propagated is on and reply.decoded_steps == 2  # the first step came from the history
                assert iou(decode_png_mask(reply.mask_png), expected[answer]) > 0.999
        with grpc.insecure_channel(auto.address) as channel:
            info = pb_grpc.SegmentationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.propagation_default == pb.PROPAGATION_AUTO
    finally:
        for srv in (spreading, auto, sure):
            srv.stop(0)
    custom = tmp_path / "p.yaml"
    custom.write_text("gamma: 0.5\n")
    assert SegmentationServicer(ServerSettings(propagation_config=custom), models, False).propagation.gamma == 0.5
    with pytest.raises(InvalidInputError, match="propagation must be one of"):
        ServerSettings.from_mapping({"propagation": "yes"})
    with pytest.raises(NotFoundError, match="propagation config"):
        SegmentationServicer(ServerSettings(propagation_config=tmp_path / "none.yaml"), models, False)


def test_auto_switches_on_when_the_model_ignores_a_correction_click(models, image_png, tmp_path):
    """Server "auto" (issue 18): every click's ``propagated`` is the rule replayed on the same
    decoder's answers: the first step's confidence, or a correction click the answer to it
    contradicted. Once on, it stays on; an undo to before the ignored click turns it off."""
    img = synthetic_image()
    model = models.default
    features = model.encoder(img)
    clicks = [(100.0, 100.0, 1), (250.0, 120.0, 0), (60.0, 200.0, 1), (300.0, 60.0, 0), (150.0, 150.0, 1)]
    points = np.array([c[:2] for c in clicks])
    labels = np.array([c[2] for c in clicks])
    # The tiny random model is unsure of every first answer: with the confidence test off, the
    # ignored clicks alone decide here.
    config = tmp_path / "ignored_only.yaml"
    config.write_text("auto_confidence: 1.0e-9\nauto_when_sure: own\n")  # propagated = the rule's verdict
    shipped = PropagationSettings.load(config)
    answers, previous = [], None
    for k in range(1, len(clicks) + 1):
        previous, _ = model.decoder(features, (H, W), points[:k], labels[:k], None, previous)
        answers.append(previous)
    confidence = model_confidence(answers[0], model.transform, (H, W), shipped.temperature)
    ignored = np.cumsum([0] + [click_ignored(answers[k], model.transform, (H, W), points[k], int(labels[k]))
                               for k in range(1, len(clicks))])
    expected = [auto_propagates(confidence, int(n), shipped) for n in ignored]
    assert expected[0] is False and expected[-1] is True  # the test sees the switch happen
    with SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation="auto",
                                           propagation_config=config), models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).propagation_default == pb.PROPAGATION_AUTO
        sid = open_image(stub, image_png).session_id
        got = []
        for k in range(1, len(clicks) + 1):
            request = pb.ClickRequest(session_id=sid, points=pts(*[(x, y, bool(lab)) for x, y, lab in clicks[:k]]))
            reply = stub.Click(request, timeout=30)
            assert reply.decoded_steps == 1  # the verdicts ride on the history: nothing re-decoded
            got.append(reply.propagated)
        assert got == expected, (got, list(ignored), confidence)
        undo = stub.Click(pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True))), timeout=30)
        assert undo.propagated is expected[0] and undo.decoded_steps == 0


def test_settings_validation_and_mapping(tmp_path):
    s = ServerSettings.from_mapping({"port": "0", "slide-root": [str(tmp_path)], "models": str(tmp_path),
                                     "max_points": 3, "session-idle-seconds": "5"})
    assert s.port == 0 and s.slide_roots == (tmp_path,) and s.models_dir == tmp_path
    assert s.max_points == 3 and s.session_idle_seconds == 5.0
    with pytest.raises(InvalidInputError, match="unknown server setting"):
        ServerSettings.from_mapping({"prot": 1})
    with pytest.raises(InvalidInputError, match="go together"):
        ServerSettings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(InvalidInputError, match="max-pixels"):
        ServerSettings(max_pixels=0)
    empty = tmp_path / "empty_token"
    empty.write_text("  \n")
    with pytest.raises(InvalidInputError, match="empty"):
        ServerSettings(token_file=empty).resolve_token()


def test_embedding_cache_is_bounded_in_bytes_and_lru():
    def embedding(n: int) -> Embedding:
        return Embedding({"image_embeddings": np.zeros(n, np.float32)}, 10, 10)

    cache = EmbeddingCache(max_bytes=3 * 4000)
    for key in "abc":
        cache.put(key, embedding(1000))
    assert cache.get("a") is not None  # touch: "b" is now the least recently used
    cache.put("d", embedding(1000))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.used_bytes == 12000 and len(cache) == 3
    cache.put("huge", embedding(10_000))  # over budget alone: kept, everything else goes
    assert len(cache) == 1 and cache.get("huge") is not None
    computed = []
    value, hit = cache.get_or_compute("x", lambda: computed.append(1) or embedding(10))
    assert not hit and cache.get_or_compute("x", lambda: computed.append(1) or embedding(10)) == (value, True)
    assert computed == [1]


def test_session_store_expires_idle_and_drops_least_recently_used():
    now = [0.0]
    store = SessionStore(idle_seconds=10, max_sessions=2, clock=lambda: now[0])
    emb = Embedding({}, 4, 4)
    a, b = store.create(None, emb, Frame()), store.create(None, emb, Frame())
    now[0] = 5
    store.get(a.session_id)  # a is used: b is now the least recently used
    c = store.create(None, emb, Frame())
    with pytest.raises(NotFoundError, match="re-open"):
        store.get(b.session_id)
    now[0] = 14
    assert store.get(c.session_id) is c  # created at 5: idle 9 s, under the limit
    now[0] = 16
    assert store.sweep() == 1  # a: idle since 5
    with pytest.raises(NotFoundError):
        store.get(a.session_id)
    assert len(store) == 1


def test_default_bundle_path_is_exact_and_torch_free(tmp_path):
    """The server finds the default bundle by a key over the weights, computed without torch;
    a bundle of other weights (another key) is never picked."""
    import subprocess
    import sys

    expected = cached_bundle_path("default", cache_dir=tmp_path)
    (tmp_path / "default-0000000000000000").mkdir(parents=True)
    ((tmp_path / "default-0000000000000000") / "manifest.json").write_text("{}")
    expected.mkdir(parents=True)
    (expected / "manifest.json").write_text("{}")
    assert default_bundle_path(tmp_path) == expected
    code = (
        "import sys; from pathlib import Path; from histosam.backend.serving.model_store import default_bundle_path; "
        f"p = default_bundle_path(Path({str(tmp_path)!r})); "
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["NO_TORCH", str(expected)]


def test_server_process_never_imports_torch(tiny_bundle, image_png, tmp_path):
    script = f"""
import sys, grpc
from histosam.backend.serving.server import SegmentationServer, ServerSettings
from histosam.v1 import segmentation_pb2 as pb, segmentation_pb2_grpc as pb_grpc
with SegmentationServer(ServerSettings(port=0, bundles=({str(tiny_bundle)!r},), threads=2, ort_threads=1)) as srv:
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SegmentationStub(ch)
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=open(sys.argv[1], 'rb').read()), timeout=60).session_id
        reply = stub.Click(pb.ClickRequest(session_id=sid, points=[pb.Point(x=5, y=5, positive=True)]), timeout=60)
bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))
print('TORCH' if bad else 'NO_TORCH', reply.num_points)
"""
    image = tmp_path / "image.png"
    image.write_bytes(image_png)
    out = subprocess.run([sys.executable, "-c", script, str(image)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NO_TORCH", "1"]


# --------------------------------------------------------------------------- slides


def test_slide_region_comes_back_in_level0_coordinates(stub, server, data_dir):
    slide = data_dir / "slides" / CMU
    if not slide.is_file():
        pytest.skip(f"{slide} missing")
    region = pb.SlideRegion(slide_path=str(slide), x=500, y=600, width=1024, height=1024, downsample=4)
    opened = stub.OpenImage(pb.OpenImageRequest(slide_region=region), timeout=120)
    assert (opened.width, opened.height) == (256, 256)
    assert (opened.frame.origin_x, opened.frame.origin_y, opened.frame.downsample) == (500, 600, 4)
    reply = stub.Click(pb.ClickRequest(session_id=opened.session_id, points=pts((1012, 1112, True)),
                                       want_mask_png=True, min_area=0), timeout=30)
    polygons = polygons_of(reply)
    assert polygons
    for p in polygons:
        assert p.exterior[:, 0].min() >= 500 and p.exterior[:, 0].max() <= 1524
        assert p.exterior[:, 1].min() >= 600 and p.exterior[:, 1].max() <= 1624
    raster = polygons_to_mask(polygons, (256, 256), origin=(500, 600), downsample=4)
    assert iou(raster, decode_png_mask(reply.mask_png)) > 0.999
    # The same region by a relative path under the slide root: same signature, a cache hit.
    relative = pb.SlideRegion(slide_path=CMU, x=500, y=600, width=1024, height=1024, downsample=4)
    again = stub.OpenImage(pb.OpenImageRequest(slide_region=relative), timeout=120)
    assert again.cache_hit
    # The pixels are the slide's: the region read through histosam.backend.wsi.slides.
    from histosam.backend.wsi.slides import open_slide

    with open_slide(slide) as s:
        rgb = s.read_region(500, 600, 1024, 1024, downsample=4)
    direct = open_image(stub, png(rgb))
    assert (direct.width, direct.height) == (256, 256)
    off = pb.SlideRegion(slide_path=CMU, x=100_000, y=0, width=100, height=100)
    code, details = status_of(stub.OpenImage, pb.OpenImageRequest(slide_region=off))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in details
    tiny = pb.SlideRegion(slide_path=CMU, x=0, y=0, width=1000, height=1000, downsample=10_000)
    code, details = status_of(stub.OpenImage, pb.OpenImageRequest(slide_region=tiny))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "use a smaller downsample" in details
    sliver = pb.SlideRegion(slide_path=CMU, x=s.dimensions[0] - 3, y=0, width=100, height=100, downsample=2)
    code, details = status_of(stub.OpenImage, pb.OpenImageRequest(slide_region=sliver))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "under 2 pixels of it would be read" in details
    # A region reaching past the right and bottom edges is cut there: no mask over the glass beyond.
    w0, h0 = s.dimensions
    edge = pb.SlideRegion(slide_path=CMU, x=w0 - 400, y=h0 - 200, width=1000, height=1000, downsample=2)
    cut = stub.OpenImage(pb.OpenImageRequest(slide_region=edge), timeout=120)
    assert (cut.width, cut.height) == (200, 100)
    assert (cut.frame.origin_x, cut.frame.origin_y, cut.frame.downsample) == (w0 - 400, h0 - 200, 2)
    reply = stub.Click(pb.ClickRequest(session_id=cut.session_id, points=pts((w0 - 200, h0 - 100, True)),
                                       box=pb.Box(x0=w0 - 400, y0=h0 - 200, x1=w0, y1=h0), min_area=0), timeout=30)
    for p in polygons_of(reply):
        assert p.exterior[:, 0].max() <= w0 and p.exterior[:, 1].max() <= h0


# --------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def lite_server(lite_bundle):
    settings = ServerSettings(port=0, threads=4, bundles=(lite_bundle,))
    srv = SegmentationServer(settings)
    srv.start()
    yield srv
    srv.stop(0)


def ring_image(size: int = 256) -> np.ndarray:
    img = np.full((size, size, 3), 240, np.uint8)
    cv2.circle(img, (size // 2, size // 2), 80, (120, 40, 140), -1)
    cv2.circle(img, (size // 2, size // 2), 40, (240, 240, 240), -1)
    return img


@pytest.mark.slow
def test_real_model_ring_comes_back_with_its_hole(lite_server):
    with grpc.insecure_channel(lite_server.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        data = png(ring_image())
        frame = pb.Frame(origin_x=5000, origin_y=7000, downsample=2)
        opened = open_image(stub, data, frame)
        assert not opened.cache_hit and opened.model == "lite_medsam"
        assert open_image(stub, data, frame).cache_hit
        box = pb.Box(x0=5000 + 40 * 2, y0=7000 + 40 * 2, x1=5000 + 216 * 2, y1=7000 + 216 * 2)
        reply = stub.Click(pb.ClickRequest(session_id=opened.session_id, box=box, want_mask_png=True), timeout=60)
        polygons = polygons_of(reply)
        assert len(polygons) == 1 and len(polygons[0].holes) == 1
        hole = polygons[0].holes[0]
        cx, cy = 5000 + 128 * 2, 7000 + 128 * 2
        assert abs(hole[:, 0].mean() - cx) < 10 and abs(hole[:, 1].mean() - cy) < 10  # the hole is the centre
        mask = decode_png_mask(reply.mask_png)
        truth = np.zeros((256, 256), np.uint8)
        cv2.circle(truth, (128, 128), 80, 1, -1)
        cv2.circle(truth, (128, 128), 40, 0, -1)
        assert iou(mask, truth > 0) > 0.9
        raster = polygons_to_mask(polygons, (256, 256), origin=(5000, 7000), downsample=2)
        assert iou(raster, mask) > 0.99
        # Simplified (tolerance in image pixels): far fewer vertices, the same shape.
        simple = stub.Click(pb.ClickRequest(session_id=opened.session_id, box=box, simplify_tolerance=1.0), timeout=60)
        assert simple.decoded_steps == 0
        assert len(simple.polygons[0].exterior) < len(reply.polygons[0].exterior) / 2
        simple_raster = polygons_to_mask(polygons_of(simple), (256, 256), origin=(5000, 7000), downsample=2)
        assert iou(simple_raster, mask) > 0.97
        # Add a point and undo it.
        inner = stub.Click(pb.ClickRequest(session_id=opened.session_id, box=box, points=pts((cx + 120, cy, True))),
                           timeout=60)
        assert inner.decoded_steps == 1
        undo = stub.Click(pb.ClickRequest(session_id=opened.session_id, box=box, want_mask_png=True), timeout=60)
        assert undo.decoded_steps == 0 and undo.polygons == reply.polygons


@pytest.mark.slow
def test_real_model_on_a_real_patch(lite_server, data_dir):
    images = sorted((data_dir / "patches" / "ocdc" / "images").glob("*"))
    masks = sorted((data_dir / "patches" / "ocdc" / "masks").glob("*"))
    if not images or not masks:
        pytest.skip("ocdc patches missing")
    truth = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE) > 127
    ys, xs = np.nonzero(truth)
    box = pb.Box(x0=float(xs.min()), y0=float(ys.min()), x1=float(xs.max() + 1), y1=float(ys.max() + 1))
    with grpc.insecure_channel(lite_server.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        opened = open_image(stub, images[0].read_bytes())
        assert (opened.height, opened.width) == truth.shape
        reply = stub.Click(pb.ClickRequest(session_id=opened.session_id, box=box, want_mask_png=True), timeout=60)
        mask = decode_png_mask(reply.mask_png)
        assert iou(mask, truth) > 0.3  # zero-shot on a tumour region from its bounding box
        raster = polygons_to_mask(polygons_of(reply), truth.shape, origin=(0, 0), downsample=1)
        assert iou(raster, mask) > 0.99  # only specks below the minimum area differ


def test_a_bundles_mask_calibration_shapes_the_served_mask_not_the_history(tiny_bundle, tmp_path, image_png):
    """mask_dilation in the manifest (the shipped default's is 1) grows served masks by whole
    low-res pixels; the logits kept for the next click stay the model's own."""
    import json
    import shutil

    calibrated = tmp_path / "tiny_calibrated"
    shutil.copytree(tiny_bundle, calibrated)
    manifest = json.loads((calibrated / "manifest.json").read_text())
    manifest["mask_dilation"] = 1
    (calibrated / "manifest.json").write_text(json.dumps(manifest))
    masks, lows = {}, {}
    for name, bundle in (("plain", tiny_bundle), ("calibrated", calibrated)):
        store = ModelStore.load([bundle], threads=1)
        assert store.default.transform.mask_dilation == (1 if name == "calibrated" else 0)
        srv = SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation="off"), models=store)
        srv.start()
        try:
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SegmentationStub(channel)
                sid = open_image(stub, image_png).session_id
                request = pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True)), want_mask_png=True,
                                          min_area=0)
                masks[name] = decode_png_mask(stub.Click(request, timeout=30).mask_png)
                session = srv.servicer.sessions.get(sid)
                lows[name] = next(iter(session.history.values())).low_res
        finally:
            srv.stop(0)
    assert np.array_equal(lows["plain"], lows["calibrated"])  # the mask prompt is not calibrated
    transform = ModelStore.load([calibrated], threads=1).default.transform
    assert np.array_equal(masks["calibrated"], transform.mask_from_logits(lows["calibrated"], (H, W)))
    assert masks["calibrated"][masks["plain"]].all() and masks["calibrated"].sum() > masks["plain"].sum()


def test_edge_snapping_follows_the_bundle_unless_the_server_says_on_or_off(models, server, image_png, tiny_bundle,
                                                                           tmp_path):
    """The served mask is the model's mask with its edge snapped when the model's bundle asks for it
    (``edge_snap: true`` in its manifest, as the shipped default's does) or the server says on;
    propagated masks are never snapped; the tiny bundle asks for nothing, so the module's server
    (``edge_snap`` = model) serves its raw masks."""
    import json
    import shutil

    from histosam.backend.postprocess.edge_snap import EdgeSnapSettings, snap_mask, working_lab

    img = synthetic_image()
    points = np.array([[100.0, 100.0], [250.0, 120.0]])
    labels = np.array([1, 0])
    model = models.default
    assert not model.bundle.edge_snap
    features = model.encoder(img)
    first, _ = model.decoder(features, (H, W), points[:1], labels[:1], None, None)
    second, _ = model.decoder(features, (H, W), points, labels, None, first)
    own = model.transform.mask_from_logits(second, (H, W))
    snapped = snap_mask(working_lab(img, EdgeSnapSettings()), own, points, labels, EdgeSnapSettings())
    assert not np.array_equal(own, snapped)  # there is an edge to move
    propagated = ImageGraph.from_image(img, PropagationSettings.load()).refine(second, model.transform, points, labels)
    asking = tmp_path / "asking"
    shutil.copytree(tiny_bundle, asking)
    manifest = json.loads((asking / "manifest.json").read_text())
    manifest["edge_snap"] = True
    (asking / "manifest.json").write_text(json.dumps(manifest))
    asking_models = ModelStore.load([asking], threads=1)
    assert asking_models.default.bundle.edge_snap
    servers = [(SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, edge_snap=True, propagation="off"),
                                   models=models), snapped),
               (SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, propagation="off"),
                                   models=asking_models), snapped),
               (SegmentationServer(ServerSettings(port=0, threads=2, ort_threads=1, edge_snap="off", propagation="off"),
                                   models=asking_models), own)]
    for srv, _ in servers:
        srv.start()
    try:
        for srv, want in [*servers, (server, own)]:
            with grpc.insecure_channel(srv.address) as channel:
                stub = pb_grpc.SegmentationStub(channel)
                sid = open_image(stub, image_png).session_id
                for choice, expected in ((pb.PROPAGATION_SERVER_DEFAULT, want), (pb.PROPAGATION_ON, propagated)):
                    reply = stub.Click(pb.ClickRequest(session_id=sid, points=pts((100.0, 100.0, True), (250.0, 120.0, False)),
                                                       want_mask_png=True, min_area=0, propagation=choice), timeout=30)
                    assert iou(decode_png_mask(reply.mask_png), expected) > 0.999
                # GetServerInfo says which models are snapped here (QuPath users see it in `client info`).
                (info,) = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30).models
                assert info.edge_snap == (want is snapped)
        for srv, want in servers:  # the working copy is kept only where it is used, and counted in the budget
            (embedding,) = srv.servicer.cache._entries.values()
            assert (embedding.snap_lab is not None) == (want is snapped)
            assert embedding.nbytes == (sum(a.nbytes for a in embedding.features.values()) + embedding.working_image.nbytes
                                        + (0 if embedding.snap_lab is None else embedding.snap_lab.nbytes))
    finally:
        for srv, _ in servers:
            srv.stop(0)
