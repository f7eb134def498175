"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), own implementation.

A copy of a trained model is fine-tuned so that its prediction *conditioned on the concept*
matches the frozen model's prediction negatively guided away from it::

    target(x_t, t) = e*(x_t, t, "") - eta * (e*(x_t, t, c) - e*(x_t, t, ""))
    loss           = || e_theta(x_t, t, c) - target ||^2

``e*`` is the frozen original, ``e_theta`` the copy. Which parameters train:

* ``x`` (ESD-x): the parameters of every cross-attention module (attention whose keys and
  values come from the text): erasing tied to the prompt. In the tiny UNet
  (``only_cross_attention``) both attention layers of each block attend to the text.
* ``u`` (ESD-u): every *other* UNet parameter (convolutions, norms, time embedding):
  erasing that also acts without the prompt.

The objective is in noise (epsilon) space. Models that predict ``v`` (the tiny model) are
converted with :func:`geomerase.core.guidance.pred_to_eps` (affine in the prediction for a
fixed ``x_t``), so the target is formed and the loss measured in epsilon as published;
in ``v`` terms the loss is the v-space error scaled by ``alpha_bar_t``.

``x_t`` comes from one of two sources: ``model`` (the paper: the frozen model's own DDIM
trajectory conditioned on the concept, stopped at a random step) or ``data`` (training images
noised to a random timestep, much cheaper on a CPU).
"""
from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from geomerase.core.guidance import pred_to_eps
from geomerase.core.diffusion_model import DiffusionModel


@dataclass
class ESDConfig:
    """One ESD fine-tune."""

    concept: str = "qr code"
    """The prompt to erase (the concept's name)."""
    method: Literal["x", "u"] = "x"
    """'x': cross-attention parameters train (ESD-x); 'u': all non-cross-attention UNet parameters (ESD-u)."""
    eta: float = 1.0
    """Negative-guidance strength of the target."""
    steps: int = 200
    """Optimizer steps."""
    lr: float = 1e-4
    """Adam learning rate."""
    batch_size: int = 8
    """x_t samples per step."""
    xt_source: Literal["data", "model"] = "data"
    """'data': noised training images; 'model': the frozen model's DDIM trajectory under the concept (paper)."""
    ddim_steps: int = 15
    """'model' source: DDIM steps of the trajectory (a random prefix of it is run per step)."""
    guidance_scale: float = 3.0
    """'model' source: CFG scale of the trajectory."""
    seed: int = 0
    """Seed of batches, noise and timesteps."""
    log_every: int = 10
    """Steps between loss-log rows."""

    def validate(self) -> None:
        if self.method not in ("x", "u"):
            raise ValueError(f"esd.method must be 'x' or 'u', got {self.method!r}")
        if self.xt_source not in ("data", "model"):
            raise ValueError(f"esd.xt_source must be 'data' or 'model', got {self.xt_source!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.eta < 0:
            raise ValueError(f"esd: invalid steps/batch/lr/eta in {self}")


def esd_parameters(unet: torch.nn.Module, method: str) -> list[torch.nn.Parameter]:
    """The parameters ESD-x (``method='x'``) or ESD-u (``'u'``) trains; freezes all others."""
    cross: set[int] = set()
    for m in unet.modules():
        if getattr(m, "is_cross_attention", False):
            cross.update(id(p) for p in m.parameters())
    if not cross:
        raise ValueError("esd: the UNet has no cross-attention modules")
    chosen = [p for p in unet.parameters() if (id(p) in cross) == (method == "x")]
    unet.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return chosen


class ESDTrainer:
    """Holds the frozen original and the trained copy; :meth:`step` is one optimizer step."""

    def __init__(self, model: DiffusionModel, cfg: ESDConfig, images_u8: torch.Tensor | None = None):
        """``model`` is trained in place (its UNet); ``images_u8`` ``(N, 3, R, R)`` feed the 'data' source."""
        cfg.validate()
        if cfg.xt_source == "data" and (images_u8 is None or len(images_u8) == 0):
            raise ValueError("esd.xt_source='data' needs training images")
        self.cfg, self.model, self.images = cfg, model, images_u8
        self.device = next(model.unet.parameters()).device
        model.text_encoder.requires_grad_(False).eval()
        self.frozen = copy.deepcopy(model.unet).requires_grad_(False).eval()
        self.params = esd_parameters(model.unet, cfg.method)
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        with torch.no_grad():
            emb = model.encode_text(model.tokenize(["", cfg.concept]))
        self.emb_u, self.emb_c = emb[:1], emb[1:]
        self.sched = model.noise_scheduler
        self.kind = self.sched.config.prediction_type
        self.step_no = 0

    def _xt(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(B, C, h, w)`` of noisy inputs and their timesteps ``(B,)``, on the model's device
        (random draws on the CPU, so a run does not depend on the hardware)."""
        b, m, dev = self.cfg.batch_size, self.model, self.device
        if self.cfg.xt_source == "data":
            idx = torch.randint(0, len(self.images), (b,), generator=gen)
            x0 = m.to_model_space(self.images[idx].to(dev).float() / 127.5 - 1)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            t = torch.randint(0, self.sched.config.num_train_timesteps, (b,), generator=gen).to(dev)
            return self.sched.add_noise(x0, noise, t), t
        return self._trajectory(gen)

    @torch.no_grad()
    def _trajectory(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen model's DDIM (CFG on the concept) from noise for a random number of steps."""
        b, m, cfg = self.cfg.batch_size, self.model, self.cfg
        ddim = DDIMScheduler.from_config(self.sched.config, clip_sample=m.vae is None, set_alpha_to_one=False)
        ddim.set_timesteps(cfg.ddim_steps)
        stop = int(torch.randint(0, cfg.ddim_steps, (1,), generator=gen))
        x = torch.randn((b,) + tuple(m.sample_shape), generator=gen).to(self.device)
        cond = torch.cat([self.emb_c.expand(b, -1, -1), self.emb_u.expand(b, -1, -1)])
        for t in ddim.timesteps[:stop]:
            # Through DiffusionModel.denoise: it appends the coordinate planes a size may have.
            out = m.denoise(x.repeat(2, 1, 1, 1), t.to(self.device).expand(2 * b), cond, unet=self.frozen)
            guided = out[b:] + cfg.guidance_scale * (out[:b] - out[b:])
            x = ddim.step(guided, t, x).prev_sample
        return x, ddim.timesteps[stop].expand(b).clone().to(self.device)

    def target(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` epsilon target ``e*_u - eta (e*_c - e*_u)`` of the frozen model."""
        b = x_t.shape[0]
        with torch.no_grad():
            out = self.model.denoise(x_t.repeat(2, 1, 1, 1), t.repeat(2),
                                     torch.cat([self.emb_u.expand(b, -1, -1), self.emb_c.expand(b, -1, -1)]),
                                     unet=self.frozen)
            ac = self.sched.alphas_cumprod
            e_u = pred_to_eps(out[:b], x_t, t, ac, self.kind)
            e_c = pred_to_eps(out[b:], x_t, t, ac, self.kind)
        return e_u - self.cfg.eta * (e_c - e_u)

    def concept_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The trained model's epsilon ``(B, C, h, w)`` conditioned on the concept."""
        out = self.model.denoise(x_t, t, self.emb_c.expand(x_t.shape[0], -1, -1))
        return pred_to_eps(out, x_t, t, self.sched.alphas_cumprod, self.kind)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """One optimizer step (on ``batch = (x_t, t)`` when given, else a fresh draw); returns the loss."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step_no)
        x_t, t = batch if batch is not None else self._xt(gen)
        self.model.unet.train()
        loss = (self.concept_eps(x_t, t).float() - self.target(x_t, t).float()).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step_no += 1
        return float(loss.detach())


def run_esd(model: DiffusionModel, cfg: ESDConfig, out_dir: str | Path, images_u8: torch.Tensor | None = None,
            progress: bool = False) -> DiffusionModel:
    """Fine-tune ``model`` with ESD and save it to ``out_dir/model`` (plus ``loss.csv`` and a summary).

    ``loss.csv`` rows (``step,loss,seconds``) double as the progress file of a job pool.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = ESDTrainer(model, cfg, images_u8)
    t0 = time.time()
    rows: list[dict] = []
    acc, n = 0.0, 0
    for step in tqdm(range(cfg.steps), disable=not progress, desc=f"esd-{cfg.method}"):
        acc += tr.step()
        n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rows.append({"step": step + 1, "loss": acc / n, "seconds": time.time() - t0})
            acc, n = 0.0, 0
            with open(out / "loss.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "loss", "seconds"])
                w.writeheader()
                w.writerows(rows)
    model.unet.eval()
    model.save(out / "model")
    (out / "esd_summary.json").write_text(json.dumps(
        {"config": asdict(cfg), "trained_parameters": sum(p.numel() for p in tr.params),
         "seconds": time.time() - t0, "final_loss": rows[-1]["loss"]}, indent=1))
    return model
