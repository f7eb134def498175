"""Launch planning of the Triton flash attention (:mod:`geomerase.kernels.attention`).

Everything the host decides before a kernel runs, cached per shape so the hot path is one
``JITFunction.run`` per kernel: the forced choices of :func:`kernel_overrides`, the tile-config
lists per kernel and head-dim class (and which autotuned or pinned launcher serves them), the
split of non-power-of-two head dims into two column chunks, stride alignment hints, the query
splits of the backward sweeps, and the forward / backward plans (:class:`_FwdPlan`,
:class:`_BwdPlan`) that freeze all of it after their first launch. The kernels themselves are in
:mod:`geomerase.kernels.attention_kernels`; the design notes in :mod:`geomerase.kernels.attention`.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import triton

from .attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_split_sum_kernel,
    _attn_fwd_kernel,
)
from .attention_ref import check_attention_inputs

LOG2E = 1.4426950408889634

# The interpreter (TRITON_INTERPRET=1) evaluates tl.dot with numpy, which has no bfloat16:
# bf16 operands must be widened to fp32 there. On a GPU this flag is always False.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The fused backward holds every key of a (b, h) on chip: K and V tiles plus two fp32
# (keys x D) accumulators. Up to 128 keys and 80 columns (hd 40/64/80 with SD's 77 keys)
# lower for sm_90a without spills (benchmarks/compile_check.py); hd 160 spilled even at 64.
_FUSED_MAX_KEYS, _FUSED_MAX_WIDTH = 128, 80


# --------------------------------------------------------------------------- overrides
@dataclass(frozen=True)
class KernelOverrides:
    """Choices forced on the launch plans built while they are active (see :func:`kernel_overrides`)."""

    dkdv_split: int | None = None
    """Query split of the backward's key-block sweep (both schemes; > 1 writes fp32 partials that a
    sum kernel adds); None: from the SM count on a GPU, 1 elsewhere."""
    config_index: int | None = None
    """Entry of every kernel's tile-config list to launch with, instead of autotuning or the
    interpreter's tile; None: those."""
    bwd_scheme: Literal["fused", "two_kernel"] | None = None
    """Backward scheme; None: the plan's choice (timed on a GPU with tuning on, else fused where
    every key fits one tile)."""

    def __post_init__(self) -> None:
        if self.bwd_scheme not in (None, "fused", "two_kernel"):
            raise ValueError(f"unknown backward scheme {self.bwd_scheme!r}")
        if self.dkdv_split is not None and self.dkdv_split < 1:
            raise ValueError(f"dkdv_split must be >= 1, got {self.dkdv_split}")


_OVERRIDES: ContextVar[KernelOverrides] = ContextVar("geomerase_kernel_overrides", default=KernelOverrides())


@contextmanager
def kernel_overrides(dkdv_split: int | None = None, config_index: int | None = None,
                     bwd_scheme: Literal["fused", "two_kernel"] | None = None) -> Iterator[KernelOverrides]:
    """Within the block, exactly these :class:`KernelOverrides` apply (an argument left None is not
    forced, whatever an enclosing block forced); the previous ones come back on exit.

    The overrides live in a context variable: other threads and other asyncio tasks keep their
    own. Plans are cached per overrides, and a forward's plan carries them to its backward.
    """
    token = _OVERRIDES.set(KernelOverrides(dkdv_split, config_index, bwd_scheme))
    try:
        yield _OVERRIDES.get()
    finally:
        _OVERRIDES.reset(token)


# --------------------------------------------------------------------------- launch configs
def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _fcfg(bm: int, warps: int, stages: int) -> triton.Config:
    # fused backward: BLOCK_N is every key (set by the plan), only the query tile is tuned
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# Per head-dim class (columns of MMA work DA+DB: <=64, <=128, >128). The first entry is
# the untuned default. Large heads get small tiles: a 128x160 fp32 accumulator plus the
# K/V tiles already fill the register file. Chosen from an offline sm_90a lowering
# (benchmarks/compile_check.py): every entry below compiles to wgmma with cp.async-pipelined
# loads and (near) no register spills; 32-row dot tiles fell back to mma.sync and spilled at
# hd 160. Kept short: every entry is a compile.
_CONFIGS = {
    "fwd": {
        "s": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 4), _cfg(128, 32, 4, 4)],
        "m": [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3)],
        "l": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3), _cfg(128, 32, 8, 2)],
    },
    # dK/dV: BLOCK_N keys are held, BLOCK_M queries are swept; two fp32 (BLOCK_N, D)
    # accumulators, so hd 160 stays at 64 held keys with 8 warps (4 warps spill)
    "dkdv": {
        "s": [_cfg(32, 128, 4, 3), _cfg(64, 64, 4, 3), _cfg(64, 128, 8, 3), _cfg(32, 64, 4, 4)],
        "m": [_cfg(32, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 3)],
        "l": [_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 3), _cfg(16, 64, 4, 3), _cfg(64, 64, 8, 2)],
    },
    # dQ: BLOCK_M queries are held, BLOCK_N keys are swept
    "dq": {
        "s": [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 4)],
        "m": [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 3)],
        "l": [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)],
    },
    # fused backward (all keys held, <= 80 columns: no "l" class): the (keys x queries) score
    # tiles and two (keys x D) fp32 accumulators share the register file, so 8 warps; the
    # 64 x 4-warp and 32 x 4-warp (hd 80) tiles spilled in the sm_90a lowering
    "fused": {
        "s": [_fcfg(64, 8, 3), _fcfg(64, 8, 2), _fcfg(32, 8, 3), _fcfg(32, 4, 3)],
        "m": [_fcfg(64, 8, 2), _fcfg(64, 8, 3), _fcfg(32, 8, 3), _fcfg(32, 8, 2)],
    },
}
# 64x64 halves interpreter time vs 32x32 while 77/130-long tests still span several tiles
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

# "fused" is the dK/dV kernel in its single-pass mode (FUSED=True), with its own tile lists
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel,
            "fused": _attn_bwd_dkdv_kernel}
_TUNE_KEY = {
    "fwd": ["SEQ_Q", "SEQ_K", "HEAD_DIM"],
    "dkdv": ["SEQ_Q", "SEQ_K", "HEAD_DIM", "N_SPLIT"],
    "dq": ["SEQ_Q", "SEQ_K", "HEAD_DIM"],
    "fused": ["SEQ_Q", "SEQ_K", "HEAD_DIM", "N_SPLIT"],
}
_HEURISTICS = {
    "EVEN_M": lambda a: a["SEQ_Q"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["SEQ_K"] % a["BLOCK_N"] == 0,
}
# Everything derived from _KERNELS/_CONFIGS: the (autotuned) launchers and the per-shape
# plans. One dict, so whoever swaps _KERNELS (benchmarks/check_seq1.py) resets all with .clear().
_launcher_cache: dict[tuple, Any] = {}
_SM_COUNT: dict[int, int] = {}
# Kernel launches issued by this module since import (tests and the profiler read it).
_LAUNCHES = [0]


def launch_count() -> int:
    """Number of Triton kernel launches made by this module so far."""
    return _LAUNCHES[0]


def _autotune_enabled() -> bool:
    # Tests switch tuning off (GEOMERASE_FLASH_AUTOTUNE=0): one compile per shape class.
    return not _INTERPRET and os.environ.get("GEOMERASE_FLASH_AUTOTUNE", "1") != "0"


def _launcher(kind: str, hd_class: str, pinned: int | None):
    """Return ``(kernel, fixed_meta)``: an autotuned kernel, or a plain one plus its config
    (entry ``pinned`` of its list when given)."""
    tune = _autotune_enabled() and pinned is None
    key = (kind, hd_class, tune, pinned)
    if key not in _launcher_cache:
        base = triton.heuristics(_HEURISTICS)(_KERNELS[kind])
        if tune:
            _launcher_cache[key] = (triton.autotune(_CONFIGS[kind][hd_class], key=_TUNE_KEY[kind])(base), {})
        elif _INTERPRET and pinned is None:
            fixed = {"BLOCK_M": _INTERPRET_CONFIG["BLOCK_M"]} if kind == "fused" else dict(_INTERPRET_CONFIG)
            _launcher_cache[key] = (base, fixed)
        else:
            c = _CONFIGS[kind][hd_class][pinned or 0]
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            _launcher_cache[key] = (base, meta)
    return _launcher_cache[key]


def _head_meta(head_dim: int, dtype: torch.dtype) -> tuple[str, dict]:
    """Split ``head_dim`` into power-of-two chunks DA (+ DB) that tl.arange can cover."""
    if head_dim <= 16:
        da, db, has_b = 16, 16, False
    else:
        da = 1 << (head_dim.bit_length() - 1)
        has_b = da != head_dim
        # tl.dot needs K >= 16, so a remainder of 8 (hd 40) still takes a 16-wide chunk
        db = max(16, triton.next_power_of_2(head_dim - da)) if has_b else 16
    width = da + (db if has_b else 0)
    hd_class = "s" if width <= 64 else ("m" if width <= 128 else "l")
    upcast = _INTERPRET and dtype == torch.bfloat16
    meta = dict(
        HEAD_DIM=head_dim, DA=da, DB=db, HAS_B=has_b,
        MASK_A=da > head_dim, MASK_B=has_b and da + db > head_dim,
        UPCAST=upcast,
        # fp32 inputs get exact fp32 products (SDPA's default), not tf32
        PREC="ieee" if (dtype == torch.float32 or upcast) else "tf32",
    )
    return hd_class, meta


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:  # a driver query: once per device, never per call
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _dkdv_splits(bh: int, seq_q: int, seq_k: int, device: torch.device, forced: int | None) -> int:
    if forced is not None:
        return forced
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    programs = triton.cdiv(seq_k, 64) * bh
    if programs >= sms:
        return 1
    # ~4 programs per SM to hide load latency, but keep >= 256 queries per program so the
    # fp32 partials stay small next to the Q/dO traffic
    return max(1, min(triton.cdiv(4 * sms, programs), seq_q // 256, 16))


def _fused_block_n(seq_k: int, head_dim: int) -> int | None:
    """Key tile of the fused backward (all keys in one), or None when they do not fit."""
    meta = _head_meta(head_dim, torch.float32)[1]
    width = meta["DA"] + (meta["DB"] if meta["HAS_B"] else 0)  # columns of MMA work
    block_n = max(16, triton.next_power_of_2(seq_k))
    return block_n if block_n <= _FUSED_MAX_KEYS and width <= _FUSED_MAX_WIDTH else None


def _fused_splits(bh: int, seq_q: int, device: torch.device, forced: int | None) -> int:
    if forced is not None:
        return forced
    if device.type != "cuda":
        return 1
    # The grid is (n_split, B*H): ~4 programs per SM, but >= 256 queries per program so the
    # fp32 dK/dV partials (2 x Sk x D each) stay small next to its Q/O/dO/dQ traffic.
    return max(1, min(triton.cdiv(4 * _sm_count(device), bh), seq_q // 256, 32))


# --------------------------------------------------------------------------- host side
def _align(*tensors: torch.Tensor) -> int:
    """Largest power of two (<= 16) dividing every stride of ``tensors`` (see ``_hint``)."""
    g = 0
    for t in tensors:
        for st in t.stride()[:-1]:
            g = math.gcd(g, st)
    a = 1
    while a < 16 and (g == 0 or g % (2 * a) == 0):
        a *= 2
    return a


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_attention_inputs(q, k, v)
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attention supports head dims up to 256, got {q.shape[-1]}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("flash_attention needs v to share q's head dim")
    if k.shape[2] == 0 or q.shape[2] == 0:
        raise ValueError("flash_attention needs at least one query and one key")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"flash_attention supports fp16/bf16/fp32, got {q.dtype}")


# --------------------------------------------------------------------------- launch plans
class _Launch:
    """One kernel with its tile config resolved: the plain JIT function, a fixed grid and
    frozen keyword arguments. Calling it is a single ``JITFunction.run``, no wrapper."""

    __slots__ = ("fn", "grid", "kwargs")

    def __init__(self, fn: Any, grid: tuple[int, int], kwargs: dict[str, Any]) -> None:
        self.fn, self.grid, self.kwargs = fn, grid, kwargs

    def __call__(self, *args: Any) -> None:
        _LAUNCHES[0] += 1
        self.fn.run(*args, grid=self.grid, warmup=False, **self.kwargs)


def _first_launch(kind: str, hd_class: str, grid_of: Callable[[dict], tuple[int, int]],
                  seq_q: int, seq_k: int, args: tuple, const: dict[str, Any], pinned: int | None) -> _Launch:
    """A plan's first call: launch through the autotuner (or the pinned/interpreter config)
    and freeze what it picked, so later calls skip the autotuner and heuristics."""
    kernel, fixed = _launcher(kind, hd_class, pinned)
    _LAUNCHES[0] += 1
    kernel[grid_of](*args, **const, **fixed)
    best = getattr(kernel, "best_config", None)
    if fixed:
        picked = dict(fixed)
    elif best is not None:  # the autotuner's pick for this key, with every option it launched with
        picked = best.all_kwargs()
    else:  # a Triton without ``best_config``: correct but slower, stay on the autotuner
        return _Launch(kernel, grid_of, dict(const))
    kwargs = dict(const, **picked)
    kwargs["EVEN_M"] = seq_q % kwargs["BLOCK_M"] == 0
    kwargs["EVEN_N"] = seq_k % kwargs["BLOCK_N"] == 0
    return _Launch(_KERNELS[kind], grid_of(kwargs), kwargs)


class _FwdPlan:
    """Per (shapes, strides, dtypes, devices): everything the forward launch needs but the
    tensors and the scale; plus the backward plans of this forward, keyed by dO's strides."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, overrides: KernelOverrides) -> None:
        _check_kernel_inputs(q, k, v)
        # SDPA-style strided views are read in place; only a non-unit last stride is copied
        self.copy_q, self.copy_k, self.copy_v = (t.stride(-1) != 1 for t in (q, k, v))
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        bsz, heads, seq_q, head_dim = q.shape
        seq_k = k.shape[2]
        self.head_dim, self.heads, self.seq_q, self.seq_k = head_dim, heads, seq_q, seq_k
        self.default_scale = 1.0 / math.sqrt(head_dim)
        self.hd_class, self.meta = _head_meta(head_dim, q.dtype)
        o = torch.empty_like(q)  # what every call's empty_like(q) will give: same strides
        self.o_strides = o.stride()[:3]
        self.lse_shape = (bsz * heads, seq_q)
        self.strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *self.o_strides)
        self.const = dict(self.meta, ALIGN=_align(q, k, v, o))
        self.launch: _Launch | None = None
        self.bwd: dict[tuple[int, ...], _BwdPlan] = {}
        # the overrides belong to the plan (its cache key holds them), not to the moment or
        # the thread in which autograd runs the backward
        self.overrides = overrides

    def grid(self, m: dict) -> tuple[int, int]:
        return (triton.cdiv(self.seq_q, m["BLOCK_M"]), self.lse_shape[0])


class _BwdPlan:
    """Backward launch metadata for one forward plan and one dO stride pattern: the
    candidate schemes for this shape (``two_kernel``; ``fused`` when all keys fit one tile,
    see ``_fused_block_n``), each with its query split, partial buffers and launches; which
    one runs is decided on the plan's first backward (``_flash_bwd``)."""

    def __init__(self, fp: _FwdPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 do: torch.Tensor) -> None:
        bsz, heads, seq_q, head_dim = q.shape
        seq_k, bh = fp.seq_k, bsz * heads
        self.bh, self.seq_q, self.seq_k, self.heads = bh, seq_q, seq_k, heads
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_n = _fused_block_n(seq_k, head_dim)
        forced, split = fp.overrides.bwd_scheme, fp.overrides.dkdv_split
        self.pinned = fp.overrides.config_index
        if forced is not None:
            if forced == "fused" and block_n is None:
                raise ValueError(f"the fused backward needs all keys in one tile (<= {_FUSED_MAX_KEYS} keys, "
                                 f"<= {_FUSED_MAX_WIDTH} columns); got Sk={seq_k} at hd {head_dim}")
            self.candidates = [forced]
        else:
            # without timing, fused wins by construction: fewer launches and matmuls
            self.candidates = ["fused", "two_kernel"] if block_n is not None else ["two_kernel"]
        self.splits = {
            "two_kernel": _dkdv_splits(bh, seq_q, seq_k, q.device, split),
            "fused": _fused_splits(bh, seq_q, q.device, split),
        }
        # fp32 dK/dV partials of a split scheme, in one allocation: (2, n_split, B, H, Sk, D)
        self.part_shape = {
            name: (2, n, bsz, heads, seq_k, head_dim)
            for name, n in self.splits.items() if n > 1 and name in self.candidates
        }
        parts = {name: torch.empty(shape, device=q.device, dtype=torch.float32)
                 for name, shape in self.part_shape.items()}
        # one ALIGN for all backward kernels: every tensor any of them touches (o via the
        # forward's value; both are powers of two, so the smaller divides everything)
        align = min(_align(q, k, v, do, dq, dk, dv, *parts.values()), fp.const["ALIGN"])
        self.const = dict(fp.meta, ALIGN=align)
        self.kv_const = {name: dict(self.const, N_SPLIT=self.splits[name], FUSED=name == "fused")
                         for name in self.candidates}
        if "fused" in self.candidates:
            self.kv_const["fused"]["BLOCK_N"] = block_n
        out_strides = {}
        for name in self.candidates:
            if name in parts:
                part_strides = parts[name].stride()[1:5]
                out_strides[name] = (*part_strides, *part_strides)
            else:
                out_strides[name] = ((0,) + dk.stride()[:3]) + ((0,) + dv.stride()[:3])
        qkv = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.dq_strides = (*qkv, *fp.o_strides, *do.stride()[:3], *dq.stride()[:3])
        self.kv_strides = {name: (*self.dq_strides, *out_strides[name]) for name in self.candidates}
        self.launches: dict[str, _Launch] = {}
        self.sums: dict[str, _Launch] = {}
        for name, part in parts.items():
            block_d = triton.next_power_of_2(head_dim)
            bn = max(16, min(64, 4096 // block_d))
            sum_kwargs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, N_SPLIT=self.splits[name], ALIGN=align, BLOCK_N=bn)
            self.sums[name] = _Launch(_attn_bwd_split_sum_kernel, (triton.cdiv(seq_k, bn), bh), sum_kwargs)
        self.sum_strides = {name: (*part.stride()[1:5], *dk.stride()[:3], *dv.stride()[:3])
                            for name, part in parts.items()}
        self.scheme: str | None = None
        self.scheme_ms: dict[str, float] = {}

    @property
    def n_split(self) -> int:
        """The query split of the chosen scheme (1: no partials)."""
        return self.splits[self.scheme or self.candidates[0]]

    def grid_q(self, m: dict) -> tuple[int, int]:
        return (triton.cdiv(self.seq_q, m["BLOCK_M"]), self.bh)

    def grid_kv(self, m: dict) -> tuple[int, int]:
        return (triton.cdiv(self.seq_k, m["BLOCK_N"]) * self.splits["two_kernel"], self.bh)

    def grid_fused(self, m: dict) -> tuple[int, int]:
        return (self.splits["fused"], self.bh)


def _fwd_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _FwdPlan:
    """The cached plan for these inputs; building it validates them (a hit implies valid)."""
    overrides = _OVERRIDES.get()
    try:
        # the switches that change what a plan freezes are part of its key
        key = ("plan", overrides, _autotune_enabled(), q.shape, k.shape, v.shape, q.stride(), k.stride(),
               v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)
    except AttributeError:  # not tensors: let the shared check raise its TypeError
        check_attention_inputs(q, k, v)
        raise
    plan = _launcher_cache.get(key)
    if plan is None:
        plan = _launcher_cache[key] = _FwdPlan(q, k, v, overrides)
    return plan
