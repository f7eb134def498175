"""Fixtures: a tiny annotated ICD (oracle detector) shared by the core tests.

Imports stay inside the fixture: the GPU check runs this folder's attention tests on a
machine without the data dependencies (qrcode), where a module-level import would stop
pytest from loading the conftest at all.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_icd(tmp_path_factory) -> Path:
    from geomerase.core.annotate import Annotator, annotate_shards
    from geomerase.core.detectors import OracleDetector
    from geomerase.core.geometry import GeometryConfig
    from geomerase.core.tokenizer import build_tokenizer
    from geomerase.data.icd import build_icd

    root = tmp_path_factory.mktemp("icd")
    build_icd("qr", 48, 0.5, 32, 0, root / "raw", shard_size=24, progress=False)
    ann = Annotator(OracleDetector("qr"), GeometryConfig(grid=4, overlap_threshold=0.25), build_tokenizer(4), "qr code")
    annotate_shards(ann, str(root / "raw" / "*.tar"), root / "ann", progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline saved once in the standard diffusers layout
    (what a user's local SD folder looks like, at a size that loads in a second)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from geomerase.core.tokenizer import base_clip_tokenizer

    path = tmp_path_factory.mktemp("sd") / "sd"
    torch.manual_seed(0)
    tok = base_clip_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline folder (:func:`geomerase.core.sdxl.write_tiny_sdxl`), saved once per session."""
    from geomerase.core.sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models (faster than two fighting over a busy
    2-core machine); restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
