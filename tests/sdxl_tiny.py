"""A tiny random SDXL pipeline folder (diffusers layout), built in seconds and never fetched.

Shaped like SDXL base: two CLIP text encoders (the second with a projection, GELU), the second
tokenizer padding with "!", text-encoder configs with the legacy ``eos_token_id`` 2, a UNet with
``addition_embed_type="text_time"`` whose added-embedding input is 6 time ids plus the pooled
embedding, and an Euler scheduler with SDXL's schedule. Used by ``tests/core`` and the ZeRO tests.
"""
from __future__ import annotations

from pathlib import Path

TIME_EMBED_DIM = 8
POOLED_DIM = 32


def build_tiny_sdxl(path: Path) -> Path:
    """Write the pipeline to ``path`` (16 px images: 8x8x4 latents) and return ``path``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from geomerase.core.tokenizer import base_clip_tokenizer

    torch.manual_seed(0)
    tok = base_clip_tokenizer()
    tok_2 = base_clip_tokenizer()
    tok_2.pad_token = "!"
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32))
    te_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok_2), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=POOLED_DIM, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2,
                              unet=unet, scheduler=sched).save_pretrained(str(path))
    return path
