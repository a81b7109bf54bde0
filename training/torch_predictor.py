"""The PyTorch predictor: same numpy transforms and mask rule as the ONNX one.

Used by the evaluator (``--backend torch``), by export's parity check, and in training's
validation. The serving side never imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from histosam.backend.core.predictor import Prediction, prompt_arrays
from histosam.backend.core.transforms import LOW_RES, ImageTransform, validate_rgb
from histosam.training.models.sam_model import HistoSam


class TorchPredictor:
    """Encode once with ``set_image``, then ``predict`` per click."""

    def __init__(self, model: HistoSam, name: str | None = None, device: str = "cpu", mask_dilation: int = 0) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.name = name or model.spec.name
        spec = model.spec
        self.transform = ImageTransform(spec.input_size, spec.mean, spec.std, mask_dilation)
        self._features: dict[str, torch.Tensor] | None = None
        self._hw: tuple[int, int] | None = None
        self.last_encode_seconds = 0.0
        # Whether these weights' masks are edge-snapped where they are served (histosam.backend.postprocess.edge_snap);
        # the evaluator applies it, as it does for the ONNX bundle.
        self.edge_snap = False

    @classmethod
    def from_spec(cls, model_or_bundle: str, checkpoint: str | None = None,
                  decoder_weights: str | None = None) -> TorchPredictor:
        """A registry name, or a bundle dir whose manifest names its source model."""
        from histosam.training.models.loading import load_model_from_source

        path = Path(model_or_bundle)
        if (path / "manifest.json").is_file():
            manifest = json.loads((path / "manifest.json").read_text())
            source = manifest["source"]
            model = load_model_from_source(source)
            predictor = cls(model, name=source["model"], mask_dilation=int(manifest.get("mask_dilation", 0)))
            predictor.edge_snap = bool(manifest.get("edge_snap", False))
            return predictor
        from histosam.backend.bundles.catalog import resolve_source

        # Base models, shipped fine-tunes and "default" resolve the same way as for export/serve.
        source = resolve_source(model_or_bundle, checkpoint, decoder_weights)
        predictor = cls(load_model_from_source(source), name=source["name"], mask_dilation=source.get("mask_dilation", 0))
        predictor.edge_snap = bool(source.get("edge_snap", False))
        return predictor

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        image = validate_rgb(image)
        start = time.perf_counter()
        x = torch.from_numpy(self.transform.apply_image(image)).to(self.device)
        self._features = self.model.encode(x)
        self._hw = image.shape[:2]
        self.last_encode_seconds = time.perf_counter() - start

    @property
    def features(self) -> dict[str, np.ndarray]:
        """The encoder outputs as numpy (for parity checks against encoder.onnx)."""
        if self._features is None:
            raise RuntimeError("call set_image first")
        return {k: v.detach().cpu().numpy() for k, v in self._features.items()}

    @torch.inference_mode()
    def predict(self, points=None, labels=None, box=None, mask_logits=None) -> Prediction:
        if self._features is None or self._hw is None:
            raise RuntimeError("call set_image before predict")
        coords, lbl = prompt_arrays(points, labels, box)
        coords = self.transform.apply_coords(coords, self._hw)
        has_mask = mask_logits is not None
        mask_in = (np.asarray(mask_logits, np.float32).reshape(1, 1, LOW_RES, LOW_RES) if has_mask
                   else np.zeros((1, 1, LOW_RES, LOW_RES), np.float32))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        low_res, iou = self.model.decode(
            self._features,
            t(coords[None]),
            t(lbl[None]),
            t(mask_in),
            t(np.array([float(has_mask)], np.float32)),
        )
        low = low_res[0, 0].float().cpu().numpy()
        return Prediction(mask=self.transform.mask_from_logits(low, self._hw), low_res_logits=low, iou=float(iou[0, 0]))
