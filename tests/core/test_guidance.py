"""SLD guidance: prediction-type conversions, the safety term, warm-up, momentum, sampler hook."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from geomerase.core.guidance import (SLD_PRESETS, SLDConfig, SLDGuidance, eps_to_pred, pred_to_eps, safety_term,
                                     sld_preset)


def _sched(kind: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type=kind)


@pytest.mark.parametrize("kind", ["v_prediction", "sample", "epsilon"])
def test_conversions_recover_the_true_noise_and_round_trip(kind):
    s = _sched(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([10, 200, 500, 900])
    xt = s.add_noise(x0, eps, t)
    truth = {"epsilon": eps, "v_prediction": s.get_velocity(x0, eps, t), "sample": x0}[kind]
    got = pred_to_eps(truth, xt, t, s.alphas_cumprod, kind)
    torch.testing.assert_close(got, eps, atol=2e-3, rtol=1e-3)
    back = eps_to_pred(got, xt, t, s.alphas_cumprod, kind)
    torch.testing.assert_close(back, truth, atol=5e-3, rtol=1e-3)


def test_safety_term_follows_the_published_rule():
    assert SLDConfig().mu_rule == "clamp"  # the authors' released rule is the default
    cfg = SLDConfig(guidance_scale=100.0, threshold=0.05, mu_rule="paper")
    e_u = torch.zeros(1, 4)
    e_s = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # d = e_p - e_s: far below the threshold (large mu), tiny (mu floored at 1), above the threshold (0).
    e_p = e_s + torch.tensor([[-0.5, 0.001, 0.06, 0.049]])
    got = safety_term(e_p, e_u, e_s, cfg)
    torch.testing.assert_close(got, torch.tensor([[50.0, 1.0, 0.0, 4.9]]))
    clamp = safety_term(e_p, e_u, e_s, SLDConfig(guidance_scale=100.0, threshold=0.05))
    torch.testing.assert_close(clamp, torch.tensor([[1.0, 0.1, 0.0, 1.0]]))


def test_warmup_and_momentum():
    s = _sched("epsilon")
    cfg = SLDConfig(warmup=20, reference_steps=50, guidance_scale=1.0, threshold=10.0, momentum_scale=0.5,
                    momentum_beta=0.5, mu_rule="paper")
    assert cfg.warmup_steps(10) == 4
    g = SLDGuidance("qr code", cfg)
    assert g.prompts == ["qr code"]
    g.start(1)
    x = torch.zeros(1, 1, 1, 1)
    p, u, c = torch.full_like(x, 1.0), torch.zeros_like(x), torch.full_like(x, 3.0)
    outs = [g(i, 10, torch.tensor(500), x, p, u, c[None], 2.0, s) for i in range(6)]
    # Before the warm-up ends it is plain CFG: u + 2 (p - u) = 2.
    assert all(float(o) == 2.0 for o in outs[:4])
    assert g.applied_steps == 2
    # d = p - c = -2 < threshold, mu = max(1, 2) = 2, term = 2 * 3 = 6; momentum nu_0 = 0:
    # gamma_k = 6 + 0.5 nu_k, nu_{k+1} = 0.5 nu_k + 0.5 gamma_k.
    nu, gammas = 0.0, []
    for _ in range(6):
        gamma = 6 + 0.5 * nu
        nu = 0.5 * nu + 0.5 * gamma
        gammas.append(gamma)
    assert float(outs[4]) == pytest.approx(2 * (1 - gammas[4]))
    assert float(outs[5]) == pytest.approx(2 * (1 - gammas[5]))
    g.start(1)
    assert g.momentum is None and g.applied_steps == 0


def test_presets_and_errors():
    assert set(SLD_PRESETS) == {"weak", "medium", "strong", "max"}
    strong = sld_preset("strong")
    assert (strong.warmup, strong.guidance_scale, strong.threshold, strong.momentum_scale, strong.momentum_beta) == \
        (7, 2000.0, 0.025, 0.5, 0.7)
    assert sld_preset("strong", threshold=0.1).threshold == 0.1 and SLD_PRESETS["strong"].threshold == 0.025
    with pytest.raises(KeyError, match="unknown SLD preset"):
        sld_preset("extreme")
    with pytest.raises(ValueError, match="momentum"):
        SLDGuidance("x", SLDConfig(momentum_beta=1.5))


def test_sampler_hook_runs_sld_and_differs_from_cfg():
    from geomerase.core.models import build_random
    from geomerase.core.sampling import SamplerConfig, sample

    model = build_random("debug", grid=4, seed=0)
    model.noise_scheduler.register_to_config(prediction_type="v_prediction")
    cfg = SamplerConfig(steps=4, guidance_scale=3.0, batch_size=2)
    seeds = [1, 2, 3]
    plain = sample(model, ["a red circle"] * 3, [""], seeds, cfg)
    again = sample(model, ["a red circle"] * 3, [""], seeds, cfg)
    torch.testing.assert_close(plain, again)
    # A hook that reproduces CFG gives the same images as no hook (the extra prompt is evaluated but unused).
    off = SLDGuidance("qr code", sld_preset("strong", warmup=50))
    torch.testing.assert_close(sample(model, ["a red circle"] * 3, [""], seeds, cfg, guidance=off), plain,
                               atol=1e-4, rtol=1e-4)
    assert off.applied_steps == 0
    on = SLDGuidance("qr code", sld_preset("max"))
    guided = sample(model, ["a red circle"] * 3, [""], seeds, cfg, guidance=on)
    assert guided.shape == plain.shape and on.applied_steps == 4
    assert (guided - plain).abs().max() > 1e-3
