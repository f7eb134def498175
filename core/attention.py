"""Attention dispatch: one call site, several interchangeable backends.

``attention(q, k, v, scale=None, backend="sdpa")`` on SDPA-layout ``(B, H, S, D)`` tensors:

* ``sdpa``     - ``torch.nn.functional.scaled_dot_product_attention`` (torch picks flash /
  efficient / cuDNN / math itself); always available.
* ``triton``   - the Triton flash-attention kernel of ``geomerase.kernels.attention``; needs
  triton and either a CUDA device or, for CPU tensors, ``TRITON_INTERPRET=1`` set before
  triton is first imported (slow: tests only).
* ``xformers`` - ``xformers.ops.memory_efficient_attention``; needs xformers and CUDA.
* ``math``     - the pure-torch reference (full score matrix); always available.

Model code never imports a kernel: the Triton and xformers modules are imported here, on
first use. ``DispatchAttnProcessor`` plugs the dispatch into diffusers' ``Attention``
modules (same maths as diffusers' ``AttnProcessor2_0``) and ``set_attention_backend``
installs it on a whole UNet. Processors hold no parameters, so the state dict is untouched.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import torch
import torch.nn.functional as F

from ..kernels.attention_ref import attention_ref, check_attention_inputs

BACKENDS: tuple[str, ...] = ("sdpa", "triton", "xformers", "math")
_KERNEL_MODULE = __package__.rsplit(".", 1)[0] + ".kernels.attention"
_PLAN_MODULE = _KERNEL_MODULE + "_plan"
"""The kernels' launch planning, which owns their interpreter flag (``_INTERPRET``)."""


class AttentionBackendUnavailable(RuntimeError):
    """Raised when a named backend cannot run here; the message says which and why."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _triton_interpreting() -> bool:
    # triton.jit decides interpret-vs-compile when the kernel module is imported, so once
    # it is loaded its own flag is the truth, whatever the environment says now.
    mod = sys.modules.get(_PLAN_MODULE)
    if mod is not None:
        return bool(getattr(mod, "_INTERPRET", False))
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(backend: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(available, reason)`` for ``backend`` on ``device`` (default: cuda if present, else cpu)."""
    if backend not in BACKENDS:
        return False, f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if backend in ("sdpa", "math"):
        return True, "ok"
    if backend == "xformers":
        if not _has_module("xformers"):
            return False, "attention backend 'xformers' is unavailable: xformers is not installed"
        if dev.type != "cuda" or not torch.cuda.is_available():
            return False, "attention backend 'xformers' is unavailable: xformers has no CPU operators, CUDA is needed"
        return True, "ok"
    # triton
    if not _has_module("triton"):
        return False, "attention backend 'triton' is unavailable: triton is not installed"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "attention backend 'triton' is unavailable: no CUDA device"
        if _triton_interpreting():
            return True, "ok (TRITON_INTERPRET=1: running in the slow interpreter)"
        return True, "ok"
    if dev.type == "cpu":
        if _triton_interpreting():
            return True, "ok (TRITON_INTERPRET=1 interpreter)"
        return False, ("attention backend 'triton' is unavailable on CPU: triton only runs on CPU tensors "
                       "with TRITON_INTERPRET=1 set before triton is first imported")
    return False, f"attention backend 'triton' is unavailable on device type {dev.type!r}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends from ``BACKENDS`` that can run on ``device`` here, in preference order."""
    return [b for b in BACKENDS if backend_status(b, device)[0]]


def _require(backend: str, device: torch.device) -> None:
    ok, reason = backend_status(backend, device)
    if not ok:
        raise AttentionBackendUnavailable(reason)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale [+ mask])``: ``(B, H, Sq, Sk)`` float32 for ``q`` ``(B, H, Sq, D)``, ``k``
    ``(B, H, Sk, D)``; ``attn_mask`` boolean (True = keep) or additive, as :func:`attention` takes it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    return torch.softmax(scores, dim=-1)


def _math_attention(q, k, v, scale, attn_mask):
    if attn_mask is None:
        return attention_ref(q, k, v, scale)
    return torch.matmul(attention_probs(q, k, scale, attn_mask).to(v.dtype), v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "sdpa",
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal attention through the named backend.

    Args:
        q: ``(B, H, Sq, D)``; k, v: ``(B, H, Sk, D)``; one floating dtype and device.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: one of ``BACKENDS``.
        attn_mask: optional boolean (True = keep) or additive mask broadcastable to
            ``(B, H, Sq, Sk)``; only ``sdpa`` and ``math`` accept one.

    Returns:
        ``(B, H, Sq, D)`` in ``q.dtype``; differentiable in ``q, k, v`` on every backend.

    Raises:
        AttentionBackendUnavailable: the backend cannot run here (message says why).
        NotImplementedError: a mask was given to a backend without mask support.
    """
    check_attention_inputs(q, k, v)
    _require(backend, q.device)
    if attn_mask is not None and backend in ("triton", "xformers"):
        raise NotImplementedError(f"attention backend {backend!r} does not support attn_mask")
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if backend == "math":
        return _math_attention(q, k, v, scale, attn_mask)
    if backend == "triton":
        kernel = importlib.import_module(_KERNEL_MODULE)
        return kernel.flash_attention(q, k, v, scale)
    xops = importlib.import_module("xformers.ops")
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


class DispatchAttnProcessor:
    """diffusers attention processor that computes attention through :func:`attention`.

    Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0`` (spatial norm,
    group norm, 4-D inputs, cross-attention with ``norm_cross``, q/k norms, output
    projection, residual connection, rescale) with the ``scaled_dot_product_attention``
    call replaced. Uses ``attn.scale`` as the softmax scale. An ``attention_mask`` is
    forwarded to ``sdpa``/``math`` and rejected by ``triton``/``xformers``.

    With a ``record`` list, an attention that reads ``encoder_hidden_states`` (text) is computed
    explicitly instead and appends its ``(B, H, Q, S)`` probabilities to the list (the alignment loss of
    ``core.attention_align``); the others still go through ``backend``.
    """

    def __init__(self, backend: str = "sdpa", record: list[torch.Tensor] | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.record = record

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, recording={self.record is not None})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        reads_text = encoder_hidden_states is not None
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            if self.backend in ("triton", "xformers"):
                raise NotImplementedError(f"attention backend {self.backend!r} does not support attention_mask")
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, S, H*D) -> (B, H, S, D) views: no copies, every backend takes strides
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        if self.record is not None and reads_text:
            hidden_states = self._recorded(query, key, value, attn.scale, attention_mask)
        else:
            hidden_states = attention(query, key, value, scale=attn.scale, backend=self.backend,
                                      attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _recorded(self, q, k, v, scale, attn_mask):
        """Attention in the math form, with its probabilities appended to ``self.record``."""
        probs = attention_probs(q, k, scale, attn_mask)
        self.record.append(probs)
        return torch.matmul(probs.to(v.dtype), v)


def set_attention_backend(unet: torch.nn.Module, backend: str) -> None:
    """Install a :class:`DispatchAttnProcessor` for ``backend`` on every attention module of ``unet``.

    Checks availability against the device of ``unet``'s parameters first, so a bad choice
    fails here rather than in the first forward. The state dict is unchanged.

    Raises:
        AttentionBackendUnavailable: the backend cannot run on the model's device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    param = next(unet.parameters(), None)
    _require(backend, param.device if param is not None else torch.device("cpu"))
    processor = DispatchAttnProcessor(backend)
    if hasattr(unet, "set_attn_processor"):
        unet.set_attn_processor(processor)
        return
    # plain nn.Module holding diffusers Attention blocks (no ModelMixin helpers)
    for module in unet.modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(processor)
