"""ESD: parameter selection, the target, and one step moving the concept prediction toward it."""
from __future__ import annotations

import pytest
import torch

from geomerase.core.esd import ESDConfig, ESDTrainer, esd_parameters, run_esd
from geomerase.core.models import build_random


def _model(kind: str = "v_prediction"):
    m = build_random("debug", grid=4, seed=0)
    m.noise_scheduler.register_to_config(prediction_type=kind)
    return m


def _images(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_parameter_selection_x_vs_u():
    m = _model()
    x = {id(p) for p in esd_parameters(m.unet, "x")}
    assert x and all(p.requires_grad == (id(p) in x) for p in m.unet.parameters())
    names = {n for n, p in m.unet.named_parameters() if id(p) in x}
    assert all("attn2" in n for n in names), names  # debug UNet: attn1 is self-attention, attn2 cross
    u = {id(p) for p in esd_parameters(m.unet, "u")}
    assert u and not (u & x) and len(u) + len(x) == len(list(m.unet.parameters()))


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_one_step_moves_concept_prediction_toward_target(kind):
    torch.manual_seed(0)
    m = _model(kind)
    tr = ESDTrainer(m, ESDConfig(concept="qr code", eta=1.0, lr=1e-3, batch_size=6, seed=0), _images())
    gen = torch.Generator().manual_seed(5)
    x_t, t = tr._xt(gen)
    frozen_before = {k: v.clone() for k, v in tr.frozen.state_dict().items()}
    target = tr.target(x_t, t)
    # The target is negative guidance of the frozen model, formed in epsilon space.
    with torch.no_grad():
        b = x_t.shape[0]
        e_u = tr.frozen(x_t, t, tr.emb_u.expand(b, -1, -1)).sample
        e_c = tr.frozen(x_t, t, tr.emb_c.expand(b, -1, -1)).sample
    from geomerase.core.guidance import pred_to_eps

    ac = m.noise_scheduler.alphas_cumprod
    want = pred_to_eps(e_u, x_t, t, ac, kind) - (pred_to_eps(e_c, x_t, t, ac, kind) - pred_to_eps(e_u, x_t, t, ac, kind))
    torch.testing.assert_close(target, want)
    with torch.no_grad():
        before = (tr.concept_eps(x_t, t) - target).pow(2).mean().item()
    trainable = {n: p.clone() for n, p in m.unet.named_parameters() if p.requires_grad}
    frozen_names = {n: p.clone() for n, p in m.unet.named_parameters() if not p.requires_grad}
    for _ in range(3):
        tr.step((x_t, t))
    with torch.no_grad():
        after = (tr.concept_eps(x_t, t) - target).pow(2).mean().item()
    assert after < before
    for n, p in m.unet.named_parameters():
        if n in frozen_names:
            assert torch.equal(p, frozen_names[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in m.unet.named_parameters() if n in trainable)
    for k, v in tr.frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k


def test_model_source_trajectory_and_run_saves(tmp_path):
    m = _model()
    cfg = ESDConfig(concept="qr code", steps=2, batch_size=2, xt_source="model", ddim_steps=3, log_every=1)
    tr = ESDTrainer(m, cfg)
    x, t = tr._trajectory(torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and t.shape == (2,) and bool((t == t[0]).all()) and 0 <= int(t[0]) < 1000
    assert torch.isfinite(x).all()
    run_esd(_model(), ESDConfig(steps=2, batch_size=2, log_every=1), tmp_path / "esd", _images())
    assert (tmp_path / "esd" / "model" / "geomerase.json").is_file()
    assert (tmp_path / "esd" / "loss.csv").read_text().count("\n") == 3
    with pytest.raises(ValueError, match="needs training images"):
        ESDTrainer(_model(), ESDConfig(xt_source="data"))
    with pytest.raises(ValueError, match="method"):
        ESDConfig(method="z").validate()


def test_model_source_on_a_size_with_coordinate_planes():
    # The frozen copy's trajectory goes through DiffusionModel.denoise, which appends the (x, y)
    # planes; calling the UNet directly fed 12 channels to a 14-channel input conv.
    from dataclasses import replace

    from geomerase.core.models import MODEL_SIZES, register_size

    if "debug-coord" not in MODEL_SIZES:
        d = MODEL_SIZES["debug"]
        register_size("debug-coord", replace(d, coord_channels=2, unet={**d.unet, "in_channels": 5}))
    m = build_random("debug-coord", grid=4, seed=0)
    tr = ESDTrainer(m, ESDConfig(xt_source="model", steps=1, batch_size=2, ddim_steps=3, seed=1))
    x_t, t = tr._xt(torch.Generator().manual_seed(0))
    assert x_t.shape == (2, 3, 16, 16) and t.shape == (2,) and x_t.device == tr.device
    assert torch.isfinite(torch.tensor(tr.step((x_t, t))))
