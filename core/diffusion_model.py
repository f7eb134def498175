"""The model bundle every fine-tune and sampler works on, and the folder it is saved as.

:class:`DiffusionModel` holds the tokenizer (with the G^2 location tokens), the CLIP text encoder,
the UNet, an optional VAE (latent space) and the training noise scheduler; it maps images to what
the UNet denoises and back, and saves itself in the diffusers folder layout with safetensors
weights plus ``geomerase.json`` (:data:`META_FILE`) for what diffusers has no field for. Building
and loading models (sizes, random init, local Stable Diffusion folders, shipped bases) is
:mod:`geomerase.core.models`; SDXL's two-encoder variant is :mod:`geomerase.core.sdxl`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from geomerase.core.lora import LORA_DIR, base_state_dict, has_lora, save_unet_lora
from geomerase.core.tokenizer import location_token_ids
from geomerase.data.shards import atomic_dir

META_FILE = "geomerase.json"
"""The model folder's own metadata (grid, resolution, space, size, patch, coordinate planes)."""


@dataclass
class DiffusionModel:
    """Everything a fine-tune and a sampler touch. Shapes: images ``(B, 3, R, R)`` in [-1, 1]."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    grid: int
    resolution: int
    space: Literal["pixel", "latent"]
    vae: AutoencoderKL | None = None
    size: str = "custom"
    patch: int = 1
    coord_channels: int = 0
    """Coordinate planes appended to the UNet input by :meth:`denoise` (see ``ModelSize``)."""

    @property
    def loc_token_ids(self) -> list[int]:
        return location_token_ids(self.tokenizer, self.grid)

    @property
    def text_encoders(self) -> list[tuple[str, CLIPTokenizer, nn.Module]]:
        """``(folder suffix, tokenizer, encoder)`` of every text encoder, each with its own location
        tokens: ``text_encoder{suffix}/`` and ``tokenizer{suffix}/`` on disk. One here (suffix "")."""
        return [("", self.tokenizer, self.text_encoder)]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """``(B, 77)`` int64 ids, padded and truncated to the text encoder's length."""
        return self.tokenizer(captions, padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, 77)`` ids -> ``(B, 77, D)`` last hidden states (float)."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises (pixels, or scaled VAE latents)."""
        if self.vae is None:
            return F.pixel_unshuffle(images, self.patch) if self.patch > 1 else images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_model_space`; returns images in [-1, 1]."""
        if self.vae is None:
            return (F.pixel_shuffle(x, self.patch) if self.patch > 1 else x).clamp(-1, 1)
        return self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        return (self.unet.config.out_channels, s, s)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                unet: UNet2DConditionModel | None = None) -> torch.Tensor:
        """UNet prediction ``(B, C, h, w)`` for noisy ``x`` ``(B, C, h, w)``, timesteps ``t`` and text
        states ``cond`` ``(B, 77, D)``; appends the coordinate planes when the size has them.
        ``unet`` defaults to ``self.unet`` (ESD passes its frozen copy)."""
        unet = self.unet if unet is None else unet
        return unet(with_coords(x, self.coord_channels), t, cond).sample

    def train(self, mode: bool = True) -> "DiffusionModel":
        """Put the UNet and every text encoder in training (``mode``) or eval mode; the VAE stays as it is."""
        self.unet.train(mode)
        for _, _, text_encoder in self.text_encoders:
            text_encoder.train(mode)
        return self

    def set_attention_backend(self, backend: str) -> None:
        """Route every UNet attention through the named backend (stock weights layout kept)."""
        if backend == "diffusers":
            return
        from geomerase.core.attention import set_attention_backend

        set_attention_backend(self.unet, backend)

    def to(self, device: torch.device | str) -> "DiffusionModel":
        for m in (*(te for _, _, te in self.text_encoders), self.unet, self.vae):
            if m is not None:
                m.to(device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write a diffusers-layout folder atomically (temp dir in the same parent, then rename)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self._save_unet(tmp)
            for suffix, tokenizer, text_encoder in self.text_encoders:
                text_encoder.save_pretrained(tmp / f"text_encoder{suffix}", safe_serialization=True)
                tokenizer.save_pretrained(tmp / f"tokenizer{suffix}")
            self.noise_scheduler.save_pretrained(tmp / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.write_meta(tmp)
        return path

    def _save_unet(self, folder: Path) -> None:
        """``folder/unet``; a UNet with a LoRA adapter is saved as its base weights (stock keys) plus
        ``folder/unet_lora`` (:mod:`geomerase.core.lora`)."""
        if not has_lora(self.unet):
            self.unet.save_pretrained(folder / "unet", safe_serialization=True)
            return
        from safetensors.torch import save_file

        self.unet.save_config(folder / "unet")
        save_file({k: v.contiguous() for k, v in base_state_dict(self.unet).items()},
                  str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        save_unet_lora(self.unet, folder / LORA_DIR)

    def write_meta(self, folder: Path) -> None:
        """``folder/geomerase.json``: what diffusers has no field for (grid, resolution, space, size, patch)."""
        meta = {"grid": self.grid, "resolution": self.resolution, "space": self.space, "size": self.size,
                "patch": self.patch, "coord_channels": self.coord_channels}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def with_coords(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C + n, h, w)``: n = 2 appends x and y planes in [-1, 1] (x's dtype)."""
    if n == 0:
        return x
    if n != 2:
        raise ValueError(f"coord_channels must be 0 or 2, got {n}")
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], 1)


def seeded_vocab_rows(vocab: int, dim: int, seed: int) -> torch.Tensor:
    """``(vocab, dim)`` fp32 ``N(0, 0.02^2)`` rows from ``seed`` alone (see ``ModelSize.seeded_vocab``)."""
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed)) * 0.02


def stored_resolution(folder: str | Path) -> int:
    """The pixel resolution of the model saved in ``folder``, read from its config files only.

    ``geomerase.json``'s ``resolution`` when present, else ``unet.sample_size`` times the
    VAE's downsampling factor (a plain diffusers Stable Diffusion folder)."""
    path = Path(folder)
    meta_path = path / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if "resolution" in meta:
            return int(meta["resolution"])
    unet_cfg = path / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise FileNotFoundError(f"{path}: neither {META_FILE} with a resolution nor unet/config.json")
    sample = int(json.loads(unet_cfg.read_text())["sample_size"])
    vae_cfg = path / "vae" / "config.json"
    scale = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1) if vae_cfg.is_file() else 1
    return sample * scale
