"""ICR with its Wilson interval, and comparisons decided on the intervals."""
import pytest

from geomerase.core.metrics import clearly_below, difference_interval, icr, wilson_interval


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


def test_difference_interval_is_newcombes_hybrid_score_interval():
    def of(k, n=64):
        return icr([True] * k + [False] * (n - k))
    # Newcombe (1998), Table II, example (h): 56/70 vs 48/80 -> 0.2000 (0.0524, 0.3339) by method 10
    r = difference_interval(of(56, 70), of(48, 80))
    assert r["diff"] == pytest.approx(0.2)
    assert r["ci95"] == pytest.approx([0.0524, 0.3339], abs=1e-4)
    # 0/64 vs 5/64: intervals overlap (not clearly_below) yet the difference's interval excludes 0
    z, five = of(0), of(5)
    assert not clearly_below(z, five)
    assert difference_interval(z, five)["ci95"][1] < 0
    assert difference_interval(of(10), of(12))["ci95"][0] < 0 < difference_interval(of(10), of(12))["ci95"][1]
