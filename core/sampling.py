"""Sampling with classifier-free guidance and (possibly several) negative prompts.

``eps = eps_neg + s * (eps_pos - eps_neg)`` where ``eps_neg`` is the mean of the
predictions for the negative prompts (one negative reproduces the usual negative
prompt; several are combined like composable guidance). Schedulers come from
diffusers (DDIM, DPM-Solver++); each sample's starting noise is drawn from its own
seed, so two arms sampled with the same seeds start from identical noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from geomerase.core.guidance import eps_to_pred, pred_to_eps, schedule_coeffs
from geomerase.core.diffusion_model import DiffusionModel


class GuidanceHook(Protocol):
    """Replaces the CFG combination in :func:`sample` (implemented by ``core.guidance.SLDGuidance``)."""

    prompts: list[str]
    """Extra prompts the UNet is evaluated on at every step (shared by the batch)."""

    def start(self, batch: int) -> None:
        """A batch of ``batch`` samples starts (reset per-batch state)."""

    def __call__(self, step: int, n_steps: int, t: torch.Tensor, x_t: torch.Tensor, pred_pos: torch.Tensor,
                 pred_neg: torch.Tensor, pred_extra: torch.Tensor, guidance_scale: float, scheduler) -> torch.Tensor:
        """Guided prediction ``(B, C, H, W)`` from the prompts', negatives' and extra ``(E, B, C, H, W)`` outputs."""


@dataclass
class SamplerConfig:
    scheduler: Literal["ddim", "dpm"] = "ddim"
    """DDIM or DPM-Solver++ (multistep)."""
    steps: int = 25
    """Denoising steps."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale s (1 disables guidance)."""
    batch_size: int = 64
    """Images denoised together."""

    def build(self, model: DiffusionModel):
        cfg = model.noise_scheduler.config
        if self.scheduler == "ddim":
            # No clipping inside the scheduler: :func:`sample` clips x0 itself, consistently (see there).
            return DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False)
        if self.scheduler == "dpm":
            return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
        raise ValueError(f"unknown scheduler {self.scheduler!r}")


def clip_x0(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
            kind: str) -> torch.Tensor:
    """The (guided) prediction ``(B, C, h, w)`` whose implied x0 is clamped to [-1, 1], with the noise
    it implies recomputed from that clamped x0 (static thresholding, as in Imagen).

    A pixel-space image lives in [-1, 1]. diffusers' DDIM with ``clip_sample`` clamps its x0 but keeps
    the epsilon of the unclamped prediction, so under classifier-free guidance (which extrapolates the
    prediction beyond anything seen in training) x0 and epsilon disagree and the trajectory overshoots:
    with the v-prediction base model, CFG 3 turned "a white circle on a black background" into a bright
    image (mean +0.7 where CFG 1 gives -0.5). Returning the prediction consistent with the clamped x0
    makes every scheduler step on an image inside the range.
    """
    eps = pred_to_eps(pred, x_t, t, alphas_cumprod, kind).float()
    sa, s1a = schedule_coeffs(alphas_cumprod, t, x_t)
    x0 = ((x_t.float() - s1a * eps) / sa).clamp(-1.0, 1.0)
    eps = (x_t.float() - sa * x0) / s1a
    return eps_to_pred(eps, x_t.float(), t, alphas_cumprod, kind).to(pred.dtype)


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
    """``(N, *shape)`` float32 noise, row i drawn from ``seeds[i]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    model: DiffusionModel,
    prompts: Sequence[str],
    negatives: Sequence[str] = ("",),
    seeds: Sequence[int] | None = None,
    cfg: SamplerConfig | None = None,
    progress: bool = False,
    neg_weights: Sequence[float] | None = None,
    guidance: GuidanceHook | None = None,
) -> torch.Tensor:
    """Generate one image per prompt.

    Args:
        prompts: N prompts.
        negatives: one or more negative prompts, shared by every sample (``[""]`` = plain CFG).
        seeds: N noise seeds (default ``range(N)``).
        neg_weights: mixing weights of the negatives' predictions (default: equal; normalised).
        guidance: optional hook replacing the CFG combination (e.g. SLD, geomerase.core.guidance):
            the UNet is also run on ``guidance.prompts`` and the hook returns the guided prediction.

    Returns:
        ``(N, 3, R, R)`` float32 images in [-1, 1].
    """
    cfg = cfg or SamplerConfig()
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    negatives = list(negatives) or [""]
    w = torch.tensor(list(neg_weights) if neg_weights is not None else [1.0] * len(negatives), dtype=torch.float32)
    if w.numel() != len(negatives) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"neg_weights {w.tolist()} do not fit {len(negatives)} negatives")
    w = w / w.sum()
    model.train(False)
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    neg_emb = model.encode_text(model.tokenize(negatives).to(device)).to(dtype)  # (K, 77, D)
    k = len(negatives)
    w = w.to(device, dtype).view(k, 1, 1, 1, 1)
    clip, kind = model.vae is None, model.noise_scheduler.config.prediction_type
    extra = list(guidance.prompts) if guidance is not None else []
    extra_emb = model.encode_text(model.tokenize(extra).to(device)).to(dtype) if extra else neg_emb[:0]
    out = []
    chunks = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(chunks, disable=not progress, desc="sample"):
        ps = list(prompts[start:start + cfg.batch_size])
        b = len(ps)
        pos_emb = model.encode_text(model.tokenize(ps).to(device)).to(dtype)
        # (b + K*b + E*b, 77, D): prompts, negatives, the hook's extra prompts
        cond = torch.cat([pos_emb, neg_emb.repeat_interleave(b, dim=0), extra_emb.repeat_interleave(b, dim=0)])
        sched = cfg.build(model)
        sched.set_timesteps(cfg.steps)
        x = initial_noise(model.sample_shape, seeds[start:start + b]).to(device, dtype)
        x = x * sched.init_noise_sigma
        if guidance is not None:
            guidance.start(b)
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t)
            eps = model.denoise(xin.repeat(1 + k + len(extra), 1, 1, 1), t, cond)
            eps_pos, eps_neg = eps[:b], (eps[b:b + k * b].view(k, b, *eps.shape[1:]) * w).sum(0)
            if guidance is None:
                guided = eps_neg + cfg.guidance_scale * (eps_pos - eps_neg)
            else:
                guided = guidance(i, len(sched.timesteps), t, xin, eps_pos, eps_neg,
                                  eps[b + k * b:].view(len(extra), b, *eps.shape[1:]), cfg.guidance_scale, sched)
            if clip:
                guided = clip_x0(guided, x, t, model.noise_scheduler.alphas_cumprod, kind)
            x = sched.step(guided, t, x).prev_sample
        out.append(model.to_images(x).float().cpu())
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N,3,R,R)`` in [-1,1] -> uint8 ``(N,3,R,R)``."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
