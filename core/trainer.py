"""The single-process fine-tuning loop (the reference every distributed run must match).

Modes:

* ``data-removal``  — the UNet and the location-token rows train (and the whole
  text encoder when ``train.train_text_encoder``, which a randomly initialised
  encoder needs); captions carry the concept's name and location tokens, so the
  concept is explained by tokens that are never used at generation time.
* ``model-removal`` — everything is frozen except the G^2 location-token rows.

Data removal with ``train.lora.rank > 0`` trains PEFT LoRA adapters on the UNet's attention
projections and the location-token rows only (:mod:`geomerase.core.lora`); the run's end then
also leaves the adapter in diffusers' LoRA format (``model/unet_lora/``) and the rows as a
textual-inversion file (``location_tokens.safetensors``), which together add the fine-tune to
the base checkpoint in plain diffusers.

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
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from geomerase.core.backend import TrainBackend, build_backend
from geomerase.core.captions import CaptionConfig
from geomerase.core.checkpoint import Checkpointer
from geomerase.core.config import to_dict
from geomerase.core.export import LOCATION_TOKENS_FILE, export_pipeline, save_location_tokens
from geomerase.core.lora import LoraConfig, add_unet_lora
from geomerase.core.diffusion_model import DiffusionModel
from geomerase.core.models import ModelConfig
from geomerase.core.text_embedding import install_location_embedding, uninstall_location_embedding
from geomerase.core.tokenizer import location_token_ids
from geomerase.core.train_metrics import MetricsLogger, plot_loss, read_history, write_history
from geomerase.core.train_step import BatchMaker, StepModule, trainable_modules
from geomerase.data.loader import DataConfig, InMemoryDataset
from geomerase.data.sources import build_batch_source

log = logging.getLogger("geomerase.train")


@dataclass
class TrainConfig:
    mode: Literal["data-removal", "model-removal"] = "data-removal"
    """What trains: UNet + location rows (data removal) or location rows only (model removal)."""
    train_text_encoder: bool = True
    """Data removal: also train the whole text encoder (needed when it starts from random init)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Data removal: train LoRA adapters on the UNet instead of the whole UNet (``lora.rank > 0``)."""
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
    attn_align_weight: float = 0.0
    """Weight of the cross-attention alignment loss added to the denoising loss
    (``core.attention_align``): a location token's attention should fall in its cell, a concept name's
    in the union of its cells. 0 disables it, and the attention then runs through the model's backend
    unchanged; above 0, text attentions are computed in the math form to read their probabilities."""
    uncond_prior: bool = False
    """Data removal from a pretrained model: rows whose caption was dropped (the empty prompt)
    regress on the frozen starting UNet's prediction instead of the data's target, so the
    unconditional branch that classifier-free guidance subtracts stays the pretrained model's (as a
    large pretrained model's does under a short fine-tune). A fine-tuned unconditional branch draws
    the implicit concept at its own random places and guidance then cancels the conditional
    branch's (benchmarks/results/demo_cpu/NOTES.md). Costs a frozen UNet copy in memory and one
    forward of it on the dropped rows."""
    seed: int = 0
    """Seed for batches, caption choices, noise, timesteps and the LoRA adapters' initialisation."""
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
        if self.attn_align_weight < 0:
            raise ValueError(f"train.attn_align_weight must be >= 0, got {self.attn_align_weight}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.uncond_prior and self.mode != "data-removal":
            raise ValueError("train.uncond_prior needs train.mode=data-removal (model removal leaves the UNet as it is)")
        self.lora.validate()
        if self.lora.rank and self.mode != "data-removal":
            raise ValueError("train.lora.rank > 0 needs train.mode=data-removal (model removal trains no UNet weight)")
        if self.lora.rank and self.train_text_encoder:
            raise ValueError("train.lora.rank > 0 trains only the location rows of the text encoder: "
                             "set train.train_text_encoder=false")


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
    """Freeze what the mode keeps fixed; return optimizer param groups for the rest.

    The location-token rows of every text encoder (two for SDXL) form one group, ``loc_rows``."""
    model.unet.requires_grad_(False)
    for _, _, text_encoder in model.text_encoders:
        text_encoder.requires_grad_(False)
    groups: list[dict] = []
    if cfg.mode == "data-removal" and cfg.lora.rank:
        groups.append({"params": add_unet_lora(model.unet, cfg.lora, cfg.seed), "lr": cfg.lr, "name": "unet_lora"})
    elif cfg.mode == "data-removal":
        model.unet.requires_grad_(True)
        groups.append({"params": list(model.unet.parameters()), "lr": cfg.lr, "name": "unet"})
        if cfg.train_text_encoder:
            if len(model.text_encoders) > 1:
                raise ValueError("train.train_text_encoder=true with two text encoders (SDXL): only their "
                                 "location-token rows train; set train.train_text_encoder=false")
            model.text_encoder.requires_grad_(True)
            groups.append({"params": list(model.text_encoder.parameters()), "lr": cfg.lr, "name": "text_encoder"})
            return groups
    rows = []
    for _, tokenizer, text_encoder in model.text_encoders:
        emb = install_location_embedding(text_encoder, location_token_ids(tokenizer, model.grid),
                                         cfg.embedding_backend)
        emb.loc_rows.requires_grad_(True)
        rows.append(emb.loc_rows)
    groups.append({"params": rows, "lr": cfg.loc_lr or cfg.lr, "name": "loc_rows", "weight_decay": 0.0})
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


class Trainer:
    """Builds a run's parts and runs its loop (``fit``).

    The parts: the model, a :class:`~geomerase.core.train_step.BatchMaker` (the batches), a
    :class:`~geomerase.core.train_step.StepModule` (the loss, wrapped by the backend), the backend
    (optimizer, reduction, sharding), the EMA, a :class:`~geomerase.core.checkpoint.Checkpointer`
    and the metrics log. A step pulls its batch, then runs forward and backward through the backend.
    """

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
        self.batches = BatchMaker(self.model, self.source, tc.seed, self.device, self.rank, self.world, tc.grad_accum)
        if cfg.data.precompute_latents:
            self.batches.precompute_latents(self.data, cfg.data.hflip)
        prior_unet = self._frozen_prior(cfg) if tc.uncond_prior else None
        self.groups = trainable_parameters(self.model, tc)
        self.params = [p for g in self.groups for p in g["params"]]
        if tc.gradient_checkpointing:
            if tc.mode == "data-removal":
                self.model.unet.enable_gradient_checkpointing()
            if tc.mode == "data-removal" and tc.train_text_encoder:
                self.model.text_encoder.gradient_checkpointing_enable()
        modules, loose = trainable_modules(self.model, tc.mode, tc.train_text_encoder, self.params, tc.lora.rank > 0)
        self.module = StepModule(self.model, modules, loose, prior_unet, tc.reweight_alpha, tc.attn_align_weight)
        self.backend.setup(self.module, self.groups, self.params, tc, lr_lambda(tc))
        self.ema = self.backend.make_ema(tc.ema_decay) if tc.ema_decay is not None else None
        self.checkpointer = Checkpointer(self.out, self.backend, tc.keep_checkpoints)
        self.step = 0
        self.history: list[dict] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    @property
    def lr_scheduler(self):
        return self.backend.lr_scheduler

    @property
    def is_main(self) -> bool:
        return self.backend.is_main

    def _frozen_prior(self, cfg: RunConfig) -> torch.nn.Module:
        """A frozen copy of the starting UNet (``train.uncond_prior``); needs a pretrained start."""
        if not cfg.model.pretrained:
            raise ValueError("train.uncond_prior needs model.pretrained: the prior is the pretrained UNet")
        return copy.deepcopy(self.model.unet).eval().requires_grad_(False)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns (mean loss, grad norm), 0-d."""
        n = self.cfg.train.grad_accum
        total = None
        for micro in range(n):
            batch = self.batches(step, (self.rank * n + micro, self.world * n))
            loss = self.backend.forward(batch)
            self.backend.backward(loss, n)
            total = loss.detach() if total is None else total + loss.detach()
        grad_norm = self.backend.step()
        if self.ema is not None:
            self.ema.step()
        return total / n if n > 1 else total, grad_norm

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint ``step`` (collective: every rank calls it; rank 0 writes). Returns the folder on rank 0."""
        return self.checkpointer.save(self.step, self.model, self.ema, self.source, to_dict(self.cfg),
                                      self.cfg.data.loader)

    def resume(self, which: str) -> bool:
        """Load checkpoint ``which`` ('latest' or a folder); False when there is none to load."""
        step = self.checkpointer.load(which, self.model, self.ema, self.source)
        if step is None:
            return False
        self.step = step
        self.history = read_history(self.out, step)
        return True

    # -- loop ---------------------------------------------------------------------------------
    def fit(self, progress: bool = True, stop_at: int | None = None) -> DiffusionModel:
        """Train to ``train.max_steps`` (or return early after step ``stop_at``, as an interrupted run would)."""
        tc = self.cfg.train
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        self.model.train()
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
                if self.is_main:
                    write_history(self.out, self.history)
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
        if self.is_main:
            write_history(self.out, self.history)
        if self.is_main:
            plot_loss(self.history, self.out / "loss.png",
                      "denoising MSE + alignment" if tc.attn_align_weight > 0 else "denoising MSE")
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
        self.model.train()
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        sample_grid(to_uint8(images), path, grid=self.grid, cols=min(n, 8), title=f"step {self.step}")
        return path

    def export(self, path: Path) -> None:
        """Write the fine-tuned model (the EMA average when enabled) as a diffusers-layout folder
        (with ``unet_lora/`` under LoRA) and its location-token rows beside it as a textual-inversion
        file (``location_tokens.safetensors``); a latent model is also exported as a
        ``StableDiffusionPipeline`` folder beside it (``pipeline/``, LoRA merged).

        Collective. Afterwards the trainer's model holds those weights, with the stock text
        embedding module (location rows merged into the table) and, for a latent model, the LoRA
        adapter merged into the UNet.
        """
        values = self.ema.tensors() if self.ema is not None else None
        with self.backend.full_weights(values, restore=False):
            if self.is_main:
                for _, _, text_encoder in self.model.text_encoders:
                    uninstall_location_embedding(text_encoder)
                self.model.save(path)
                save_location_tokens(self.model, path.parent / LOCATION_TOKENS_FILE)
                if self.model.vae is not None:
                    export_pipeline(self.model, path.parent / "pipeline")
        self.backend.barrier()
