"""The erasing benchmark end to end on the smoke preset (tiny sizes): schema, arms, files, resume."""
from __future__ import annotations

import json
import time

import pytest
import torch

from geomerase.benchmarks.erasing import ARMS, PRESETS, PROMPT_SETS, ErasingConfig, erasing_config
from geomerase.benchmarks.erasing_run import run_erasing
from geomerase.core.config import ConfigError

TINY = ["n_train=48", "n_heldout=8", "n_aux=24", "image_size=32", "samples=4", "sweep_samples=2", "classifier_steps=5",
        "steps=2", "batch_size=4", "sample_steps=2", "grid_columns=2", "base_steps=2"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "erasing"
    cfg = erasing_config("smoke", TINY, out=str(out), concepts=["qr"])
    t0 = time.time()
    results = run_erasing(cfg)
    return cfg, out, results, time.time() - t0


def test_results_schema_and_all_arms(smoke_run):
    cfg, out, results, _ = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) == {"qr"}
    assert set(on_disk["qr"]) == set(PROMPT_SETS) == {"heldout", "open"}
    expected_arms = {"plain", "np", "sld", "existence", "geom", "geom_reweight", "geom_mr", "esd", "oracle"}
    assert set(ARMS) == expected_arms
    for pset in PROMPT_SETS:
        assert set(on_disk["qr"][pset]) == expected_arms
        for arm, row in on_disk["qr"][pset].items():
            assert set(row) == {"icr", "fid", "fidelity", "n"}, (pset, arm)
            assert row["n"] == cfg.samples and 0.0 <= row["icr"] <= 1.0 and row["fid"] >= 0.0
            assert (row["fidelity"] is None) == (pset == "open")


def test_files_written(smoke_run):
    cfg, out, _, _ = smoke_run
    report = (out / "report.md").read_text()
    assert "## qr" in report and "| geom_mr |" in report and "Targets:" in report and "Ablation" in report
    for name in ("icr.png", "details.json", "timings.json", "figures/heatmap_qr.png", "figures/guidance_qr.png",
                 "figures/grid_qr_heldout.png", "figures/grid_qr_open.png", "figures/arms/qr_open_sld.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    details = json.loads((out / "details.json").read_text())
    row = details["concepts"]["qr"]["scores"]["heldout"]["geom"]
    assert len(row["heatmap"]) == 4 and len(row["heatmap"][0]) == 4 and len(row["ci95"]) == 2
    assert row["fr"] == pytest.approx(row["fid"] * row["icr"])
    curve = details["concepts"]["qr"]["icr_vs_guidance"]
    assert set(curve) == {"3", "6"} and set(curve["6"]) == {"np", "geom"}
    # The scorer's threshold per prompt set: never below the F1 one, and holding the oracle's
    # calibration samples (other seeds) to the false-positive bound.
    th = details["concepts"]["qr"]["scorer_thresholds"]
    assert set(th) == set(PROMPT_SETS)
    for pset, t in th.items():
        assert t["threshold"] >= t["f1_threshold"] and t["flagged"] <= t["flagged_at_f1"]
        assert t["flagged"] <= cfg.scorer_fpr + 1e-9 and t["n"] == cfg.calibration_samples, (pset, t)
    assert {"scorer", "scorer_open", "scorer_f1", "annotator"} <= set(details["concepts"]["qr"]["detectors"])
    assert "Scorer threshold: F1-calibrated" in report
    assert len(list((out / "shared" / "oracle-base" / "samples" / "calibration").glob("heldout-*.safetensors"))) == 1
    assert details["targets"]["qr"] and all({"target", "met", "measured"} <= set(t) for t in details["targets"]["qr"])
    # base_steps > 0: one shared base model, and every data-removal arm fine-tuned from it
    assert (out / "shared" / "models" / "base" / "model" / "geomerase.json").is_file()
    for arm in ("plain", "geom", "existence", "geom_reweight"):
        state = sorted((out / "qr" / "models" / arm / "checkpoints").glob("step-*/trainer.json"))[-1]
        assert json.loads(state.read_text())["config"]["model"]["pretrained"].endswith("shared/models/base/model"), arm


def test_rerun_resumes_without_recomputing(smoke_run):
    cfg, out, results, first = smoke_run
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    model = out / "qr" / "models" / "geom" / "model" / "geomerase.json"
    before = model.stat().st_mtime_ns
    t0 = time.time()
    again = run_erasing(cfg)
    assert again == results
    assert model.stat().st_mtime_ns == before
    assert stamp and all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert time.time() - t0 < first


def test_config_errors_and_presets():
    assert {"smoke", "cpu", "gpu"} <= set(PRESETS)
    cpu = erasing_config("cpu")
    assert cpu.samples >= 128 and cpu.concepts == ["qr", "watermark", "text"]
    with pytest.raises(ConfigError, match="unknown preset"):
        erasing_config("huge")
    with pytest.raises(ConfigError, match="unknown config key"):
        erasing_config("smoke", ["stepz=3"])
    with pytest.raises(ConfigError, match="n_heldout"):
        erasing_config("smoke", ["samples=100", "n_heldout=10"])
    with pytest.raises(ConfigError, match="concepts"):
        ErasingConfig(concepts=["logo"]).validate()
    with pytest.raises(ConfigError, match="inception_weights: '/nope.pt' is not a file"):
        erasing_config("smoke", ["inception_weights=/nope.pt"])
    with pytest.raises(ConfigError, match="scorer_fpr"):
        erasing_config("smoke", ["scorer_fpr=1.0"])
    with pytest.raises(ConfigError, match="overlay_sizes 'huge'"):
        erasing_config("smoke", ["overlay_sizes=huge"])


def test_inception_fid_is_scored_per_arm_when_weights_are_given(smoke_run, monkeypatch):
    # torchmetrics and Inception weights are not installable on these machines: the metric is
    # replaced by a stand-in that records its inputs, to check what the benchmark feeds it.
    import dataclasses

    from geomerase.benchmarks import erasing_report

    cfg, out, _, _ = smoke_run
    calls = []

    def fake_fid(images, reference, weights):
        calls.append((tuple(images.shape), tuple(reference.shape), weights, images.dtype))
        return float(len(calls))

    monkeypatch.setattr(erasing_report, "inception_fid", fake_fid)
    with_weights = dataclasses.replace(cfg, inception_weights="/models/pt_inception.pth")
    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import prompt_sets, sample_files

    lay = Layout.of(cfg)
    scores = erasing_report.score_concept(with_weights, "qr", sample_files(cfg, lay, "qr", prompt_sets(cfg, lay)))
    assert len(calls) == 2 * len(ARMS)
    for shape, ref_shape, weights, dtype in calls:
        assert shape[0] == cfg.samples and shape[1:] == ref_shape[1:] and weights == "/models/pt_inception.pth"
        assert dtype == torch.uint8 and ref_shape[0] == cfg.n_heldout
    values = sorted(scores["scores"][p][a]["fid_inception"] for p in PROMPT_SETS for a in ARMS)
    assert values == [float(i) for i in range(1, 2 * len(ARMS) + 1)]
    report = erasing_report.render_report(with_weights, {"qr": scores}, {}, 1.0)
    assert "Inception FID (held-out / open; torchmetrics, weights `pt_inception.pth`)" in report


def test_annotator_and_scorers_train_on_their_own_splits(tmp_path):
    from pathlib import Path

    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import plan

    cfg = erasing_config("smoke", ["concepts=[qr]"], out=str(tmp_path))
    tasks = plan(cfg, Layout(Path(cfg.out)), lambda: {p: [""] * cfg.samples for p in PROMPT_SETS})
    split = lambda task: Path(tasks[task].job.args[0]).parent.name  # noqa: E731
    assert split("qr/annotate") == "qr_train"
    assert split("qr/annotator") == "qr_annot"
    assert split("qr/scorer") == split("qr/attributes") == "qr_scorer"
    seeds = {tasks[f"qr/data/{s}"].job.args[4] for s in ("train", "heldout", "annot", "scorer")}
    assert len(seeds) == 4  # four disjoint seeds: no image is in two splits


def test_overlay_size_profile_reaches_the_concepts_it_lists(tmp_path):
    from pathlib import Path

    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import plan

    cfg = erasing_config("smoke", ["concepts=[qr,text]", "overlay_sizes=lowres"], out=str(tmp_path))
    tasks = plan(cfg, Layout(Path(cfg.out)), lambda: {p: [""] * cfg.samples for p in PROMPT_SETS})
    for split in ("train", "heldout", "annot", "scorer"):
        assert tasks[f"text/data/{split}"].job.args[6] == "lowres"
        assert tasks[f"qr/data/{split}"].job.args[6] == "default"  # lowres does not list qr: its data is unchanged


def test_arms_fine_tune_a_given_base_with_its_unconditional_branch(tmp_path):

    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import plan

    cfg = erasing_config("smoke", ["concepts=[qr]", "pretrained.qr=builtin:base32"], out=str(tmp_path))
    tasks = plan(cfg, Layout.of(cfg), lambda: {p: [""] * cfg.samples for p in PROMPT_SETS})
    assert "base/train" not in tasks
    for arm in ("plain", "geom", "existence", "geom_reweight"):
        train = tasks[f"qr/train/{arm}"].job.args[0].train
        assert tasks[f"qr/train/{arm}"].job.args[0].model.pretrained == "builtin:base32"
        assert train.uncond_prior and not train.train_text_encoder, arm
    assert tasks["oracle-base32/train"].job.args[0].train.uncond_prior
    mr = tasks["qr/train/geom_mr"].job.args[0]
    assert mr.train.mode == "model-removal" and not mr.train.uncond_prior
    off = erasing_config("smoke", ["concepts=[qr]", "pretrained.qr=builtin:base32", "uncond_prior=false"],
                         out=str(tmp_path))
    tasks = plan(off, Layout.of(off), lambda: {p: [""] * off.samples for p in PROMPT_SETS})
    assert not tasks["qr/train/plain"].job.args[0].train.uncond_prior
    with pytest.raises(ConfigError, match="exclude each other"):
        erasing_config("smoke", ["concepts=[qr]", "pretrained.qr=builtin:base32", "base_steps=10"])
    with pytest.raises(ConfigError, match=r"no base for concept\(s\) \['text'\]"):
        erasing_config("smoke", ["concepts=[qr,text]", "pretrained.qr=builtin:base32"])


def test_alignment_weight_reaches_only_the_arms_with_location_tokens(tmp_path):
    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import plan

    cfg = erasing_config("smoke", ["concepts=[qr]", "attn_align_weight=0.5"], out=str(tmp_path))
    tasks = plan(cfg, Layout.of(cfg), lambda: {p: [""] * cfg.samples for p in PROMPT_SETS})
    weight = {arm: tasks[f"qr/train/{arm}"].job.args[0].train.attn_align_weight
              for arm in ("plain", "existence", "geom", "geom_reweight", "geom_mr")}
    assert weight == {"plain": 0.0, "existence": 0.0, "geom": 0.5, "geom_reweight": 0.5, "geom_mr": 0.5}
    assert erasing_config("smoke").attn_align_weight == 0.0
    with pytest.raises(ConfigError, match="attn_align_weight"):
        erasing_config("smoke", ["attn_align_weight=-1"])


def test_each_concept_fine_tunes_its_own_base_at_its_resolution(tmp_path):
    """qr on the 32 px base, watermark and text on the 64 px one: classifiers at each base's
    resolution, one oracle per base (shared by the concepts on it), only the arms asked for."""
    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import plan

    cfg = erasing_config("smoke", ["concepts=[qr,watermark,text]", "pretrained.qr=builtin:base32",
                                   "pretrained.watermark=builtin:base64", "pretrained.text=builtin:base64",
                                   "arms=[plain,np,sld,geom,oracle]"], out=str(tmp_path))
    assert PRESETS["smoke"].get("pretrained") is None  # overrides never leak into the preset table
    tasks = plan(cfg, Layout.of(cfg), lambda: {p: [""] * cfg.samples for p in PROMPT_SETS})
    for c, res in (("qr", 32), ("watermark", 64), ("text", 64)):
        assert tasks[f"{c}/annotator"].job.args[1] == res and tasks[f"{c}/scorer"].job.args[1] == res, c
        assert tasks[f"{c}/train/plain"].job.args[0].model.pretrained == cfg.pretrained[c]
    assert {k for k in tasks if k.endswith("/train") and k.startswith("oracle")} == {"oracle-base32/train",
                                                                                    "oracle-base64/train"}
    assert "oracle-base64/sample/open" in tasks["text/score"].deps
    assert not any(k.endswith(("/esd", "/geom_mr", "/existence", "/geom_reweight")) for k in tasks)
    lay = Layout.of(cfg)
    assert lay.calibration("watermark") == lay.calibration("text") != lay.calibration("qr")


def test_sample_files_are_named_by_their_settings(tmp_path):
    """Another CFG scale, DDIM step count or seed names other files, so a rerun in the same folder
    with changed settings resamples instead of scoring stale images."""
    from geomerase.benchmarks.erasing import Layout
    from geomerase.benchmarks.erasing_run import sample_files

    prompts = {p: [f"a prompt {i}" for i in range(8)] for p in PROMPT_SETS}
    files = {}
    for name, extra in (("base", []), ("cfg", ["guidance_scale=5.0"]), ("steps", ["sample_steps=3"]),
                        ("seed", ["seed=1"]), ("again", [])):
        cfg = erasing_config("smoke", ["concepts=[qr]", *extra], out=str(tmp_path))
        files[name] = sample_files(cfg, Layout.of(cfg), "qr", prompts)
    assert files["again"] == files["base"]
    for name in ("cfg", "steps", "seed"):
        assert files[name]["heldout"]["geom"] != files["base"]["heldout"]["geom"], name
        assert files[name]["calibration"]["open"] != files["base"]["calibration"]["open"], name
    assert files["base"]["heldout"]["np"] != files["base"]["heldout"]["plain"]  # same model, other negative
