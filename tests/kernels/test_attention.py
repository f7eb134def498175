"""Triton flash attention against the pure-torch reference.

Criterion for every output and gradient: with ``ref64`` the reference in fp64 on the same
(already rounded) inputs, ``err(kernel in dtype) <= 2 * err(reference in dtype) + atol``,
errors as relative Frobenius norms (floored, see ``rel_err``). On CPU the kernels run in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny; on a GPU they compile.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from geomerase.kernels import attention_ref  # noqa: E402

attn_mod = pytest.importorskip("geomerase.kernels.attention")
plan_mod = pytest.importorskip("geomerase.kernels.attention_plan")
from geomerase.kernels import flash_attention, kernel_overrides  # noqa: E402
from geomerase.kernels.attention_ref import attention_lse_ref  # noqa: E402

ON_GPU = torch.cuda.is_available() and not plan_mod._INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and not plan_mod._INTERPRET:
    pytest.skip("triton was imported without TRITON_INTERPRET=1 on a CPU-only machine", allow_module_level=True)

ATOL = {torch.float32: 5e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    # Relative to the reference, floored at an rms of 0.1 (inputs are unit normal): with a
    # single key dq and dk are exactly zero and only rounding noise is left to compare.
    x, ref = x.double(), ref.double()
    floor = 0.1 * ref.numel() ** 0.5
    return ((x - ref).norm() / ref.norm().clamp_min(floor)).item()


def make_inputs(b, h, sq, sk, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(DEVICE, dtype) for s in (sq, sk, sk))
    do = torch.randn(b, h, sq, d, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def fwd_bwd(fn, q, k, v, do, scale=None, dtype=None):
    xs = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*xs, scale)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in xs]


def check_against_reference(b, h, sq, sk, d, dtype, scale=None, seed=0, q_layout="bhsd"):
    q, k, v, do = make_inputs(b, h, sq, sk, d, dtype, seed)
    if q_layout == "bshd":  # diffusers' transposed (B, S, H, D) memory
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.float64 if DEVICE == "cpu" else torch.float32
    exact = fwd_bwd(attention_ref, q, k, v, do, scale, dtype=wide)
    low_ref = fwd_bwd(attention_ref, q, k, v, do, scale)
    got = fwd_bwd(flash_attention, q, k, v, do, scale)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, low_ref, exact):
        assert g.shape == e.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        eg, er = rel_err(g, e), rel_err(r, e)
        assert eg <= 2 * er + ATOL[dtype], f"{name}: kernel err {eg:.3e} vs reference err {er:.3e} ({dtype})"
    return got


# fp32: every head dim, each odd length as a query and as a key length somewhere
FP32_CASES = [
    (40, 1, 77), (40, 130, 7),
    (64, 7, 130), (64, 77, 1),
    (80, 130, 77), (80, 1, 7),
    (128, 77, 130), (128, 7, 7),
    (160, 130, 1), (160, 1, 130),
]


@pytest.mark.parametrize("d,sq,sk", FP32_CASES)
def test_fp32_matches_reference(d, sq, sk):
    check_against_reference(1, 2, sq, sk, d, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [40, 64, 80, 128, 160])
def test_low_precision_matches_reference(d, dtype):
    # self-attention-like and cross-attention-like (77 keys) lengths, alternating by head dim
    sq, sk = (130, 77) if d in (40, 80, 160) else (77, 130)
    check_against_reference(1, 2, sq, sk, d, dtype, seed=d)


def test_batch_and_head_offsets():
    check_against_reference(3, 2, 7, 77, 64, torch.float32, seed=1)


def test_full_tiles_without_masks():
    # lengths divisible by every tile size take the unmasked (EVEN_M/EVEN_N) code paths
    check_against_reference(1, 1, 128, 128, 64, torch.float32, seed=2)


def test_custom_scale():
    check_against_reference(1, 2, 77, 7, 40, torch.float32, scale=0.3, seed=3)


def test_transposed_layout_is_read_in_place():
    q, k, v, _ = make_inputs(1, 2, 7, 77, 40, torch.float32, seed=4)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = flash_attention(q, k, v)
    assert out.stride() == q.stride()  # output keeps the (B, S, H, D) memory
    check_against_reference(1, 2, 7, 77, 40, torch.float32, seed=4, q_layout="bshd")


def test_dkdv_query_split_partials():
    # the cross-attention path: several programs share one key block and sum fp32 partials
    with kernel_overrides(dkdv_split=3, bwd_scheme="two_kernel"):
        check_against_reference(1, 2, 130, 7, 80, torch.float32, seed=5)


def _scheme_of(q, k, v) -> str:
    (bp,) = plan_mod._fwd_plan(q, k, v).bwd.values()
    return bp.scheme


# The fused single-pass backward (all keys in one tile) against the reference, without and
# with the query-range split (fp32 partials + sum kernel), at both tile-size classes; every
# case also runs the two-kernel scheme on the same inputs, so both stay covered.
@pytest.mark.parametrize("scheme", ["fused", "two_kernel"])
@pytest.mark.parametrize("d,sq,sk,dtype,split", [
    (40, 130, 77, torch.bfloat16, None), (80, 77, 7, torch.float16, 3),
    (64, 1, 1, torch.float32, None), (80, 130, 128, torch.float32, 2),
], ids=["hd40-bf16", "hd80-fp16-split3", "hd64-len1", "hd80-128keys-split2"])
def test_backward_schemes_match_reference(scheme, d, sq, sk, dtype, split):
    with kernel_overrides(bwd_scheme=scheme, dkdv_split=split):
        check_against_reference(1, 2, sq, sk, d, dtype, seed=d + sq + sk)
        q, k, v, _ = make_inputs(1, 2, sq, sk, d, dtype, seed=d + sq + sk)
        assert _scheme_of(q, k, v) == scheme


def test_forced_scheme_belongs_to_the_forward_plan():
    # a benchmark forces a scheme around the forward call only; the backward that autograd
    # runs later (override already reset) must still use it
    q, k, v, do = make_inputs(1, 2, 5, 77, 40, torch.float32, seed=15)
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with kernel_overrides(bwd_scheme="two_kernel") as forced:
        out = flash_attention(*xs)
    assert forced == attn_mod.KernelOverrides(bwd_scheme="two_kernel")
    assert plan_mod._OVERRIDES.get() == attn_mod.KernelOverrides()  # restored on exit
    n0 = attn_mod.launch_count()
    out.backward(do)
    assert attn_mod.launch_count() - n0 == 2  # dQ + dK/dV, not the fused single launch
    with kernel_overrides(bwd_scheme="two_kernel"):
        assert _scheme_of(q, k, v) == "two_kernel"


def test_backward_scheme_candidates():
    # fused only where every key fits one tile of <= 80 columns; it is the untimed default
    def candidates(sk, d):
        q, k, v, do = make_inputs(1, 1, 3, sk, d, torch.float32)
        fwd_bwd(flash_attention, q, k, v, do)
        (bp,) = plan_mod._fwd_plan(q, k, v).bwd.values()
        return bp.candidates, bp.scheme

    assert candidates(77, 40) == (["fused", "two_kernel"], "fused")
    assert candidates(128, 80) == (["fused", "two_kernel"], "fused")
    assert candidates(129, 40) == (["two_kernel"], "two_kernel")  # 256-key tile
    assert candidates(64, 160) == (["two_kernel"], "two_kernel")  # hd 160 spills
    with kernel_overrides(bwd_scheme="fused"), pytest.raises(ValueError, match="needs all keys in one tile"):
        candidates(130, 40)


@pytest.mark.parametrize("faster", ["fused", "two_kernel"])
def test_backward_scheme_timed_choice(monkeypatch, faster):
    # with timing on (a GPU with tuning), the plan runs each candidate once, times it and
    # keeps the faster; later calls launch only that scheme's kernels
    # candidates are timed in order (fused first); a query length per case, so each builds
    # its own plan (plans are cached per shape across tests)
    timings = iter({"fused": [1.0, 2.0], "two_kernel": [2.0, 1.0]}[faster])
    monkeypatch.setattr(attn_mod, "_time_schemes", lambda device: True)
    monkeypatch.setattr(attn_mod, "_scheme_ms", lambda fn: (fn(), next(timings))[1])
    sq = {"fused": 9, "two_kernel": 10}[faster]
    got = check_against_reference(1, 2, sq, 77, 40, torch.float32, seed=13)
    q, k, v, do = make_inputs(1, 2, sq, 77, 40, torch.float32, seed=13)
    (bp,) = plan_mod._fwd_plan(q, k, v).bwd.values()
    assert bp.scheme == faster and set(bp.scheme_ms) == {"fused", "two_kernel"}
    n0 = attn_mod.launch_count()
    again = fwd_bwd(flash_attention, q, k, v, do)
    assert attn_mod.launch_count() - n0 == 1 + (1 if faster == "fused" else 2)
    for a, b in zip(got, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("index", range(4))
def test_every_tuning_config_is_correct(index):
    # each autotune candidate (tile sizes per head-dim class) computes the same function;
    # on a GPU this also proves every candidate compiles
    assert all(len(per_class) == 4 for kind in plan_mod._CONFIGS.values() for per_class in kind.values())
    # 77 keys at hd 40/80: the fused backward's lists; 130 keys and hd 160: two-kernel's
    with kernel_overrides(config_index=index):
        for d, sq, sk in ((40, 130, 77), (40, 77, 130), (80, 130, 77), (80, 77, 130), (160, 130, 77)):
            check_against_reference(1, 1, sq, sk, d, torch.float16, seed=index + d)


def test_log_sum_exp():
    from geomerase.kernels import flash_attention_with_lse

    q, k, v, _ = make_inputs(2, 2, 77, 130, 80, torch.float32, seed=6)
    out, lse = flash_attention_with_lse(q, k, v)
    assert lse.shape == (2, 2, 77) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), attention_lse_ref(q, k).double().to(lse.device), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_torch_library_op_matches_function():
    from geomerase.kernels import register_flash_attention_op

    op = register_flash_attention_op()
    assert register_flash_attention_op() is op
    q, k, v, do = make_inputs(1, 2, 7, 77, 64, torch.float32, seed=7)
    via_op = fwd_bwd(op, q, k, v, do)
    via_fn = fwd_bwd(flash_attention, q, k, v, do)
    for a, b in zip(via_op, via_fn):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_torch_library_op_backward_follows_the_forward_overrides():
    from geomerase.kernels import register_flash_attention_op

    op = register_flash_attention_op()
    q, k, v, do = make_inputs(1, 2, 6, 77, 40, torch.float32, seed=16)
    xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with kernel_overrides(bwd_scheme="two_kernel"):
        out = op(*xs)
    n0 = attn_mod.launch_count()
    out.backward(do)
    assert attn_mod.launch_count() - n0 == 2  # dQ + dK/dV, not the fused single launch


def test_rejects_bad_inputs():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        flash_attention(*(torch.randn(1, 1, 4, 320, device=DEVICE),) * 3)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same length"):
        flash_attention(q, q, q[:, :, :3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("sq,sk", [(1, 77), (7, 130), (77, 7), (130, 1), (130, 130)])
def test_gpu_matrix(d, sq, sk, dtype):
    # every head dim x 16-bit dtype (fp32 is covered above), each odd length as query and key
    # length; not the full product: each distinct stride/length divisibility is a compile
    if not ON_GPU:
        pytest.skip("kernels run in the interpreter")
    check_against_reference(2, 3, sq, sk, d, dtype, seed=sq * 1000 + sk)


@pytest.mark.gpu
@pytest.mark.parametrize("d,seq_q,seq_k", [
    (40, 4096, 4096), (40, 4096, 77), (80, 1024, 1024), (80, 1024, 77),
    (160, 256, 256), (160, 256, 77), (160, 64, 64), (160, 64, 77),
])
def test_gpu_sd15_shapes_bf16(d, seq_q, seq_k):
    if not ON_GPU:
        pytest.skip("kernels run in the interpreter")
    check_against_reference(2, 4, seq_q, seq_k, d, torch.bfloat16, seed=d + seq_q + seq_k)


@pytest.mark.gpu
@pytest.mark.parametrize("d,seq_q", [(40, 4096), (80, 1024)])
def test_gpu_sd15_cross_two_kernel_bf16(d, seq_q):
    # the cross shapes above take the fused backward (untimed default); the other scheme too
    if not ON_GPU:
        pytest.skip("kernels run in the interpreter")
    with kernel_overrides(bwd_scheme="two_kernel"):
        check_against_reference(2, 4, seq_q, 77, d, torch.bfloat16, seed=d + seq_q)


# Length-1 sequences and the GPU's default tiles. On an H200 (Triton 3.6) hd 160 gave wrong
# dQ at Sk == 1 and wrong dK at Sq == 1: Triton made SEQ_K/SEQ_Q == 1 a compile-time constant,
# the key/query loop became a folded single trip without the cp.async pipeline, and that
# variant miscompiled. The interpreter cannot reproduce a compiler bug, so the CPU side checks
# (a) that the lengths are not specialised and (b) that the GPU's default tiles (config 0 of
# every list, not the interpreter's 64x64) compute these shapes correctly.
def test_sequence_lengths_are_not_specialised():
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from geomerase.kernels import attention_kernels as K\n"
        "for f in (K._attn_fwd_kernel, K._attn_bwd_dkdv_kernel, K._attn_bwd_dq_kernel, K._attn_bwd_split_sum_kernel):\n"
        "    flags = {p.name: p.do_not_specialize for p in f.params if p.name.startswith('SEQ_')}\n"
        "    assert flags and all(flags.values()), (f.__name__, flags)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("sq,sk", [(130, 1), (1, 77)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_length_one_with_gpu_default_tiles(sq, sk, dtype):
    with kernel_overrides(config_index=0):
        check_against_reference(2, 3, sq, sk, 160, dtype, seed=sq * 1000 + sk)


def test_dkdv_split_with_empty_programs():
    # more splits than query blocks: some programs sweep no queries and must store zeros
    # (the partial buffer is torch.empty), at the GPU's default hd 160 tiles
    with kernel_overrides(config_index=0, dkdv_split=4):
        check_against_reference(1, 2, 40, 77, 160, torch.float16, seed=11)


def test_backward_scheme_that_disagrees_is_not_chosen(monkeypatch):
    # A miscompiled scheme (here: fused with dQ doubled) must lose even when it times faster.
    run = attn_mod._run_bwd

    def broken(bp, scheme, *args):
        dq, dk, dv = run(bp, scheme, *args)
        return (dq * 2, dk, dv) if scheme == "fused" else (dq, dk, dv)

    monkeypatch.setattr(attn_mod, "_run_bwd", broken)
    monkeypatch.setattr(attn_mod, "_time_schemes", lambda device: True)
    timings = iter([1.0, 2.0])  # fused "faster"
    monkeypatch.setattr(attn_mod, "_scheme_ms", lambda fn: (fn(), next(timings))[1])
    q, k, v, do = make_inputs(1, 2, 11, 77, 40, torch.float32, seed=14)
    with pytest.warns(RuntimeWarning, match="'fused' backward disagrees with 'two_kernel'"):
        got = fwd_bwd(flash_attention, q, k, v, do)
    (bp,) = plan_mod._fwd_plan(q, k, v).bwd.values()
    assert bp.scheme == "two_kernel" and bp.scheme_ms["fused"] == float("inf")
    exact = fwd_bwd(attention_ref, q, k, v, do, dtype=torch.float64)
    assert rel_err(got[1], exact[1]) < 1e-5  # dQ from the scheme that was kept


@pytest.mark.parametrize("scheme,split,bwd_launches", [
    ("fused", None, 1), ("fused", 2, 2), ("two_kernel", None, 2), ("two_kernel", 2, 3),
])
def test_launch_counts_and_plan_reuse(scheme, split, bwd_launches):
    # host overhead: one launch per forward; per backward one (fused), two (two-kernel:
    # delta is fused into dQ), plus one sum kernel for both fp32 partials with a query
    # split; the second call of a shape reuses its plan (no new cache entries) and gives
    # the same numbers
    q, k, v, do = make_inputs(1, 2, 7, 77, 64, torch.float32, seed=12)
    with kernel_overrides(bwd_scheme=scheme, dkdv_split=split):
        first = fwd_bwd(flash_attention, q, k, v, do)
        entries = len(plan_mod._launcher_cache)
        n0 = attn_mod.launch_count()
        xs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention(*xs)
        assert attn_mod.launch_count() - n0 == 1
        out.backward(do)
        assert attn_mod.launch_count() - n0 == 1 + bwd_launches
        assert len(plan_mod._launcher_cache) == entries
    for a, b in zip(first, [out.detach()] + [t.grad for t in xs]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
