"""Power and sample size of the two-sided two-sample t-test, Hedges' g, Holm's adjustment.

Power is exact through the noncentral t distribution: with ``n_a``, ``n_b`` runs whose
values spread with a common ``σ`` and a true difference ``δ``,
``T ~ nct(df = n_a + n_b - 2, nc = δ / (σ √(1/n_a + 1/n_b)))`` and the power is
``P(|T| > t_{1-α/2, df})`` — the model of Cohen's power tables and G*Power. The sample
size is the smallest equal n per group that reaches the asked power.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import special

from .ttests import mean_var

__all__ = [
    "N_MAX",
    "SampleSize",
    "check_power",
    "hedges_g",
    "holm",
    "min_detectable_difference",
    "power_two_sample",
    "sample_size",
]

#: Largest number of runs per setting the sample-size search reports.
N_MAX = 10_000_000

_TYPICAL = {"alpha": "0.05", "power": "0.8"}


def _check_level(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(
            f"{name} must be between 0 and 1 (exclusive), got {value}; a usual value is "
            f"{_TYPICAL.get(name, '0.05')}"
        )


def check_power(power: float, alpha: float) -> None:
    """Raise ValueError unless 0 < alpha < 1 and alpha < power < 1."""
    _check_level("alpha", alpha)
    _check_level("power", power)
    if power <= alpha:
        raise ValueError(
            f"power {power} is not above alpha {alpha}: a test already rejects with "
            "probability alpha when there is no difference; ask for a power such as 0.8"
        )


def power_two_sample(
    delta: float, std: float, n_a: int, n_b: int | None = None, alpha: float = 0.05
) -> float:
    """Power of the two-sided two-sample t-test to detect a true difference ``delta``
    between settings whose runs spread with ``std``, with ``n_a`` and ``n_b`` runs."""
    n_b = n_a if n_b is None else n_b
    if n_a < 1 or n_b < 1 or n_a + n_b < 3:
        raise ValueError(f"the t-test needs n_a + n_b >= 3 runs, got {n_a} and {n_b}")
    _check_level("alpha", alpha)
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if std == 0:
        return 1.0 if delta != 0 else alpha
    df = n_a + n_b - 2
    nc = abs(delta) / (std * math.sqrt(1.0 / n_a + 1.0 / n_b))
    crit = -float(special.stdtrit(df, alpha / 2.0))  # upper alpha/2 quantile of t(df)
    # P(T > crit) + P(T < -crit) for T ~ noncentral t(df, nc) (scipy.stats.nct's CDF).
    return float(1.0 - special.nctdtr(df, nc, crit) + special.nctdtr(df, nc, -crit))


@dataclass(frozen=True)
class SampleSize:
    """Runs per setting (equal in both) and the power they reach; ``n`` is ``None`` when
    more than :data:`N_MAX` runs would be needed."""

    n: int | None
    achieved_power: float


def sample_size(delta: float, std: float, power: float = 0.8, alpha: float = 0.05) -> SampleSize:
    """Smallest n per setting (>= 2) whose two-sided t-test reaches ``power`` at a true
    difference ``delta`` with run-to-run spread ``std``; exact (noncentral t)."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0 (the difference to resolve), got {delta}")
    if not std >= 0 or math.isinf(std):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    check_power(power, alpha)
    if std == 0:
        return SampleSize(2, 1.0)
    d = delta / std
    z = float(-special.ndtri(alpha / 2.0) + special.ndtri(power))
    # The normal approximation 2 (z / d)² is within a few runs of the exact n; power
    # rises with n, so walk down, then up, from it.
    n = max(2, math.ceil(2.0 * (z / d) ** 2))
    if n > N_MAX:
        return SampleSize(None, power_two_sample(delta, std, N_MAX, alpha=alpha))
    while n > 2 and power_two_sample(delta, std, n - 1, alpha=alpha) >= power:
        n -= 1
    while (p := power_two_sample(delta, std, n, alpha=alpha)) < power:
        if n >= N_MAX:
            return SampleSize(None, p)
        n += 1
    return SampleSize(n, p)


def min_detectable_difference(
    std: float, n_a: int, n_b: int | None = None, power: float = 0.8, alpha: float = 0.05
) -> float:
    """The true difference that ``n_a`` and ``n_b`` runs with spread ``std`` detect with
    probability ``power`` (two-sided t-test at ``alpha``); smaller ones are usually missed."""
    n_b = n_a if n_b is None else n_b
    check_power(power, alpha)
    if std == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while power_two_sample(hi * std, std, n_a, n_b, alpha) < power:
        lo, hi = hi, hi * 2.0
    # Power rises with the difference: bisect to 1e-10 of the std (scipy.optimize, whose
    # import costs more than the whole search, is not needed for one monotone root).
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        if power_two_sample(mid * std, std, n_a, n_b, alpha) < power:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi) * std


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g of mean(a) - mean(b): the difference over the pooled std, times the exact
    small-sample correction J(n_a + n_b - 2); NaN when undefined (no spread, < 2 runs)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    ma, va = mean_var(a)
    mb, vb = mean_var(b)
    df = len(a) + len(b) - 2
    sp = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / df)
    if sp == 0:
        return float("nan")
    j = math.exp(math.lgamma(df / 2.0) - math.lgamma((df - 1) / 2.0)) / math.sqrt(df / 2.0)
    return j * (ma - mb) / sp


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
