"""Small-sample statistics without scipy: Student-t CDF and quantile, Welch's t-test.

The t CDF comes from the regularized incomplete beta function,
``P(|T| > t) = I_x(df/2, 1/2)`` with ``x = df / (df + t²)``, evaluated by its continued
fraction (modified Lentz; Numerical Recipes §6.4). Quantiles invert the CDF by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "WelchResult",
    "betainc",
    "mean_ci",
    "t_cdf",
    "t_ppf",
    "welch_test",
]


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` (> 0, may be fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with ``t_cdf(t, df) == p`` (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    v = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
    return m, v


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, sample std, CI half-width)``; the half-width is NaN with fewer than 2 values."""
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    m, v = _mean_var(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    s = math.sqrt(v)
    return m, s, t_ppf(0.5 + level / 2.0, len(xs) - 1) * s / math.sqrt(len(xs))


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    diff: float
    t: float
    df: float
    p_value: float
    #: The smallest |difference| that would reach significance at ``alpha`` with these
    #: spreads and seed counts: ``t_{1-alpha/2, df} · SE``.
    resolvable: float


def welch_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> WelchResult:
    """Two-sided Welch t-test; needs >= 2 values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"Welch's t-test needs >= 2 values per side, got {len(a)} and {len(b)}; run more seeds"
        )
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    qa, qb = va / len(a), vb / len(b)
    se2 = qa + qb
    diff = ma - mb
    if se2 == 0.0:
        # No spread on either side: any difference is exact, none is resolvable below it.
        p = 1.0 if diff == 0 else 0.0
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return WelchResult(diff, t, float(len(a) + len(b) - 2), p, 0.0)
    df = se2 * se2 / (qa * qa / (len(a) - 1) + qb * qb / (len(b) - 1))
    se = math.sqrt(se2)
    t = diff / se
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return WelchResult(diff, t, df, p, t_ppf(1.0 - alpha / 2.0, df) * se)
