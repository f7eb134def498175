"""What a training run reports: rank 0's scalar log (``metrics.jsonl``, tensorboard when asked for)
and the loss-curve picture."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger("geomerase.train")


class LogSettings(Protocol):
    """What the logger reads of a run's settings (``core.trainer.TrainConfig`` has these fields)."""

    tensorboard: bool
    flops_per_sample: float | None
    peak_flops: float | None


class MetricsLogger:
    """Rank-0 scalars: ``metrics.jsonl`` always, tensorboard when asked for and importable."""

    def __init__(self, out: Path, tc: LogSettings, global_batch: int, world: int):
        self.global_batch, self.world, self.tc = global_batch, world, tc
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.tb = None
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                log.warning("train.tensorboard=true but the tensorboard package is not importable "
                            "(pip install tensorboard); scalars go to %s only", out / "metrics.jsonl")

    def log(self, step: int, loss: float, lr: float, grad_norm: float, steps_per_s: float) -> None:
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": steps_per_s * self.global_batch}
        if self.tc.flops_per_sample and self.tc.peak_flops:
            row["mfu"] = row["samples_per_s"] * self.tc.flops_per_sample / (self.tc.peak_flops * self.world)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss(history: list[dict], path: Path, ylabel: str = "denoising MSE") -> None:
    """Loss curve PNG (matplotlib, headless); ``ylabel`` names what the logged loss is."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


HISTORY_FILE = "loss.csv"
"""The loss log of a run (``step,loss,lr,grad_norm,seconds`` per log step): what resume reads back and
progress displays follow."""
_HISTORY_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds"]


def read_history(out: Path, upto_step: int) -> list[dict]:
    """The rows of ``out/loss.csv`` up to ``upto_step`` (a resumed run continues its log)."""
    path = Path(out) / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items()}
                for row in csv.DictReader(f) if int(float(row["step"])) <= upto_step]


def write_history(out: Path, rows: list[dict]) -> None:
    """Rewrite ``out/loss.csv`` with ``rows`` (rank 0 only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / HISTORY_FILE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_HISTORY_FIELDS)
        w.writeheader()
        w.writerows(rows)
