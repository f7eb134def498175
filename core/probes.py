"""Has the model learned what its location tokens mean? Measurements without sampling.

Sampling-based checks (ICR under a negative prompt, the ``probe_geom`` arm) mix many effects:
the scorer, guidance, the sampler, how often the concept appears anyway. These probes look at
one denoising step instead, on clean held-out images whose noise is fixed:

* :func:`tag_localisation` appends ``"<concept> <l..>"`` for a chosen set of cells to each
  caption and measures where the model's x0 prediction changes. A model that bound its
  location tokens changes the named cells and leaves the rest alone (``ratio`` >> 1); a model
  that ignores the tag changes nothing (``effect`` ~ 0); one that learned only "the concept
  exists somewhere" changes the image everywhere (``ratio`` ~ 1).
* :func:`conditioning_paths` (UNets with a pooled-text time embedding) splits the text's
  influence between that global path and cross-attention, the only path with a spatial axis.

Both are deterministic for a seed and cost a few UNet evaluations per timestep.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F

from geomerase.core.captions import rewrite_caption
from geomerase.core.guidance import eps_to_pred, pred_to_eps
from geomerase.core.losses import diffusion_target
from geomerase.core.diffusion_model import DiffusionModel


def random_cell_sets(n: int, grid: int, seed: int = 0) -> list[list[int]]:
    """``n`` cell sets of 1, 2 or 4 adjacent cells (the sizes small concepts cover in ICD)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([1, 2, 4])
        r0, c0 = rng.randrange(grid - 1), rng.randrange(grid - 1)
        block = [(r0 + a) * grid + c0 + b for a in range(2) for b in range(2)]
        out.append(sorted(block[:k]))
    return out


def cell_masks(cells: Sequence[Sequence[int]], grid: int, size: int) -> torch.Tensor:
    """``(N, 1, size, size)`` float masks, 1 inside each set's cells (nearest upsampling of the grid)."""
    m = torch.zeros(len(cells), grid * grid)
    for i, cs in enumerate(cells):
        if cs:
            m[i, list(cs)] = 1.0
    return F.interpolate(m.view(-1, 1, grid, grid), size=(size, size), mode="nearest")


def _x0(model: DiffusionModel, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The model's x0 estimate ``(B, C, h, w)`` whatever its prediction type."""
    ac, kind = model.noise_scheduler.alphas_cumprod, model.noise_scheduler.config.prediction_type
    eps = pred_to_eps(model.denoise(xt, t, cond), xt, t, ac, kind)
    return eps_to_pred(eps, xt, t, ac, "sample")


@torch.no_grad()
def tag_localisation(model: DiffusionModel, images: torch.Tensor, captions: Sequence[str], concept_name: str,
                     cells: Sequence[Sequence[int]], timesteps: Sequence[int] = (300, 500, 700, 900),
                     seed: int = 0) -> dict[int, dict[str, float]]:
    """Where does appending the concept tag for ``cells`` change the x0 prediction?

    ``images``: ``(N, 3, R, R)`` in [-1, 1], ideally concept-free; ``captions``: their clean
    captions; ``cells[i]``: the cells named for image i. Returns, per timestep, the mean squared
    change of x0 inside the named cells (``in``) and outside (``out``), ``ratio = in / out`` and
    ``effect`` = ``in`` relative to the change the caption itself makes (caption vs empty) over
    the whole image, so models of different scales compare.
    """
    if not (len(images) == len(captions) == len(cells)):
        raise ValueError(f"images/captions/cells lengths differ: {len(images)}, {len(captions)}, {len(cells)}")
    dev = next(model.unet.parameters()).device
    x0 = model.to_model_space(images.to(dev))
    mask = cell_masks(cells, model.grid, x0.shape[-1]).to(dev)
    tagged = [rewrite_caption(c, concept_name, cs, model.tokenizer).text for c, cs in zip(captions, cells)]
    emb = {k: model.encode_text(model.tokenize(v).to(dev))
           for k, v in (("plain", list(captions)), ("tag", tagged), ("empty", [""] * len(captions)))}
    out: dict[int, dict[str, float]] = {}
    for tv in timesteps:
        gen = torch.Generator().manual_seed(seed * 1000 + int(tv))
        noise = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
        t = torch.full((x0.shape[0],), int(tv), device=dev, dtype=torch.long)
        xt = model.noise_scheduler.add_noise(x0, noise, t)
        pred = {k: _x0(model, xt, t, e) for k, e in emb.items()}
        d = (pred["tag"] - pred["plain"]).pow(2).mean(1, keepdim=True)
        e_in = float((d * mask).sum() / mask.sum().clamp_min(1))
        e_out = float((d * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1))
        caption_effect = float((pred["plain"] - pred["empty"]).pow(2).mean())
        out[int(tv)] = {"in": e_in, "out": e_out, "ratio": e_in / e_out if e_out > 0 else float("inf") if e_in > 0
                        else float("nan"), "effect": e_in / caption_effect if caption_effect > 0 else float("nan")}
    return out


@torch.no_grad()
def conditioning_paths(model: DiffusionModel, images: torch.Tensor, captions: Sequence[str],
                       timesteps: Sequence[int] = (500, 700, 900), seed: int = 0) -> dict[int, dict[str, float]]:
    """Denoising loss with the text routed through both paths, neither, or one of them.

    Only for UNets with a text-conditioned time embedding (``addition_embed_type='text'``):
    ``pool_only`` feeds the caption to that embedding and the empty caption to cross-attention,
    ``xattn_only`` the reverse. ``pool_only`` ~ ``both`` means cross-attention carries nothing.
    """
    add = getattr(model.unet, "add_embedding", None)
    if add is None:
        raise ValueError("conditioning_paths: this UNet has no pooled-text time embedding")
    dev = next(model.unet.parameters()).device
    x0 = model.to_model_space(images.to(dev))
    real = model.encode_text(model.tokenize(list(captions)).to(dev))
    empty = model.encode_text(model.tokenize([""] * len(captions)).to(dev))
    forward, patched_before = add.forward, "forward" in vars(add)
    out: dict[int, dict[str, float]] = {}
    try:
        for tv in timesteps:
            gen = torch.Generator().manual_seed(seed * 1000 + int(tv))
            noise = torch.randn(x0.shape, generator=gen).to(dev, x0.dtype)
            t = torch.full((x0.shape[0],), int(tv), device=dev, dtype=torch.long)
            xt = model.noise_scheduler.add_noise(x0, noise, t)
            target = diffusion_target(model.noise_scheduler, x0, noise, t)
            row = {}
            for name, xattn, pooled in (("both", real, real), ("neither", empty, empty),
                                        ("pool_only", empty, real), ("xattn_only", real, empty)):
                add.forward = lambda h, _p=pooled: forward(_p)
                row[name] = float((model.denoise(xt, t, xattn) - target).pow(2).mean())
            out[int(tv)] = row
    finally:
        if patched_before:
            add.forward = forward
        else:
            del add.forward  # back to the class's method
    return out
