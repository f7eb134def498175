"""The CLI wiring and a miniature end-to-end demo (numbers meaningless, files and keys checked)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from geomerase.cli import build_parser, main
from geomerase.core.config import field_docs


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "geomerase", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "data", "classifier", "annotate", "train", "sample", "fetch-tokenizer"):
        assert cmd in out.stdout


def test_cli_top_level_help_imports_no_config_module():
    code = ("import sys; from geomerase.cli import build_parser; build_parser().format_help(); "
            "assert 'torch' not in sys.modules and 'geomerase.demo' not in sys.modules, 'imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _sub_parsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.format_help()  # adds its options
                yield sub
                yield from _sub_parsers(sub)


def test_cli_every_flag_has_help():
    for sub in _sub_parsers(build_parser()):
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{sub.prog} {action.option_strings or action.dest}: no help"


def test_cli_flags_and_help_come_from_the_configs(capsys):
    from geomerase.core.classifiers import PatchClassifierConfig
    from geomerase.core.geometry import GeometryConfig
    from geomerase.demo import DemoConfig

    for argv, doc in ((["annotate", "--help"], field_docs(GeometryConfig)["overlap_threshold"]),
                      (["demo", "--help"], field_docs(DemoConfig)["ratio"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert " ".join(doc.split()) in " ".join(capsys.readouterr().out.split()), argv
    geometry = GeometryConfig()
    a = build_parser().parse_args(["annotate", "--input", "x", "--out", "y"])
    assert (a.grid, a.overlap_threshold, a.mode) == (geometry.grid, geometry.overlap_threshold, geometry.mode)
    a = build_parser().parse_args(["classifier", "train", "--input", "x", "--out", "y"])
    pcfg = PatchClassifierConfig()
    assert (a.resolution, a.grid, a.width) == (pcfg.resolution, pcfg.grid, pcfg.width)
    assert build_parser().parse_args(["demo"]).out is None  # the config's out (YAML or DemoConfig.out)


def test_cli_bad_demo_key_is_an_error(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_demo_lora_setting_reaches_both_fine_tunes(tmp_path):
    from pathlib import Path

    from geomerase.core.config import load_config
    from geomerase.demo import DemoConfig, _train_rc

    cfg = load_config(DemoConfig, None, [f"out={tmp_path}", "lora.rank=8", "lr=0.005"])
    rc = _train_rc(cfg, Path(tmp_path) / "m", "x/*.tar", cfg.captions, None)
    assert (rc.train.lora.rank, rc.train.lr, rc.train.train_text_encoder) == (8, 0.005, False)
    assert _train_rc(DemoConfig(), Path(tmp_path), "x/*.tar", cfg.captions, None).train.lora.rank == 0


def test_miniature_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "n_train=200", "n_heldout=100", "steps=3", "samples=4",
               "classifier_steps=20", "sample_steps=2", "batch_size=4", "threads=2", "extra_negatives=[geom-cells]",
               "n_aux=100", "reweight_alpha=2.0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for arm in ("plain", "plain_np", "geom_noneg", "geom", "open_noneg", "open_np", "open_geom", "geom[geom-cells]",
                "probe_geom", "probe_scene", "open_plain", "open_plain_np"):
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
    assert "cells_vs_asked" in m["icr_detail"]["probe_geom"] and "cells_vs_asked" in m["icr_detail"]["probe_scene"]
    assert "| open_plain_np | plain | open | qr code |" in (out / "report.md").read_text()
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
