"""Fréchet distance against closed forms and a brute-force matrix square root."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geomerase.core.fid import DomainFID, fid_from_features, frechet_distance, trace_sqrt_product


def _brute_trace_sqrt(a: np.ndarray, b: np.ndarray) -> float:
    # (A B) is similar to a PSD matrix: its eigenvalues are real and >= 0; tr sqrt = sum sqrt(eig).
    w = np.linalg.eigvals(a @ b)
    return float(np.sqrt(np.clip(w.real, 0, None)).sum())


def test_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_non_commuting_covariances_match_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    assert trace_sqrt_product(s1, s2) == pytest.approx(_brute_trace_sqrt(s1, s2), rel=1e-6)


def test_feature_fid_is_zero_for_same_set_and_grows_with_shift():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 8))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-6)
    near, far = fid_from_features(f, f + 0.1), fid_from_features(f, f + 1.0)
    assert near == pytest.approx(8 * 0.01, rel=1e-6) and far == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(f[:1], f)


def test_domain_fid_uses_network_features():
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 128, (64, 3, 4, 4), dtype=torch.uint8, generator=g)
    fid = DomainFID(body, ref)
    assert fid(ref) == pytest.approx(0.0, abs=1e-6)
    assert fid(ref + 100) > fid(ref + 10) > 0.0
