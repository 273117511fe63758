"""The seeded comparison: Welch's t-test, gains under soft and hard labels, the printed table."""
import math
import statistics

import pytest

from engine.report import compare, results_table, welch_test


def test_welch_matches_the_textbook_formula():
    a, b = [80.1, 81.3, 79.8, 80.9, 81.0], [78.2, 79.9, 77.5, 78.8, 80.1]
    va, vb = statistics.variance(a), statistics.variance(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va / 5 + vb / 5)
    df = (va / 5 + vb / 5) ** 2 / ((va / 5) ** 2 / 4 + (vb / 5) ** 2 / 4)
    res = welch_test(a, b)
    assert res["t"] == pytest.approx(t) and res["df"] == pytest.approx(df) and res["n"] == [5, 5]
    assert 0.0 < res["p"] < 0.05  # clearly separated means
    same = welch_test(a, [x + 0.01 for x in a])
    assert same["p"] > 0.9  # indistinguishable


def test_welch_needs_two_runs_per_side():
    assert welch_test([80.0], [79.0, 78.0]) is None


def _summary(top1s, hard=None):
    s = {"top1": top1s[0], "top5": 99.0, "runs": [{"seed": i, "top1": v} for i, v in enumerate(top1s)]}
    if len(top1s) > 1:
        s["top1_mean"], s["top1_std"] = statistics.fmean(top1s), statistics.stdev(top1s)
    if hard:
        s["hard"] = {"top1": hard[0], "top1s": hard}
    return s


def test_compare_reports_soft_and_hard_gains_and_tests():
    res = {"method": "scdd", "ipc": 10, "num_classes": 10,
           "protocol": {"label_mode": "online", "seeds": [0, 1, 2]},
           "distilled": _summary([70.0, 71.0, 72.0], hard=[60.0, 61.0, 62.0]),
           "random_real": _summary([75.0, 76.0, 77.0], hard=[66.0, 65.0, 64.0])}
    compare(res)
    assert res["gain_over_random"] == pytest.approx(-5.0)
    assert res["gain_over_random_hard"] == pytest.approx(-4.0)
    assert res["welch"]["soft"]["p"] < 0.05 and res["welch"]["hard"]["n"] == [3, 3]
    table = results_table(res)
    assert "71.00 +- 1.00" in table and "65.00 +- 1.00" in table
    assert "online labels: -5.00 points (Welch t-test p = " in table and "hard labels: -4.00" in table


def test_single_seed_has_a_gain_but_no_test():
    res = {"protocol": {"label_mode": "online", "seeds": [0]}, "distilled": _summary([70.0]),
           "random_real": _summary([72.5])}
    compare(res)
    assert res["gain_over_random"] == pytest.approx(-2.5) and "welch" not in res
    assert "p =" not in results_table(res)
