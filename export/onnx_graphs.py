"""torch.nn wrappers that become encoder.onnx and decoder.onnx.

Like segment-anything's SamOnnxModel they reuse the model's own submodules (via
``HistoSam.encode``/``decode``), so the graphs compute what the PyTorch predictor computes.
Differences from PyPI segment-anything 1.0's exporter, on purpose:
- the un-padding crop in ``masks`` is computed from ``orig_im_size`` inside the graph (1.0
  bakes the traced size in, giving wrong masks for every other image size);
- the output is always the single-mask token 0 (1.0's ``select_masks`` picks a multimask
  output for a single click).
"""

from __future__ import annotations

import torch
from torch import nn

from histosam.training.models.sam_model import HistoSam, upsample_logits

DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


class EncoderGraph(nn.Module):
    """Preprocessed image (1, 3, S, S) float32 -> image_embeddings (+ extra features)."""

    def __init__(self, model: HistoSam) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["image_embeddings", *model.spec.extra_features]
        # torch.onnx.export restores the wrapper's training flag recursively after export; a
        # wrapper left in training mode would switch the model's BatchNorms to batch stats.
        self.eval()

    def forward(self, image: torch.Tensor):
        feats = self.model.encode(image)
        return tuple(feats[name] for name in self.output_names)


class DecoderGraph(nn.Module):
    """SAM's official ONNX decoder interface, plus the model's extra feature inputs (if any).

    ``extra_inputs=()`` gives SAM's interface alone, so tools that know only it can run the
    graph; the exporter does so (decoder_stock.onnx) only for decoders that can run without
    their extra features (their ``stock_mode``).
    """

    def __init__(self, model: HistoSam, extra_inputs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.extra_inputs = tuple(extra_inputs)
        self.input_names = DECODER_INPUTS + list(self.extra_inputs)
        self.eval()  # see EncoderGraph

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size, *extras):
        features = {"image_embeddings": image_embeddings}
        features.update(dict(zip(self.extra_inputs, extras, strict=True)))
        low_res, iou = self.model.decode(features, point_coords, point_labels, mask_input, has_mask_input)
        masks = upsample_logits(low_res, self.model.spec.input_size, orig_im_size)
        return masks, iou, low_res
