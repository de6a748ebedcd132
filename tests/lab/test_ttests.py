"""Student-t and Welch numbers against closed forms, hand-computed values, scipy and
published worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from normlab.lab.analysis.ttests import betainc, mean_ci, t_cdf, t_ppf, welch_test


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


# Two worked examples of Wikipedia's "Welch's t-test" article, with the t, df and p it
# prints, to the digits it prints.
_A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
_A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
_B1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
_B2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8]
_B2 += [20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8]


@pytest.mark.parametrize(
    "a, b, t, df, p",
    [
        (_A1, _A2, -2.46, 24.99, 0.021),
        (_B1, _B2, -1.57, 9.90, 0.149),
    ],
)
def test_welch_published_examples(a, b, t, df, p):
    r = welch_test(a, b)
    assert r.t == pytest.approx(t, abs=0.005)
    assert r.df == pytest.approx(df, abs=0.005)
    assert r.p_value == pytest.approx(p, abs=0.0005)


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0 + seed, size=3 + seed).tolist()
    b = rng.normal(0.7, 2.0, size=7 - seed).tolist()
    r = welch_test(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert r.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert r.df == pytest.approx(float(ref.df), rel=1e-12)
    assert r.p_value == pytest.approx(float(ref.pvalue), rel=1e-10)
    lo, hi = r.ci(0.95)
    ci = ref.confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((float(ci.low), float(ci.high)), rel=1e-10)
    # The CI and the test agree: the CI excludes 0 exactly when p < 0.05.
    assert (lo > 0 or hi < 0) == (r.p_value < 0.05)


def test_t_functions_match_scipy():
    for df in (1.5, 3, 7.25, 40):
        for t in (-4.0, -0.3, 0.0, 1.1, 6.0):
            assert t_cdf(t, df) == pytest.approx(float(st.t.cdf(t, df)), abs=1e-14)
        assert t_ppf(0.9, df) == pytest.approx(float(st.t.ppf(0.9, df)), rel=1e-12)
    assert t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0


@pytest.mark.parametrize(
    "bad", [lambda: t_cdf(1.0, 0), lambda: t_ppf(1.0, 3), lambda: t_ppf(0.5, -1)]
)
def test_t_functions_reject_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_welch_nearly_equal_values_no_warning():
    # scipy's ttest_ind warns on nearly identical data; welch_test computes the spread
    # in two exact passes and stays quiet (pytest turns warnings into errors).
    r = welch_test([1.0, 1.0 + 1e-15, 1.0], [2.0, 2.0, 2.0 + 1e-15])
    assert r.p_value < 1e-6 and r.diff == pytest.approx(-1.0)
