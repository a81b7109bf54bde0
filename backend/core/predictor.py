"""The predictor interface that the evaluator, the server and the tests program against.

Two real implementations share every step but the network: ``OnnxPredictor``
(histosam.backend.bundles.onnx_predictor, onnxruntime) and ``TorchPredictor``
(histosam.training.torch_predictor, PyTorch). Both call the same numpy transforms and the
same mask-selection rule (single-mask output, token 0), so they agree to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One answer to one prompt.

    mask: (H, W) bool at the original image size (logits > 0).
    low_res_logits: (256, 256) float32 in the model's letterboxed frame; feed it back as
        ``mask_logits`` with the next click.
    iou: the model's own estimate of the mask's IoU.
    """

    mask: np.ndarray
    low_res_logits: np.ndarray
    iou: float


@runtime_checkable
class Predictor(Protocol):
    """Encode an image once, then answer prompts cheaply.

    Coordinates are in original image pixels, x then y (SAM's convention: a pixel index,
    not its centre). ``labels``: 1 positive, 0 negative.
    """

    name: str

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> Prediction: ...


def prompt_arrays(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Points, labels and an optional box as SAM's (N, 2) coords and (N,) labels.

    A box becomes two corner points labelled 2 and 3. Without a box a padding point
    (label -1) is appended, as SAM does for point-only prompts. Raises on non-finite input.
    """
    from histosam.backend.core.errors import InvalidInputError

    pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    lbl = np.zeros((0,), np.float32) if labels is None else np.asarray(labels, np.float32).reshape(-1)
    if len(pts) != len(lbl):
        raise InvalidInputError(f"{len(pts)} points but {len(lbl)} labels")
    if box is not None:
        b = np.asarray(box, np.float32).reshape(4)
        if not np.all(np.isfinite(b)):
            raise InvalidInputError("box has a non-finite coordinate")
        x0, x1 = sorted((float(b[0]), float(b[2])))
        y0, y1 = sorted((float(b[1]), float(b[3])))
        pts = np.concatenate([pts, np.array([[x0, y0], [x1, y1]], np.float32)])
        lbl = np.concatenate([lbl, np.array([2, 3], np.float32)])
    else:
        pts = np.concatenate([pts, np.zeros((1, 2), np.float32)])
        lbl = np.concatenate([lbl, np.array([-1], np.float32)])
    if not np.all(np.isfinite(pts)):
        raise InvalidInputError("a point has a non-finite coordinate")
    if len(lbl) == 1 and lbl[0] == -1:
        raise InvalidInputError("a prompt needs at least one point or a box")
    return pts, lbl
