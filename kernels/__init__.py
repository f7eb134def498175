"""Fused kernels (Triton) and their pure-torch references.

``attention_ref`` and ``loc_embedding_ref`` import eagerly and work everywhere. The Triton
kernels (``flash_attention``, ``loc_embedding``) are resolved on first attribute access, so
``import geomerase.kernels`` never imports triton: on a CPU machine triton only runs with
``TRITON_INTERPRET=1`` set before its first import, which the caller must be free to decide.
"""
from __future__ import annotations

import importlib
from typing import Any

from .attention_ref import attention_ref
from .loc_embedding_ref import loc_embedding_ref

_LAZY = {
    "flash_attention": ".attention",
    "flash_attention_with_lse": ".attention",
    "FlashAttentionFunction": ".attention",
    "KernelOverrides": ".attention",
    "kernel_overrides": ".attention",
    "register_flash_attention_op": ".attention_op",
    "loc_embedding": ".loc_embedding",
    "LocEmbeddingFunction": ".loc_embedding",
}

__all__ = ["attention_ref", "loc_embedding_ref", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
