"""Rank 0's scalar log and the loss-curve picture."""
from __future__ import annotations

import json

from geomerase.core.train_metrics import MetricsLogger, plot_loss
from geomerase.core.trainer import TrainConfig


def test_metrics_rows_with_samples_per_second_and_mfu(tmp_path):
    tc = TrainConfig(flops_per_sample=2e9, peak_flops=1e12)
    m = MetricsLogger(tmp_path, tc, global_batch=16, world=2)
    m.log(10, 0.5, 1e-3, 0.25, steps_per_s=3.0)
    m.log(20, 0.4, 9e-4, 0.20, steps_per_s=2.0)
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["samples_per_s"] == 48.0
    assert abs(rows[0]["mfu"] - 48.0 * 2e9 / (1e12 * 2)) < 1e-12
    plain = MetricsLogger(tmp_path / "p", TrainConfig(), global_batch=4, world=1)
    plain.log(1, 0.1, 1e-3, 0.1, steps_per_s=1.0)
    plain.close()
    assert "mfu" not in json.loads((tmp_path / "p" / "metrics.jsonl").read_text())


def test_loss_plot_written_only_with_history(tmp_path):
    plot_loss([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    plot_loss([{"step": s, "loss": 1.0 / s} for s in range(1, 20)], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
