"""Exports of a fine-tuned model: a whole ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``)
folder, or the portable parts.

:func:`export_pipeline` writes a folder (``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/`` with the G^2 location tokens, ``vae/``, ``scheduler/``) that loads with
``StableDiffusionPipeline.from_pretrained(path)`` and nothing else; the negative prompt
``"qr code <l0> ... <l15>"`` then works as in the paper. ``geomerase.json`` is kept beside it
so :func:`geomerase.core.models.load_model` reads the folder too. A LoRA adapter is merged.

The portable parts add a fine-tune to the base checkpoint it started from, in plain diffusers:
:func:`export_lora` (the UNet adapter of a ``train.lora`` run, diffusers' LoRA format, for
``pipe.load_lora_weights``) and :func:`save_location_tokens` (the location-token rows as a
textual-inversion file ``{"<l0>": (D,), ...}``, for ``pipe.load_textual_inversion``; with model
removal it is the whole fine-tune). Everything is written atomically (temp file or folder in the
same parent, then rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from geomerase.core.geometry import all_loc_tokens
from geomerase.core.lora import has_lora, merge_unet_lora, save_unet_lora
from geomerase.core.diffusion_model import DiffusionModel
from geomerase.core.text_embedding import location_rows, uninstall_location_embedding
from geomerase.data.shards import atomic_dir, atomic_write

LOCATION_TOKENS_FILE = "location_tokens.safetensors"
"""Name of the textual-inversion file a training run leaves beside its ``model/``."""


def diffusers_pipeline(model: DiffusionModel) -> Any:
    """``model``'s components (shared, not copied) in a ``StableDiffusionPipeline`` with no safety checker,
    or for an :class:`~geomerase.core.sdxl.SDXLModel` a ``StableDiffusionXLPipeline`` with
    ``force_zeros_for_empty_prompt`` off; the scheduler is DDIM on the model's noise schedule. Needs a VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from geomerase.core.sdxl import SDXLModel

    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    if isinstance(model, SDXLModel):
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                         text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                         tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def export_pipeline(model: DiffusionModel, path: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers pipeline folder; needs a latent model (a VAE).

    A :class:`~geomerase.core.sdxl.SDXLModel` becomes a ``StableDiffusionXLPipeline`` folder (with
    ``text_encoder_2/`` and ``tokenizer_2/``, both carrying the location tokens) whose
    ``force_zeros_for_empty_prompt`` is off: an empty negative prompt is encoded, as geomerase's
    sampler and training (caption dropout) encode it. Afterwards ``model`` has the stock text
    embedding modules and its LoRA adapter (if any) merged."""
    if model.vae is None:
        raise ValueError(f"export_pipeline: model {model.size!r} works in pixel space (no VAE); "
                         "only latent models map onto StableDiffusionPipeline")
    for _, _, text_encoder in model.text_encoders:
        uninstall_location_embedding(text_encoder)  # stock CLIP module, location rows merged
    merge_unet_lora(model.unet)
    path = Path(path)
    pipe = diffusers_pipeline(model)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        model.write_meta(tmp)
    return path


def location_token_tensors(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """Each location token's current row, on the CPU, in the text encoder's dtype:
    ``{"<l0>": (D,), ..., "<l{G^2-1}>": (D,)}``; for SDXL ``{"clip_l": (G^2, D1), "clip_g": (G^2, D2)}``
    (rows in token order, one tensor per encoder, the layout of SDXL textual-inversion files)."""
    from geomerase.core.sdxl import SDXLModel

    if isinstance(model, SDXLModel):
        return {"clip_l": location_rows(model.text_encoder, model.loc_token_ids).cpu().clone(),
                "clip_g": location_rows(model.text_encoder_2, model.loc_token_ids_2).cpu().clone()}
    rows = location_rows(model.text_encoder, model.loc_token_ids).cpu()
    return {tok: rows[i].clone() for i, tok in enumerate(all_loc_tokens(model.grid))}


def save_location_tokens(model: DiffusionModel, path: str | os.PathLike) -> Path:
    """Write the location-token rows as a textual-inversion safetensors file
    (:func:`location_token_tensors`; the grid and token order in the file's metadata).

    Plain diffusers loads it with ``emb = safetensors.torch.load_file(path)`` and
    ``pipe.load_textual_inversion(list(emb.values()), token=list(emb))``: diffusers 0.42 reads one
    token per file, or one tensor per token from a list. SDXL: once per encoder,
    ``pipe.load_textual_inversion(emb["clip_l"], token=tokens, text_encoder=pipe.text_encoder,
    tokenizer=pipe.tokenizer)`` and likewise ``clip_g`` with the ``_2`` parts, ``tokens`` from the
    metadata."""
    tensors = location_token_tensors(model)
    meta = {"format": "pt", "kind": "geomerase-location-tokens", "grid": str(model.grid),
            "tokens": json.dumps(all_loc_tokens(model.grid))}
    return atomic_write(path, save(tensors, metadata=meta))


def export_lora(model: DiffusionModel, folder: str | os.PathLike) -> Path:
    """Write the UNet's LoRA adapter to ``folder`` in diffusers' LoRA format (for
    ``pipe.load_lora_weights(folder)``); returns the weights file. An error without an adapter."""
    if not has_lora(model.unet):
        raise ValueError("export_lora: the model has no LoRA adapter (train with train.lora.rank > 0)")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        name = save_unet_lora(model.unet, tmp).name
    return folder / name


def load_location_tokens(model: DiffusionModel, path: str | os.PathLike) -> None:
    """Write the rows of a file from :func:`save_location_tokens` into ``model``'s text encoder(s)
    (in place), as ``load_textual_inversion`` does in plain diffusers. The file's grid must be the
    model's (``load_model(base, grid=G)`` adds the G^2 tokens to a base that has none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from geomerase.core.sdxl import SDXLModel

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != "geomerase-location-tokens":
        raise ValueError(f"{path}: not a location-token file (no 'geomerase-location-tokens' metadata)")
    if int(meta["grid"]) != model.grid:
        raise ValueError(f"{path}: location tokens of grid {meta['grid']}, but the model's grid is {model.grid}")
    tensors = load_file(str(path))
    if isinstance(model, SDXLModel):
        pairs = [(model.text_encoder, model.loc_token_ids, tensors["clip_l"]),
                 (model.text_encoder_2, model.loc_token_ids_2, tensors["clip_g"])]
    else:
        rows = torch.stack([tensors[t] for t in json.loads(meta["tokens"])])
        pairs = [(model.text_encoder, model.loc_token_ids, rows)]
    with torch.no_grad():
        for encoder, ids, rows in pairs:
            table = encoder.get_input_embeddings().weight
            table[list(ids)] = rows.to(table.device, table.dtype)
