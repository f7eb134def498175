"""Stable Diffusion XL behind the :class:`~geomerase.core.diffusion_model.DiffusionModel` interface.

SDXL conditions its UNet on two CLIP text encoders: the penultimate hidden states of both,
concatenated along the feature axis (``(B, 77, D1 + D2)``, 768 + 1280 for SDXL base), and, through
``added_cond_kwargs``, the second encoder's projected pooled embedding ``(B, P)`` plus six
"time ids" (original size, crop corner, target size). Both tokenizers carry the G^2 location
tokens and both encoders a row for each, so a caption or negative prompt reaches both.

The rest of the project passes text conditioning around as one tensor (concatenated, indexed,
repeated, cast), so :meth:`SDXLModel.encode_text` packs the pooled embedding into one extra
sequence position: ``cond[:, :77]`` are the hidden states and ``cond[:, 77, :P]`` the pooled
embedding (zeros after it). :meth:`SDXLModel.denoise` unpacks it; the time ids are
``(R, R, 0, 0, R, R)`` for the model's resolution R, what ``StableDiffusionXLPipeline`` uses at
``height = width = R`` by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from geomerase.core.diffusion_model import DiffusionModel
from geomerase.core.tokenizer import location_token_ids


@dataclass
class SDXLModel(DiffusionModel):
    """A :class:`DiffusionModel` with SDXL's second tokenizer and text encoder (with projection).

    ``tokenize`` gives ``(B, 2, 77)`` ids (one row per tokenizer), ``encode_text`` the packed
    ``(B, 78, D1 + D2)`` conditioning described in the module docstring."""

    tokenizer_2: CLIPTokenizer | None = None
    """The second encoder's tokenizer (with the location tokens)."""
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """The second text encoder; its projected pooled output enters the UNet's added embedding."""

    def __post_init__(self) -> None:
        if self.tokenizer_2 is None or self.text_encoder_2 is None:
            raise ValueError("SDXLModel needs tokenizer_2 and text_encoder_2")
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"SDXL UNet needs addition_embed_type='text_time', got {cfg.addition_embed_type!r}")
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim != width:
            raise ValueError(f"unet cross_attention_dim {cfg.cross_attention_dim} != the encoders' hidden sizes "
                             f"summed ({width})")
        if self.pooled_dim > width:
            raise ValueError(f"pooled embedding ({self.pooled_dim}) wider than the hidden states ({width}): "
                             "it cannot be packed into one sequence position")
        for _, tokenizer, encoder in self.text_encoders:
            pool_at_eos(encoder, tokenizer.eos_token_id)

    @property
    def pooled_dim(self) -> int:
        """P: width of the second encoder's projected pooled embedding."""
        return self.text_encoder_2.config.projection_dim

    @property
    def loc_token_ids_2(self) -> list[int]:
        """Ids of ``<l0> .. <l{G*G-1}>`` in the second tokenizer."""
        return location_token_ids(self.tokenizer_2, self.grid)

    @property
    def text_encoders(self) -> list[tuple[str, CLIPTokenizer, nn.Module]]:
        return [("", self.tokenizer, self.text_encoder), ("_2", self.tokenizer_2, self.text_encoder_2)]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """``(B, 2, 77)`` int64 ids: row 0 from the first tokenizer, row 1 from the second."""
        return torch.stack([tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                                return_tensors="pt").input_ids for _, tok, _ in self.text_encoders], 1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, 2, 77)`` ids -> ``(B, 78, D1 + D2)`` packed conditioning (float, the first encoder's
        device and dtype): penultimate hidden states of both encoders, then the pooled row."""
        device = self.text_encoder.device
        out_1 = self.text_encoder(input_ids[:, 0].to(device), output_hidden_states=True)
        out_2 = self.text_encoder_2(input_ids[:, 1].to(self.text_encoder_2.device), output_hidden_states=True)
        states_1 = out_1.hidden_states[-2]
        states = torch.cat([states_1, out_2.hidden_states[-2].to(device, states_1.dtype)], -1)
        pooled = F.pad(out_2.text_embeds.to(device, states.dtype), (0, states.shape[-1] - self.pooled_dim))
        return torch.cat([states, pooled[:, None]], 1)

    def split_cond(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(B, S + 1, D)`` -> hidden states ``(B, S, D)`` and pooled embedding ``(B, P)``."""
        return cond[:, :-1], cond[:, -1, :self.pooled_dim]

    def time_ids(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``(batch, 6)`` time ids (original size, crop top-left, target size) = ``(R, R, 0, 0, R, R)``
        in ``like``'s dtype and device."""
        r = float(self.resolution)
        return torch.tensor([r, r, 0.0, 0.0, r, r], dtype=like.dtype, device=like.device).expand(batch, 6)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                unet: UNet2DConditionModel | None = None) -> torch.Tensor:
        """UNet prediction ``(B, C, h, w)`` for noisy latents ``x``, timesteps ``t`` and packed
        conditioning ``cond`` ``(B, 78, D)`` (pooled embedding and time ids via ``added_cond_kwargs``)."""
        unet = self.unet if unet is None else unet
        states, pooled = self.split_cond(cond)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x.shape[0], states)}
        return unet(x, t, states, added_cond_kwargs=added).sample


def pool_at_eos(text_encoder: nn.Module, eos_token_id: int) -> None:
    """Make ``text_encoder`` pool at the first ``eos_token_id`` of each sequence.

    A config with ``eos_token_id == 2`` (CLIP's original configs, SDXL base's included) makes
    transformers pool at the position of the largest id, which is a location token whenever a
    prompt holds one (their ids come after the base vocabulary). The config is updated too, so an
    exported folder pools the same way in plain diffusers."""
    text_encoder.config.eos_token_id = eos_token_id
    transformer = getattr(text_encoder, "text_model", text_encoder)  # WithProjection nests a CLIPTextModel
    transformer.config.eos_token_id = eos_token_id
    transformer.eos_token_id = eos_token_id


_TINY_TIME_EMBED_DIM = 8
_TINY_POOLED_DIM = 32


def write_tiny_sdxl(path: str | Path) -> Path:
    """Write a tiny random SDXL-shaped pipeline folder to ``path`` (16 px images: 8x8x4 latents) and
    return it; built in seconds from a fixed seed (the caller's RNG untouched), never fetched. Shaped
    like SDXL base: two CLIP text encoders (the second with a projection, GELU), the second tokenizer
    padding with "!", text-encoder configs with the legacy ``eos_token_id`` 2, a UNet with
    ``addition_embed_type="text_time"`` (6 time ids plus the pooled embedding) and an Euler scheduler
    with SDXL's schedule. For the tests and CPU benchmarks of the SDXL paths."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from geomerase.core.tokenizer import base_clip_tokenizer

    tok, tok_2 = base_clip_tokenizer(), base_clip_tokenizer()
    tok_2.pad_token = "!"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                          projection_dim=32))
        te_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok_2), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=_TINY_POOLED_DIM, hidden_act="gelu"))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 64,
            attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _TINY_TIME_EMBED_DIM + _TINY_POOLED_DIM)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=16)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2,
                              unet=unet, scheduler=sched).save_pretrained(str(path))
    return Path(path)
