"""compare.stats against hand-computed values with tabulated t quantiles.

t(0.975, df): 12.706205 (1), 4.302653 (2), 3.182446 (3), 2.776445 (4), from printed tables.
"""
import math

import pytest

from compare import stats


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


T975_DF2 = 4.302653


def test_paired_interval_by_hand_and_where_welch_sees_only_noise():
    # seed i of both frameworks: differences 0.03, 0.04, 0.02 -> mean 0.03, sd 0.01, df 2
    a, b = [0.80, 0.82, 0.81], [0.83, 0.86, 0.83]
    paired = stats.paired_diff_ci(a, b)
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert paired.method == "paired t" and paired.df == 2 and (paired.n_a, paired.n_b) == (3, 3)
    assert (paired.diff, paired.lo, paired.hi) == pytest.approx((0.03, 0.03 - half, 0.03 + half), abs=1e-6)
    assert stats.verdict(paired, "torch", "tensorflow") == "tensorflow better by 3.00 pts"
    # the same six numbers as unpaired samples: the seed-to-seed spread swamps the difference
    welch = stats.welch_diff_ci(a, b)
    assert welch.lo < 0 < welch.hi and stats.verdict(welch, "torch", "tensorflow") == "within seed noise"


def test_seed_diff_ci_pairs_by_seed_and_falls_back_to_welch_only_without_pairs():
    a = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.99}  # seed 3 has no partner: left out of the pairs
    b = {2: 0.83, 0: 0.83, 1: 0.86}
    ci = stats.seed_diff_ci(a, b)
    assert ci.method == "paired t" and ci.n_a == 3 and ci.diff == pytest.approx(0.03)
    unpaired = stats.seed_diff_ci({0: 0.80, 1: 0.82}, {2: 0.83, 3: 0.86})
    assert unpaired.method == "Welch t" and unpaired.diff == pytest.approx(0.035)
    assert stats.seed_diff_ci({0: 0.8, 1: None}, {0: 0.9, 1: 0.95}).n_a == 1  # a failed run pairs with nothing
    same_shift = stats.paired_diff_ci([0.8, 0.7], [0.9, 0.8])  # every seed 10 points up: no spread
    assert (same_shift.lo, same_shift.hi) == pytest.approx((0.1, 0.1))
    assert stats.verdict(same_shift, "a", "b") == "b better by 10.00 pts"
    with pytest.raises(ValueError):
        stats.paired_diff_ci([0.8], [0.9, 0.8])


def test_paired_ratio_is_the_median_of_per_seed_ratios_with_a_t_interval_on_logs():
    a = {0: 1000.0, 1: 2000.0, 2: 1000.0, 3: 500.0}  # seed 3 unpaired
    b = {0: 1000.0, 1: 2200.0, 2: 1210.0}  # ratios 1.0, 1.1, 1.21: logs 0, l, 2l with l = ln 1.1
    ratio = stats.paired_ratio_ci(a, b)
    log = math.log(1.1)  # mean of the logs = l, their sd = l
    half = T975_DF2 * log / math.sqrt(3)
    assert ratio.median == pytest.approx(1.1) and ratio.seeds == 3
    assert (ratio.lo, ratio.hi) == pytest.approx((math.exp(log - half), math.exp(log + half)))
    assert (ratio.seed_min, ratio.seed_max) == pytest.approx((1.0, 1.21))
    one = stats.paired_ratio_ci({0: 100.0}, {0: 90.0})
    assert one.median == pytest.approx(0.9) and math.isnan(one.lo) and one.seeds == 1
    assert stats.paired_ratio_ci({0: 100.0}, {1: 90.0}).seeds == 0


def test_seed_spread_is_the_pooled_standard_deviation_and_widens_the_verdict_only_inside_it():
    # sd(0.80, 0.82, 0.81) = 0.01, sd(0.83, 0.86, 0.83) = sqrt(0.0003): pooled sqrt((0.0001 + 0.0003) / 2)
    spread = stats.seed_spread([0.80, 0.82, 0.81], [0.83, 0.86, 0.83, None])
    assert spread == pytest.approx(math.sqrt(0.0002))
    assert math.isnan(stats.seed_spread([0.8], [0.8, 0.9]))
    ci = stats.DiffCI(diff=0.002, lo=0.001, hi=0.003, df=2, n_a=3, n_b=3, method="paired t")
    assert stats.verdict(ci, "a", "b", spread=0.003).startswith("within seed noise (b +0.20 pts")
    assert stats.verdict(ci, "a", "b", spread=0.0029) == "b better by 0.20 pts"  # the interval reaches past it
    assert stats.verdict(ci, "a", "b") == "b better by 0.20 pts"  # no spread known: significance alone
