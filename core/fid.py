"""Fréchet distance between image sets in the feature space of a domain network.

FID (Heusel et al. 2017) fits a Gaussian to the features of each image set and reports

    ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).

Inception features mean little for 32 px procedural scenes and no Inception weights are
available offline, so the benchmark uses the penultimate features of the attribute
classifier (trained on the training split only): a network that knows this domain. The
matrix square-root trace is computed with symmetric eigendecompositions in float64
(numpy only): ``tr((S_1 S_2)^{1/2}) = sum sqrt(eig(S_1^{1/2} S_2 S_1^{1/2}))``, which is
exact for PSD matrices and needs no ``scipy.linalg.sqrtm`` (scipy is not installed here).

Values depend on the feature network and on the number of images (FID is biased upwards
for small sets); compare arms only at the same ``n`` and with the same network.
"""
from __future__ import annotations


import numpy as np
import torch
from torch import nn


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of ``(D, D)`` ``s`` (negative eigenvalues from rounding clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr((S_1 S_2)^{1/2})`` for PSD ``(D, D)`` matrices."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` features -> (mean ``(D,)``, covariance ``(D, D)``) in float64 (N >= 2)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between ``N(mu1, s1)`` and ``N(mu2, s2)`` (``(D,)`` means, ``(D, D)`` covariances)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """FID between two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


@torch.no_grad()
def domain_features(body: nn.Module, images_u8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Penultimate features ``(N, D)`` of ``body`` (e.g. ``AttributeClassifier.body``) for uint8
    images ``(N, 3, R, R)`` (scaled to [-1, 1] as the classifiers are trained)."""
    body.eval()
    out = []
    for i in range(0, images_u8.shape[0], batch):
        out.append(body(images_u8[i:i + batch].float() / 127.5 - 1).float())
    return torch.cat(out)


class DomainFID:
    """FID of image sets against one fixed reference set, in a domain network's feature space."""

    def __init__(self, body: nn.Module, reference_u8: torch.Tensor):
        self.body = body
        self.ref_stats = gaussian_stats(domain_features(body, reference_u8))
        self.n_reference = int(reference_u8.shape[0])

    def __call__(self, images_u8: torch.Tensor) -> float:
        """FID of ``(N, 3, R, R)`` uint8 images against the reference."""
        return frechet_distance(*gaussian_stats(domain_features(self.body, images_u8)), *self.ref_stats)


def inception_fid(images_u8: torch.Tensor, reference_u8: torch.Tensor, weights: str,
                  feature: int = 2048) -> float:
    """Inception FID via torchmetrics, with Inception weights from a local file the user supplies.

    Raises a clear error when torchmetrics (and its torch-fidelity backend) is not installed;
    nothing is downloaded.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError("Inception FID needs torchmetrics[image] (and torch-fidelity) installed; "
                          "the domain-feature FID needs neither") from e
    metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights)
    metric.update(reference_u8, real=True)
    metric.update(images_u8, real=False)
    return float(metric.compute())

