"""Diffusion training losses, with Geom-Erasing's optional region re-weighting.

Re-weighting (paper Sec. 3.3): with T grid cells of which K hold the concept and a
factor ``alpha``, each pixel of a concept cell gets weight ``T / (K + alpha (T-K))``
and every other pixel ``alpha T / (K + alpha (T-K))``. The weights of the T cells
sum to T, so the loss scale matches the unweighted loss; ``alpha > 1`` makes the
model spend more of its capacity on the scene than on the concept region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def region_weights(cell_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-cell loss weights.

    Args:
        cell_mask: ``(B, G, G)`` bool, True where the cell holds the concept.
        alpha: weight ratio outside/inside the concept region (> 0).

    Returns:
        ``(B, G, G)`` float32 weights; each image's weights sum to ``G*G``. Images
        with no concept cell get all-ones.
    """
    if alpha <= 0:
        raise ValueError(f"re-weighting alpha must be > 0, got {alpha}")
    mask = cell_mask.float()
    total = mask[0].numel()
    k = mask.flatten(1).sum(1).view(-1, 1, 1)
    denom = k + alpha * (total - k)
    inside = total / denom
    outside = alpha * total / denom
    return torch.where(mask.bool(), inside, outside).float()


def weight_map(cell_mask: torch.Tensor, alpha: float, height: int, width: int) -> torch.Tensor:
    """``(B, 1, H, W)`` per-pixel weights, each cell's weight spread uniformly over its pixels.

    ``H`` and ``W`` must be multiples of ``G`` (the UNet input grid aligns with the cells).
    """
    g = cell_mask.shape[-1]
    if height % g or width % g:
        raise ValueError(f"loss grid {g} must divide the model input size {height}x{width}")
    w = region_weights(cell_mask, alpha)
    return F.interpolate(w.unsqueeze(1), size=(height, width), mode="nearest")


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict for the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, optionally weighted per pixel.

    Args:
        pred, target: ``(B, C, H, W)``.
        weights: ``(B, 1, H, W)`` from :func:`weight_map`, or None.

    Returns:
        Scalar float32 loss (mean over every element, so weights with mean 1 keep the scale).
    """
    err = (pred.float() - target.float()).pow(2)
    if weights is not None:
        err = err * weights.to(err.dtype)
    return err.mean()
