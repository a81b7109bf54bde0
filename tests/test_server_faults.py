"""The server under faults: cancelled calls, restarts, corrupt bundles, pixel bombs, idle and
evicted sessions, a full admission queue, and readiness while the models load.

Real server on a free loopback port, real onnxruntime (the tiny random SAM bundle). Where a
test must hold calls in flight it wraps the real encoder in a gate (the encoder still runs).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histosam.backend.core.errors import BundleError, InvalidInputError, ResourceLimitError
from histosam.backend.serving import server as server_module
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.image_sources import decode_image
from histosam.backend.serving.model_store import LoadedModel, ModelStore
from histosam.backend.serving.server import SERVICE_NAME, SegmentationServer, ServerSettings
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def blobs(seed: int, h: int = 200, w: int = 260) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 230, np.uint8)
    for _ in range(8):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(10, 40)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return img


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (a decompression-bomb shape)."""
    raw = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()
    ihdr_at = raw.index(b"IHDR")
    chunk = b"IHDR" + struct.pack(">II", width, height) + raw[ihdr_at + 12: ihdr_at + 17]
    return raw[:ihdr_at] + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[ihdr_at + 21:]


def code_of(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30, **kwargs)
    return info.value.code(), info.value.details()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLICK = [pb.Point(x=60, y=70, positive=True), pb.Point(x=150, y=120, positive=False)]


def test_cancelled_and_abandoned_calls_leave_the_server_serving(models):
    with SegmentationServer(ServerSettings(port=0, threads=4), models=models) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=png(blobs(0))), timeout=30).session_id
        expected = stub.Click(pb.ClickRequest(session_id=sid, points=CLICK), timeout=30)
        outcomes = []
        for i in range(6):
            opening = stub.OpenImage.future(pb.OpenImageRequest(encoded_image=png(blobs(100 + i, 600, 600))))
            clicking = stub.Click.future(pb.ClickRequest(session_id=sid, points=CLICK[: 1 + i % 2]))
            opening.cancel()
            clicking.cancel()
            for future in (opening, clicking):
                try:
                    future.result(timeout=30)
                    outcomes.append("done")  # finished before the cancel reached it: also fine
                except grpc.FutureCancelledError:
                    outcomes.append("cancelled")
        assert "cancelled" in outcomes
        # A client that goes away mid-call (its channel closed under a running OpenImage).
        for i in range(3):
            gone = grpc.insecure_channel(srv.address)
            future = pb_grpc.SegmentationStub(gone).OpenImage.future(
                pb.OpenImageRequest(encoded_image=png(blobs(200 + i, 600, 600))), timeout=30)
            gone.close()
            with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                future.result(timeout=30)
        # Still serving, the session intact and answering as before.
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).models
        again = stub.Click(pb.ClickRequest(session_id=sid, points=CLICK), timeout=30)
        assert again.polygons == expected.polygons and again.mask_pixels == expected.mask_pixels
        fresh = stub.OpenImage(pb.OpenImageRequest(encoded_image=png(blobs(1))), timeout=30)
        assert stub.Click(pb.ClickRequest(session_id=fresh.session_id, points=CLICK[:1]), timeout=30).num_points == 1


def test_a_restart_between_two_clicks_is_invisible_to_the_client(models, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(png(blobs(3)))
    port = free_port()
    points = [(60.0, 70.0, True), (150.0, 120.0, False), (100.0, 40.0, True)]
    first = SegmentationServer(ServerSettings(port=port, threads=2), models=models)
    first.start()
    with SegmentationClient(f"127.0.0.1:{port}", timeout=20) as client:
        try:
            session = client.open_image(image)
            before = session.click(points, min_area=0, want_mask=True)
        finally:
            first.stop(0)
        with SegmentationServer(ServerSettings(port=port, threads=2), models=models):
            client.wait_ready(20)
            after = session.click(points, min_area=0, want_mask=True)
    assert after.reopened and session.reopen_count == 1
    assert after.decoded_steps == 3  # the new server replayed the whole history
    assert after.response.polygons == before.response.polygons
    assert np.array_equal(after.mask, before.mask) and after.predicted_iou == before.predicted_iou


def test_a_bundle_that_does_not_match_its_manifest_is_refused_at_start(tiny_bundle, tmp_path, models):
    bad = tmp_path / "bad_bundle"
    shutil.copytree(tiny_bundle, bad)
    decoder = next(p for p in bad.iterdir() if p.name.startswith("decoder") and p.suffix == ".onnx")
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    decoder.write_bytes(bytes(data))

    proc = subprocess.run(
        [sys.executable, "-m", "histosam.backend.cli", "serve", "--models", str(bad), "--port", "0", "--cpu"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, proc.stderr
    assert "sha256" in lines[0] and decoder.name in lines[0] and "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout

    # In-process: the same BundleError, and the port (bound before loading) is free again.
    port = free_port()
    with pytest.raises(BundleError, match="sha256"):
        SegmentationServer(ServerSettings(port=port, bundles=(bad,), prefer_gpu=False)).start()
    with SegmentationServer(ServerSettings(port=port, threads=1), models=models) as srv:
        assert srv.port == port


def test_a_pixel_bomb_is_refused_from_its_header_without_allocating(models):
    bomb = png_header_claiming(100_000, 100_000)
    assert len(bomb) < 100
    tracemalloc.start()
    try:
        with pytest.raises(ResourceLimitError):
            decode_image(bomb, max_pixels=4096 * 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # 100000^2 RGB would be 30 GB; nothing near even 1 MB is taken
    settings = ServerSettings(port=0, threads=2, max_pixels=1000 * 1000)
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        for claim in (png_header_claiming(100_000, 100_000), png_header_claiming(1001, 1000),
                      png_header_claiming(2**31 - 1, 2**31 - 1)):
            code, details = code_of(stub.OpenImage, pb.OpenImageRequest(encoded_image=claim))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).cache_entries == 0  # nothing encoded


def test_a_session_past_its_idle_time_is_not_found_and_the_client_reopens(models, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(png(blobs(4)))
    settings = ServerSettings(port=0, threads=2, session_idle_seconds=0.3)
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel, \
            SegmentationClient(srv.address, timeout=20) as client:
        stub = pb_grpc.SegmentationStub(channel)
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=image.read_bytes()), timeout=30).session_id
        session = client.open_image(image)
        before = session.click([(60.0, 70.0)], min_area=0)
        time.sleep(0.8)
        code, details = code_of(stub.Click, pb.ClickRequest(session_id=sid, points=CLICK))
        assert code == grpc.StatusCode.NOT_FOUND and "re-open" in details
        after = session.click([(60.0, 70.0)], min_area=0)
        assert after.reopened and after.response.polygons == before.response.polygons


def test_sessions_cannot_hold_embeddings_beyond_the_cache_budget(models, tmp_path):
    """Many sessions on distinct images: the embeddings in memory stay within the budget, the
    oldest session is told to re-open, and the Python client does so transparently."""
    images = [tmp_path / f"image{i}.png" for i in range(8)]
    for i, path in enumerate(images):
        path.write_bytes(png(blobs(10 + i)))
    with SegmentationServer(ServerSettings(port=0, threads=2), models=models) as probe, \
            SegmentationClient(probe.address) as c:
        c.open_image(images[0])
        one = c.info().cache_used_bytes  # bytes of one embedding of this model
    assert one > 0
    budget = int(2.5 * one)  # room for two embeddings
    settings = ServerSettings(port=0, threads=2, cache_bytes=budget, max_sessions=100)
    with SegmentationServer(settings, models=models) as srv, SegmentationClient(srv.address, timeout=20) as client, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        sessions, answers = [], []
        for path in images:
            session = client.open_image(path)
            answers.append(session.click([(60.0, 70.0), (150.0, 120.0, False)], min_area=0))
            sessions.append(session)
            info = client.info()
            assert info.cache_used_bytes <= budget and info.limits.cache_bytes == budget
            # What the sessions can actually reach (weak references resolved): within budget too.
            assert srv.servicer.sessions.resident_embedding_bytes() <= budget
            assert info.open_sessions <= info.cache_entries <= 2
        assert srv.servicer.sessions.resident_embedding_bytes() == 2 * one
        oldest = sessions[0]
        code, details = code_of(stub.Click, pb.ClickRequest(session_id=oldest.session_id, points=CLICK))
        assert code == grpc.StatusCode.NOT_FOUND and "re-open" in details and "evicted" in details
        again = oldest.click([(60.0, 70.0), (150.0, 120.0, False)], min_area=0)
        assert again.reopened and again.response.polygons == answers[0].response.polygons
        assert client.info().cache_used_bytes <= budget
        # Re-opening the oldest evicted the least recently used survivor (image 6), not image 7.
        assert not sessions[-1].click([(60.0, 70.0)], min_area=0).reopened
        assert not oldest.click([(60.0, 70.0)], min_area=0).reopened
        assert sessions[-2].click([(60.0, 70.0)], min_area=0).reopened


class GatedEncoder:
    """The real encoder, run only once the test opens the gate (to hold calls in flight)."""

    def __init__(self, encoder, gate: threading.Event) -> None:
        self.encoder, self.gate = encoder, gate
        self.entered = threading.Semaphore(0)

    def __call__(self, rgb):
        self.entered.release()
        if not self.gate.wait(60):
            raise TimeoutError("gate never opened")
        return self.encoder(rgb)


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once(models):
    gate = threading.Event()
    real = models.default
    encoder = GatedEncoder(real.encoder, gate)
    gated = ModelStore([LoadedModel(real.bundle, encoder, real.decoder, real.providers)])
    settings = ServerSettings(port=0, threads=2, max_concurrent_rpcs=2)
    with pytest.raises(InvalidInputError, match="max-concurrent-rpcs"):
        ServerSettings(max_concurrent_rpcs=0)
    with SegmentationServer(settings, models=gated) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        running = [stub.OpenImage.future(pb.OpenImageRequest(encoded_image=png(blobs(30 + i))), timeout=60)
                   for i in range(2)]
        try:
            for _ in running:  # both are inside the encoder now
                assert encoder.entered.acquire(timeout=30)
            t0 = time.monotonic()
            code, details = code_of(stub.GetServerInfo, pb.GetServerInfoRequest())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert time.monotonic() - t0 < 10  # answered while the gate is still shut: no queueing
        finally:
            gate.set()
        assert all(f.result(timeout=60).session_id for f in running)
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).models


def test_health_turns_serving_only_once_the_models_are_loaded(tiny_bundle, monkeypatch):
    gate = threading.Event()
    real_load = ModelStore.load.__func__

    def gated_load(cls, *args, **kwargs):
        if not gate.wait(60):
            raise TimeoutError("gate never opened")
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(server_module.ModelStore, "load", classmethod(gated_load))
    port = free_port()
    srv = SegmentationServer(ServerSettings(port=port, threads=2, bundles=(tiny_bundle,), ort_threads=1))
    errors: list[BaseException] = []

    def start() -> None:
        try:
            srv.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            reply = health.Check(request, timeout=30, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # bound, still loading
            code, details = code_of(pb_grpc.SegmentationStub(channel).GetServerInfo, pb.GetServerInfoRequest())
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            gate.set()
            starter.join(60)
            assert not errors and not starter.is_alive()
            assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            info = pb_grpc.SegmentationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.default_model == "tiny_sam"
    finally:
        gate.set()
        starter.join(60)
        srv.stop(0)


@pytest.mark.slow
def test_the_load_bench_runs_clean_against_a_server_process(tiny_bundle, tmp_path):
    """`histosam bench load` end to end on the tiny model: a server process, no errors, figures."""
    import json

    from histosam.backend.cli import main

    out = tmp_path / "load.json"
    rc = main(["bench", "load", "--clients", "3", "--clicks", "4", "--models", str(tiny_bundle), "--cpu",
               "--ort-threads", "1", "--threads", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["errors"] == 0 and result["clicks"] == 12
    assert result["clicks_per_second"] > 0 and 0 < result["click_latency"]["p50_ms"] <= result["click_latency"]["p99_ms"]
    assert result["server_peak_rss_bytes"] >= result["server_rss_ready_bytes"] > 0
    assert result["server_cache_entries"] == 3 and result["model"] == "tiny_sam"
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("spread", [[], ["correction"]])
def test_the_serve_bench_measures_propagation_as_a_paired_ratio(tiny_bundle, tmp_path, spread):
    """`histosam bench serve --propagation [correction] --propagation-config F` on the tiny model:
    the walker runs with the file's settings (every click spread, or only the corrections, as the
    served auto answers a sure model), and its cost comes out as a per-click ratio to the decoder."""
    import json

    from histosam.backend.cli import main

    config = tmp_path / "small_grid.yaml"
    config.write_text("working_side: 64\n")
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--bundle", str(tiny_bundle), "--cpu", "--ort-threads", "1", "--sequences", "2",
               "--points", "3", "--opens", "1", "--propagation", *spread, "--propagation-config", str(config),
               "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["clicks"] == 6 and result["propagation"]
    assert result["propagation_spread"] == (spread[0] if spread else "model")
    assert result["propagation_settings"]["working_side"] == 64
    ratio = result["inference_over_decoder"]
    assert ratio["p10"] <= ratio["p50"] <= ratio["p90"] and ratio["p50"] > 1.0  # the walker costs something
    assert result["inference_bare"]["p50_ms"] > result["decoder_bare"]["p50_ms"]


def test_the_serve_bench_measures_edge_snapping_as_a_paired_ratio(tiny_bundle, tmp_path):
    """`histosam bench serve --edge-snap --edge-snap-config F`: snapping runs with the file's
    settings and counts as inference, its cost a per-click ratio to the decoder."""
    import json

    from histosam.backend.cli import main

    config = tmp_path / "snap.yaml"
    config.write_text("band: 2\nworking_side: 128\n")
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--bundle", str(tiny_bundle), "--cpu", "--ort-threads", "1", "--sequences", "2",
               "--points", "3", "--opens", "1", "--edge-snap", "on", "--edge-snap-config", str(config), "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["clicks"] == 6 and result["edge_snap"] and not result["propagation"]
    assert result["edge_snap_settings"]["band"] == 2 and result["edge_snap_settings"]["working_side"] == 128
    ratio = result["inference_over_decoder"]
    assert ratio["p10"] <= ratio["p50"] <= ratio["p90"] and ratio["p50"] > 1.0
