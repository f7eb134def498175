"""Fused location-token embedding (Triton) against ``loc_embedding_ref``.

Checks the forward bit-for-bit (fp32/fp16; bf16 within one ulp under the CPU interpreter,
whose fp32->bf16 cast truncates instead of rounding), the trainable-row and position
gradients against exact fp64 scatter sums, that the frozen table gets no gradient and no
update, and that no vocabulary-sized buffer is allocated in the backward.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from geomerase.kernels import loc_embedding_ref  # noqa: E402

emb_mod = pytest.importorskip("geomerase.kernels.loc_embedding")
from geomerase.kernels import loc_embedding  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

V, D, R, START, P = 60, 40, 6, 50, 12  # D=40: the feature axis is masked (not a power of 2)


def make_case(dtype, pos_mode, seed=0, bsz=3, seq=9, train_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (bsz, seq), generator=g)
    ids[0, :5] = torch.tensor([START, START + 1, START + R - 1, START, START - 1])  # repeats + edges
    ids[1, -1] = V - 1
    frozen = torch.randn(V, D, generator=g).to(dtype)
    train = torch.randn(R, D, generator=g).to(train_dtype)
    pos_w = torch.randn(P, D, generator=g).to(dtype)
    pos = {None: None,
           "batch": torch.randint(0, P, (bsz, seq), generator=g),
           "shared": torch.randint(0, P, (1, seq), generator=g)}[pos_mode]
    grad = torch.randn(bsz, seq, D, generator=g).to(dtype)
    to = (lambda t: None if t is None else t.to(DEVICE))
    return to(ids), to(frozen), to(train), to(pos_w), to(pos), to(grad)


def exact_grads(ids, grad, pos, bsz, seq):
    """fp64 scatter sums: what the (R, D) and (P, D) gradients must equal."""
    g = grad.double().reshape(-1, D).cpu()
    flat = ids.reshape(-1).cpu()
    dtrain = torch.zeros(R, D, dtype=torch.float64)
    local = flat - START
    keep = (local >= 0) & (local < R)
    dtrain.index_add_(0, local[keep], g[keep])
    positions = (torch.arange(seq).expand(bsz, seq) if pos is None else pos.cpu().expand(bsz, seq)).reshape(-1)
    dpos = torch.zeros(P, D, dtype=torch.float64).index_add_(0, positions, g)
    return dtrain, dpos


@pytest.mark.parametrize("pos_mode", [None, "batch", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_reference(dtype, pos_mode):
    ids, frozen, train, pos_w, pos, grad = make_case(dtype, pos_mode, seed=hash((str(dtype), pos_mode)) % 1000)
    train_k = train.clone().requires_grad_(True)
    pos_k = pos_w.clone().requires_grad_(True)
    out = loc_embedding(ids, frozen, train_k, START, pos_k, pos)
    ref = loc_embedding_ref(ids, frozen, train.clone(), START, pos_w.clone(), pos)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.bfloat16 and INTERPRET:
        # two casts (train row, sum) that may each be 1 ulp off: bound by the terms' sizes
        terms = loc_embedding_ref(ids, frozen.float().abs(), train.float().abs(), START, pos_w.float().abs(), pos)
        assert ((out.float() - ref.float()).abs() <= terms * 2.0 ** -6).all()
    else:
        assert torch.equal(out, ref)
    out.backward(grad)
    dtrain, dpos = exact_grads(ids, grad, pos, *ids.shape)
    assert train_k.grad.shape == (R, D) and train_k.grad.dtype == train.dtype
    torch.testing.assert_close(train_k.grad.double().cpu(), dtrain, atol=1e-5, rtol=1e-5)
    # the position grad is returned in the table's dtype: allow its rounding
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(pos_k.grad.double().cpu(), dpos, atol=tol * 4, rtol=tol)


def test_frozen_rows_get_no_gradient_and_no_update():
    ids, frozen, train, pos_w, pos, grad = make_case(torch.float32, None, seed=11)
    frozen = frozen.clone().requires_grad_(True)  # even if someone leaves it trainable
    train = train.clone().requires_grad_(True)
    pos_w = pos_w.clone()  # frozen position table: no grad requested
    before = frozen.detach().clone()
    opt = torch.optim.SGD([frozen, train], lr=1.0)
    loc_embedding(ids, frozen, train, START, pos_w, pos).backward(grad)
    assert frozen.grad is None
    assert pos_w.grad is None
    assert train.grad is not None and train.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(frozen.detach(), before)


def test_rows_not_in_batch_get_zero_gradient():
    ids, frozen, train, pos_w, pos, grad = make_case(torch.float32, None, seed=12)
    ids = ids.clone()
    ids[(ids - START >= 3) & (ids - START < R)] = 0  # rows 3.. never appear
    train = train.clone().requires_grad_(True)
    loc_embedding(ids, frozen, train, START, pos_w, pos).backward(grad)
    assert torch.count_nonzero(train.grad[3:]) == 0
    assert torch.count_nonzero(train.grad[:3]) > 0


def _largest_cpu_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocator probe; the GPU benchmark measures CUDA memory")
def test_backward_allocates_no_vocab_sized_gradient():
    vocab, dim = 40_000, 32
    vocab_bytes = vocab * dim * 4
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    ids[0, 0] = vocab - 3
    frozen = torch.randn(vocab, dim, generator=g)
    pos_w = torch.randn(8, dim, generator=g)

    train = frozen[vocab - 4:].clone().requires_grad_(True)
    out = loc_embedding(ids, frozen, train, vocab - 4, pos_w)
    fused = _largest_cpu_allocation(lambda: out.sum().backward())
    assert train.grad.shape == (4, dim)

    # the textual-inversion pattern this replaces: the probe does see its (V, D) gradient
    dense = torch.nn.Embedding(vocab, dim)
    dense_peak = _largest_cpu_allocation(lambda: (dense(ids) + pos_w[:5]).sum().backward())
    assert dense_peak >= vocab_bytes
    assert fused < vocab_bytes // 100


def test_rejects_bad_shapes():
    ids, frozen, train, pos_w, _, _ = make_case(torch.float32, None)
    with pytest.raises(ValueError, match="widths differ"):
        loc_embedding(ids, frozen, train[:, :8], START, pos_w)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        loc_embedding(ids[0], frozen, train, START, pos_w)
    with pytest.raises(ValueError, match="fewer than"):
        loc_embedding(ids, frozen, train, START, pos_w[:4])
