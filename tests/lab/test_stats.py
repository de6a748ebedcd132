"""Student-t and Welch numbers against closed forms and hand-computed values."""

from __future__ import annotations

import math

import pytest

from normlab.lab.stats import betainc, mean_ci, t_cdf, t_ppf, welch_test


def _t_pdf(x: float, df: float) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_sf_numeric(t: float, df: float, n: int = 20000) -> float:
    """P(T > t) by Simpson's rule on the pdf after x = t + u/(1-u) (independent of betainc)."""
    h = 1.0 / n
    total = 0.0
    for i in range(n + 1):
        u = min(i * h, 1 - 1e-12)
        f = _t_pdf(t + u / (1 - u), df) / (1 - u) ** 2
        total += f * (1 if i in (0, n) else (4 if i % 2 else 2))
    return total * h / 3


@pytest.mark.parametrize("t", [-3.0, -0.5, 0.0, 0.7, 2.0, 10.0])
def test_t_cdf_closed_forms(t):
    # df = 1 is Cauchy; df = 2 has cdf 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize(
    "df, q", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)]
)
def test_t_ppf_matches_table(df, q):
    assert t_ppf(0.975, df) == pytest.approx(q, abs=1e-6)
    assert t_ppf(0.025, df) == pytest.approx(-q, abs=1e-6)


def test_betainc_symmetry_and_uniform():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)
    assert betainc(2.5, 1.5, 0.4) == pytest.approx(1 - betainc(1.5, 2.5, 0.6), abs=1e-13)


def test_mean_ci_by_hand():
    m, s, ci = mean_ci([10.0, 12.0, 14.0])
    assert (m, s) == (12.0, 2.0)
    assert ci == pytest.approx(4.302653 * 2 / math.sqrt(3), abs=1e-5)
    m, s, ci = mean_ci([5.0])
    assert m == 5.0 and math.isnan(s) and math.isnan(ci)


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    # var a = 5/3, var b = 10; SE^2 = (5/3)/4 + 10/5 = 29/12.
    se2 = 29 / 12
    df = se2**2 / ((5 / 12) ** 2 / 3 + 2.0**2 / 4)
    r = welch_test(a, b)
    assert r.diff == pytest.approx(-3.5)
    assert r.t == pytest.approx(-3.5 / math.sqrt(se2), rel=1e-12)
    assert r.df == pytest.approx(df, rel=1e-12)
    assert r.df == pytest.approx(5.520788, abs=1e-5)
    assert r.p_value == pytest.approx(2 * _t_sf_numeric(abs(r.t), df), abs=1e-7)
    assert r.resolvable == pytest.approx(t_ppf(0.975, df) * math.sqrt(se2), rel=1e-12)
    assert r.resolvable > abs(r.diff) and r.p_value > 0.05  # not significant, consistently


def test_welch_needs_two_values():
    with pytest.raises(ValueError, match="more seeds"):
        welch_test([1.0], [1.0, 2.0])


def test_welch_without_spread():
    r = welch_test([1.0, 1.0], [2.0, 2.0])
    assert r.p_value == 0.0 and r.resolvable == 0.0
