"""SDXL's two text encoders in the original single-file layout (Stability's ``sd_xl_base_1.0.safetensors``).

Text encoder 1 (``CLIPTextModel``) sits under :data:`CLIP_L_PREFIX` with transformers' own names.
Text encoder 2 (``CLIPTextModelWithProjection``) sits under :data:`OPEN_CLIP_PREFIX` in OpenCLIP's
names: ``token_embedding.weight``, ``positional_embedding``, ``ln_final``, ``text_projection`` and
``transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_1, ln_2, mlp.c_fc,
mlp.c_proj}``. Values are kept bit for bit: ``in_proj_*`` is q, k and v concatenated along the first
axis (split back into three equal parts on reading) and ``text_projection`` is the transpose of
transformers' ``text_projection.weight``. The published file's ``logit_scale`` (not part of the text
encoder) is not written and is dropped on reading.

diffusers 0.42's ``from_single_file`` tells the two encoders apart by width (the CLIP-L position
table's last dimension against the model being loaded), so it loads a file whose two encoders are
equally wide into the wrong encoder; SDXL's are 768 and 1280 wide.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_SKIPPED = ("logit_scale",)
"""OpenCLIP parameters of the original files with no counterpart in the text encoder; dropped on reading."""

_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_PROJECTION = "text_projection.weight"
_DIFFUSERS_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OPEN_CLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def open_clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` state dict (keys with or without ``text_model.``) -> OpenCLIP
    names (without :data:`OPEN_CLIP_PREFIX`); ``in_proj_*`` are new tensors, the rest the same ones
    (``text_projection`` a transposed view). An unknown key or an incomplete q/k/v triple is an error."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == _PROJECTION:
            out["text_projection"] = tensor.T
            continue
        name = key.removeprefix("text_model.")
        match = _DIFFUSERS_LAYER.fullmatch(name)
        if name in _TOP:
            out[_TOP[name]] = tensor
        elif match and match[2] in _QKV:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif match and match[2] in _LAYER:
            out[f"transformer.resblocks.{match[1]}.{_LAYER[match[2]]}.{match[3]}"] = tensor
        else:
            raise ValueError(f"text_encoder_2 key {key!r} has no counterpart in the OpenCLIP layout")
    for (layer, param), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"text_encoder_2 layer {layer}: {param} of q/k/v incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in _QKV])
    return out


def open_clip_from_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP names (without :data:`OPEN_CLIP_PREFIX`) -> ``CLIPTextModelWithProjection`` keys
    (``text_model.`` before the transformer's, ``text_projection.weight``); q/k/v are copies, the rest
    the same tensors (the projection a transposed view). :data:`OPEN_CLIP_SKIPPED` keys are dropped; any
    other unknown key is an error."""
    top, layer_names = {v: k for k, v in _TOP.items()}, {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match, proj = _OPEN_CLIP_LAYER.fullmatch(key), _OPEN_CLIP_IN_PROJ.fullmatch(key)
        if key in OPEN_CLIP_SKIPPED:
            continue
        if key == "text_projection":
            out[_PROJECTION] = tensor.T
        elif key in top:
            out["text_model." + top[key]] = tensor
        elif match and match[2] in layer_names:
            out[f"text_model.encoder.layers.{match[1]}.{layer_names[match[2]]}.{match[3]}"] = tensor
        elif proj:
            if tensor.shape[0] % 3:
                raise ValueError(f"text_encoder_2 key {key!r}: first dimension {tensor.shape[0]} is not 3 x width")
            for name, part in zip(_QKV, tensor.chunk(3)):
                out[f"text_model.encoder.layers.{proj[1]}.{name}.{proj[2]}"] = part.clone()
        else:
            raise ValueError(f"text_encoder_2 key {key!r} has no counterpart in the transformers layout")
    return out
