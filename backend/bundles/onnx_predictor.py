"""The onnxruntime predictor: what the server runs, and the evaluator's ``--backend onnx``.

The encoder graph runs once per image; each click runs only the decoder graph. Pre- and
post-processing are the shared numpy transforms (histosam.backend.core.transforms).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from histosam.backend.bundles.bundle import Bundle, load_bundle
from histosam.backend.core.predictor import Prediction, prompt_arrays
from histosam.backend.core.transforms import LOW_RES, validate_rgb


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, CPU always last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    chosen = []
    if prefer_gpu and "CUDAExecutionProvider" in have:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


def lower_thread_priority(niceness: int) -> bool:
    """Raise the calling thread's nice value by ``niceness`` (Linux: nice values are per thread,
    and threads it starts inherit them). False where the platform has no per-thread priority."""
    if niceness <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError:
        return False
    return True


def make_session(path: Path, providers: list[str] | None = None, threads: int | None = None,
                 niceness: int = 0, spinning: bool = True):
    """An onnxruntime session; ``threads`` intra-op threads (None: onnxruntime's choice).

    ``spinning=False`` lets idle intra-op threads sleep instead of busy-waiting for work, which
    on a shared CPU takes cores from other requests. ``niceness > 0`` builds the session in a
    thread of lower priority, so its intra-op threads (started now, inheriting it) yield the CPU
    to normal-priority work: the server's encoder must not stall other sessions' clicks.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3

    def build():
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or available_providers())

    if niceness <= 0:
        return build()
    made: list[Any] = []
    failed: list[BaseException] = []

    def build_in_background() -> None:
        lower_thread_priority(niceness)
        try:
            made.append(build())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=build_in_background, name="histosam-session-build")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


class OnnxEncoder:
    """encoder.onnx: image -> features dict. Thread-safe (onnxruntime sessions are)."""

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 niceness: int = 0, spinning: bool = True) -> None:
        self.bundle = bundle
        self.transform = bundle.transform
        self.session = make_session(bundle.graph_path("encoder"), providers, threads, niceness, spinning)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        x = self.transform.apply_image(image)
        outs = self.session.run(None, {"image": x})
        return dict(zip(self.output_names, outs, strict=True))


class OnnxDecoder:
    """decoder.onnx: features + prompt -> (low-res logits, iou)."""

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 graph: str = "decoder", spinning: bool = True) -> None:
        self.bundle = bundle
        self.transform = bundle.transform
        self.session = make_session(bundle.graph_path(graph), providers, threads, spinning=spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, features: dict[str, np.ndarray], hw: tuple[int, int], points=None, labels=None,
                 box=None, mask_logits=None) -> tuple[np.ndarray, float]:
        coords, lbl = prompt_arrays(points, labels, box)
        coords = self.transform.apply_coords(coords, hw)
        has_mask = mask_logits is not None
        mask_in = (np.asarray(mask_logits, np.float32).reshape(1, 1, LOW_RES, LOW_RES) if has_mask
                   else np.zeros((1, 1, LOW_RES, LOW_RES), np.float32))
        feeds: dict[str, Any] = {
            "point_coords": coords[None].astype(np.float32),
            "point_labels": lbl[None].astype(np.float32),
            "mask_input": mask_in,
            "has_mask_input": np.array([float(has_mask)], np.float32),
            # The graph's own `masks` output is not used here (the shared numpy transform
            # makes the full-size mask); a small size keeps that branch cheap.
            "orig_im_size": np.array([LOW_RES, LOW_RES], np.float32),
        }
        for name in self.input_names:
            if name not in feeds:
                feeds[name] = features[name]
        low_res, iou = self.session.run(["low_res_masks", "iou_predictions"], feeds)
        return low_res[0, 0], float(iou[0, 0])


class OnnxPredictor:
    """The Predictor protocol over a bundle (see histosam.backend.core.predictor)."""

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.transform = bundle.transform
        self.edge_snap = bundle.edge_snap  # applied where served and by the evaluator, not here
        self.encoder = OnnxEncoder(bundle, providers, threads)
        self.decoder = OnnxDecoder(bundle, providers, threads)
        self.providers = self.encoder.session.get_providers()
        self.features: dict[str, np.ndarray] | None = None
        self._hw: tuple[int, int] | None = None
        self.last_encode_seconds = 0.0

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, providers: list[str] | None = None,
                    threads: int | None = None) -> OnnxPredictor:
        return cls(load_bundle(Path(path)), providers, threads)

    def set_image(self, image: np.ndarray) -> None:
        image = validate_rgb(image)
        start = time.perf_counter()
        self.features = self.encoder(image)
        self._hw = image.shape[:2]
        self.last_encode_seconds = time.perf_counter() - start

    def predict(self, points=None, labels=None, box=None, mask_logits=None) -> Prediction:
        if self.features is None or self._hw is None:
            raise RuntimeError("call set_image before predict")
        low, iou = self.decoder(self.features, self._hw, points, labels, box, mask_logits)
        return Prediction(mask=self.transform.mask_from_logits(low, self._hw), low_res_logits=low, iou=iou)
