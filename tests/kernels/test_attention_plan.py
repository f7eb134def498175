"""Host-side launch planning of the Triton flash attention (``kernels/attention_plan.py``).

Pure host logic: no kernel runs here (the plans' effect on launches and gradients is tested
through the kernels in ``test_attention.py``).
"""
from __future__ import annotations

import os
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

plan = pytest.importorskip("geomerase.kernels.attention_plan")


def test_overrides_are_per_thread_and_nested_blocks_replace():
    seen = []
    with plan.kernel_overrides(dkdv_split=2, config_index=1):
        with plan.kernel_overrides(bwd_scheme="fused") as inner:  # not merged with the enclosing block
            assert inner == plan.KernelOverrides(bwd_scheme="fused")
        assert plan._OVERRIDES.get() == plan.KernelOverrides(dkdv_split=2, config_index=1)
        worker = threading.Thread(target=lambda: seen.append(plan._OVERRIDES.get()))
        worker.start()
        worker.join()
    assert seen == [plan.KernelOverrides()]
    assert plan._OVERRIDES.get() == plan.KernelOverrides()
    with pytest.raises(ValueError, match="unknown backward scheme"):
        plan.KernelOverrides(bwd_scheme="three_kernel")
    with pytest.raises(ValueError, match="dkdv_split must be >= 1"):
        plan.KernelOverrides(dkdv_split=0)


@pytest.mark.parametrize("d,da,db,has_b,hd_class", [
    (8, 16, 16, False, "s"),      # padded to tl.dot's minimum of 16 columns
    (40, 32, 16, True, "s"),      # 32 + 16 (a remainder of 8 still takes 16)
    (64, 64, 16, False, "s"),
    (80, 64, 16, True, "m"),
    (160, 128, 32, True, "l"),
    (256, 256, 16, False, "l"),
])
def test_head_dims_split_into_power_of_two_chunks(d, da, db, has_b, hd_class):
    cls, meta = plan._head_meta(d, torch.float16)
    assert (meta["DA"], meta["DB"], meta["HAS_B"], cls) == (da, db, has_b, hd_class)
    assert meta["MASK_A"] == (da > d) and meta["MASK_B"] == (has_b and da + db > d)
    assert meta["DA"] + (meta["DB"] if meta["HAS_B"] else 0) >= d  # every column is covered
    assert plan._head_meta(d, torch.float32)[1]["PREC"] == "ieee"


def test_alignment_hint_is_the_largest_power_of_two_dividing_the_strides():
    assert plan._align(torch.empty(2, 8, 77, 40)) == 8          # row stride 40
    assert plan._align(torch.empty(2, 8, 77, 64)) == 16         # capped at 16
    assert plan._align(torch.empty(1, 1, 3, 5)) == 1
    assert plan._align(torch.empty(2, 8, 77, 64), torch.empty(2, 8, 77, 40)) == 8  # common to all


def test_fused_backward_needs_every_key_in_one_tile():
    assert plan._fused_block_n(77, 40) == 128
    assert plan._fused_block_n(5, 64) == 16
    assert plan._fused_block_n(129, 40) is None   # 256-key tile
    assert plan._fused_block_n(77, 160) is None   # 160 columns spill


def test_query_splits_off_the_gpu_are_one_unless_forced():
    cpu = torch.device("cpu")
    assert plan._dkdv_splits(16, 4096, 77, cpu, None) == 1
    assert plan._fused_splits(16, 4096, cpu, None) == 1
    assert plan._dkdv_splits(16, 4096, 77, cpu, 3) == 3
    assert plan._fused_splits(16, 4096, cpu, 2) == 2
