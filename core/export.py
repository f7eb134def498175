"""Export a fine-tuned latent model as a standard diffusers ``StableDiffusionPipeline`` folder.

The folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/`` with the G^2
location tokens, ``vae/``, ``scheduler/``) loads with
``StableDiffusionPipeline.from_pretrained(path)`` and nothing else; the negative prompt
``"qr code <l0> ... <l15>"`` then works as in the paper. ``geomerase.json`` is kept beside it
so :func:`geomerase.core.models.load_model` reads the folder too. Written atomically (temp
folder in the same parent, then rename).
"""
from __future__ import annotations

import os
from pathlib import Path

from geomerase.core.models import DiffusionModel
from geomerase.data.shards import atomic_dir


def export_pipeline(model: DiffusionModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers Stable Diffusion pipeline folder; needs a latent model (a VAE)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model.vae is None:
        raise ValueError(f"export_pipeline: model {model.size!r} works in pixel space (no VAE); "
                         "only latent models map onto StableDiffusionPipeline")
    from geomerase.core.text_embedding import uninstall_location_embedding

    uninstall_location_embedding(model.text_encoder)  # stock CLIP module, location rows merged
    path = Path(path)
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        model.write_meta(tmp)
    return path
