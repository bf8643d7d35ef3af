"""Small statistics for the report: mean/std, Student-t intervals, Welch's difference of means.

scipy is not a dependency, so the Student-t quantile is computed here from the
regularized incomplete beta function (Lentz continued fraction, as in
Numerical Recipes ``betacf``) and inverted by bisection. Good to ~1e-10,
which is far more than a 95% interval on a handful of seeds needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from common.metrics import median_ci

__all__ = ["mean", "sample_std", "t_quantile", "t_cdf", "mean_ci", "welch_diff_ci", "DiffCI",
           "verdict", "median_with_ci"]


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean(values: Iterable[float | None]) -> float:
    """Arithmetic mean of the finite values (NaN when there are none)."""
    x = _finite(values)
    return sum(x) / len(x) if x else math.nan


def sample_std(values: Iterable[float | None]) -> float:
    """Sample standard deviation (ddof=1) of the finite values; NaN with fewer than two."""
    x = _finite(values)
    if len(x) < 2:
        return math.nan
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    # the continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, may be fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: df=1 at p=0.9995 needs ~637
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean; lo/hi NaN with fewer than two values."""
    x = _finite(values)
    m = mean(x)
    if len(x) < 2:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2.0, len(x) - 1) * sample_std(x) / math.sqrt(len(x))
    return m, m - half, m + half


@dataclass(frozen=True)
class DiffCI:
    """Difference of means (b - a) with its Welch interval."""

    diff: float  # mean(b) - mean(a)
    lo: float  # NaN when there is no noise estimate (a side with < 2 values)
    hi: float
    df: float  # Welch-Satterthwaite degrees of freedom (inf when both variances are 0)
    n_a: int
    n_b: int


def welch_diff_ci(a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95) -> DiffCI:
    """Welch's interval for mean(b) - mean(a) (unequal variances)."""
    xa, xb = _finite(a), _finite(b)
    diff = mean(xb) - mean(xa) if xa and xb else math.nan
    if len(xa) < 2 or len(xb) < 2:
        return DiffCI(diff, math.nan, math.nan, math.nan, len(xa), len(xb))
    va, vb = sample_std(xa) ** 2 / len(xa), sample_std(xb) ** 2 / len(xb)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values on both sides: no spread, the interval is the point
        return DiffCI(diff, diff, diff, math.inf, len(xa), len(xb))
    df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return DiffCI(diff, diff - half, diff + half, df, len(xa), len(xb))


def verdict(ci: DiffCI, name_a: str, name_b: str, scale: float = 100.0, unit: str = "pts") -> str:
    """Plain-language reading of a difference of accuracies (b - a, scaled to percentage points)."""
    if ci.n_a == 0 or ci.n_b == 0:
        missing = name_a if ci.n_a == 0 else name_b
        return f"no ok runs for {missing}"
    if min(ci.n_a, ci.n_b) < 2:
        return "one seed: no noise estimate"
    if ci.lo <= 0.0 <= ci.hi:
        return "within seed noise"
    better = name_b if ci.diff > 0 else name_a
    return f"{better} better by {abs(ci.diff) * scale:.2f} {unit}"


def median_with_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi) via common.metrics.median_ci (order statistics; full range below 6 values)."""
    x = _finite(values)
    if not x:
        return math.nan, math.nan, math.nan
    return median_ci(x, confidence)
