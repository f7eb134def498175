"""``geomerase bench compare``: exact ICR, tolerant FID/fidelity, missing cells, clear errors."""
from __future__ import annotations

import copy
import json

import pytest

from geomerase.benchmarks.compare_results import compare, load_results, max_abs_diff
from geomerase.cli import main as cli

RUN = {"qr": {"heldout": {"plain": {"icr": 0.25, "fid": 5.7, "fidelity": 0.5, "n": 128},
                          "geom": {"icr": 0.0625, "fid": 5.4, "fidelity": 0.55, "n": 128}},
              "open": {"plain": {"icr": 0.5, "fid": 21.0, "fidelity": None, "n": 128}}}}


def test_identical_runs_are_the_same_table(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(RUN))
    (tmp_path / "b.json").write_text(json.dumps(RUN))
    assert compare(load_results(tmp_path / "a"), load_results(tmp_path / "b.json")) == []
    assert cli(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0


def test_differences_are_listed_with_their_place(tmp_path, capsys):
    other = copy.deepcopy(RUN)
    other["qr"]["heldout"]["geom"]["icr"] = 0.0703125  # one more flagged sample
    other["qr"]["heldout"]["plain"]["fid"] = 5.7 + 1e-4
    del other["qr"]["open"]["plain"]
    d = {x.where: (x.a, x.b) for x in compare(RUN, other, tol=0.0)}
    assert d == {"qr/heldout/geom/icr": (0.0625, 0.0703125), "qr/heldout/plain/fid": (5.7, 5.7 + 1e-4),
                 "qr/open/plain": (RUN["qr"]["open"]["plain"], None)}
    # A float tolerance forgives the FID wobble, never an ICR count.
    assert {x.where for x in compare(RUN, other, tol=1e-3)} == {"qr/heldout/geom/icr", "qr/open/plain"}
    assert max_abs_diff(RUN, other, "icr") == pytest.approx(0.0078125)
    (tmp_path / "a.json").write_text(json.dumps(RUN))
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert cli(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tol", "1e-3"]) == 1
    assert "DIFFERS qr/heldout/geom/icr" in capsys.readouterr().out


def test_missing_or_broken_results_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        load_results(tmp_path)
