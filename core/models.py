"""Model registry, construction and loading: random init of a named size, local Stable Diffusion
folders and the shipped bases.

A *model* here is the bundle a text-to-image fine-tune needs (:class:`~geomerase.core.diffusion_model.DiffusionModel`):
tokenizer (with the G^2 location tokens), CLIP text encoder, UNet, optional VAE (latent space) and the
training noise scheduler. Named sizes live in :data:`MODEL_SIZES`; ``tiny`` runs
the whole pipeline on a 2-core CPU in pixel space, ``sd15`` has Stable Diffusion
1.5's shapes (random init, for GPU benchmarks) and ``--pretrained PATH`` loads a
real Stable Diffusion (or SDXL, :mod:`geomerase.core.sdxl`) from a local diffusers folder.

Checkpoints use the diffusers folder layout (``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``vae/``) with safetensors weights, plus
``geomerase.json`` for what diffusers has no field for (grid, space, resolution), and
``unet_lora/`` when the UNet carries a LoRA adapter (``unet/`` then holds the base weights).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from geomerase.core.builtin import resolve_pretrained
from geomerase.core.diffusion_model import META_FILE, DiffusionModel, seeded_vocab_rows
from geomerase.core.lora import LORA_DIR, load_unet_lora
from geomerase.core.sdxl import SDXLModel
from geomerase.core.tokenizer import add_location_tokens, build_tokenizer, location_token_ids


@dataclass(frozen=True)
class ModelSize:
    """One named architecture."""

    space: Literal["pixel", "latent"]
    resolution: int
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any] | None = None
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts by default for this size."""
    patch: int = 1
    """Pixel space only: the UNet sees ``patch x patch`` pixel blocks folded into channels
    (space-to-depth), so a 32 px image is a 16x16x12 input at patch 2."""
    coord_channels: int = 0
    """0 or 2: extra UNet input channels holding each position's (x, y) in [-1, 1]. A conv UNet
    knows where a pixel is only through its zero padding, so binding a location token to its
    cell has to be learned from scratch; fixed coordinate planes give every cross-attention
    query its position from step 0. The UNet's ``in_channels`` counts them (stock layout)."""
    seeded_vocab: bool = False
    """Draw the text encoder's token-embedding table from ``torch.Generator().manual_seed(seed)``
    (``N(0, 0.02^2)``, fp32, row-major) instead of transformers' initialiser, so rows that no
    training caption uses can be regenerated exactly and need not be shipped (``core.builtin``)."""
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012,
    })


MODEL_SIZES: dict[str, ModelSize] = {}


def register_size(name: str, size: ModelSize) -> None:
    """Add a named size to the registry (an error if the name is taken)."""
    if name in MODEL_SIZES:
        raise KeyError(f"model size {name!r} already registered")
    MODEL_SIZES[name] = size


# CPU preset, 32 px images. The UNet works on 2x2 pixel blocks folded into channels
# (a 16x16x12 input): the full-resolution level dominated the step on 2 cores and
# space-to-depth halves the step time (measured 2.0 vs 4.4 s/step, 1 thread, loaded
# machine) at the same image size. Every attention layer attends to the text only
# (``only_cross_attention``): self-attention over the grid tripled the step time while
# the convolutions already mix space. diffusers' ``attention_head_dim`` is the head
# *count* here. The pooled text embedding also enters the time embedding ("text"
# addition) so global attributes such as the background colour have a direct path
# besides cross-attention.
# v-prediction: with epsilon-prediction the 600-step model's x0 estimate at t >= 700 was
# pure noise (the eps error is amplified by 1/sqrt(alpha_bar) ~ 20-50x under the linear
# schedule), so no global colour or layout was ever committed and samples were noise;
# v-prediction regresses x0 directly there.
register_size("tiny", ModelSize(
    space="pixel", resolution=32, patch=2, prediction_type="v_prediction",
    unet=dict(
        sample_size=16, in_channels=12, out_channels=12, layers_per_block=1,
        block_out_channels=(64, 96, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=2, only_cross_attention=True, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4,
    ),
    text_encoder=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=77, projection_dim=128),
    scheduler={"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
))

# ``tiny`` plus (x, y) coordinate planes at the UNet input (14 = 12 + 2 channels): the
# location tokens' cells become visible to cross-attention from the first step.
register_size("tiny-coord", replace(MODEL_SIZES["tiny"], coord_channels=2,
                                    unet={**MODEL_SIZES["tiny"].unet, "in_channels": 14}))

# ``tiny`` without the pooled-text path into the time embedding, so every word reaches the
# image only through cross-attention; with and without coordinate planes. Measured on the
# 1300-step ``tiny`` geom model: feeding the empty caption's states to cross-attention but the
# real caption to the pooled path left the held-out loss at t=900 unchanged (0.178 vs 0.176),
# the reverse gave the empty-caption loss (0.402 vs 0.433): all conditioning went through the
# global pool, which has no spatial axis, so location tokens could not bind to cells.
# Measured with the same 1300-step demo (2026-11-28), ``tiny-xattn-coord`` did not fix that:
# its geom model's x0 reacts to the tag (5-10% of the caption's own effect, vs 0.02-0.4%) but
# everywhere alike (in/out-of-cell ratio 0.9-1.1), and ICR (held-out 0.45, open 0.52-0.58) and
# fidelity (0.30 vs 0.37) were worse. ``tiny`` stays the default; these sizes stay for
# experiments at larger budgets.
_NO_POOL = {k: v for k, v in MODEL_SIZES["tiny"].unet.items()
            if k not in ("addition_embed_type", "addition_embed_type_num_heads")}
register_size("tiny-xattn", replace(MODEL_SIZES["tiny"], unet=_NO_POOL))
register_size("tiny-xattn-coord", replace(MODEL_SIZES["tiny"], coord_channels=2, unet={**_NO_POOL, "in_channels": 14}))

# The base models: pretrained once on the concept-free corpus (``geomerase.data.corpus``) and shipped
# inside the package (``core.builtin``); the demo and the erasing benchmark fine-tune from them, as
# the paper fine-tunes a pretrained Stable Diffusion. Every word reaches the image through
# cross-attention (no pooled-text path: a pooled vector has no spatial axis, and with one the tiny
# UNet routed its whole caption through it, see ``tiny-xattn`` above), and (x, y) coordinate planes
# tell each cross-attention query where it is, so a position word (and later a location token) can
# select a region. Channels (64, 96, 96): 4.2 M UNet parameters, 0.56 s per batch-16 step on one
# CPU thread; the full-resolution level stays attention-free (cross-attention there cost +40%).
register_size("base32", replace(MODEL_SIZES["tiny"], coord_channels=2, seeded_vocab=True, unet={
    **_NO_POOL, "in_channels": 14, "block_out_channels": (64, 96, 96)}))

# The same UNet on 64 px images folded 4x4 into a 16x16x48 input: watermarks and overlaid text,
# unreadable at 32 px, stay visible to a scorer, at about base32's cost per step.
register_size("base64", replace(MODEL_SIZES["base32"], resolution=64, patch=4, unet={
    **MODEL_SIZES["base32"].unet, "in_channels": 50, "out_channels": 48}))

# Even smaller, for unit tests: seconds per step on CPU.
register_size("debug", ModelSize(
    space="pixel", resolution=16,
    unet=dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ),
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=77, projection_dim=32),
    scheduler={"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
))

# Stable Diffusion 1.5's shapes (random init): GPU throughput benchmarks.
register_size("sd15", ModelSize(
    space="latent", resolution=512,
    unet=dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ),
    text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2, sample_size=512),
))


@dataclass
class ModelConfig:
    size: str = "tiny"
    """Registry name of the architecture (see ``MODEL_SIZES``); ignored for weights when ``pretrained`` is set."""
    pretrained: str | None = None
    """Local folder: a diffusers Stable Diffusion or SDXL pipeline, or a geomerase checkpoint. None: random init."""
    grid: int = 4
    """G: number of grid rows/cols; G^2 location tokens are added to the tokenizer."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the UNet predicts; None: the size's default (random init) or the checkpoint's scheduler."""
    attention_backend: str = "sdpa"
    """Attention backend by name: sdpa, triton, xformers, math (see geomerase.core.attention)."""
    seed: int = 0
    """Seed for random initialisation."""
    loc_init: Literal["mean", "position-words"] = "position-words"
    """How location-token rows added to a pretrained text encoder start: 'mean' (mean of the
    vocabulary plus small noise, an uninformative token) or 'position-words' (cell ``(r, c)``'s
    row is the overlap-weighted mix of the embeddings of the position words "top left" ...
    "bottom right" whose thirds of the image it covers, so it starts out meaning its place)."""

    def validate(self) -> None:
        if self.loc_init not in ("mean", "position-words"):
            raise ValueError(f"model.loc_init must be 'mean' or 'position-words', got {self.loc_init!r}")
        if self.pretrained is None and self.size not in MODEL_SIZES:
            raise ValueError(f"model.size {self.size!r} unknown; registered: {sorted(MODEL_SIZES)}")
        if self.grid < 0:
            raise ValueError(f"model.grid must be >= 0 (0: no location tokens, a base model), got {self.grid}")

    def build(self) -> "DiffusionModel":
        self.validate()
        if self.pretrained:
            model = load_model(resolve_pretrained(self.pretrained), grid=self.grid, seed=self.seed,
                               loc_init=self.loc_init)
        else:
            model = build_random(self.size, self.grid, self.seed)
        if self.prediction_type is not None:
            model.noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        model.set_attention_backend(self.attention_backend)
        return model


def _resize_for_loc_tokens(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, grid: int, seed: int,
                           loc_init: str = "mean") -> None:
    """Grow the embedding table to the tokenizer and initialise the new location rows.

    'mean': the mean of the existing rows plus small noise, so a pretrained encoder sees them as
    ordinary, uninformative tokens at first. 'position-words': :func:`position_word_rows`.
    """
    old = text_encoder.get_input_embeddings().weight.shape[0]
    if len(tokenizer) == old:
        return
    # Every new row is set below, so skip transformers' mean-and-covariance draw (and its global-RNG use).
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        mean, std = emb[:old].mean(0), emb[:old].std(0)
        noise = torch.randn(len(tokenizer) - old, emb.shape[1], generator=g).to(emb.dtype)
        emb[old:] = mean + 0.1 * std * noise
        if loc_init == "position-words":
            ids = location_token_ids(tokenizer, grid)
            emb[ids] = position_word_rows(emb[:old], tokenizer, grid).to(emb.dtype)


def position_word_rows(table: torch.Tensor, tokenizer: CLIPTokenizer, grid: int) -> torch.Tensor:
    """``(G*G, D)`` rows: cell ``(r, c)`` mixes the embeddings of the nine position words of the
    scenes (``data.scenes.POSITIONS``, thirds split at 0.4 / 0.6 of the side as ``position_word``
    assigns them), weighted by the area of the cell inside each word's region; a multi-token word
    ("top left") is the mean of its token rows. ``table``: ``(V, D)`` token embeddings."""
    from geomerase.data.scenes import POSITIONS

    edges = (0.0, 0.4, 0.6, 1.0)
    words = torch.stack([torch.stack([table[tokenizer(w, add_special_tokens=False).input_ids].float().mean(0)
                                      for w in row]) for row in POSITIONS])  # (3, 3, D)
    out = []
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        y0, y1, x0, x1 = r / grid, (r + 1) / grid, c / grid, (c + 1) / grid
        wy = torch.tensor([max(0.0, min(y1, edges[i + 1]) - max(y0, edges[i])) for i in range(3)])
        wx = torch.tensor([max(0.0, min(x1, edges[i + 1]) - max(x0, edges[i])) for i in range(3)])
        w = (wy[:, None] * wx[None, :]) / (wy.sum() * wx.sum())
        out.append((w[..., None] * words).sum((0, 1)))
    return torch.stack(out)


def build_random(size: str, grid: int, seed: int = 0) -> DiffusionModel:
    """A randomly initialised model of registry size ``size``."""
    spec = MODEL_SIZES[size]
    tokenizer = build_tokenizer(grid)
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              **spec.text_encoder)
    text_encoder = CLIPTextModel(text_cfg)
    if spec.seeded_vocab:
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.copy_(seeded_vocab_rows(len(tokenizer), text_cfg.hidden_size, seed))
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae) if spec.vae is not None else None
    scheduler = DDPMScheduler(**spec.scheduler, prediction_type=spec.prediction_type)
    if unet.config.in_channels != unet.config.out_channels + spec.coord_channels:
        raise ValueError(f"model size {size!r}: unet in_channels must be out_channels + coord_channels")
    return DiffusionModel(tokenizer, text_encoder, unet, scheduler, grid, spec.resolution, spec.space, vae, size,
                          spec.patch, spec.coord_channels)


def load_model(path: str | os.PathLike, grid: int | None = None, seed: int = 0,
               loc_init: str = "mean") -> DiffusionModel:
    """Load a geomerase checkpoint or a local diffusers Stable Diffusion (or SDXL) folder.

    A Stable Diffusion folder gets the G^2 location tokens added (``grid`` required)
    and its text-encoder embedding rows resized; nothing is fetched from a hub. A folder with
    ``unet_lora/`` (a LoRA fine-tune) gets that adapter attached to its UNet, unmerged. A folder
    with ``text_encoder_2/`` is SDXL: both tokenizers get the tokens, both encoders the rows, and the
    result is a :class:`geomerase.core.sdxl.SDXLModel`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path}: missing '{sub}/' (expected a diffusers pipeline folder)")
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if grid is None:
        grid = meta.get("grid")
        if grid is None:
            raise ValueError(f"{path}: not a geomerase checkpoint; pass the grid size to add location tokens")
    elif meta.get("grid") not in (None, 0, grid):
        raise ValueError(f"{path}: checkpoint was trained with grid {meta['grid']}, asked for grid {grid}")
    kw = dict(local_files_only=True)
    tokenizer, text_encoder = load_text_encoder(path, "", CLIPTextModel, grid, seed, loc_init)
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), use_safetensors=True, **kw)
    scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"), **kw)
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(str(path / "vae"), use_safetensors=True, **kw)
        vae.requires_grad_(False)
    if (path / LORA_DIR).is_dir():
        load_unet_lora(unet, path / LORA_DIR)
    space = meta.get("space", "latent" if vae is not None else "pixel")
    patch = int(meta.get("patch", 1))
    coords = int(meta.get("coord_channels", 0))
    if unet.config.in_channels != unet.config.out_channels + coords:
        raise ValueError(f"{path}: unet in_channels {unet.config.in_channels} != out_channels "
                         f"{unet.config.out_channels} + coord_channels {coords} (from {META_FILE})")
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else patch
    resolution = meta.get("resolution", unet.config.sample_size * scale)
    parts = (tokenizer, text_encoder, unet, scheduler, grid, resolution, space, vae,
             meta.get("size", "pretrained"), patch, coords)
    if (path / "text_encoder_2").is_dir():
        from transformers import CLIPTextModelWithProjection

        tokenizer_2, text_encoder_2 = load_text_encoder(path, "_2", CLIPTextModelWithProjection, grid, seed, loc_init)
        return SDXLModel(*parts, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
    return DiffusionModel(*parts)


def load_text_encoder(path: Path, suffix: str, cls: type[nn.Module], grid: int, seed: int,
                      loc_init: str) -> tuple[CLIPTokenizer, nn.Module]:
    """``tokenizer{suffix}/`` with the location tokens added and ``text_encoder{suffix}/`` (a ``cls``)
    with its embedding table grown to match (new rows initialised by ``loc_init``)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(path / f"tokenizer{suffix}"), local_files_only=True)
    text_encoder = cls.from_pretrained(str(path / f"text_encoder{suffix}"), use_safetensors=True,
                                       local_files_only=True)
    add_location_tokens(tokenizer, grid)
    _resize_for_loc_tokens(text_encoder, tokenizer, grid, seed, loc_init)
    return tokenizer, text_encoder
