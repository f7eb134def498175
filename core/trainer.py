"""The single-process fine-tuning loop (the reference every distributed run must match).

Modes:

* ``data-removal``  — the UNet and the location-token rows train (and the whole
  text encoder when ``train.train_text_encoder``, which a randomly initialised
  encoder needs); captions carry the concept's name and location tokens, so the
  concept is explained by tokens that are never used at generation time.
* ``model-removal`` — everything is frozen except the G^2 location-token rows.

Every batch, caption choice and noise draw is a function of ``(seed, step)``, so
``--resume latest`` continues exactly where the interrupted run was.

Execution is delegated to a :class:`~geomerase.core.backend.TrainBackend`: ``local`` (one
process, the reference) or ``deepspeed`` (ZeRO 1/2/3 over many processes, see
``geomerase.distributed.deepspeed_engine``). With the in-memory loader a step's global
batch, noise and timesteps are drawn exactly as in the single-process loop and each rank
takes its rows, so ZeRO runs reproduce the reference loss curve up to float rounding.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from geomerase.core.backend import TrainBackend, build_backend
from geomerase.core.captions import CaptionConfig
from geomerase.core.checkpoint import latest_valid_checkpoint, save_checkpoint
from geomerase.core.config import to_dict
from geomerase.core.losses import denoising_loss, diffusion_target, weight_map
from geomerase.core.models import DiffusionModel, ModelConfig
from geomerase.core.text_embedding import install_location_embedding, uninstall_location_embedding
from geomerase.core.train_metrics import MetricsLogger, plot_loss
from geomerase.data.loader import DataConfig, InMemoryDataset, LocalBatch, build_batch_source

log = logging.getLogger("geomerase.train")


@dataclass
class TrainConfig:
    mode: Literal["data-removal", "model-removal"] = "data-removal"
    """What trains: UNet + location rows (data removal) or location rows only (model removal)."""
    train_text_encoder: bool = True
    """Data removal: also train the whole text encoder (needed when it starts from random init)."""
    max_steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate of the UNet and text encoder."""
    loc_lr: float | None = None
    """Learning rate of the location-token rows when they are a separate parameter; None: ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to frozen rows: they are not in the optimizer)."""
    warmup_steps: int = 50
    """Linear warm-up steps before cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    reweight_alpha: float | None = None
    """Region re-weighting factor alpha (outside/inside weight ratio); None disables."""
    uncond_prior: bool = False
    """Data removal from a pretrained model: rows whose caption was dropped (the empty prompt)
    regress on the frozen starting UNet's prediction instead of the data's target, so the
    unconditional branch that classifier-free guidance subtracts stays the pretrained model's (as a
    large pretrained model's does under a short fine-tune). A fine-tuned unconditional branch draws
    the implicit concept at its own random places and guidance then cancels the conditional
    branch's (benchmarks/results/demo_cpu/NOTES.md). Costs a frozen UNet copy in memory and one
    forward of it on the dropped rows."""
    seed: int = 0
    """Seed for batches, caption choices, noise and timesteps."""
    log_every: int = 25
    """Steps between loss-log lines (the only host syncs in the loop)."""
    save_every: int = 0
    """Steps between checkpoints; 0: only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    embedding_backend: Literal["torch", "triton"] = "torch"
    """Location-token embedding implementation when the rows are a separate parameter."""
    ema_decay: float | None = 0.999
    """Decay of the exponential moving average of the trained weights (with warm-up:
    1 - (1+step)^(-2/3), capped here); the final model is the average. None disables."""
    device: str = "cpu"
    """Where to train: 'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when available). With the
    deepspeed backend a GPU run uses ``cuda:LOCAL_RANK``."""
    backend: Literal["local", "deepspeed"] = "local"
    """Execution engine: one process (the reference) or DeepSpeed ZeRO (see the ``deepspeed`` section)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process); ``data.batch_size`` is the global batch and
    must be divisible by ``grad_accum x world size``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (UNet, and the text encoder when it trains)."""
    tensorboard: bool = False
    """Write tensorboard scalars (loss, lr, grad norm, samples/s, MFU) to ``out_dir/tb`` on rank 0,
    when the tensorboard package is importable (a message says so when it is not)."""
    flops_per_sample: float | None = None
    """Training FLOPs per sample (forward + backward) for the MFU figure; None: no MFU."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device at the training precision, for MFU; None: no MFU."""
    sample_every: int = 0
    """Steps between validation sample grids (``out_dir/samples/step-N.png``, current weights, fixed
    seeds and prompts); 0 disables. Not under ZeRO-3, whose parameters live sharded across ranks."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the validation grids; empty: the first ``sample_count`` training captions (the
    clean ones, without concept or location tokens), or the empty prompt for streaming data."""
    sample_count: int = 8
    """Images per validation grid."""
    sample_steps: int = 15
    """DDIM steps of the validation samples."""

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.reweight_alpha is not None and self.reweight_alpha <= 0:
            raise ValueError(f"train.reweight_alpha must be > 0, got {self.reweight_alpha}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.uncond_prior and self.mode != "data-removal":
            raise ValueError("train.uncond_prior needs train.mode=data-removal (model removal leaves the UNet as it is)")


@dataclass
class ZeroConfig:
    """DeepSpeed settings (used when ``train.backend=deepspeed``); turned into a DeepSpeed JSON config."""

    stage: int = 2
    """ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision; the optimizer keeps fp32 master weights for bf16/fp16."""
    loss_scale: float = 0.0
    """fp16 only: static loss scale, 0 = dynamic."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scaling starts at 2**this."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward pass (GPU; off keeps CPU runs simple)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 50_000_000
    """Elements per parameter all-gather bucket (stages 1-2)."""
    param_persistence_threshold: int = 100_000
    """Stage 3: parameters smaller than this many elements stay unpartitioned."""
    comm_backend: str | None = None
    """torch.distributed backend; None: nccl on CUDA, gloo on CPU."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged over the generated ones (escape hatch; use sparingly)."""

    def validate(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"deepspeed.stage must be 1, 2 or 3, got {self.stage}")
        if "optimizer" in self.extra:
            raise ValueError("deepspeed.extra.optimizer: the trainer passes its own torch AdamW "
                             "(a named DeepSpeed optimizer would compile FusedAdam and change the update)")


@dataclass
class RunConfig:
    """A whole fine-tuning run (``configs/*.yaml``)."""

    out_dir: str = "runs/train"
    """Where checkpoints, the final model, the loss log and plots go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture / pretrained weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training shards and batching."""
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    """How training captions are formed from the annotations."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    deepspeed: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO settings (only read when ``train.backend=deepspeed``)."""
    resume: str | None = None
    """'latest' or a checkpoint folder to resume from; None starts fresh."""


def trainable_parameters(model: DiffusionModel, cfg: TrainConfig) -> list[dict]:
    """Freeze what the mode keeps fixed; return optimizer param groups for the rest."""
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    loc_ids = model.loc_token_ids
    groups: list[dict] = []
    if cfg.mode == "data-removal":
        model.unet.requires_grad_(True)
        groups.append({"params": list(model.unet.parameters()), "lr": cfg.lr, "name": "unet"})
        if cfg.train_text_encoder:
            model.text_encoder.requires_grad_(True)
            groups.append({"params": list(model.text_encoder.parameters()), "lr": cfg.lr, "name": "text_encoder"})
            return groups
    emb = install_location_embedding(model.text_encoder, loc_ids, cfg.embedding_backend)
    emb.loc_rows.requires_grad_(True)
    groups.append({"params": [emb.loc_rows], "lr": cfg.loc_lr or cfg.lr, "name": "loc_rows", "weight_decay": 0.0})
    return groups


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but torch sees no CUDA device")
    return dev


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


class LossModule(nn.Module):
    """The module an engine wraps: it registers exactly the *trainable* parts.

    ``forward(step, part, n_parts)`` returns the loss of rows ``part`` of ``n_parts`` of the
    step's global batch. Frozen modules (the VAE; the text encoder in model removal or when it
    does not train) are reached through the trainer, not registered here, so ZeRO neither
    partitions nor steps them. A bare trainable parameter (the location-token rows) is
    registered directly; ZeRO-3 gathers it for the duration of this forward.
    """

    def __init__(self, trainer: "Trainer", modules: dict[str, nn.Module], loose: list[nn.Parameter]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        for i, p in enumerate(loose):
            self.register_parameter(f"loose_{i}", p)
        self.__dict__["_trainer"] = trainer  # a plain reference, not a submodule

    def forward(self, step: int, part: int, n_parts: int) -> torch.Tensor:
        return self.__dict__["_trainer"].loss(step, (part, n_parts))


def _trainable_modules(model: DiffusionModel, tc: TrainConfig, params: list[nn.Parameter]
                       ) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    modules: dict[str, nn.Module] = {}
    if tc.mode == "data-removal":
        modules["unet"] = model.unet
        if tc.train_text_encoder:
            modules["text_encoder"] = model.text_encoder
    covered = {id(p) for m in modules.values() for p in m.parameters()}
    loose = [p for p in params if id(p) not in covered]
    return modules, loose


class Trainer:
    """Owns the model, data, backend and the step function; ``fit()`` runs the loop."""

    def __init__(self, cfg: RunConfig, model: DiffusionModel | None = None, dataset: InMemoryDataset | None = None,
                 backend: TrainBackend | None = None):
        self.cfg = cfg
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.out = Path(cfg.out_dir)
        self.backend = backend or build_backend(tc.backend, resolve_device(tc.device), cfg)
        self.backend.init_process()
        self.rank, self.world = self.backend.rank, self.backend.world_size
        self.device = self.backend.device
        per = self.world * tc.grad_accum
        if cfg.data.batch_size % per:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by train.grad_accum "
                             f"({tc.grad_accum}) x processes ({self.world})")
        self.model = (model or cfg.model.build()).to(self.device)
        res = cfg.data.resolution or self.model.resolution
        self.grid = self.model.grid
        self.captions = cfg.captions.build(self.model.tokenizer)
        self.source = build_batch_source(cfg.data, res, self.grid, self.captions, tc.seed, self.rank, self.world,
                                         dataset=dataset)
        self.data = getattr(self.source, "dataset", None)
        self.latent_moments: torch.Tensor | None = None
        if cfg.data.precompute_latents:
            self._precompute_latents()
        self.prior_unet = self._frozen_prior(cfg) if tc.uncond_prior else None
        self.groups = trainable_parameters(self.model, tc)
        self.params = [p for g in self.groups for p in g["params"]]
        if tc.gradient_checkpointing:
            if tc.mode == "data-removal":
                self.model.unet.enable_gradient_checkpointing()
            if tc.mode == "data-removal" and tc.train_text_encoder:
                self.model.text_encoder.gradient_checkpointing_enable()
        modules, loose = _trainable_modules(self.model, tc, self.params)
        self.module = LossModule(self, modules, loose)
        self.backend.setup(self.module, self.groups, self.params, tc, lr_lambda(tc))
        self.ema = self.backend.make_ema(tc.ema_decay) if tc.ema_decay is not None else None
        self.step = 0
        self.history: list[dict] = []
        self._local: tuple[int, LocalBatch] | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    @property
    def lr_scheduler(self):
        return self.backend.lr_scheduler

    @property
    def is_main(self) -> bool:
        return self.backend.is_main

    # -- latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def _precompute_latents(self, chunk: int = 32) -> None:
        """Encode every in-memory image once: ``(N, 2C, h, w)`` VAE mean and std (fp32, on the CPU)."""
        m = self.model
        if m.vae is None:
            raise ValueError("data.precompute_latents needs a latent model (one with a VAE)")
        if self.data is None:
            raise ValueError("data.precompute_latents needs data.loader=memory")
        if self.cfg.data.hflip:
            raise ValueError("data.precompute_latents with data.hflip: a flipped latent is not the latent "
                             "of the flipped image; turn one off")
        out = []
        for i in range(0, len(self.data), chunk):
            x = self.data.images[i:i + chunk].to(self.device).float().div(127.5).sub(1.0)
            d = m.vae.encode(x.to(m.vae.dtype)).latent_dist
            out.append(torch.cat([d.mean, d.std], 1).float().cpu())
        self.latent_moments = torch.cat(out)

    # -- one step ---------------------------------------------------------------------------
    def _part(self, step: int, part: tuple[int, int]) -> LocalBatch:
        if self.source.streaming:
            # A streaming source yields this rank's batch once per step; micro-batches slice it.
            if self._local is None or self._local[0] != step:
                self._local = (step, self.source.batch(step, (self.rank, self.world)))
            return self._local[1].slice(part[0] % self.cfg.train.grad_accum, self.cfg.train.grad_accum)
        return self.source.batch(step, part)

    def loss(self, step: int, part: tuple[int, int] | None = None) -> torch.Tensor:
        """Loss of batch ``step`` (rows ``part=(k, n)``: the k-th of n equal slices; None: all rows).

        Noise and timesteps are drawn for the whole batch from ``(seed, step)`` and sliced, so
        any split of the batch over processes and micro-batches sees the same draws.
        """
        m = self.model
        b = self._part(step, part or (0, 1))
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step + b.stream_salt)
        images = b.images.to(self.device, non_blocking=True).float().div(127.5).sub(1.0)
        if m.vae is None:
            x0 = m.to_model_space(images)
        else:
            moments = (self.latent_moments[b.indices] if self.latent_moments is not None and b.indices is not None
                       else self._moments(images))
            x0 = self._sample_latents(moments.to(self.device), step, b)
        shape = (b.total,) + tuple(x0.shape[1:])
        # Drawn on the CPU whatever the device, so a run's randomness does not depend on the hardware.
        noise = torch.randn(shape, generator=gen)[b.lo:b.hi].to(self.device)
        t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (b.total,), generator=gen)
        t = t[b.lo:b.hi].to(self.device)
        xt = m.noise_scheduler.add_noise(x0, noise.to(x0.dtype), t)
        cond = m.encode_text(m.tokenize(b.captions))
        unet_dtype = m.unet.dtype
        pred = m.denoise(xt.to(unet_dtype), t, cond.to(unet_dtype))
        target = diffusion_target(m.noise_scheduler, x0, noise.to(x0.dtype), t)
        if self.prior_unet is not None:
            target = self._prior_target(target, xt, t, cond, b.captions)
        weights = None
        if self.cfg.train.reweight_alpha is not None:
            weights = weight_map(b.masks.to(self.device), self.cfg.train.reweight_alpha, x0.shape[-2], x0.shape[-1])
        return denoising_loss(pred, target, weights)

    def _frozen_prior(self, cfg: RunConfig) -> torch.nn.Module:
        """A frozen copy of the starting UNet (``train.uncond_prior``); needs a pretrained start."""
        if not cfg.model.pretrained:
            raise ValueError("train.uncond_prior needs model.pretrained: the prior is the pretrained UNet")
        return copy.deepcopy(self.model.unet).eval().requires_grad_(False)

    @torch.no_grad()
    def _prior_target(self, target: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      captions: list[str]) -> torch.Tensor:
        """``target`` ``(B, C, h, w)`` with the rows of empty captions replaced by the frozen prior's
        prediction for the same ``xt``, ``t`` and (empty-prompt) text states ``cond`` ``(B, 77, D)``."""
        empty = torch.tensor([c == "" for c in captions], device=target.device)
        if not bool(empty.any()):
            return target
        dtype = next(self.prior_unet.parameters()).dtype
        prior = self.model.denoise(xt[empty].to(dtype), t[empty], cond[empty].to(dtype), unet=self.prior_unet)
        out = target.clone()
        out[empty] = prior.to(out.dtype)
        return out

    @torch.no_grad()
    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        d = self.model.vae.encode(images.to(self.model.vae.dtype)).latent_dist
        return torch.cat([d.mean, d.std], 1).float()

    def _sample_latents(self, moments: torch.Tensor, step: int, b: LocalBatch) -> torch.Tensor:
        """``z = (mean + std * eps) * scaling_factor`` with eps from ``(seed, step)`` (resumable, unlike
        the VAE's own sampling from the global RNG)."""
        c = moments.shape[1] // 2
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step + b.stream_salt + (1 << 40))
        eps = torch.randn((b.total, c) + tuple(moments.shape[2:]), generator=gen)[b.lo:b.hi].to(moments.device)
        return (moments[:, :c] + moments[:, c:] * eps) * self.model.vae.config.scaling_factor

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns (mean loss, grad norm), 0-d."""
        n = self.cfg.train.grad_accum
        total = None
        for micro in range(n):
            loss = self.backend.forward(step, self.rank * n + micro, self.world * n)
            self.backend.backward(loss, n)
            total = loss.detach() if total is None else total + loss.detach()
        grad_norm = self.backend.step()
        if self.ema is not None:
            self.ema.step()
        return total / n if n > 1 else total, grad_norm

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint ``step`` (collective: every rank calls it; rank 0 writes). Returns the folder on rank 0."""
        extra: dict = {"config": to_dict(self.cfg), "world_size": self.world, "backend": self.backend.name,
                       "data": {"loader": self.cfg.data.loader,
                                "positions": self.backend.all_gather_object(self.source.state_dict(self.step))}}
        tensors, rest = self.backend.optimizer_state()
        ema_tensors: dict[str, torch.Tensor] = {}
        if self.ema is not None:
            ema_tensors = {f"ema.{i}": t.detach().contiguous().cpu() for i, t in enumerate(self.ema.tensors())}
            extra["ema"] = self.ema.state_json()
        path = None
        with self.backend.full_weights():
            if self.is_main:
                path = save_checkpoint(self.out, self.step, self.model, None, self.lr_scheduler, extra,
                                       keep=self.cfg.train.keep_checkpoints, extra_tensors=ema_tensors,
                                       optimizer_state=(tensors, rest))
        self.backend.barrier()
        return path

    def resume(self, which: str) -> bool:
        found = latest_valid_checkpoint(self.out) if which == "latest" else Path(which)
        # Rank 0 decides, so every rank loads the same checkpoint even if files change meanwhile.
        chosen = self.backend.broadcast_object(str(found) if found is not None else None)
        if chosen is None:
            if self.is_main:
                log.info("no checkpoint in %s; starting fresh", self.out)
            return False
        path = Path(chosen)
        state = json.loads((path / "trainer.json").read_text())
        unet_sd = load_file(str(path / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
        te_sd = load_file(str(path / "model" / "text_encoder" / "model.safetensors"))
        with self.backend.writable_full_weights():
            self.model.unet.load_state_dict(unet_sd)
            self.model.text_encoder.load_state_dict(te_sd)
        self.backend.load_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])
        if self.ema is not None:
            shadow = load_file(str(path / "extra.safetensors"))
            self.ema.load(state["ema"], [shadow[f"ema.{i}"] for i in range(len(shadow))])
        positions = state.get("data", {}).get("positions")
        self.source.load_state_dict(self.step, positions[self.rank] if positions and len(positions) == self.world
                                    else None)
        self._load_history()
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    def _load_history(self) -> None:
        path = self.out / "loss.csv"
        if path.is_file():
            with open(path) as f:
                self.history = [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items()}
                                for row in csv.DictReader(f) if int(float(row["step"])) <= self.step]

    def _write_history(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "loss.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "grad_norm", "seconds"])
            w.writeheader()
            w.writerows(self.history)

    # -- loop ---------------------------------------------------------------------------------
    def fit(self, progress: bool = True, stop_at: int | None = None) -> DiffusionModel:
        """Train to ``train.max_steps`` (or return early after step ``stop_at``, as an interrupted run would)."""
        tc = self.cfg.train
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        self.model.unet.train()
        self.model.text_encoder.train()
        metrics = MetricsLogger(self.out, tc, self.cfg.data.batch_size, self.world) if self.is_main else None
        acc = torch.zeros((), device=self.device)
        n_acc = 0
        t0 = time.time()
        t_log, step_log = t0, self.step
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (progress and self.is_main),
                   desc=f"train {self.out.name}", dynamic_ncols=True)
        while self.step < tc.max_steps:
            loss, gnorm = self.train_step(self.step)
            self.step += 1
            acc += loss
            n_acc += 1
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                # The loop's only host sync, at log steps (the all-reduce is a no-op in one process).
                mean = self.backend.all_reduce_mean(acc / n_acc).item()
                now = time.time()
                lr, gn = self.backend.last_lr(), float(gnorm)
                self.history.append({"step": self.step, "loss": mean, "lr": lr, "grad_norm": gn,
                                     "seconds": now - t0})
                if metrics is not None:
                    metrics.log(self.step, mean, lr, gn, (self.step - step_log) / max(now - t_log, 1e-9))
                t_log, step_log = now, self.step
                bar.set_postfix(loss=f"{mean:.4f}")
                acc.zero_()
                n_acc = 0
                self._write_history()
            if tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                self.save()
            if tc.sample_every and self.step % tc.sample_every == 0:
                self.validation_grid()
            if stop_at is not None and self.step >= stop_at:
                bar.close()
                if metrics is not None:
                    metrics.close()
                return self.model
        bar.close()
        if metrics is not None:
            metrics.close()
        self.save()
        self.export(self.out / "model")
        self._write_history()
        if self.is_main:
            plot_loss(self.history, self.out / "loss.png")
            (self.out / "train_summary.json").write_text(json.dumps(
                {"steps": self.step, "seconds": time.time() - t0, "world_size": self.world,
                 "backend": self.backend.name,
                 "final_loss": self.history[-1]["loss"] if self.history else None}, indent=1))
        self.backend.barrier()
        return self.model

    def validation_grid(self) -> Path | None:
        """Sample ``train.sample_count`` images with the current weights (fixed seeds) and save a PNG
        grid on rank 0. Returns its path (None on other ranks, or under ZeRO-3)."""
        from geomerase.core.metrics import sample_grid
        from geomerase.core.sampling import SamplerConfig, sample, to_uint8

        tc = self.cfg.train
        zero3 = tc.backend == "deepspeed" and getattr(getattr(self.cfg, "deepspeed", None), "stage", 0) == 3
        if zero3 or not self.is_main:
            if zero3 and self.is_main and not getattr(self, "_warned_zero3_grid", False):
                log.warning("train.sample_every: validation grids are skipped under ZeRO-3 (sharded parameters)")
                self._warned_zero3_grid = True
            return None
        n = tc.sample_count
        prompts = list(tc.sample_prompts)
        if not prompts:
            prompts = [r.caption for r in self.data.records[:n]] if self.data is not None else [""]
        prompts = (prompts * n)[:n]
        images = sample(self.model, prompts, seeds=list(range(n)),
                        cfg=SamplerConfig(steps=tc.sample_steps, batch_size=n))
        self.model.unet.train()
        self.model.text_encoder.train()
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        sample_grid(to_uint8(images), path, grid=self.grid, cols=min(n, 8), title=f"step {self.step}")
        return path

    def export(self, path: Path) -> None:
        """Write the fine-tuned model (the EMA average when enabled) as a diffusers-layout folder;
        a latent model is also exported as a ``StableDiffusionPipeline`` folder beside it (``pipeline/``).

        Collective. Afterwards the trainer's model holds those weights, with the stock text
        embedding module (location rows merged into the table).
        """
        values = self.ema.tensors() if self.ema is not None else None
        with self.backend.full_weights(values, restore=False):
            if self.is_main:
                uninstall_location_embedding(self.model.text_encoder)
                self.model.save(path)
                if self.model.vae is not None:
                    from geomerase.core.export import export_pipeline

                    export_pipeline(self.model, path.parent / "pipeline")
        self.backend.barrier()
