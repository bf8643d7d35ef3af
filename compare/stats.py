"""Statistics for the report, from ``scipy.stats``: t intervals, paired and Welch differences, ratios across seeds.

How a comparison is tested follows how the runs were designed:

* The seed pairs the two frameworks' runs (same initial weights, same data
  order, run back to back), so the accuracy difference is a **paired t test
  over seeds** (``scipy.stats.ttest_rel``). Welch's unequal-variance interval
  (``ttest_ind(equal_var=False)``) is used only where runs do not pair (fewer
  than two seeds present on both sides). Why t and not Wilcoxon's signed-rank
  test: with the 3-5 seeds a comparison affords, the signed-rank test cannot
  reach the 5% level at all (its smallest two-sided p-value is 0.25 with 3
  pairs, 0.125 with 4, 0.0625 with 5), so it would call every difference noise.
* A throughput ratio is the **median of the per-seed paired ratios** with a
  **95% t interval across seeds on the log ratios**, back-transformed (log:
  ratios are symmetric on that scale, 0.5x and 2x lie equally far from 1). The
  interval is centred on the geometric mean, which estimates the same ratio as
  the median when run-to-run noise is symmetric on the log scale. Not
  ``scipy.stats.bootstrap``: resampling 3 seeds gives a bootstrap distribution
  with a handful of distinct values, not an interval. Step-level intervals
  (pooled, autocorrelated steps of one run) say nothing about run-to-run spread
  and are only reported as secondary, named as such.
* Statistically significant is not the same as large: the pairing makes the
  paired interval narrow, so a difference far smaller than what changing the
  seed does to either framework can exclude 0 (3 seeds of seed_cnn: 0.19 pts,
  interval 0.07..0.30, while one framework's accuracy moves by 0.31 pts from
  seed to seed). The verdict therefore also asks whether the difference
  matters next to the **seed spread** (``seed_spread``: the pooled standard
  deviation of each framework's accuracy across seeds) with an equivalence
  test in the two-one-sided-tests sense: a difference whose whole 95%
  interval lies inside +-(seed spread) is read "within seed noise" even when
  the interval excludes 0 (the verdict says so and by how much); only a
  difference whose interval reaches beyond the spread is "better by".
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from common.metrics import median_ci


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(float(value))


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if _is_finite(v)]


def _no_spread(values: Sequence[float]) -> bool:
    """All values equal up to floating-point rounding (0.9 - 0.8 and 0.8 - 0.7 differ in the last bits)."""
    return math.isclose(min(values), max(values), rel_tol=1e-9, abs_tol=1e-12)


def mean(values: Iterable[float | None]) -> float:
    """Arithmetic mean of the finite values (NaN when there are none)."""
    x = _finite(values)
    return float(np.mean(x)) if x else math.nan


def sample_std(values: Iterable[float | None]) -> float:
    """Sample standard deviation (ddof=1) of the finite values; NaN with fewer than two."""
    x = _finite(values)
    return float(np.std(x, ddof=1)) if len(x) >= 2 else math.nan


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean; lo/hi NaN with fewer than two values."""
    x = _finite(values)
    m = mean(x)
    if len(x) < 2:
        return m, math.nan, math.nan
    if _no_spread(x):  # identical values: the interval is the point
        return m, m, m
    lo, hi = scipy_stats.t.interval(confidence, len(x) - 1, loc=m, scale=scipy_stats.sem(x))
    return m, float(lo), float(hi)


@dataclass(frozen=True)
class DiffCI:
    """Difference of means (b - a) with its interval, and how it was tested."""

    diff: float  # mean(b) - mean(a) (paired: the mean of the per-seed differences)
    lo: float  # NaN when there is no noise estimate (fewer than two values or pairs)
    hi: float
    df: float  # degrees of freedom (paired: pairs - 1; Welch-Satterthwaite; inf when there is no spread)
    n_a: int  # values of a used (paired: the number of pairs)
    n_b: int
    method: str = "Welch t"  # "paired t" | "Welch t"


def _interval(result, confidence: float) -> tuple[float, float]:
    with warnings.catch_warnings():  # near-identical values: scipy warns of precision loss, the interval stands
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = result.confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def welch_diff_ci(a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95) -> DiffCI:
    """Welch's interval for mean(b) - mean(a) (unpaired runs, unequal variances)."""
    xa, xb = _finite(a), _finite(b)
    diff = mean(xb) - mean(xa) if xa and xb else math.nan
    if len(xa) < 2 or len(xb) < 2:
        return DiffCI(diff, math.nan, math.nan, math.nan, len(xa), len(xb))
    if _no_spread(xa) and _no_spread(xb):  # no spread on either side: the point
        return DiffCI(diff, diff, diff, math.inf, len(xa), len(xb))
    result = scipy_stats.ttest_ind(xb, xa, equal_var=False)
    lo, hi = _interval(result, confidence)
    return DiffCI(diff, lo, hi, float(result.df), len(xa), len(xb))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> DiffCI:
    """Paired t interval for the mean of b[i] - a[i] (a[i] and b[i] are one seed's two runs)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    differences = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(differences)
    diff = mean(differences) if differences else math.nan
    if n < 2:
        return DiffCI(diff, math.nan, math.nan, math.nan, n, n, "paired t")
    if _no_spread(differences):  # every seed moved by the same amount: the point
        return DiffCI(diff, diff, diff, math.inf, n, n, "paired t")
    result = scipy_stats.ttest_rel(b, a)
    lo, hi = _interval(result, confidence)
    return DiffCI(diff, lo, hi, float(result.df), n, n, "paired t")


def seed_diff_ci(a: Mapping[int, float | None], b: Mapping[int, float | None], confidence: float = 0.95) -> DiffCI:
    """b - a over seeds: paired over the seeds both sides have when there are two or more, else Welch."""
    xa = {s: float(v) for s, v in a.items() if _is_finite(v)}
    xb = {s: float(v) for s, v in b.items() if _is_finite(v)}
    shared = sorted(set(xa) & set(xb))
    if len(shared) >= 2:
        return paired_diff_ci([xa[s] for s in shared], [xb[s] for s in shared], confidence)
    return welch_diff_ci(list(xa.values()), list(xb.values()), confidence)


def seed_spread(a: Iterable[float | None], b: Iterable[float | None]) -> float:
    """Pooled standard deviation across seeds of two frameworks' values: sqrt of the mean of their variances.

    What changing the seed alone does to one framework's result; NaN unless both have two values or more.
    """
    sd_a, sd_b = sample_std(a), sample_std(b)
    return math.sqrt((sd_a ** 2 + sd_b ** 2) / 2) if _is_finite(sd_a) and _is_finite(sd_b) else math.nan


def verdict(ci: DiffCI, name_a: str, name_b: str, scale: float = 100.0, unit: str = "pts",
            spread: float | None = None) -> str:
    """Plain-language reading of a difference of accuracies (b - a, scaled to percentage points).

    ``spread``: the seed spread (``seed_spread``) as the equivalence margin; a difference that excludes 0
    but whose interval lies inside +-spread is within seed noise (see the module docstring).
    """
    if ci.n_a == 0 or ci.n_b == 0:
        missing = name_a if ci.n_a == 0 else name_b
        return f"no ok runs for {missing}"
    if min(ci.n_a, ci.n_b) < 2:
        return "one seed: no noise estimate"
    if ci.lo <= 0.0 <= ci.hi:
        return "within seed noise"
    better = name_b if ci.diff > 0 else name_a
    if _is_finite(spread) and max(abs(ci.lo), abs(ci.hi)) <= float(spread):
        return (f"within seed noise ({better} +{abs(ci.diff) * scale:.2f} {unit}: the 95% interval excludes 0 "
                f"but lies inside the seed spread of {float(spread) * scale:.2f} {unit})")
    return f"{better} better by {abs(ci.diff) * scale:.2f} {unit}"


@dataclass(frozen=True)
class RatioCI:
    """Per-seed paired ratios b/a: their median and a t interval across seeds (log scale)."""

    median: float  # median of the per-seed ratios (NaN without a pair)
    lo: float  # NaN with fewer than two seeds
    hi: float
    seed_min: float
    seed_max: float
    seeds: int  # pairs used


def paired_ratio_ci(a: Mapping[int, float | None], b: Mapping[int, float | None],
                    confidence: float = 0.95) -> RatioCI:
    """b[s] / a[s] for every seed s with a positive finite value on both sides (see the module docstring)."""
    ratios = [b[s] / a[s] for s in sorted(set(a) & set(b))
              if _is_finite(a[s]) and _is_finite(b[s]) and a[s] > 0 and b[s] > 0]
    if not ratios:
        return RatioCI(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    _, log_lo, log_hi = mean_ci(np.log(ratios).tolist(), confidence)
    return RatioCI(float(np.median(ratios)), math.exp(log_lo), math.exp(log_hi), min(ratios), max(ratios),
                   len(ratios))


def median_with_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi) via common.metrics.median_ci (order statistics; full range below 6 values)."""
    x = _finite(values)
    if not x:
        return math.nan, math.nan, math.nan
    return median_ci(x, confidence)
