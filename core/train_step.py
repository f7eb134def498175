"""One training step's two halves: the batch a step pulls, and the loss of that batch.

:class:`BatchMaker` turns rows of a step's global batch into a :class:`TrainBatch` (clean model-space
input, noise, timesteps, noised input, captions, concept cells), with every draw a function of
``(seed, step)``. Nothing in it has a gradient: the VAE is frozen and pixel folding has no
parameters. :class:`StepModule` is what an engine wraps: ``forward(batch)`` returns the denoising
loss, and its registered parameters are exactly the trainable ones. The loop
(:meth:`geomerase.core.trainer.Trainer.train_step`) pulls a batch, then runs forward and backward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from geomerase.core.attention_align import (alignment_loss, alignment_targets, boundary_ids,
                                            recorded_cross_attention)
from geomerase.core.diffusion_model import DiffusionModel
from geomerase.core.lora import lora_layers
from geomerase.core.losses import denoising_loss, diffusion_target, weight_map
from geomerase.data.loader import InMemoryDataset, LocalBatch


@dataclass
class TrainBatch:
    """One micro-batch on the training device, ready for :meth:`StepModule.forward`.

    ``x0``: ``(b, C, h, w)`` float32 clean input in model space (folded pixels, or scaled VAE
    latents); ``noise``: like ``x0``; ``t``: ``(b,)`` int64 timesteps; ``xt``: ``x0`` noised to ``t``;
    ``captions``: b training captions (after rewriting and dropout; "" = dropped); ``masks``:
    ``(b, G, G)`` bool concept cells (region re-weighting).
    """

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    xt: torch.Tensor
    captions: list[str]
    masks: torch.Tensor


class BatchMaker:
    """``maker(step, (k, n))``: rows ``k`` of ``n`` equal slices of step ``step``'s global batch.

    Noise and timesteps are drawn for the whole batch from ``(seed, step)`` and sliced, so any split
    of the batch over processes and micro-batches sees the same draws. A streaming source yields this
    rank's rows once per step (its own noise salt); micro-batches slice them.
    """

    def __init__(self, model: DiffusionModel, source, seed: int, device: torch.device, rank: int, world: int,
                 grad_accum: int):
        self.model, self.source, self.seed, self.device = model, source, seed, device
        self.rank, self.world, self.grad_accum = rank, world, grad_accum
        self.latent_moments: torch.Tensor | None = None
        """``(N, 2C, h, w)`` fp32 VAE mean and std of every in-memory image, once precomputed."""
        self._local: tuple[int, LocalBatch] | None = None

    @torch.no_grad()
    def precompute_latents(self, data: InMemoryDataset | None, hflip: bool, chunk: int = 32) -> None:
        """Encode every in-memory image once (``data.precompute_latents``)."""
        m = self.model
        if m.vae is None:
            raise ValueError("data.precompute_latents needs a latent model (one with a VAE)")
        if data is None:
            raise ValueError("data.precompute_latents needs data.loader=memory")
        if hflip:
            raise ValueError("data.precompute_latents with data.hflip: a flipped latent is not the latent "
                             "of the flipped image; turn one off")
        out = []
        for i in range(0, len(data), chunk):
            out.append(self._moments(data.images[i:i + chunk].to(self.device).float().div(127.5).sub(1.0)).cpu())
        self.latent_moments = torch.cat(out)

    def rows(self, step: int, part: tuple[int, int]) -> LocalBatch:
        """The data rows (uint8 images, captions, cells) of ``part`` of step ``step``."""
        if self.source.streaming:
            if self._local is None or self._local[0] != step:
                self._local = (step, self.source.batch(step, (self.rank, self.world)))
            return self._local[1].slice(part[0] % self.grad_accum, self.grad_accum)
        return self.source.batch(step, part)

    @torch.no_grad()
    def __call__(self, step: int, part: tuple[int, int] = (0, 1)) -> TrainBatch:
        m = self.model
        b = self.rows(step, part)
        gen = torch.Generator().manual_seed(self.seed * 7919 + step + b.stream_salt)
        images = b.images.to(self.device, non_blocking=True).float().div(127.5).sub(1.0)
        if m.vae is None:
            x0 = m.to_model_space(images)
        else:
            moments = (self.latent_moments[b.indices] if self.latent_moments is not None and b.indices is not None
                       else self._moments(images))
            x0 = self._sample_latents(moments.to(self.device), step, b)
        shape = (b.total,) + tuple(x0.shape[1:])
        # Drawn on the CPU whatever the device, so a run's randomness does not depend on the hardware.
        noise = torch.randn(shape, generator=gen)[b.lo:b.hi].to(self.device).to(x0.dtype)
        t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (b.total,), generator=gen)
        t = t[b.lo:b.hi].to(self.device)
        xt = m.noise_scheduler.add_noise(x0, noise, t)
        return TrainBatch(x0, noise, t, xt, list(b.captions), b.masks.to(self.device))

    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        d = self.model.vae.encode(images.to(self.model.vae.dtype)).latent_dist
        return torch.cat([d.mean, d.std], 1).float()

    def _sample_latents(self, moments: torch.Tensor, step: int, b: LocalBatch) -> torch.Tensor:
        """``z = (mean + std * eps) * scaling_factor`` with eps from ``(seed, step)`` (resumable, unlike
        the VAE's own sampling from the global RNG)."""
        c = moments.shape[1] // 2
        gen = torch.Generator().manual_seed(self.seed * 7919 + step + b.stream_salt + (1 << 40))
        eps = torch.randn((b.total, c) + tuple(moments.shape[2:]), generator=gen)[b.lo:b.hi].to(moments.device)
        return (moments[:, :c] + moments[:, c:] * eps) * self.model.vae.config.scaling_factor


class StepModule(nn.Module):
    """The module an engine wraps; ``forward(batch)`` is the denoising loss of a :class:`TrainBatch`.

    It registers exactly the *trainable* parts: ``modules`` (the UNet, or only its LoRA layers; the
    text encoder when it trains) and ``loose`` bare parameters (the location-token rows; ZeRO-3 gathers them for the
    forward). Frozen modules (the VAE, a frozen text encoder, the prior UNet) are held as plain
    references, so ZeRO neither partitions nor steps them.
    """

    def __init__(self, model: DiffusionModel, modules: dict[str, nn.Module], loose: list[nn.Parameter],
                 prior_unet: nn.Module | None = None, reweight_alpha: float | None = None,
                 align_weight: float = 0.0):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        for i, p in enumerate(loose):
            self.register_parameter(f"loose_{i}", p)
        # plain references, not submodules
        self.__dict__["model"] = model
        self.__dict__["prior_unet"] = prior_unet
        self.reweight_alpha = reweight_alpha
        self.align_weight = align_weight
        self._boundary_ids = boundary_ids(model.tokenizer)

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        m: DiffusionModel = self.__dict__["model"]
        ids = m.tokenize(batch.captions)
        cond = m.encode_text(ids)
        unet_dtype = m.unet.dtype
        targets = None
        if self.align_weight > 0 and m.grid > 0:
            targets = alignment_targets(ids, m.loc_token_ids, m.grid, self._boundary_ids)
        with (recorded_cross_attention(m.unet) if targets is not None and bool(targets.selected.any())
              else contextlib.nullcontext([])) as probs:
            pred = m.denoise(batch.xt.to(unet_dtype), batch.t, cond.to(unet_dtype))
        target = diffusion_target(m.noise_scheduler, batch.x0, batch.noise, batch.t)
        if self.__dict__["prior_unet"] is not None:
            target = self._prior_target(target, batch, cond)
        weights = None
        if self.reweight_alpha is not None:
            weights = weight_map(batch.masks, self.reweight_alpha, batch.x0.shape[-2], batch.x0.shape[-1])
        loss = denoising_loss(pred, target, weights)
        if probs:
            loss = loss + self.align_weight * alignment_loss(probs, targets)
        return loss

    @torch.no_grad()
    def _prior_target(self, target: torch.Tensor, batch: TrainBatch, cond: torch.Tensor) -> torch.Tensor:
        """``target`` ``(B, C, h, w)`` with the rows of empty captions replaced by the frozen prior's
        prediction for the same ``xt``, ``t`` and (empty-prompt) text states ``cond`` ``(B, 77, D)``."""
        prior_unet = self.__dict__["prior_unet"]
        empty = torch.tensor([c == "" for c in batch.captions], device=target.device)
        if not bool(empty.any()):
            return target
        dtype = next(prior_unet.parameters()).dtype
        prior = self.__dict__["model"].denoise(batch.xt[empty].to(dtype), batch.t[empty], cond[empty].to(dtype),
                                               unet=prior_unet)
        out = target.clone()
        out[empty] = prior.to(out.dtype)
        return out


def trainable_modules(model: DiffusionModel, mode: str, train_text_encoder: bool, params: list[nn.Parameter],
                      lora: bool = False) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """The modules a :class:`StepModule` registers whole, and the trainable parameters outside them.

    With ``lora`` the UNet's adapter layers (:func:`geomerase.core.lora.lora_layers`) are registered
    instead of the UNet, so the frozen base weights stay outside the engine."""
    modules: dict[str, nn.Module] = {}
    if mode == "data-removal" and lora:
        modules["unet_lora"] = lora_layers(model.unet)
    elif mode == "data-removal":
        modules["unet"] = model.unet
        if train_text_encoder:
            modules["text_encoder"] = model.text_encoder
    covered = {id(p) for m in modules.values() for p in m.parameters()}
    loose = [p for p in params if id(p) not in covered]
    return modules, loose
