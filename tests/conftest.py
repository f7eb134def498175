"""Shared pytest configuration.

* Registers the ``gpu`` marker; tests carrying it are skipped where CUDA is absent.
* On machines without CUDA, defaults ``TRITON_INTERPRET=1`` before any test module can
  import triton (triton reads it at import/decoration time), so the Triton kernels run in
  the CPU interpreter. With CUDA present the kernels are compiled and run on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
