"""Rebuild a model from a "source" record (what a bundle's manifest stores).

A source is ``{"model": registry name, "checkpoint": path or None, "decoder_weights": path or
None, ...}``. Decoder weights are a safetensors file produced by training: they replace the
prompt encoder and mask decoder of the base model and may carry a modified decoder, whose
architecture is described in the file's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histosam.training.models.registry import build_model
from histosam.training.models.sam_model import HistoSam


def load_model_from_source(source: dict[str, Any]) -> HistoSam:
    model = build_model(source["model"], source.get("checkpoint"))
    weights = source.get("decoder_weights")
    if weights:
        from histosam.training.models.decoder_weights import apply_decoder_weights

        model = apply_decoder_weights(model, Path(weights))
    return model.eval()
