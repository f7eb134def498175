"""Region re-weighting: inside T/(K+a(T-K)), outside aT/(K+a(T-K)), summing to T."""
from __future__ import annotations

import pytest
import torch

from geomerase.core.losses import denoising_loss, region_weights, weight_map


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_region_weights_values_and_sum(alpha):
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # K = 4 of T = 16
    w = region_weights(mask, alpha)
    t, k = 16, 4
    assert w[0][mask[0]].unique().item() == pytest.approx(t / (k + alpha * (t - k)))
    assert w[0][~mask[0]].unique().item() == pytest.approx(alpha * t / (k + alpha * (t - k)))
    assert w[0].sum().item() == pytest.approx(t)
    assert torch.allclose(w[1], torch.ones(4, 4))  # no concept: uniform


def test_weight_map_and_loss_scale():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    wm = weight_map(mask, 2.0, 32, 32)
    assert wm.shape == (1, 1, 32, 32)
    assert wm.mean().item() == pytest.approx(1.0)
    pred, target = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    assert denoising_loss(pred, target, wm).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        weight_map(mask, 2.0, 30, 30)
    with pytest.raises(ValueError):
        region_weights(mask, 0.0)
