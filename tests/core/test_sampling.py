"""The sampler (`core.sampling`): seeds and negative prompts; x0 clipping."""
from __future__ import annotations


import pytest
import torch

from geomerase.core.models import build_random
from geomerase.core.sampling import SamplerConfig, sample


def test_sampler_seeds_and_negatives():
    m = build_random("debug", grid=2)
    cfg = SamplerConfig(steps=3, guidance_scale=3.0, batch_size=2)
    a = sample(m, ["a red circle", "a blue square", "x"], ["qr code"], seeds=[1, 2, 3], cfg=cfg)
    b = sample(m, ["a red circle", "a blue square", "x"], ["qr code"], seeds=[1, 2, 3], cfg=cfg)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    c = sample(m, ["a red circle"], ["qr code <l0> <l1> <l2> <l3>"], seeds=[1], cfg=cfg)
    assert not torch.equal(a[:1], c)  # the negative prompt changes the guidance
    # Several negatives average their predictions: two copies equal one (up to fp32 rounding: the UNet
    # batch differs, so GEMM blocking does too; differences up to 1.4e-5 seen on a loaded 2-core CPU).
    d = sample(m, ["a red circle"], ["qr code", "qr code"], seeds=[1], cfg=cfg)
    torch.testing.assert_close(d, a[:1], atol=1e-4, rtol=0)
    # Weights select: all weight on the first negative equals using it alone.
    e = sample(m, ["a red circle"], ["qr code", "qr code <l0> <l1> <l2> <l3>"], seeds=[1], cfg=cfg, neg_weights=[1, 0])
    torch.testing.assert_close(e, a[:1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_clip_x0_clamps_the_implied_image_and_keeps_x0_and_noise_consistent(kind):
    from geomerase.core.guidance import eps_to_pred, pred_to_eps, schedule_coeffs
    from geomerase.core.sampling import clip_x0

    m = build_random("debug", grid=2)
    ac = m.noise_scheduler.alphas_cumprod
    t = torch.tensor(700)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 4 - 2  # half the values outside [-1, 1]
    eps = torch.randn(2, 3, 4, 4, generator=g)
    sa, s1a = schedule_coeffs(ac, t, x0)
    x_t = sa * x0 + s1a * eps
    pred = eps_to_pred(eps, x_t, t, ac, kind)
    out = clip_x0(pred, x_t, t, ac, kind)
    eps2 = pred_to_eps(out, x_t, t, ac, kind)
    x0_2 = (x_t - s1a * eps2) / sa
    torch.testing.assert_close(x0_2, x0.clamp(-1, 1), atol=1e-4, rtol=0)
    inside = (x0.abs() <= 1)
    torch.testing.assert_close(eps2[inside], eps[inside], atol=1e-4, rtol=0)  # in range: unchanged

