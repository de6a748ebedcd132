"""Small-sample statistics on scipy: Student-t CDF and quantile, Welch's t-test.

The distributions come from :mod:`scipy.special` (``stdtr``/``stdtrit``, the functions
behind :data:`scipy.stats.t`, without importing all of :mod:`scipy.stats`, so that
``normlab compare`` starts fast); the means, variances, t and the
Welch–Satterthwaite degrees of freedom are computed here in closed form, because
:func:`scipy.stats.ttest_ind` warns (and returns NaN) on groups without spread, which
the lab meets whenever every seed of a cell ends at the same error. On data with spread
:func:`welch_test` equals ``scipy.stats.ttest_ind(a, b, equal_var=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import special

__all__ = [
    "WelchResult",
    "betainc",
    "mean_ci",
    "mean_var",
    "t_cdf",
    "t_ppf",
    "welch_test",
]


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    return float(special.betainc(a, b, x))


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` (> 0, may be fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(special.stdtr(df, t))


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with ``t_cdf(t, df) == p`` (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(special.stdtrit(df, p))


def mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample variance)`` with the n - 1 divisor; the variance is NaN for one value.

    Two passes with :func:`math.fsum`, so that nearly equal values keep their small spread.
    """
    n = len(xs)
    if n == 0:
        raise ValueError("needs at least one value")
    m = math.fsum(xs) / n
    v = math.fsum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
    return m, v


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, sample std, CI half-width)``; the half-width is NaN with fewer than 2 values."""
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    m, v = mean_var(xs)
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
    #: Standard error of the difference, ``sqrt(var_a/n_a + var_b/n_b)``.
    se: float = float("nan")

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval of the difference of means on the Welch–Satterthwaite df."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if self.se == 0.0:
            return self.diff, self.diff
        half = t_ppf(0.5 + level / 2.0, self.df) * self.se
        return self.diff - half, self.diff + half


def welch_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> WelchResult:
    """Two-sided Welch t-test; needs >= 2 values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"Welch's t-test needs >= 2 values per side, got {len(a)} and {len(b)}; run more seeds"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ma, va = mean_var(a)
    mb, vb = mean_var(b)
    qa, qb = va / len(a), vb / len(b)
    se2 = qa + qb
    diff = ma - mb
    if se2 == 0.0:
        # No spread on either side: any difference is exact, none is resolvable below it.
        p = 1.0 if diff == 0 else 0.0
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return WelchResult(diff, t, float(len(a) + len(b) - 2), p, 0.0, 0.0)
    df = se2 * se2 / (qa * qa / (len(a) - 1) + qb * qb / (len(b) - 1))
    se = math.sqrt(se2)
    t = diff / se
    p = float(2.0 * special.stdtr(df, -abs(t)))
    return WelchResult(diff, t, df, p, t_ppf(1.0 - alpha / 2.0, df) * se, se)
