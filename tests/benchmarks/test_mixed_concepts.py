"""The mixed-concept benchmark end to end on tiny sizes: arms, negatives, per-concept scores, resume."""
from __future__ import annotations

import json

import pytest

from geomerase.benchmarks.mixed_concepts import MixedConfig, arms, erasing_settings, run

CONCEPTS = ["qr", "watermark", "text"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    cfg = MixedConfig(out=str(out), concepts=CONCEPTS, n_train=100, n_heldout=8, samples=4, steps=3, preset="smoke",
                      workers=1, threads=1)
    return cfg, out, run(cfg)


def test_every_concept_is_scored_in_every_arm(mixed_run):
    cfg, out, res = mixed_run
    want = {"plain", "plain_np", "geom_noneg", "geom_np", "geom", *(f"geom_{c}" for c in CONCEPTS)}
    assert set(res["icr_any"]) == want
    for c in CONCEPTS:
        assert set(res["icr"][c]) == want and all(r["n"] == 4 for r in res["icr"][c].values())
        assert 0.0 <= res["scorers"][c]["oracle_flagged"] <= 0.05 + 1e-9  # the false-positive bound holds
        assert {"precision", "recall"} <= set(res["annotation"][c])
    # any-concept ICR is at least each concept's
    for a in want:
        assert res["icr_any"][a]["k"] >= max(res["icr"][c][a]["k"] for c in CONCEPTS)
    assert json.loads((out / "results.json").read_text())["icr"] == res["icr"]
    report = (out / "report.md").read_text()
    assert all(f"| geom_{c} |" in report for c in CONCEPTS) and (out / "icr.png").stat().st_size > 0


def test_the_annotation_names_each_concept_found(mixed_run):
    from geomerase.data.shards import iter_samples

    _, out, _ = mixed_run
    found = set()
    for s in iter_samples(str(out / "annotated" / "*.tar")):
        for c, v in s.meta["annotation"]["concepts"].items():
            if v["cells"]:
                found.add(c)
                assert f"{v['concept_name']} <l" in s.caption
    assert found  # the tiny annotators still find something


def test_negatives_name_all_concepts_or_one():
    cfg = MixedConfig(concepts=CONCEPTS, preset="smoke")
    specs = {a.name: a for group in arms(cfg, ["a red circle"] * 4, erasing_settings(cfg)).values() for a in group}
    cells = " ".join(f"<l{i}>" for i in range(16))
    assert specs["geom"].negatives == [f"qr code {cells}, watermark {cells}, text {cells}"]
    assert specs["geom_text"].negatives == [f"text {cells}"] and specs["plain_np"].negatives == ["qr code, watermark, text"]
    assert specs["calibration"].negatives == [""]
