"""ICR with its Wilson interval, and comparisons decided on the intervals."""
import pytest

from geomerase.core.metrics import clearly_below, icr, wilson_interval


def test_wilson_interval_contains_the_estimate_and_narrows_with_n():
    lo, hi = wilson_interval(16, 64)
    assert lo < 0.25 < hi
    lo2, hi2 = wilson_interval(160, 640)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 64)[0] == 0.0 and wilson_interval(64, 64)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_icr_counts_flags():
    r = icr([True, False, True, False])
    assert r["icr"] == 0.5 and r["k"] == 2 and r["n"] == 4 and r["ci95"][0] < 0.5 < r["ci95"][1]


@pytest.mark.parametrize("ka,kb,want", [(2, 30, True), (20, 30, False), (30, 2, False), (10, 22, False)])
def test_clearly_below_needs_disjoint_intervals(ka, kb, want):
    a, b = icr([True] * ka + [False] * (64 - ka)), icr([True] * kb + [False] * (64 - kb))
    assert clearly_below(a, b) is want
    # 10/64 vs 22/64 is a lower point estimate whose intervals still overlap: not counted.
    if (ka, kb) == (10, 22):
        assert a["icr"] < b["icr"] and a["ci95"][1] >= b["ci95"][0]
