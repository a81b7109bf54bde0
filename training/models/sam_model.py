"""The one model container used by training, the PyTorch predictor and the ONNX export.

``HistoSam.encode`` and ``HistoSam.decode`` are the only forward paths: the predictor calls
them and the ONNX wrappers trace them, so PyTorch and ONNX cannot compute different things.
``decode`` follows SAM's ONNX decoder semantics (padding points labelled -1, box corners 2/3,
a mask prompt gated by ``has_mask_input``) and always returns the single-mask output
(token 0), the only token LiteMedSAM trained and the one our fine-tunes train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs around it: input geometry, normalisation, embedding shape."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_shape: tuple[int, int, int] = (256, 64, 64)
    # Names of extra encoder outputs the decoder consumes (high-resolution features).
    extra_features: tuple[str, ...] = field(default_factory=tuple)


CLICK_DISK_MODES = ("add", "override")


class HistoSam(nn.Module):
    """Image encoder + prompt encoder + mask decoder, with SAM's ONNX-style prompt handling.

    ``click_disk_radius`` > 0 also draws the clicks into the dense mask prompt as +/- disks
    (in low-res pixels), RITM-style, so clicks reach the decoder through the spatially
    aligned path as well as through the sparse point tokens. ``click_disk_mode`` says how a
    disk meets the previous mask there: ``"add"`` (+/-8 added to the previous logits: a click
    on a confident error, logit -15, still reads "background", so the decoder can hardly tell
    it was clicked) or ``"override"`` (the disk replaces the previous logits: the clicked spot
    says what the user said). "add" is kept for weights trained with it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        click_disk_radius: float = 0.0,
        click_disk_mode: str = "add",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.click_disk_radius = float(click_disk_radius)
        if click_disk_mode not in CLICK_DISK_MODES:
            raise ValueError(f"click_disk_mode must be one of {CLICK_DISK_MODES}, got {click_disk_mode!r}")
        self.click_disk_mode = click_disk_mode

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed (B, 3, S, S) -> {"image_embeddings": (B, 256, 64, 64), extras...}."""
        features_fn = getattr(self.mask_decoder, "encoder_features", None)
        if features_fn is not None:
            return features_fn(self.image_encoder, image)
        return {"image_embeddings": self.image_encoder(image)}

    # -- prompts ---------------------------------------------------------------------------
    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) coords in the input frame, (B, N) labels -> (B, N, 256) sparse tokens."""
        pe = self.prompt_encoder
        coords = (coords + 0.5) / self.spec.input_size
        emb = pe.pe_layer._pe_encoding(coords)
        lab = labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (lab != -1)
        emb = emb + pe.not_a_point_embed.weight * (lab == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (lab == i)
        return emb

    def disk_maps(self, coords: torch.Tensor, labels: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative click disks on the 256x256 low-res grid, each (B, 1, 256, 256).

        The one click raster: the dense prompt, the prompt maps and the click-consistency
        loss's target all come from here.

        ``radius`` is in input-frame pixels. Trace-friendly (tensor ops only).
        """
        size = self.prompt_encoder.mask_input_size[0]
        scale = size / self.spec.input_size
        grid = (torch.arange(size, dtype=coords.dtype, device=coords.device) + 0.5) / scale
        yy = grid.view(1, 1, size, 1)
        xx = grid.view(1, 1, 1, size)
        cx = coords[..., 0].unsqueeze(-1).unsqueeze(-1)
        cy = coords[..., 1].unsqueeze(-1).unsqueeze(-1)
        inside = (((xx - cx) ** 2 + (yy - cy) ** 2) <= radius * radius).to(coords.dtype)  # (B, N, S, S)
        pos = (inside * (labels == 1).to(coords.dtype).unsqueeze(-1).unsqueeze(-1)).amax(dim=1, keepdim=True)
        neg = (inside * (labels == 0).to(coords.dtype).unsqueeze(-1).unsqueeze(-1)).amax(dim=1, keepdim=True)
        return pos, neg

    def click_disks(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Clicks as +1/-1 disks on the 256x256 low-res grid, (B, 1, 256, 256).

        ``click_disk_radius`` is in low-res pixels.
        """
        scale = self.prompt_encoder.mask_input_size[0] / self.spec.input_size
        pos, neg = self.disk_maps(coords, labels, self.click_disk_radius / scale)
        return pos - neg

    def prompt_maps(self, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor,
                    has_mask_input: torch.Tensor, radius: float) -> torch.Tensor:
        """(B, 3, 256, 256): positive disks, negative disks, previous mask probability (0 if none).

        ``radius`` is in input-frame pixels. Trace-friendly (tensor ops only).
        """
        pos, neg = self.disk_maps(coords, labels, radius)
        prev = torch.sigmoid(mask_input) * has_mask_input.reshape(-1, 1, 1, 1)
        return torch.cat([pos, neg, prev], dim=1)

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        gate = has_mask_input.reshape(-1, 1, 1, 1)
        emb = gate * pe.mask_downscaling(mask_input)
        return emb + (1 - gate) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    # -- decoder ---------------------------------------------------------------------------
    def decode(
        self,
        features: dict[str, torch.Tensor],
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> low-res logits (B, 1, 256, 256) and predicted IoU (B, 1).

        ``features`` holds ``image_embeddings`` (B or 1, 256, 64, 64) and any extras.
        """
        sparse = self.embed_points(point_coords, point_labels)
        if self.click_disk_radius > 0:
            disks = self.click_disks(point_coords, point_labels)
            gate = has_mask_input.reshape(-1, 1, 1, 1)
            # Without a previous mask the disks alone are the dense prompt.
            if self.click_disk_mode == "override":
                mask_input = torch.where(disks != 0, disks * 8.0, mask_input * gate)
            else:
                mask_input = mask_input * gate + disks * 8.0
            has_mask_input = torch.ones_like(has_mask_input)
        dense = self.embed_mask(mask_input, has_mask_input)
        image_pe = self.prompt_encoder.get_dense_pe()
        single = getattr(self.mask_decoder, "predict_single", None)
        if single is not None and getattr(self.mask_decoder, "uses_prompt_maps", False):
            # Full-resolution prompt maps for decoders that refine at 256x256 (refine_hq):
            # the clicks and the previous mask reach the high-resolution head directly.
            maps = self.prompt_maps(point_coords, point_labels, mask_input, has_mask_input,
                                    float(self.mask_decoder.config.get("map_disk_radius", 3.0)))
            return single(features, image_pe, sparse, dense, prompt_maps=maps)
        if single is not None:
            return single(features, image_pe, sparse, dense)
        return stock_predict_single(self.mask_decoder, features["image_embeddings"], image_pe, sparse, dense)

    def forward(self, image, point_coords, point_labels, mask_input, has_mask_input):
        return self.decode(self.encode(image), point_coords, point_labels, mask_input, has_mask_input)


def run_two_way(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's two-way transformer with one prompt set per image.

    ``decoder`` has SAM's iou_token, mask_tokens, transformer and iou_prediction_head.
    Returns the token outputs (B, T, C), the image features as (B, C, 64, 64), and the
    predicted IoU of token 0 (B, 1).
    """
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = image_embeddings.expand(b, -1, -1, -1) + dense
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, :1]
    return hs, src.transpose(1, 2).reshape(b, c, h, w), iou


def stock_predict_single(
    decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's MaskDecoder.predict_masks, one prompt set per image, token 0 only.

    The stock method repeats each image once per prompt set (``repeat_interleave``), which
    pairs images and prompts wrongly for a batch of B images with one prompt set each.
    """
    hs, src, iou = run_two_way(decoder, image_embeddings, image_pe, sparse, dense)
    mask_token_out = hs[:, 1, :]
    upscaled = decoder.output_upscaling(src)
    hyper = decoder.output_hypernetworks_mlps[0](mask_token_out)
    bb, cc, hh, ww = upscaled.shape
    masks = (hyper.unsqueeze(1) @ upscaled.reshape(bb, cc, hh * ww)).reshape(bb, 1, hh, ww)
    return masks, iou


def upsample_logits(low_res: torch.Tensor, input_size: int, orig_hw: torch.Tensor) -> torch.Tensor:
    """Low-res logits -> logits at the original size, SAM's two-step rule, trace-friendly.

    The crop size is computed from ``orig_hw`` with tensor ops so that a traced graph keeps
    it dynamic (PyPI segment-anything 1.0 bakes it in as a constant).
    """
    masks = F.interpolate(low_res, size=(input_size, input_size), mode="bilinear", align_corners=False)
    orig = orig_hw.to(torch.float32)
    scale = input_size / torch.max(orig)
    pre = torch.floor(orig * scale + 0.5).to(torch.int64)
    masks = masks[..., : pre[0], : pre[1]]
    size = orig_hw.to(torch.int64)
    return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)
