"""compare.stats against hand-computed and tabulated values."""
import math

import pytest

from compare import stats


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228),
                                          (30, 2.042), (120, 1.980)])
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_other_levels_and_symmetry():
    assert stats.t_quantile(0.95, 5) == pytest.approx(2.015, abs=5e-4)
    assert stats.t_quantile(0.995, 1) == pytest.approx(63.657, abs=5e-3)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    # large df tends to the normal quantile
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    # fractional df (Welch) lies between its integer neighbours
    assert stats.t_quantile(0.975, 4) < stats.t_quantile(0.975, 3.5) < stats.t_quantile(0.975, 3)


def test_t_cdf_known_values():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert stats.t_cdf(-1.0, 1) == pytest.approx(0.25)
    assert stats.t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(6)))  # closed form for df=2


def test_mean_and_sample_std_by_hand():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    # squares of deviations: 2.25 + 0.25 + 0.25 + 2.25 = 5, / (4-1)
    assert stats.sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(stats.sample_std([3.0]))
    assert stats.mean([1.0, None, float("nan"), 3.0]) == 2.0  # missing values are ignored
    assert math.isnan(stats.mean([]))


def test_mean_ci_by_hand():
    m, lo, hi = stats.mean_ci([1, 2, 3, 4])
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n)
    assert (m, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half), abs=1e-5)
    m, lo, hi = stats.mean_ci([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)


def test_welch_interval_by_hand():
    a, b = [0.80, 0.81, 0.82], [0.85, 0.86, 0.87]
    ci = stats.welch_diff_ci(a, b)
    # var/n = 0.0001/3 on each side; df = (2v)^2 / (2 v^2 / 2) = 4; se = sqrt(2 * 0.0001 / 3)
    se = math.sqrt(2 * 0.0001 / 3)
    assert ci.diff == pytest.approx(0.05)
    assert ci.df == pytest.approx(4.0)
    assert ci.lo == pytest.approx(0.05 - 2.776445 * se, abs=1e-6)
    assert ci.hi == pytest.approx(0.05 + 2.776445 * se, abs=1e-6)
    assert stats.verdict(ci, "torch", "tensorflow") == "tensorflow better by 5.00 pts"
    flipped = stats.welch_diff_ci(b, a)
    assert stats.verdict(flipped, "torch", "tensorflow") == "torch better by 5.00 pts"


def test_welch_unequal_variances_df():
    a, b = [1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0]
    ci = stats.welch_diff_ci(a, b)
    va, vb = 1.0 / 3, (20 / 3) / 4  # s^2/n: s_a^2 = 1, s_b^2 = 20/3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert ci.df == pytest.approx(df)
    assert ci.diff == pytest.approx(2.0)
    assert stats.verdict(ci, "a", "b") == "within seed noise"  # wide interval contains 0


def test_verdict_edge_cases():
    assert stats.verdict(stats.welch_diff_ci([0.8], [0.9]), "torch", "tensorflow") == "one seed: no noise estimate"
    assert stats.verdict(stats.welch_diff_ci([], [0.9, 0.8]), "torch", "tensorflow") == "no ok runs for torch"
    same = stats.welch_diff_ci([0.8, 0.8], [0.8, 0.8])  # zero spread, zero difference
    assert (same.lo, same.hi) == (0.0, 0.0) and stats.verdict(same, "a", "b") == "within seed noise"
    shifted = stats.welch_diff_ci([0.8, 0.8], [0.9, 0.9])  # zero spread, real difference
    assert stats.verdict(shifted, "a", "b") == "b better by 10.00 pts"


def test_median_with_ci_uses_order_statistics():
    median, lo, hi = stats.median_with_ci([5.0, 1.0, 3.0])
    assert (median, lo, hi) == (3.0, 1.0, 5.0)  # fewer than 6 values: the full range
    values = list(range(1, 101))
    median, lo, hi = stats.median_with_ci(values)
    assert median == 50.5 and lo < median < hi and hi - lo < 30
    assert all(math.isnan(v) for v in stats.median_with_ci([]))
