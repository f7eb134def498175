"""LoRA adapters (PEFT) on the UNet's attention projections, for data removal.

With ``train.lora.rank > 0`` the base UNet is frozen and PEFT wraps each targeted ``nn.Linear``
(``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by default) as ``base_layer(x) + B(A(dropout(x))) *
alpha / rank``, adapter name ``default``. ``B`` starts at zero, so training starts from the base
model exactly.

On disk (:meth:`geomerase.core.diffusion_model.DiffusionModel.save`) a UNet with an adapter is two folders:
``unet/`` holds the base weights under the stock diffusers keys, ``unet_lora/`` the adapter in
diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``,
the PEFT config in the file's metadata), which ``StableDiffusionPipeline.load_lora_weights`` reads
as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"
LORA_DIR = "unet_lora"
"""Folder of a saved model that holds its UNet adapter (diffusers LoRA format)."""
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""File name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for."""


@dataclass
class LoraConfig:
    """``train.lora``: low-rank adapters on the UNet (data removal only)."""

    rank: int = 0
    """Rank r of every adapter; 0 disables LoRA (the whole UNet trains)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. None: equal to the rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module-name suffixes in the UNet that get an adapter (PEFT ``target_modules``)."""

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank must be >= 0, got {self.rank}")
        if self.rank and not self.target_modules:
            raise ValueError("train.lora.target_modules is empty")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"train.lora.dropout must be in [0, 1), got {self.dropout}")

    def peft(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                              lora_dropout=self.dropout, target_modules=list(self.target_modules),
                              init_lora_weights=True)


def has_lora(unet: nn.Module) -> bool:
    """Whether ``unet`` carries the PEFT adapter of :func:`add_unet_lora`."""
    return ADAPTER in (getattr(unet, "peft_config", None) or {})


def add_unet_lora(unet: nn.Module, cfg: LoraConfig, seed: int) -> list[nn.Parameter]:
    """Freeze ``unet`` and wrap its target projections with trainable adapters (kept when it already
    has them, e.g. loaded from a LoRA checkpoint). ``A`` is drawn on the CPU from ``seed`` alone (the
    global RNG is left as it was). Returns the adapter parameters in module order."""
    unet.requires_grad_(False)
    if has_lora(unet) and unet.peft_config[ADAPTER].r != cfg.rank:
        raise ValueError(f"train.lora.rank={cfg.rank} but the model's adapter has rank {unet.peft_config[ADAPTER].r}")
    if not has_lora(unet):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(cfg.peft(), adapter_name=ADAPTER)
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    if not params:
        raise ValueError(f"train.lora.target_modules {cfg.target_modules} match no module of the UNet")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_layers(unet: nn.Module) -> nn.ModuleList:
    """The adapters' own sub-modules (``lora_A`` / ``lora_B`` of every wrapped projection), without the
    frozen base layers: what a :class:`~geomerase.core.train_step.StepModule` registers."""
    return nn.ModuleList(m for n, m in unet.named_modules() if n.endswith((".lora_A", ".lora_B")))


def base_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The base UNet's weights under the stock keys (adapters left out, ``.base_layer`` dropped)."""
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def adapter_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's layout: ``<module>.lora_A.weight`` ``(r, in)`` and
    ``<module>.lora_B.weight`` ``(out, r)``."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def save_unet_lora(unet: nn.Module, folder: Path) -> Path:
    """Write the adapter into ``folder`` in diffusers' LoRA format (with its PEFT config as metadata,
    so alpha survives). Not atomic by itself: callers write into a temporary folder."""
    from diffusers import StableDiffusionPipeline

    meta = unet.peft_config[ADAPTER].to_dict()
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=adapter_state_dict(unet),
                                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    return Path(folder) / LORA_WEIGHTS


def load_unet_lora(unet: nn.Module, folder: Path) -> None:
    """Attach (or overwrite) the adapter saved by :func:`save_unet_lora` in ``folder``, as diffusers'
    ``load_lora_weights`` does."""
    from diffusers import StableDiffusionPipeline

    state, _, meta = StableDiffusionPipeline.lora_state_dict(str(folder), return_lora_metadata=True)
    if has_lora(unet):
        unet.delete_adapters(ADAPTER)
    unet.load_lora_adapter(state, prefix="unet", metadata=meta, adapter_name=ADAPTER)


def load_unet_weights(unet: nn.Module, folder: Path) -> None:
    """Load a saved model folder's UNet weights (``unet/``, and ``unet_lora/`` when ``unet`` carries an
    adapter) into ``unet`` in place; every tensor must match (strict)."""
    from safetensors.torch import load_file

    base = load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))
    if not has_lora(unet):
        unet.load_state_dict(base)
        return
    from diffusers import StableDiffusionPipeline

    state, _ = StableDiffusionPipeline.lora_state_dict(str(Path(folder) / LORA_DIR))
    adapter = {k.removeprefix("unet."): v for k, v in state.items()}
    full = {}
    for key in unet.state_dict():
        if ".lora_" in key:
            full[key] = adapter[key.replace(f".{ADAPTER}.", ".")]
        else:
            full[key] = base[key.replace(".base_layer.", ".")]
    unet.load_state_dict(full)


def merge_unet_lora(unet: nn.Module) -> None:
    """Fold the adapter into the base weights and remove it: ``unet`` becomes a stock UNet whose
    projections compute ``W + B A alpha / rank`` (equal to the adapter up to float rounding)."""
    if has_lora(unet):
        unet.fuse_lora(lora_scale=1.0)
        unet.unload_lora()
