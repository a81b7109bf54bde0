"""Modified mask decoders: ``refine`` (the paper's), ``refine_lite`` and ``refine_hq``.

All three keep SAM's two-way transformer, output tokens and IoU head (initialised from the
base model's decoder) and keep the decoder interface (low-res 256x256 logits + IoU), so the
ONNX export, the predictors and the server treat them like the stock decoder.

* ``refine`` follows the paper: after the transformer a global self-attention block over the
  64x64 image tokens, then two UpConvBlocks (two 3x3 convs, the second halving the channels,
  then a 2x2 up-convolution) and a ConvBlock (two 3x3 convs, the second halving), InstanceNorm
  and GELU between layers, a shortcut in each block, and a 1x1 conv that gives the mask
  directly (no token/embedding dot product). About 20 GMACs per click: seconds on a CPU.
* ``refine_lite``: the same ideas at a size that keeps the per-click cost near the stock
  decoder's: a 1x1 reduction to ``width`` channels, the global attention on a 2x pooled grid,
  halved blocks. It replaces SAM's upscaling path, so it is not more expensive than stock.
* ``refine_hq``: the stock SAM path unchanged (so at initialisation it *is* the base model),
  plus a residual head at 128x128 and 256x256 that sees higher-resolution information the
  64x64 embedding lacks: a small trainable image stem (two convs on the 256x256 input, run
  once per image on the *encoder* side, exported as extra encoder outputs ``hq_stem_256`` and
  ``hq_stem_128``), the clicks as disks and the previous mask at 256x256. Its last conv is
  zero-initialised, so training starts from LiteMedSAM's behaviour and learns corrections
  (where a boundary really runs) instead of a mask from scratch.

Stock interface for ``refine_hq``: tools that only know SAM's decoder inputs cannot feed the
stem features. ``stock_mode`` makes the decoder skip the high-resolution head and return the
SAM path's logits: the exporter writes that as ``decoder_stock.onnx``. Those logits are those
of the fine-tuned SAM path alone (trained with an auxiliary loss so they stay a usable mask),
honest about what it is: the model *without* its high-resolution refinement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from histosam.backend.core.errors import CheckpointError
from histosam.training.models.sam_model import HistoSam, run_two_way

VARIANTS = ("refine", "refine_lite", "refine_hq")
HQ_FEATURES = ("hq_stem_256", "hq_stem_128")


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class ConvBlock(nn.Module):
    """Two 3x3 convs (the second halving the channels), InstanceNorm + GELU, 1x1 shortcut."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out = out_channels or channels // 2
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, out, 3, padding=1)
        self.norm2 = _norm(out)
        self.shortcut = nn.Conv2d(channels, out, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class UpConvBlock(nn.Module):
    """ConvBlock then a 2x2 stride-2 up-convolution (doubles the resolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ConvBlock(channels)
        self.up = nn.ConvTranspose2d(channels // 2, channels // 2, 2, stride=2)
        self.norm = _norm(channels // 2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.up(self.block(x))))


class GlobalAttention(nn.Module):
    """Pre-norm multi-head self-attention over all image tokens (+ positional encoding)."""

    def __init__(self, dim: int, heads: int, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        src = x + pos
        if self.pool > 1:
            src = F.avg_pool2d(src, self.pool)
        hh, ww = src.shape[-2:]
        tokens = self.norm(src.flatten(2).transpose(1, 2))
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        out = out.transpose(1, 2).reshape(b, c, hh, ww)
        if self.pool > 1:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return x + out


class _SamParts(nn.Module):
    """The parts every variant shares with SAM's decoder (names kept, so weights load)."""

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.transformer = stock.transformer
        self.iou_token = stock.iou_token
        self.mask_tokens = stock.mask_tokens
        self.iou_prediction_head = stock.iou_prediction_head

    def run_transformer(self, image_embeddings, image_pe, sparse, dense):
        return run_two_way(self, image_embeddings, image_pe, sparse, dense)


class RefineDecoder(_SamParts):
    """``refine`` / ``refine_lite``: attention + conv upsampling, mask from a 1x1 conv."""

    def __init__(self, stock: nn.Module, config: dict[str, Any]) -> None:
        super().__init__(stock)
        self.config = dict(config)
        width = int(config.get("width", 256))
        pool = int(config.get("attn_pool", 1))
        heads = int(config.get("heads", 8))
        self.reduce = nn.Identity() if width == 256 else nn.Conv2d(256, width, 1)
        self.pos_reduce = nn.Identity() if width == 256 else nn.Conv2d(256, width, 1, bias=False)
        self.attention = GlobalAttention(width, heads, pool)
        self.up1 = UpConvBlock(width)
        self.up2 = UpConvBlock(width // 2)
        self.block = ConvBlock(width // 4)
        self.head = nn.Conv2d(width // 8, 1, 1)

    def predict_single(self, features, image_pe, sparse, dense):
        _, src, iou = self.run_transformer(features["image_embeddings"], image_pe, sparse, dense)
        x = self.reduce(src)
        pos = self.pos_reduce(image_pe)
        x = self.attention(x, pos.expand(x.shape[0], -1, -1, -1))
        x = self.block(self.up2(self.up1(x)))
        return self.head(x), iou


class ImageStem(nn.Module):
    """Two cheap strided convs on the (normalised) 256x256 input: 256^2 and 128^2 features."""

    def __init__(self, c256: int, c128: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c256, 3, padding=1)
        self.conv2 = nn.Conv2d(c256, c128, 3, stride=2, padding=1)
        self.act = nn.GELU()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f256 = self.act(self.conv1(image))
        return f256, self.act(self.conv2(f256))


class RefineHQDecoder(_SamParts):
    """``refine_hq``: the stock SAM path + a zero-initialised high-resolution residual head."""

    uses_prompt_maps = True
    supports_stock_interface = True

    def __init__(self, stock: nn.Module, config: dict[str, Any], image_scale: float = 1.0) -> None:
        super().__init__(stock)
        self.config = dict(config)
        self.stock_mode = False
        self.output_upscaling = stock.output_upscaling
        self.output_hypernetworks_mlps = stock.output_hypernetworks_mlps
        c256 = int(config.get("stem_256", 16))
        c128 = int(config.get("stem_128", 32))
        width = int(config.get("width", 16))
        # Keeps the stem's input near unit scale whatever the base model's normalisation.
        self.image_scale = float(config.get("image_scale", image_scale))
        self.stem = ImageStem(c256, c128)
        up1_ch = stock.output_upscaling[0].out_channels  # 64 in SAM
        up2_ch = stock.output_upscaling[3].out_channels  # 32 in SAM
        self.fuse128 = nn.Conv2d(up1_ch + c128, 2 * width, 1)
        self.conv128 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.norm128 = _norm(2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.fuse256 = nn.Conv2d(width + up2_ch + c256 + 4, width, 1)
        self.conv256a = nn.Conv2d(width, width, 3, padding=1)
        self.norm256 = _norm(width)
        self.conv256b = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.act = nn.GELU()
        self.last_stock_logits: torch.Tensor | None = None  # training's auxiliary loss

    def encoder_features(self, image_encoder: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Runs once per image (encoder.onnx): TinyViT embedding + the trainable stem."""
        f256, f128 = self.stem(image * self.image_scale)
        return {"image_embeddings": image_encoder(image), "hq_stem_256": f256, "hq_stem_128": f128}

    def stem_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stem alone (training caches the frozen embedding and runs only this)."""
        f256, f128 = self.stem(image * self.image_scale)
        return {"hq_stem_256": f256, "hq_stem_128": f128}

    def predict_single(self, features, image_pe, sparse, dense, prompt_maps=None):
        hs, src, iou = self.run_transformer(features["image_embeddings"], image_pe, sparse, dense)
        b = src.shape[0]
        ups = self.output_upscaling
        mid = ups[2](ups[1](ups[0](src)))  # (B, 64, 128, 128)
        upscaled = ups[4](ups[3](mid))  # (B, 32, 256, 256)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1, :])
        _, cc, hh, ww = upscaled.shape
        stock = (hyper.unsqueeze(1) @ upscaled.reshape(b, cc, hh * ww)).reshape(b, 1, hh, ww)
        if self.stock_mode or prompt_maps is None:
            return stock, iou
        s256 = features["hq_stem_256"].expand(b, -1, -1, -1)
        s128 = features["hq_stem_128"].expand(b, -1, -1, -1)
        x = self.act(self.fuse128(torch.cat([mid, s128], dim=1)))
        x = self.act(self.norm128(self.conv128(x)) + x)
        x = self.act(self.up(x))
        stock_prob = torch.sigmoid(stock)
        y = self.act(self.fuse256(torch.cat([x, upscaled, s256, prompt_maps, stock_prob], dim=1)))
        y = self.act(self.norm256(self.conv256a(y)) + y)
        y = self.act(self.conv256b(y) + y)
        if self.training:
            self.last_stock_logits = stock
        return stock + self.head(y), iou


def build_decoder(model: HistoSam, cfg: dict[str, Any]) -> HistoSam:
    """A copy of ``model`` whose mask decoder is the variant ``cfg["variant"]``.

    Shared parts are the stock decoder's own modules (so they start from its weights);
    ``cfg`` is kept as the decoder's ``config`` and round-trips through the weights file.
    """
    variant = cfg.get("variant", "stock")
    stock = model.mask_decoder
    if not hasattr(stock, "output_upscaling") or isinstance(stock, (RefineDecoder, RefineHQDecoder)):
        raise CheckpointError(f"build_decoder needs a model with SAM's stock decoder, not {type(stock).__name__}")
    extra: tuple[str, ...] = ()
    if variant == "refine":
        full = {"variant": "refine", "width": 256, "heads": 8, "attn_pool": 1}
        full.update(cfg)
        decoder: nn.Module = RefineDecoder(stock, full)
    elif variant == "refine_lite":
        full = {"variant": "refine_lite", "width": 64, "heads": 4, "attn_pool": 2}
        full.update(cfg)
        decoder = RefineDecoder(stock, full)
    elif variant == "refine_hq":
        full = {"variant": "refine_hq", "stem_256": 16, "stem_128": 32, "width": 16, "map_disk_radius": 3.0,
                "image_scale": _unit_scale(model)}
        full.update(cfg)
        decoder = RefineHQDecoder(stock, full)
        extra = HQ_FEATURES
    else:
        raise CheckpointError(f"unknown decoder variant {variant!r}; known: stock, {', '.join(VARIANTS)}")
    spec = dataclasses.replace(model.spec, extra_features=extra)
    return HistoSam(spec, model.image_encoder, model.prompt_encoder, decoder,
                    click_disk_radius=model.click_disk_radius,
                    click_disk_mode=model.click_disk_mode).train(model.training)


def _unit_scale(model: HistoSam) -> float:
    """1 for inputs already near unit scale (LiteMedSAM: RGB/255, SAM: z-scores)."""
    std = max(model.spec.std)
    return 1.0 if std > 1 or math.isclose(std, 1.0) else 1.0 / std
