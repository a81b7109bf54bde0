"""Normalized Focal Loss (RITM, Sofiiuk et al.): focal loss whose focal weights are rescaled
per image to sum to the number of (valid) pixels, the scale detached.

Plain focal loss shrinks as the prediction improves, so late, fine corrections (the last
clicks) get vanishing gradients; normalising the weights keeps the total gradient scale
constant and puts it on the pixels that are still wrong.
"""

from __future__ import annotations

import torch


def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                          alpha: float = 0.5, gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """Mean over images of NFL; ``logits``/``target``/``weight`` are (B, 1, H, W) (or (B, H, W)).

    ``weight`` (1 inside the image, 0 on the letterbox padding) excludes pixels entirely.
    """
    target = target.to(logits.dtype)
    weight = torch.ones_like(logits) if weight is None else weight.to(logits.dtype)
    dims = tuple(range(1, logits.dim()))
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0.5, p, 1 - p)
    alpha_t = torch.where(target > 0.5, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    beta = (1 - pt) ** gamma * weight
    n_valid = weight.sum(dim=dims, keepdim=True)
    scale = (n_valid / (beta.sum(dim=dims, keepdim=True) + eps)).detach()
    # log(pt) from logits for stability: log sigmoid(+-x).
    log_pt = torch.nn.functional.logsigmoid(torch.where(target > 0.5, logits, -logits))
    loss = -alpha_t * beta * scale * log_pt
    per_image = loss.sum(dim=dims) / (n_valid.reshape(-1) + eps)
    return per_image.mean()


def click_consistency_loss(logits: torch.Tensor, click_map: torch.Tensor) -> torch.Tensor:
    """Mean over images of the BCE on the pixels around each click, toward the click's label.

    Why: NFL spreads the gradient over every wrong pixel, and the pixels a user clicked are a
    handful among 65k, so a decoder that mostly copies its mask prompt and the image prior
    loses little by ignoring a click (obedience stayed at ~20 % for positive clicks). This term
    asks directly for what a user expects: the clicked spot takes the clicked label.
    ``click_map`` (B, 1, H, W): +1 around positive clicks, -1 around negative ones, 0 elsewhere
    (and where a positive and a negative disk overlap); images without clicks contribute zero.
    """
    mask = (click_map != 0).to(logits.dtype)
    target = (click_map > 0).to(logits.dtype)
    dims = tuple(range(1, logits.dim()))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask
    per_image = bce.sum(dim=dims) / mask.sum(dim=dims).clamp(min=1.0)
    return per_image.mean()
