"""Fine-tuned decoder weights as safetensors: small, safe to load, self-describing.

The file holds the prompt encoder and mask decoder tensors (what decoder training changes)
and, in its metadata, the base model name, the decoder architecture and the click-disk
setting, so ``apply_decoder_weights`` can rebuild the exact model without code edits.
The image encoder is stored only when it was trained (``ie_md``, ``whole``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histosam.backend.core.atomic import atomic_write
from histosam.backend.core.errors import CheckpointError
from histosam.training.models.sam_model import HistoSam

PARTS = ("prompt_encoder.", "mask_decoder.")


def decoder_config(model: HistoSam) -> dict[str, Any]:
    cfg = getattr(model.mask_decoder, "config", None)
    return dict(cfg) if cfg else {"variant": "stock"}


def save_decoder_weights(model: HistoSam, path: Path, include_encoder: bool = False,
                         extra_metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file in the same folder, then rename; mode as open() gives)."""
    from safetensors.torch import save_file

    prefixes = PARTS + (("image_encoder.",) if include_encoder else ())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    meta = {
        "base_model": model.spec.name,
        "decoder": json.dumps(decoder_config(model)),
        "click_disk_radius": str(model.click_disk_radius),
        "click_disk_mode": model.click_disk_mode,
        "includes_image_encoder": str(bool(include_encoder)),
    }
    meta.update(extra_metadata or {})
    path = Path(path)
    # Not 0o600 although save_file itself writes through a private temporary file.
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta), durable=True)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"decoder weights {path} could not be read: {exc}") from None


def apply_decoder_weights(model: HistoSam, path: Path) -> HistoSam:
    """Replace decoder (and prompt encoder, maybe image encoder) with the file's weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"decoder weights {path} do not exist")
    meta = read_metadata(path)
    if meta.get("base_model") and meta["base_model"] != model.spec.name:
        raise CheckpointError(
            f"decoder weights {path} were trained on {meta['base_model']}, not {model.spec.name}"
        )
    cfg = json.loads(meta.get("decoder", '{"variant": "stock"}'))
    if cfg.get("variant", "stock") != "stock":
        from histosam.training.models.decoders import build_decoder

        model = build_decoder(model, cfg)
    model.click_disk_radius = float(meta.get("click_disk_radius", 0.0))
    model.click_disk_mode = meta.get("click_disk_mode", "add")  # files from before the option: add
    state = load_file(str(path))
    own = model.state_dict()
    bad = [k for k in state if k not in own or tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointError(f"decoder weights {path} do not match the model (e.g. {bad[0]})")
    model.load_state_dict(state, strict=False)
    return model.eval()
