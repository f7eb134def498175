"""Attention dispatch: backends agree, capability errors are clear, the diffusers processor
matches diffusers' own, and a tiny UNet trains the same with the triton and sdpa backends."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from geomerase.core import attention as dispatch  # noqa: E402
from geomerase.core.attention import (  # noqa: E402
    AttentionBackendUnavailable,
    DispatchAttnProcessor,
    attention,
    available_backends,
    set_attention_backend,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = dispatch.backend_status("triton", DEVICE)[0]


def qkv(b=2, h=2, sq=7, sk=77, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(DEVICE, dtype) for s in (sq, sk, sk)]


def test_available_backends_reports_this_machine():
    avail = available_backends(DEVICE)
    assert avail[:1] == ["sdpa"] and "math" in avail
    assert ("triton" in avail) == TRITON_OK
    try:
        import xformers  # noqa: F401
        has_xformers = torch.cuda.is_available()
    except Exception:
        has_xformers = False
    assert ("xformers" in avail) == has_xformers


@pytest.mark.parametrize("backend", ["sdpa", "triton", "xformers", "math"])
def test_backends_agree_with_math(backend):
    if backend not in available_backends(DEVICE):
        pytest.skip(dispatch.backend_status(backend, DEVICE)[1])
    q, k, v = qkv()
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ys = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*xs, scale=0.2, backend=backend)
    ref = attention(*ys, scale=0.2, backend="math")
    do = torch.randn_like(ref)
    out.backward(do)
    ref.backward(do)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad, atol=2e-5, rtol=2e-5)


def test_unknown_backend_is_named():
    with pytest.raises(AttentionBackendUnavailable, match="unknown attention backend 'flash3'"):
        attention(*qkv(), backend="flash3")


def test_xformers_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(dispatch, "_has_module", lambda name: name != "xformers")
    with pytest.raises(AttentionBackendUnavailable, match="'xformers'.*not installed"):
        attention(*qkv(), backend="xformers")
    monkeypatch.setattr(dispatch, "_has_module", lambda name: True)
    ok, reason = dispatch.backend_status("xformers", "cpu")
    assert not ok and "CUDA" in reason


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_interpreting", lambda: False)
    q, k, v = (t.cpu() for t in qkv())
    with pytest.raises(AttentionBackendUnavailable, match="TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")
    monkeypatch.setattr(dispatch, "_has_module", lambda name: name != "triton")
    with pytest.raises(AttentionBackendUnavailable, match="triton is not installed"):
        attention(q, k, v, backend="triton")


def test_mask_supported_by_sdpa_and_math_only():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 7, 77, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", attn_mask=mask),
                               attention(q, k, v, backend="math", attn_mask=mask), atol=2e-5, rtol=2e-5)
    if TRITON_OK:
        with pytest.raises(NotImplementedError, match="'triton' does not support attn_mask"):
            attention(q, k, v, backend="triton", attn_mask=mask)


def test_importing_dispatch_imports_no_kernel():
    # (a torch build that pulls triton in by itself is not the dispatch's doing)
    code = ("import sys, torch; pre = 'triton' in sys.modules; "
            "import geomerase.core.attention as a, geomerase.kernels; "
            "assert pre or 'triton' not in sys.modules, 'triton imported'; "
            "assert 'geomerase.kernels.attention' not in sys.modules; "
            "assert 'geomerase.kernels.loc_embedding' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------- diffusers
# importorskip inside the tests: a module-level skip would also drop the tests above on
# machines without diffusers (the GPU image has none)
@pytest.mark.parametrize("kind", ["self", "cross", "spatial"])
def test_processor_matches_diffusers_attnprocessor2_0(kind):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    if kind == "spatial":  # 4-D input, group norm, residual, rescale: the VAE-style block
        attn = Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                         rescale_output_factor=2.0, bias=True)
        x = torch.randn(2, 32, 4, 4)
        ctx = None
    else:
        attn = Attention(32, cross_attention_dim=24 if kind == "cross" else None, heads=2, dim_head=16)
        x = torch.randn(2, 9, 32)
        ctx = torch.randn(2, 77, 24) if kind == "cross" else None
    attn = attn.to(DEVICE)
    x = x.to(DEVICE)
    ctx = ctx.to(DEVICE) if ctx is not None else None
    expected = AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx)
    for backend in available_backends(DEVICE):
        got = DispatchAttnProcessor(backend)(attn, x, encoder_hidden_states=ctx)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=f"backend {backend}")


def _tiny_unet():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,  # diffusers: 2 heads -> head dims 16 and 32
    ).to(DEVICE)


def _step(unet, sample, t, ctx):
    unet.zero_grad(set_to_none=True)
    out = unet(sample, t, encoder_hidden_states=ctx).sample
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_set_attention_backend_keeps_state_dict_and_installs_everywhere():
    unet = _tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    set_attention_backend(unet, "math")
    after = unet.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    procs = unet.attn_processors
    assert procs and all(isinstance(p, DispatchAttnProcessor) and p.backend == "math" for p in procs.values())
    if "xformers" not in available_backends(DEVICE):
        with pytest.raises(AttentionBackendUnavailable, match="xformers"):
            set_attention_backend(unet, "xformers")
        assert all(p.backend == "math" for p in unet.attn_processors.values())  # left as it was


@pytest.mark.skipif(not TRITON_OK, reason="triton backend unavailable here")
def test_tiny_unet_triton_matches_sdpa():
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    ctx = torch.randn(2, 77, 32, generator=g).to(DEVICE)
    t = torch.tensor([10, 500], device=DEVICE)

    # fp32 means fp32 here: the Triton kernel multiplies fp32 inputs in IEEE fp32
    # (input_precision="ieee", not tf32), but cuDNN runs fp32 convolutions in TF32 by default
    # on Ampere+. Two correct attention outputs that differ by ~1e-7 then round differently
    # into the next TF32 conv (10-bit mantissa, ~5e-4 relative): the H200 run saw 6.1e-4.
    # With TF32 off the comparison measures the attention backends, not cuDNN's rounding.
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        set_attention_backend(unet, "sdpa")
        out_ref, grads_ref = _step(unet, sample, t, ctx)
        set_attention_backend(unet, "triton")
        out, grads = _step(unet, sample, t, ctx)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    attn_params = [n for n in grads if "attn" in n]
    assert attn_params  # the comparison covers the attention projections themselves
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-3, msg=name)
