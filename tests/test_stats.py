"""docs/stats.py, the comparison behind the tables, against textbook values."""
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"))
import stats  # noqa: E402 (docs/stats.py)

A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_t_quantiles_match_the_printed_table():
    found = [round(stats.t_quantile(p, df), 3) for p, df in
             [(0.975, 10), (0.975, 4), (0.8, 8), (0.95, 1), (0.995, 30)]]
    assert found == [2.228, 2.776, 0.889, 6.314, 2.750]


def test_welch_matches_the_textbook_example_and_its_own_definition():
    """Welch's first example (t = -2.46, p = 0.021); the interval and the detectable
    difference rebuilt from the standard error and the t quantiles."""
    r = stats.welch(A1, A2)
    assert (round(r["t"], 2), round(r["df"], 1), round(r["p"], 3)) == (-2.46, 25.0, 0.021)
    se = math.sqrt(statistics.variance(A1) / 15 + statistics.variance(A2) / 15)
    assert math.isclose(r["high"] - r["low"], 2 * stats.t_quantile(0.975, r["df"]) * se)
    assert math.isclose(r["detectable"], (stats.t_quantile(0.975, r["df"])
                                          + stats.t_quantile(0.8, r["df"])) * se)


def test_one_sample_matches_students_sleep_data():
    """Student's (1908) sleep data, paired: the extra hours of drug 2 over drug 1 in
    10 patients; R's t.test gives t = 4.062, df = 9, p = 0.00283, 95% interval 0.700
    to 2.460."""
    gain = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]
    r = stats.one_sample(gain)
    assert (round(r["mean"], 2), round(r["p"], 5), round(r["low"], 3), round(r["high"], 3)) == (
        1.58, 0.00283, 0.700, 2.460)


def test_seeds_needed_is_the_fewest_seeds_whose_welch_detects_the_difference():
    """Rebuilt by welch() itself on samples with the same spreads, n seeds each: with
    n = seeds_needed its detectable difference is within the target, with n - 1 not."""
    a, b = A1[:5], A2[:5]
    for target in (1.5, 3.0, welch_detectable(a, b)):
        n = stats.seeds_needed(a, b, target)
        assert welch_detectable(spread_like(a, n), spread_like(b, n)) <= target + 1e-9
        assert n == 2 or welch_detectable(spread_like(a, n - 1), spread_like(b, n - 1)) > target
    assert stats.seeds_needed(a, b, welch_detectable(a, b)) == 5


def welch_detectable(a, b):
    return stats.welch(a, b)["detectable"]


def spread_like(x, n):
    """n values with x's variance (mean 0): +-s alternating, scaled so the variance is equal."""
    v = [(-1) ** i for i in range(n)]
    scale = math.sqrt(statistics.variance(x) / statistics.variance(v))
    return [scale * e for e in v]
