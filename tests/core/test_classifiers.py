"""Patch classifier: threshold calibration, and that the calibrated threshold survives save/load."""
from __future__ import annotations

import math

import pytest
import torch

from geomerase.core.classifiers import (PatchClassifierConfig, bounded_threshold, calibrate_threshold, fpr_threshold,
                                        load_classifier, save_classifier)


def _fixed_probs(model, probs: torch.Tensor):
    """Make ``model.cell_probs`` return ``probs`` (N, G, G) whatever the images."""
    model.cell_probs = lambda images, batch=256: probs[: images.shape[0]]


def test_calibration_picks_the_f1_maximising_threshold(tmp_path):
    cfg = PatchClassifierConfig(resolution=16, grid=2, context=2, width=8)
    model = cfg.build()
    # Ground truth: cell 0 covered in every image, the rest clean. The classifier over-predicts
    # coverage on cell 1 (0.4) and gives the true cell 0.6: only a threshold in (0.4, 0.6] is exact.
    n = 10
    cov = torch.zeros(n, 2, 2)
    cov[:, 0, 0] = 0.8
    probs = torch.zeros(n, 2, 2)
    probs[:, 0, 0] = 0.6
    probs[:, 0, 1] = 0.4
    _fixed_probs(model, probs)
    images = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
    best = calibrate_threshold(model, images, cov, candidates=(0.2, 0.3, 0.45, 0.7), degrade_seed=None)
    assert best["threshold"] == 0.45
    assert best["precision"] == 1.0 and best["recall"] == 1.0
    assert model.threshold == 0.45
    assert model.cells(images.float()) == [[0]] * n
    # Left at the default, the over-predicted cell is flagged too.
    model.cfg.decision_threshold = None
    assert model.cells(images.float()) == [[0, 1]] * n

    model.cfg.decision_threshold = 0.45
    save_classifier(model, tmp_path / "pc")
    loaded, _ = load_classifier(tmp_path / "pc")
    assert loaded.threshold == 0.45


def test_calibration_on_a_real_classifier_is_reproducible():
    torch.manual_seed(0)
    cfg = PatchClassifierConfig(resolution=16, grid=2, context=2, width=8)
    model = cfg.build()
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    cov = (torch.rand(8, 2, 2) > 0.5).float()
    a = calibrate_threshold(model, images, cov)
    b = calibrate_threshold(model, images, cov)
    assert a == b
    assert 0.15 <= a["threshold"] <= 0.8


def test_training_depends_on_the_seed_not_on_the_global_rng():
    # A pool worker's global RNG holds whatever earlier jobs left; two identical benchmark runs
    # once trained different classifiers because the weights were drawn from it.
    from geomerase.core.classifiers import (AttributeClassifierConfig, train_attribute_classifier,
                                            train_patch_classifier)

    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cov = (torch.rand(12, 2, 2, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    labels = torch.arange(12) % 2
    pcfg = PatchClassifierConfig(resolution=16, grid=2, context=2, width=8)
    acfg = AttributeClassifierConfig(resolution=16, num_backgrounds=2, num_shapes=2, width=8)
    runs = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        p = train_patch_classifier(pcfg, images, cov, steps=3, batch=4, seed=7, progress=False)
        a = train_attribute_classifier(acfg, images, labels, labels, steps=3, batch=4, seed=7, progress=False)
        runs.append((p.state_dict(), a.state_dict(), torch.rand(1)))
    for sd_a, sd_b in ((runs[0][0], runs[1][0]), (runs[0][1], runs[1][1])):
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
    assert not torch.equal(runs[0][2], runs[1][2])  # the caller's global RNG stream is untouched
    other = train_patch_classifier(pcfg, images, cov, steps=3, batch=4, seed=8, progress=False)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in runs[0][0].items())


def test_fpr_threshold_bounds_false_positives_and_is_the_lowest_such():
    gen = torch.Generator().manual_seed(3)
    for n, fpr in ((100, 0.05), (37, 0.05), (128, 0.0), (10, 0.25), (1, 0.5)):
        scores = torch.rand(n, generator=gen)
        t = fpr_threshold(scores, fpr)
        allowed = math.floor(fpr * n + 1e-9)
        assert (scores >= t).sum().item() <= allowed, (n, fpr)
        # One float step lower flags one more negative than allowed.
        lower = torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(-1.0)).item()
        assert (scores >= lower).sum().item() == allowed + 1, (n, fpr)
    # Ties: all equal scores; any flag would flag all, so the bound excludes every one.
    assert (torch.full((20,), 0.5) >= fpr_threshold(torch.full((20,), 0.5), 0.1)).sum() == 0
    with pytest.raises(ValueError, match="fpr"):
        fpr_threshold(torch.rand(4), 1.0)
    with pytest.raises(ValueError, match="no negative"):
        fpr_threshold(torch.empty(0), 0.1)


def test_coverage_targets_are_the_boxes_share_of_each_cell():
    from geomerase.core.classifiers import coverage_targets

    metas = [{"boxes": [[0, 0, 16, 16]]}, {"boxes": []}, {"boxes": [[16, 16, 24, 32]]}]
    cov = coverage_targets(metas, [(64, 64)] * 3, grid=4, overlap_threshold=0.2)
    assert cov.shape == (3, 4, 4) and cov.dtype == torch.float32
    assert cov[0, 0, 0] == 1.0 and cov[0].sum() == 1.0 and cov[1].sum() == 0.0
    assert cov[2, 1, 1] == 0.5 and cov[2].sum() == 0.5


def test_bounded_threshold_only_raises_the_f1_threshold_to_meet_the_bound():
    model = PatchClassifierConfig(resolution=16, grid=2, context=2, width=8).build()
    model.cfg.decision_threshold = 0.5
    probs = torch.zeros(20, 2, 2)
    probs[:4, 1, 1] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # 4 of 20 concept-free samples above 0.5
    _fixed_probs(model, probs)
    negatives = torch.zeros(20, 3, 16, 16, dtype=torch.uint8)
    b = bounded_threshold(model, negatives, 0.05)  # at most 1 of 20 may be flagged
    assert 0.8 < b["threshold"] <= 0.9 and b["n"] == 20
    assert b["flagged"] == pytest.approx(0.05) and b["flagged_at_f1"] == pytest.approx(0.2)
    assert model.cfg.decision_threshold == 0.5  # the caller decides whether to apply it
    loose = bounded_threshold(model, negatives, 0.25)  # the F1 threshold already meets a looser bound
    assert loose["threshold"] == 0.5 and loose["flagged"] == pytest.approx(0.2)
    assert bounded_threshold(model, negatives, 0.0)["threshold"] == 0.5  # 0 keeps the F1 threshold
