"""One ``.safetensors`` file in the original Stable Diffusion (CompVis/LDM) key layout.

Tools that take a single checkpoint file (A1111-style web UIs, ``from_single_file`` loaders)
expect the UNet under ``model.diffusion_model.`` and the VAE under ``first_stage_model.``. This
module maps a diffusers latent model (``UNet2DConditionModel``, ``AutoencoderKL``) to that layout
and back. The mapping is built from the UNet and VAE configs (block types, layers per block,
``addition_embed_type``), so any SD- or SDXL-shaped size maps, not only the published ones. Tensors
keep their values bit for bit. The VAE mid-block attention's q/k/v/out weights are stored as 1x1
convolutions ``(C, C, 1, 1)`` (diffusers: linears ``(C, C)``); SDXL's second text encoder has its q/k/v
concatenated and its projection transposed (:mod:`geomerase.core.single_file_sdxl`).

Text encoders: an SD-1.x-shaped model's ``CLIPTextModel`` goes under
``cond_stage_model.transformer.text_model.`` (SD-2's OpenCLIP ``cond_stage_model.model.`` layout is not
produced). An SDXL model (UNet ``addition_embed_type="text_time"``, whose ``add_embedding`` becomes
``label_emb.0``) has its ``CLIPTextModel`` under ``conditioner.embedders.0.transformer.text_model.`` and
its ``CLIPTextModelWithProjection`` in OpenCLIP names under ``conditioner.embedders.1.model.``, as in
``sd_xl_base_1.0.safetensors``. Token tables are written whole, so they carry the G^2 location-token
rows; the tokenizers that know their names are not part of the format (:func:`write_pipeline_config`
writes them with the configs a loader needs).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from geomerase.core.diffusion_model import DiffusionModel
from geomerase.core.sdxl import SDXLModel
from geomerase.core.single_file_sdxl import (CLIP_L_PREFIX, OPEN_CLIP_PREFIX, open_clip_from_original,
                                             open_clip_to_original)
from geomerase.data.shards import atomic_dir, atomic_write

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_BUFFERS = ("embeddings.position_ids",)
"""Text-encoder buffers some original files carry; not parameters, dropped on reading."""

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_DOWN, _UNET_UP = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}


@dataclass(frozen=True)
class Rule:
    """One module's name in both layouts; ``leaves`` renames its direct children (diffusers -> original)."""

    diffusers: str
    original: str
    leaves: Mapping[str, str] = field(default_factory=dict)
    linear_as_conv: bool = False
    """2-D (linear) weights are stored as ``(C_out, C_in, 1, 1)`` in the original layout; reading
    squeezes 4-D ones and keeps 2-D ones (some converted files already store them as linears)."""


def _per_block(value: int | list[int] | tuple[int, ...], n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def is_sdxl(unet_config: Mapping[str, Any]) -> bool:
    """Whether a UNet config is SDXL's (``addition_embed_type="text_time"``): the file then holds SDXL's layout."""
    return unet_config.get("addition_embed_type") == "text_time"


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Module renames of an SD- or SDXL-shaped ``UNet2DConditionModel`` config (``input_blocks``/``output_blocks``
    numbering; SDXL's ``add_embedding`` is ``label_emb.0``). Each attention keeps its inner names, so any
    transformer depth maps."""
    down, up = config["down_block_types"], config["up_block_types"]
    layers = _per_block(config["layers_per_block"], len(down))
    rules = [Rule("time_embedding.linear_1", "time_embed.0"), Rule("time_embedding.linear_2", "time_embed.2"),
             Rule("conv_in", "input_blocks.0.0"), Rule("conv_norm_out", "out.0"), Rule("conv_out", "out.2"),
             Rule("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
             Rule("mid_block.attentions.0", "middle_block.1"),
             Rule("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    if is_sdxl(config):
        rules += [Rule("add_embedding.linear_1", "label_emb.0.0"), Rule("add_embedding.linear_2", "label_emb.0.2")]
    idx = 1
    for b, kind in enumerate(down):
        for j in range(layers[b]):
            rules.append(Rule(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{idx}.0", _UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rules.append(Rule(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{idx}.1"))
            idx += 1
        if b < len(down) - 1:
            rules.append(Rule(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{idx}.0.op"))
            idx += 1
    idx = 0
    for b, (kind, n) in enumerate(zip(up, reversed(layers))):
        attn = kind.startswith("CrossAttn")
        for j in range(n + 1):
            rules.append(Rule(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{idx}.0", _UNET_RESNET))
            if attn:
                rules.append(Rule(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{idx}.1"))
            if j == n and b < len(up) - 1:
                rules.append(Rule(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv"))
            idx += 1
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Module renames of an ``AutoencoderKL`` config; the original decoder numbers its levels deepest-last."""
    n, layers = len(config["down_block_types"]), config["layers_per_block"]
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in", f"{part}.conv_in"), Rule(f"{part}.conv_out", f"{part}.conv_out"),
                  Rule(f"{part}.conv_norm_out", f"{part}.norm_out"),
                  Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                  Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                  Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, linear_as_conv=True)]
    for b in range(n):
        rules += [Rule(f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}", _VAE_RESNET)
                  for j in range(layers)]
        rules += [Rule(f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{n - 1 - b}.block.{j}", _VAE_RESNET)
                  for j in range(layers + 1)]
        if b < n - 1:
            rules += [Rule(f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"),
                      Rule(f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{n - 1 - b}.upsample.conv")]
    return rules


def _rename(state: Mapping[str, torch.Tensor], rules: list[Rule], to_original: bool,
            what: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``state`` by the rule of its longest matching module path (an error if none)."""
    table = {(r.diffusers if to_original else r.original): r for r in rules}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        cut = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in table), None)
        if cut is None:
            raise ValueError(f"{what} key {key!r} has no counterpart in the other layout")
        rule = table[".".join(parts[:cut])]
        leaves = rule.leaves if to_original else {v: k for k, v in rule.leaves.items()}
        module, _, param = ".".join(parts[cut:]).rpartition(".")
        if leaves:
            if module not in leaves:
                raise ValueError(f"{what} key {key!r}: unknown sub-module {module!r}")
            module = leaves[module]
        name = ".".join(p for p in ((rule.original if to_original else rule.diffusers), module, param) if p)
        if rule.linear_as_conv and tensor.ndim == (2 if to_original else 4):
            tensor = tensor[:, :, None, None] if to_original else tensor[:, :, 0, 0]
        out[name] = tensor
    return out


def to_original(unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor],
                text_encoder: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                vae_config: Mapping[str, Any],
                text_encoder_2: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Diffusers state dicts -> one flat dict in the original layout (same tensors, VAE attention
    weights viewed as 1x1 convs). Text-encoder keys may carry transformers' ``text_model.`` prefix or not.
    ``text_encoder_2`` (SDXL's ``CLIPTextModelWithProjection``, written in OpenCLIP names) is required for an
    SDXL UNet config (:func:`is_sdxl`) and refused otherwise."""
    if is_sdxl(unet_config) != (text_encoder_2 is not None):
        raise ValueError("an SDXL UNet config (addition_embed_type='text_time') goes with text_encoder_2, "
                         "and only it")
    out = {UNET_PREFIX + k: v for k, v in _rename(unet, unet_rules(unet_config), True, "unet").items()}
    out.update({VAE_PREFIX + k: v for k, v in _rename(vae, vae_rules(vae_config), True, "vae").items()})
    text_prefix = CLIP_L_PREFIX if text_encoder_2 is not None else TEXT_PREFIX
    out.update({text_prefix + k.removeprefix("text_model."): v for k, v in text_encoder.items()})
    if text_encoder_2 is not None:
        out.update({OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_original(text_encoder_2).items()})
    return out


def from_original(tensors: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                  vae_config: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Original-layout tensors -> ``{"unet", "vae", "text_encoder"}`` diffusers state dicts, plus
    ``"text_encoder_2"`` for an SDXL UNet config (:func:`is_sdxl`).

    Text-encoder keys come without ``text_model.`` (transformers 5's flat ``CLIPTextModel``);
    ``text_encoder_2``'s are those of ``CLIPTextModelWithProjection``. Keys outside the model's prefixes
    (EMA copies, noise-schedule buffers of training checkpoints) are not weights of these models and are
    skipped; an unknown UNet, VAE or OpenCLIP key is an error (CLIP text-encoder keys are named alike in
    both layouts and pass through)."""
    sdxl = is_sdxl(unet_config)
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX if sdxl else TEXT_PREFIX}
    if sdxl:
        prefixes["text_encoder_2"] = OPEN_CLIP_PREFIX
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    for key, tensor in tensors.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
    for buffer in TEXT_BUFFERS:
        parts["text_encoder"].pop(buffer, None)
    out = {"unet": _rename(parts["unet"], unet_rules(unet_config), False, "unet"),
           "vae": _rename(parts["vae"], vae_rules(vae_config), False, "vae"),
           "text_encoder": parts["text_encoder"]}
    if sdxl:
        out["text_encoder_2"] = open_clip_from_original(parts["text_encoder_2"])
    return out


def check_supported(model: DiffusionModel) -> None:
    """Raise a one-line ``ValueError`` unless ``model`` is a latent model with Stable Diffusion 1.x's block layout
    or an :class:`~geomerase.core.sdxl.SDXLModel` with SDXL's."""
    where = f"single-file export: model {model.size!r}"
    if model.vae is None:
        raise ValueError(f"{where} works in pixel space (no VAE); "
                         "the format needs a latent model with an AutoencoderKL")
    if model.coord_channels:
        raise ValueError(f"{where} has {model.coord_channels} coordinate input channels, "
                         "which the format has no room for")
    cfg, vcfg = model.unet.config, model.vae.config
    addition = cfg.addition_embed_type if not isinstance(model, SDXLModel) else None  # SDXLModel: "text_time"
    if addition or cfg.class_embed_type or cfg.time_cond_proj_dim or cfg.encoder_hid_dim:
        raise ValueError(f"{where}: extra UNet embeddings (addition/class/time-cond/encoder-hid) have no "
                         "original-layout names (an SDXL UNet's text_time addition does, in an SDXL model)")
    if (not set(cfg.down_block_types) <= _UNET_DOWN or not set(cfg.up_block_types) <= _UNET_UP
            or cfg.mid_block_type != "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"{where}: UNet blocks {cfg.down_block_types}/{cfg.mid_block_type}/{cfg.up_block_types} "
                         "have no original-layout names")
    if set(vcfg.down_block_types) != {"DownEncoderBlock2D"} or set(vcfg.up_block_types) != {"UpDecoderBlock2D"}:
        raise ValueError(f"{where}: VAE blocks {vcfg.down_block_types}/{vcfg.up_block_types} are not SD's")
    if cfg.in_channels != vcfg.latent_channels:
        raise ValueError(f"{where}: UNet in_channels {cfg.in_channels} != VAE latent_channels {vcfg.latent_channels}")


def model_to_original(model: DiffusionModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model``'s UNet, VAE and text encoders (location rows included) in the original layout,
    contiguous CPU tensors, floating ones cast to ``dtype`` when given (else as stored)."""
    check_supported(model)
    text_encoder_2 = model.text_encoder_2.state_dict() if isinstance(model, SDXLModel) else None
    flat = to_original(model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(),
                       model.unet.config, model.vae.config, text_encoder_2)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in flat.items()}


def export_single_file(model: DiffusionModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as one original-layout ``.safetensors`` file at ``path`` (atomically).

    The header metadata ``geomerase`` holds ``geomerase.json``'s fields (grid, resolution, ...).
    The whole file is serialised in memory before it is written (about the model's size again)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file export writes safetensors: {str(path)!r} must end in .safetensors")
    tensors = model_to_original(model, dtype)
    meta = {"grid": model.grid, "resolution": model.resolution, "space": model.space, "size": model.size,
            "location_token_ids": model.loc_token_ids}
    return atomic_write(path, save(tensors, metadata={"format": "pt", "geomerase": json.dumps(meta)}))


def read_single_file(path: str | os.PathLike, unet_config: Mapping[str, Any],
                     vae_config: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Load an original-layout file as diffusers state dicts (see :func:`from_original`)."""
    return from_original(load_file(str(path)), unet_config, vae_config)


def write_pipeline_config(model: DiffusionModel, path: str | os.PathLike) -> Path:
    """A weightless diffusers folder for ``StableDiffusionPipeline.from_single_file(file, config=path)``
    (``StableDiffusionXLPipeline`` for an SDXL model): ``model_index.json``, each component's config, the
    tokenizers with the location tokens and a DDIM scheduler (atomically, as a folder). The pipeline is
    :func:`geomerase.core.export.diffusers_pipeline`'s (SDXL: ``force_zeros_for_empty_prompt`` off)."""
    from geomerase.core.export import diffusers_pipeline

    check_supported(model)
    pipe = diffusers_pipeline(model)
    path = Path(path)
    with atomic_dir(path) as tmp:
        pipe.save_config(str(tmp))
        model.unet.save_config(str(tmp / "unet"))
        model.vae.save_config(str(tmp / "vae"))
        for suffix, tokenizer, text_encoder in model.text_encoders:
            text_encoder.config.save_pretrained(str(tmp / f"text_encoder{suffix}"))
            tokenizer.save_pretrained(str(tmp / f"tokenizer{suffix}"))
        pipe.scheduler.save_config(str(tmp / "scheduler"))
    return path


def single_file_folder(path: str | os.PathLike, config_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The diffusers folder a single file stands for, assembled at ``out`` (atomically): the configs and
    tokenizers of ``config_dir`` (:func:`write_pipeline_config`), the file's UNet, VAE and text-encoder
    weights (:func:`from_original`, dtypes as stored; SDXL's second encoder too) and ``geomerase.json``
    from the file's metadata, so :func:`geomerase.core.models.load_model` reads it like any checkpoint."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    path, config_dir = Path(path), Path(config_dir)
    subs = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if (config_dir / "unet").is_dir() and is_sdxl(json.loads((config_dir / "unet" / "config.json").read_text())):
        subs += ["text_encoder_2", "tokenizer_2"]
    for sub in subs:
        if not (config_dir / sub).is_dir():
            raise FileNotFoundError(f"{config_dir}: missing '{sub}/' (write it with geomerase export --format "
                                    "single-file --config-dir DIR)")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("geomerase", "{}"))
    if not meta.get("grid"):
        raise ValueError(f"{path}: no geomerase metadata with the grid (not written by geomerase export --format "
                         "single-file)")
    configs = {p: json.loads((config_dir / p / "config.json").read_text()) for p in ("unet", "vae")}
    parts = read_single_file(path, configs["unet"], configs["vae"])
    files = {part: "model.safetensors" if part.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
             for part in parts}
    with atomic_dir(Path(out)) as tmp:
        shutil.copytree(config_dir, tmp, dirs_exist_ok=True)
        for part, name in files.items():
            save_file({k: v.contiguous() for k, v in parts[part].items()}, str(tmp / part / name),
                      metadata={"format": "pt"})
        (tmp / "geomerase.json").write_text(json.dumps({k: meta[k] for k in ("grid", "resolution", "space", "size")
                                                        if k in meta}, indent=2))
    return Path(out)
