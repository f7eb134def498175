"""Safe latent diffusion (SLD) guidance, and conversions between prediction types.

SLD (Schramowski et al., "Safe Latent Diffusion", CVPR 2023) adds a *safety guidance*
term to classifier-free guidance that pushes the sample away from an unsafe concept
``c_S`` (here: the implicit concept's name) while leaving pixels that do not
resemble it alone. With ``e_u = e(z_t)``, ``e_p = e(z_t, c_p)``, ``e_S = e(z_t, c_S)``::

    e_bar = e_u + s_g * (e_p - e_u - gamma)
    gamma = mu * (e_S - e_u) + s_m * nu_t                       (after the warm-up)
    mu_i  = max(1, |s_S * (e_p - e_S)_i|)  where (e_p - e_S)_i < lambda, else 0
    nu_{t+1} = beta_m * nu_t + (1 - beta_m) * gamma_t,  nu_0 = 0

``gamma = 0`` during the first ``warmup`` steps (the momentum still accumulates, as in
the paper, so the term starts with a head start). The published presets are defined
for 50 denoising steps; :class:`SLDConfig` rescales the warm-up to the sampler's steps.

The rule is defined on noise predictions (epsilon). Models that predict ``v`` (the tiny
model) or ``x0`` are converted to epsilon with :func:`pred_to_eps`, guided there, and
converted back with :func:`eps_to_pred`, so the threshold ``lambda`` means what it means
in the paper. Both conversions are affine in the prediction for a fixed ``x_t``, which
:mod:`geomerase.core.esd` relies on too.

:class:`SLDGuidance` plugs into :func:`geomerase.core.sampling.sample` through its
``guidance`` hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


# -- prediction-type conversions ------------------------------------------------------------
def schedule_coeffs(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(a_bar_t), sqrt(1 - a_bar_t))`` broadcastable to ``like`` ``(B, C, H, W)``."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    a = alphas_cumprod[t].to(like.device, torch.float32)
    if a.ndim == 0:
        a = a.expand(like.shape[0])
    a = a.view(-1, *([1] * (like.ndim - 1)))
    return a.sqrt(), (1 - a).sqrt()


def pred_to_eps(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor,
                kind: PredictionType) -> torch.Tensor:
    """Model output ``(B, C, H, W)`` of prediction type ``kind`` at ``x_t`` -> the implied noise epsilon.

    ``v = sqrt(a) eps - sqrt(1-a) x0`` and ``x_t = sqrt(a) x0 + sqrt(1-a) eps`` give
    ``eps = sqrt(a) v + sqrt(1-a) x_t``; an ``x0`` prediction gives ``eps = (x_t - sqrt(a) x0) / sqrt(1-a)``.
    """
    if kind == "epsilon":
        return pred
    sa, s1a = schedule_coeffs(alphas_cumprod, t, x_t)
    if kind == "v_prediction":
        return (sa * pred.float() + s1a * x_t.float()).to(pred.dtype)
    if kind == "sample":
        return ((x_t.float() - sa * pred.float()) / s1a).to(pred.dtype)
    raise ValueError(f"unknown prediction_type {kind!r}")


def eps_to_pred(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor,
                kind: PredictionType) -> torch.Tensor:
    """Inverse of :func:`pred_to_eps`: epsilon ``(B, C, H, W)`` -> the model's prediction type."""
    if kind == "epsilon":
        return eps
    sa, s1a = schedule_coeffs(alphas_cumprod, t, x_t)
    if kind == "v_prediction":
        return ((eps.float() - s1a * x_t.float()) / sa).to(eps.dtype)
    if kind == "sample":
        return ((x_t.float() - s1a * eps.float()) / sa).to(eps.dtype)
    raise ValueError(f"unknown prediction_type {kind!r}")


# -- SLD ----------------------------------------------------------------------------------
@dataclass
class SLDConfig:
    """Hyper-parameters of safety guidance (names follow the paper; defaults = "strong")."""

    warmup: int = 7
    """delta: steps (out of ``reference_steps``) before the safety term is applied."""
    guidance_scale: float = 2000.0
    """s_S: scale of the element-wise safety weight mu."""
    threshold: float = 0.025
    """lambda: elements where ``e_p - e_S`` reaches this are left unguided (mu = 0)."""
    momentum_scale: float = 0.5
    """s_m: weight of the momentum term in gamma."""
    momentum_beta: float = 0.7
    """beta_m: momentum decay."""
    reference_steps: int = 50
    """Denoising steps the warm-up is given for (the paper's 50); rescaled to the sampler's steps."""
    mu_rule: Literal["paper", "clamp"] = "clamp"
    """'clamp' (the authors' released code, also diffusers' StableDiffusionPipelineSafe): ``mu =
    min(1, |s_S d|)``, which bounds the term by ``e_S - e_u``; 'paper': ``mu = max(1, |s_S d|)`` as
    printed, which multiplies the term by up to ``s_S`` (2000 in "strong") and wrecks images."""

    def validate(self) -> None:
        if self.warmup < 0 or self.reference_steps < 1:
            raise ValueError(f"sld: need warmup >= 0 and reference_steps >= 1, got {self.warmup}, "
                             f"{self.reference_steps}")
        if self.guidance_scale < 0 or self.momentum_scale < 0 or not 0 <= self.momentum_beta < 1:
            raise ValueError(f"sld: invalid scales {self}")
        if self.mu_rule not in ("paper", "clamp"):
            raise ValueError(f"sld.mu_rule must be 'paper' or 'clamp', got {self.mu_rule!r}")

    def warmup_steps(self, steps: int) -> int:
        """The warm-up in the sampler's steps: ``round(warmup * steps / reference_steps)``."""
        return int(round(self.warmup * steps / self.reference_steps))


#: The published hyper-parameter presets (weak, medium, strong, max), defined for 50 steps.
SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": SLDConfig(warmup=15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDConfig(warmup=10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDConfig(warmup=7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDConfig(warmup=0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


def sld_preset(name: str, **overrides) -> SLDConfig:
    """A copy of preset ``name`` (weak, medium, strong, max) with field overrides."""
    if name not in SLD_PRESETS:
        raise KeyError(f"unknown SLD preset {name!r}; choose from {sorted(SLD_PRESETS)}")
    from dataclasses import replace

    cfg = replace(SLD_PRESETS[name], **overrides)
    cfg.validate()
    return cfg


def safety_term(eps_p: torch.Tensor, eps_u: torch.Tensor, eps_s: torch.Tensor, cfg: SLDConfig) -> torch.Tensor:
    """``mu * (e_S - e_u)`` (all ``(B, C, H, W)`` epsilon predictions), without momentum."""
    d = eps_p - eps_s
    mag = (cfg.guidance_scale * d).abs()
    mu = mag.clamp(min=1.0) if cfg.mu_rule == "paper" else mag.clamp(max=1.0)
    mu = torch.where(d < cfg.threshold, mu, torch.zeros_like(mu))
    return mu * (eps_s - eps_u)


class SLDGuidance:
    """Stateful SLD step for the sampler (one instance per :func:`sample` call).

    The sampler evaluates the UNet on ``self.prompts`` (the safety concept) beside the
    positive and negative prompts and calls this object at every step instead of the plain
    CFG combination. State (the momentum) is reset by :meth:`start` for every batch.
    """

    def __init__(self, concept: str, cfg: SLDConfig | None = None):
        self.cfg = cfg or SLDConfig()
        self.cfg.validate()
        self.prompts = [concept]
        self.momentum: torch.Tensor | None = None
        self.applied_steps = 0
        """How many steps of the last batch had the safety term on (for tests and reports)."""

    def start(self, batch: int) -> None:
        """A new batch of ``batch`` samples starts: momentum back to zero."""
        self.momentum = None
        self.applied_steps = 0

    def __call__(self, step: int, n_steps: int, t: torch.Tensor, x_t: torch.Tensor, pred_pos: torch.Tensor,
                 pred_neg: torch.Tensor, pred_extra: torch.Tensor, guidance_scale: float, scheduler) -> torch.Tensor:
        """One guided prediction.

        Args:
            step: index of this denoising step (0 = noisiest); ``n_steps`` in all.
            t: the scheduler timestep (0-d).
            x_t: ``(B, C, H, W)`` current sample (scaled model input).
            pred_pos, pred_neg: ``(B, C, H, W)`` model outputs for the prompts and the (unconditional)
                negative, in the model's prediction type.
            pred_extra: ``(1, B, C, H, W)`` model output for the safety concept.
            guidance_scale: s_g.
            scheduler: the sampling scheduler (``config.prediction_type``, ``alphas_cumprod``).
        Returns:
            ``(B, C, H, W)`` guided prediction in the model's prediction type.
        """
        kind = scheduler.config.prediction_type
        ac = scheduler.alphas_cumprod
        e_p, e_u, e_s = (pred_to_eps(p, x_t, t, ac, kind) for p in (pred_pos, pred_neg, pred_extra[0]))
        gamma = safety_term(e_p.float(), e_u.float(), e_s.float(), self.cfg)
        if self.momentum is None:
            self.momentum = torch.zeros_like(gamma)
        gamma = gamma + self.cfg.momentum_scale * self.momentum
        self.momentum = self.cfg.momentum_beta * self.momentum + (1 - self.cfg.momentum_beta) * gamma
        guide = e_p.float() - e_u.float()
        if step >= self.cfg.warmup_steps(n_steps):
            guide = guide - gamma
            self.applied_steps += 1
        eps = e_u.float() + guidance_scale * guide
        return eps_to_pred(eps.to(pred_pos.dtype), x_t, t, ac, kind)
