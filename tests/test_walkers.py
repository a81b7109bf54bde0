"""The walkers' sparse solves (edge snapping, click propagation) on the serving path.

* On real patches of every shared set, the LDL^T solves give the masks the SuperLU solves they
  replaced gave (mask IoU >= 0.995, the issue's tolerance; in practice identical).
* The per-image analysis of the propagation system is done once per image and reused by every
  click, every session on that image (counted).
* Concurrent sessions, clicking at once with snapping and propagation, get exactly the masks
  they get alone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.transforms import ImageTransform
from histosam.backend.evaluation.clicker import next_click
from histosam.backend.evaluation.metrics import iou
from histosam.backend.postprocess.edge_snap import EdgeSnapSettings, snap_mask, working_lab
from histosam.backend.postprocess.propagation import ImageGraph, PropagationSettings
from histosam.backend.serving.model_store import ModelStore
from histosam.backend.serving.server import SegmentationServer, ServerSettings, click_concurrency
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

TOLERANCE = 0.995  # mask IoU against the SuperLU answer
SETS = ("glas", "ocdc", "ebhi", "bcss", "ebhi_seg")
PER_SET = 2  # patches per set, spread over the set (ebhi_seg: over its 2226, so over its classes)
TRANSFORM = ImageTransform(input_size=1024, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))


def real_patches(data_dir: Path, name: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    folder = data_dir / "patches" / name
    if not (folder / "images").is_dir():
        pytest.skip(f"no {name} patches in {data_dir}")
    images = sorted((folder / "images").iterdir())
    masks = {p.stem: p for p in (folder / "masks").iterdir()}
    chosen = [images[round(i * (len(images) - 1) / max(1, PER_SET - 1))] for i in range(PER_SET)]
    out = []
    for path in chosen:
        rgb = np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1])
        gt = cv2.imread(str(masks[path.stem]), cv2.IMREAD_GRAYSCALE) > 127
        out.append((f"{name}/{path.stem}", rgb, gt))
    return out


def model_like_masks(gt: np.ndarray) -> list[np.ndarray]:
    """Masks wrong the ways a model's are: edges a few pixels off, shifted, a blob too many."""
    k = max(3, round(0.012 * max(gt.shape))) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    g = gt.astype(np.uint8)
    shifted = np.roll(g, (k // 2, -k // 2), axis=(0, 1))
    blob = g.copy()
    cv2.circle(blob, (gt.shape[1] // 3, gt.shape[0] // 3), 4 * k, 1, -1)
    return [cv2.dilate(g, kernel).astype(bool), cv2.erode(g, kernel).astype(bool), shifted.astype(bool),
            blob.astype(bool)]


def clicks_on(gt: np.ndarray, pred: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The evaluator's first ``n`` clicks on ``pred`` (the RITM rule), as (x, y) points and labels."""
    clicked = np.zeros_like(gt)
    points, labels = [], []
    for _ in range(n):
        click = next_click(gt, pred, clicked)
        if click is None:
            break
        clicked[click.y, click.x] = True
        points.append((click.x + 0.5, click.y + 0.5))
        labels.append(click.label)
    return np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels, np.int64)


def logits_of(mask: np.ndarray, scale: float) -> np.ndarray:
    """A model's (256, 256) letterboxed logits for ``mask``: +-``scale`` with smooth edges."""
    low = TRANSFORM.mask_to_low_res(mask)
    return (cv2.GaussianBlur(low, (0, 0), 2.0) * 2.0 - 1.0).astype(np.float32) * scale


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_edge_snapping_ldl_gives_the_superlu_masks_on_real_patches(data_dir, name):
    settings = EdgeSnapSettings.load(None)
    worst = 1.0
    for _, rgb, gt in real_patches(data_dir, name):
        lab = working_lab(rgb, settings)
        for mask in model_like_masks(gt):
            points, labels = clicks_on(gt, mask)
            reference = snap_mask(lab, mask, points, labels, settings, solver="superlu")
            snapped = snap_mask(lab, mask, points, labels, settings)
            assert not np.array_equal(snapped, mask) or not np.array_equal(reference, mask)  # the walker ran
            worst = min(worst, iou(snapped, reference))
    assert worst >= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_propagation_ldl_gives_the_superlu_masks_on_real_patches(data_dir, name):
    settings = PropagationSettings.load(None)
    worst = 1.0
    for _, rgb, gt in real_patches(data_dir, name):
        graph = ImageGraph.from_image(rgb, settings)
        for mask, scale in zip(model_like_masks(gt), (0.2, 3.0, 0.5, 8.0), strict=True):  # unsure .. sure models
            points, labels = clicks_on(gt, mask)
            low = logits_of(mask, scale)
            reference = graph.refine(low, TRANSFORM, points, labels, solver="superlu")
            propagated = graph.refine(low, TRANSFORM, points, labels)
            worst = min(worst, iou(propagated, reference))
    assert worst >= TOLERANCE
    assert graph.factor.analyses == 1 and graph.factor.refactorisations == 4  # the last image's four clicks


def test_unknown_solver_is_a_clear_error():
    rgb = np.full((40, 60, 3), 200, np.uint8)
    rgb[:, 30:] = 60
    graph = ImageGraph.from_image(rgb, PropagationSettings())
    low = logits_of(np.zeros((40, 60), bool), 1.0)
    with pytest.raises(InvalidInputError, match="solver must be one of ldl, superlu"):
        graph.refine(low, TRANSFORM, np.array([[10.0, 10.0]]), np.array([1]), solver="cg")
    mask = np.zeros((40, 60), bool)
    mask[:, :28] = True
    with pytest.raises(InvalidInputError, match="solver must be one of ldl, superlu"):
        snap_mask(working_lab(rgb, EdgeSnapSettings()), mask, np.zeros((0, 2)), np.zeros(0), EdgeSnapSettings(),
                  solver="cg")


# --------------------------------------------------------------------------- through the server


def synthetic_image(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 228, np.uint8)
    for _ in range(14):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(12, 48)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return img


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


@pytest.fixture(scope="module")
def models(tiny_bundle) -> ModelStore:
    return ModelStore.load([tiny_bundle], threads=1)


def click(stub, session_id: str, points: list[tuple[float, float, bool]], propagate: bool) -> pb.ClickResponse:
    return stub.Click(pb.ClickRequest(
        session_id=session_id, points=[pb.Point(x=x, y=y, positive=p) for x, y, p in points], want_mask_png=True,
        propagation=pb.PROPAGATION_ON if propagate else pb.PROPAGATION_OFF), timeout=120)


def test_the_propagation_analysis_is_done_once_per_image_and_reused_by_every_click(models):
    settings = ServerSettings(port=0, threads=4, ort_threads=1, propagation="on")
    with SegmentationServer(settings, models=models) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.SegmentationStub(channel)
        data = png(synthetic_image(7))
        first = stub.OpenImage(pb.OpenImageRequest(encoded_image=data), timeout=60)
        graph = server.servicer.sessions.get(first.session_id).embedding.graph
        assert graph is not None and graph.factor.analyses == 1 and graph.factor.refactorisations == 0
        points = [(60.0, 50.0, True), (200.0, 150.0, False), (120.0, 90.0, True), (250.0, 60.0, False)]
        for k in range(1, len(points) + 1):
            assert click(stub, first.session_id, points[:k], True).propagated
        second = stub.OpenImage(pb.OpenImageRequest(encoded_image=data), timeout=60)
        assert second.cache_hit  # another session on the same image: the same graph, no new analysis
        assert server.servicer.sessions.get(second.session_id).embedding.graph is graph
        click(stub, second.session_id, points[:2], True)
        assert graph.factor.analyses == 1
        assert graph.factor.refactorisations == len(points) + 1  # one numeric refactorisation per click
        channel.close()


def test_concurrent_sessions_get_the_masks_they_get_alone(models):
    """Six sessions on six images click at once (snapped and propagated clicks mixed) through a
    server computing two clicks at a time; every answer equals the same click made alone."""
    settings = ServerSettings(port=0, threads=8, ort_threads=1, edge_snap="on", max_concurrent_clicks=2)
    assert click_concurrency(settings) == 2 and click_concurrency(ServerSettings(port=0)) >= 1
    images = [png(synthetic_image(seed)) for seed in range(6)]
    points = [(40.0 + 30 * i, 30.0 + 20 * i, i % 3 != 2) for i in range(5)]
    with SegmentationServer(settings, models=models) as server:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.SegmentationStub(channel)

        def sequence(i: int) -> list[bytes]:
            sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=images[i]), timeout=60).session_id
            masks = [click(stub, sid, points[:k], propagate=i % 2 == 1).mask_png for k in range(1, len(points) + 1)]
            stub.CloseImage(pb.CloseImageRequest(session_id=sid), timeout=30)
            return masks

        alone = [sequence(i) for i in range(len(images))]
        together: list[list[bytes] | BaseException | None] = [None] * len(images)
        start = threading.Barrier(len(images))

        def run(i: int) -> None:
            start.wait()
            try:
                together[i] = sequence(i)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                together[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        channel.close()
    for i, (one, many) in enumerate(zip(alone, together, strict=True)):
        assert isinstance(many, list), f"session {i}: {many!r}"
        assert many == one, f"session {i} answered differently when clicking alongside others"
    assert len({m for seq in alone for m in seq}) > len(images)  # the masks differ: the comparison means something


def test_max_concurrent_clicks_is_checked():
    with pytest.raises(InvalidInputError, match="max-concurrent-clicks"):
        ServerSettings(max_concurrent_clicks=-1)
    assert ServerSettings.from_mapping({"max-concurrent-clicks": "3"}).max_concurrent_clicks == 3


@pytest.mark.slow
def test_the_load_bench_sweeps_client_counts(tiny_bundle, tmp_path, capsys):
    """`histosam bench load --sweep 1 2`: one server per count, clicks/s, p50 and p99 of each."""
    import json

    from histosam.backend.cli import main

    out = tmp_path / "sweep.json"
    rc = main(["bench", "load", "--sweep", "1", "2", "--clicks", "3", "--models", str(tiny_bundle), "--cpu",
               "--ort-threads", "1", "--threads", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["bench"] == "load-sweep"
    assert [row["clients"] for row in result["summary"]] == [1, 2]
    for row, run in zip(result["summary"], result["runs"], strict=True):
        assert row["errors"] == 0 and run["clicks"] == 3 * row["clients"]
        assert row["clicks_per_second"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        # The click phase's CPU, counted on both sides: the server decodes every click, and the
        # simulated users place them (a distance transform per click) on the same machine.
        assert row["server_cpu_ms_per_click"] > 0 and row["client_cpu_ms_per_click"] > 0, row
    assert result["summary"][0]["p50_over_first"] == 1.0
    assert (tmp_path / "sweep-2clients.json").is_file() and (tmp_path / "sweep-2clients.png").is_file()
    capsys.readouterr()
    assert main(["bench", "load", "--sweep", "0", "--out", str(tmp_path / "bad.json")]) != 0
    assert "--sweep client counts and --clicks must be positive" in capsys.readouterr().err
