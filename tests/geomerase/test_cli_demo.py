"""The CLI wiring and a miniature end-to-end demo (numbers meaningless, files and keys checked)."""
from __future__ import annotations

import json
import subprocess
import sys

from geomerase.cli import main


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "geomerase", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "data", "classifier", "annotate", "train", "sample", "fetch-tokenizer"):
        assert cmd in out.stdout


def test_cli_bad_demo_key_is_an_error(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_miniature_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "n_train=200", "n_heldout=100", "steps=3", "samples=4",
               "classifier_steps=20", "sample_steps=2", "batch_size=4", "threads=2", "extra_negatives=[geom-cells]",
               "n_aux=100", "reweight_alpha=2.0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for arm in ("plain", "plain_np", "geom_noneg", "geom", "open_noneg", "open_np", "open_geom", "geom[geom-cells]",
                "probe_geom"):
        assert 0.0 <= m["icr"][arm] <= 1.0, arm
    assert set(m["fidelity"]) >= {"plain", "geom", "chance"}
    assert m["n_samples"] == 4 and m["seconds"] > 0
    assert m["quality"]["annotator_heldout"]["cells_clean"]["n_images"] == 100
    assert m["quality"]["annotations_written"]["n_images"] == 200
    # The scorer is calibrated on the concept-free base model's samples (2 x samples, other seeds).
    sc = m["scorer_calibration"]
    assert sc["calibrated"] and sc["n_base_samples"] == 8 and sc["base_flagged"] <= 0.05
    assert sc["threshold"] >= sc["f1_threshold"] and 0.0 <= m["icr"]["base"] <= 0.05
    for f in ("report.md", "icr.png", "grids/plain.png", "grids/open_geom.png", "models/geom/model/unet/config.json"):
        assert (out / f).is_file(), f
    assert "| geom |" in (out / "report.md").read_text()
    assert set(m["targets"]) >= {"icr.geom <= 0.2 x icr.plain", "icr.plain >= 0.4", "demo seconds <= 1200"}
    assert all(isinstance(v, bool) for v in m["targets"].values())
    assert "cells_vs_asked" in m["icr_detail"]["probe_geom"]
    tl = m["binding"]["tag_localisation"]
    assert set(tl) == {"300", "500", "700", "900"} and all(r["in"] >= 0 and r["out"] >= 0 for r in tl.values())
    assert "Binding probe" in (out / "report.md").read_text()
    assert m["workers"] == 2
    # plain and geom fine-tune the shipped base (geom re-weighted); the text encoder stays frozen
    for name, alpha in (("plain", None), ("geom", 2.0)):
        state = sorted((out / "models" / name / "checkpoints").glob("step-*/trainer.json"))[-1]
        cfg = json.loads(state.read_text())["config"]
        assert cfg["model"]["pretrained"] == "builtin:base32" and cfg["train"]["reweight_alpha"] == alpha
        assert cfg["train"]["train_text_encoder"] is False
    # Rerunning resumes: every stage is found done and the metrics are reproduced.
    assert main(["demo", "--out", str(out), "n_train=200", "n_heldout=100", "steps=3", "samples=4",
                 "classifier_steps=20", "sample_steps=2", "batch_size=4", "threads=2",
                 "extra_negatives=[geom-cells]", "n_aux=100", "reweight_alpha=2.0"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["icr"] == m["icr"]
