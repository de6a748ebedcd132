"""Is a difference between settings real, and how many runs would tell? (``normlab compare``)

Given two or more groups of one metric (a run per seed), :func:`compare` answers:

- per group: n, mean, sample std;
- per pair: Welch's t-test (t, df, two-sided p), the confidence interval of the difference
  of means on the Welch–Satterthwaite df, Hedges' g (Cohen's d on the pooled std times the
  exact small-sample correction ``J(df) = Γ(df/2) / (√(df/2) Γ((df-1)/2))``), a verdict in
  words, and the smallest difference the pair's runs resolve at the chosen power;
- a plan: runs per setting needed to resolve a difference ``delta`` at the chosen power.

Power and sample size (:mod:`normlab.lab.analysis.power`) are those of the two-sided two-sample
t-test with a common std, exact through the noncentral t distribution: the standard
planning model (Cohen's tables); the verdict itself uses Welch's test, which does not
assume equal spreads. With more than one pair, verdicts use Holm's step-down adjustment
of the p-values, so that testing every pair does not inflate the chance of a false
"different".

The spread used for planning is the std pooled over every group with >= 2 runs, or one
the user gives. Estimated from a few runs it is itself uncertain, so the plan also states
the runs needed at its one-sided 80 % upper confidence bound ``s √(df / χ²_{0.2, df})``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from scipy import special

from .power import (
    check_power,
    hedges_g,
    holm,
    min_detectable_difference,
    power_two_sample,
    sample_size,
)
from .ttests import mean_var, welch_test

__all__ = [
    "ComparePair",
    "CompareResult",
    "Group",
    "Plan",
    "compare",
    "decimals_for",
    "fmt_p",
    "hedges_g",
    "holm",
    "min_detectable_difference",
    "power_two_sample",
    "sample_size",
]


@dataclass(frozen=True)
class Group:
    """The runs of one setting: a name and one metric value per run."""

    name: str
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_var(self.values)[0]

    @property
    def std(self) -> float:
        """Sample std (n - 1 divisor); NaN with a single run."""
        return math.sqrt(mean_var(self.values)[1]) if self.n > 1 else float("nan")


@dataclass(frozen=True)
class ComparePair:
    """One pair of groups; the difference is ``mean(a) - mean(b)``. Test fields are NaN
    when a group has fewer than 2 runs (``tested`` is then False)."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p: float
    #: Holm-adjusted p over all tested pairs (equals ``p`` with one pair).
    p_adjusted: float
    hedges_g: float
    #: Smallest true difference these runs detect at the chosen power (pooled std).
    resolvable: float
    tested: bool
    significant: bool
    verdict: str


@dataclass(frozen=True)
class Plan:
    """Runs per setting to resolve ``delta`` at ``power``, with ``std`` (and, when the
    std is estimated, at its 80 % upper bound ``std_upper``)."""

    delta: float
    std: float
    std_source: str
    n: int | None
    achieved_power: float
    std_upper: float | None = None
    n_upper: int | None = None


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` found: the groups, every pair, the plans and notes in words."""

    groups: list[Group]
    pairs: list[ComparePair]
    alpha: float
    power: float
    higher_is_better: bool | None
    #: Std pooled over the groups with >= 2 runs (NaN when none has), and its df.
    pooled_std: float
    pooled_df: int
    plans: list[Plan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def decimals_for(groups: Sequence[Group]) -> int:
    """Decimals that show the largest group mean to 4 significant digits (0 to 8)."""
    top = max((abs(v) for g in groups for v in g.values), default=0.0)
    return 2 if top == 0 else max(0, min(8, 3 - math.floor(math.log10(top))))


def _fmt(x: float, dec: int) -> str:
    return f"{x:.{dec}f}"


def fmt_p(p: float) -> str:
    """A p-value as printed: 3 decimals, 2 significant digits below 0.01, "< 0.0001"."""
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def _direction(hi: str, lo: str, higher_is_better: bool | None) -> str:
    if higher_is_better is None:
        return f"{hi} is higher than {lo} by"
    if higher_is_better:
        return f"{hi} is better than {lo}: higher by"
    return f"{lo} is better than {hi}: lower by"


def _verdict(
    a: Group, b: Group, diff: float, ci: tuple[float, float], p: float, p_adj: float,
    n_pairs: int, alpha: float, level: float, resolvable: float, power: float,
    higher_is_better: bool | None, dec: int,
) -> tuple[bool, str]:  # fmt: skip
    pct = f"{100 * level:g}% CI"
    p_text = f"p = {fmt_p(p)}"
    if n_pairs > 1:
        p_text += f", {fmt_p(p_adj)} after Holm's correction for {n_pairs} pairs"
    if p_adj < alpha:
        hi, lo, d, cl = (a, b, diff, ci) if diff > 0 else (b, a, -diff, (-ci[1], -ci[0]))
        says = _direction(hi.name, lo.name, higher_is_better)
        lo_, hi_ = _fmt(cl[0], dec), _fmt(cl[1], dec)
        return True, f"{says} {_fmt(d, dec)} ({pct} {lo_}..{hi_}), {p_text}"
    what = (
        "not distinguishable from seed-to-seed variation at these n"
        if p >= alpha
        else "not distinguishable from seed-to-seed variation once every pair is tested"
    )
    return False, (
        f"{what}: {a.name} - {b.name} = {_fmt(diff, dec)} ({pct} {_fmt(ci[0], dec)}.."
        f"{_fmt(ci[1], dec)}), {p_text}; these runs resolve differences of about "
        f"{_fmt(resolvable, dec)} or more ({100 * power:g}% power)"
    )


def _pair(a: Group, b: Group, alpha: float, power: float, dec: int) -> tuple[ComparePair, float]:
    """The pair without its Holm-adjusted p and verdict (filled in by :func:`compare`)."""
    nan = float("nan")
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        single = " and ".join(g.name for g in (a, b) if g.n < 2)
        verdict = (
            f"no verdict: {single} {'has' if ' and ' not in single else 'have'} a single run, "
            f"so the seed-to-seed spread is unknown and the difference {_fmt(diff, dec)} cannot be "
            "told from luck; run >= 2 seeds per setting (how many: see below)"
        )
        return ComparePair(
            a.name, b.name, diff, nan, nan, nan, nan, nan, nan, nan, nan, False, False, verdict
        ), nan
    w = welch_test(a.values, b.values, alpha)
    ci = w.ci(1.0 - alpha)
    df = a.n + b.n - 2
    sp = math.sqrt(((a.n - 1) * a.std**2 + (b.n - 1) * b.std**2) / df)
    res = min_detectable_difference(sp, a.n, b.n, power, alpha)
    g = hedges_g(a.values, b.values)
    return ComparePair(
        a.name, b.name, diff, ci[0], ci[1], w.t, w.df, w.p_value, w.p_value, g, res, True,
        False, "",
    ), w.p_value  # fmt: skip


def compare(
    groups: Sequence[Group],
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    delta: float | None = None,
    std: float | None = None,
    higher_is_better: bool | None = None,
) -> CompareResult:
    """Compare every pair of ``groups`` and plan the runs needed (see the module doc).

    ``delta``: the difference to resolve (plan); without it, pairs that cannot be tested
    (a single run) get a plan for their observed difference. ``std``: the run-to-run
    spread to plan with, instead of the observed pooled one. ``higher_is_better`` words
    the verdicts ("better"/"worse"); ``None`` says only "higher"/"lower".

    Raises:
        ValueError: fewer than 2 groups, a repeated name, an empty group, a non-finite
            value, or alpha/power/delta/std out of range.
    """
    check_power(power, alpha)
    if delta is not None and not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"--delta must be a finite difference > 0, got {delta}")
    if std is not None and not (std > 0 and math.isfinite(std)):
        raise ValueError(f"--std must be a finite spread > 0, got {std}")
    groups = list(groups)
    if len(groups) < 2:
        names = ", ".join(g.name for g in groups) or "none"
        raise ValueError(f"compare needs at least 2 groups, got {len(groups)} ({names})")
    seen: set[str] = set()
    for g in groups:
        if g.name in seen:
            raise ValueError(f"group {g.name!r} is given twice; merge its values or rename one")
        seen.add(g.name)
        if g.n == 0:
            raise ValueError(f"group {g.name!r} has no values")
        bad = [v for v in g.values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"group {g.name!r} holds {bad[0]}, not a finite number")

    multi = [g for g in groups if g.n >= 2]
    pooled_df = sum(g.n - 1 for g in multi)
    pooled = (
        math.sqrt(math.fsum((g.n - 1) * g.std**2 for g in multi) / pooled_df)
        if pooled_df
        else float("nan")
    )
    dec = decimals_for(groups)
    raw = [_pair(a, b, alpha, power, dec) for i, a in enumerate(groups) for b in groups[i + 1 :]]
    tested = [k for k, (pr, _) in enumerate(raw) if pr.tested]
    adjusted = dict(zip(tested, holm([raw[k][1] for k in tested]), strict=True))
    by_name = {g.name: g for g in groups}
    pairs = []
    for k, (pr, p) in enumerate(raw):
        if pr.tested:
            sig, verdict = _verdict(
                by_name[pr.a], by_name[pr.b], pr.diff, (pr.ci_low, pr.ci_high), p,
                adjusted[k], len(tested), alpha, 1.0 - alpha, pr.resolvable, power,
                higher_is_better, dec,
            )  # fmt: skip
            pr = replace(pr, p_adjusted=adjusted[k], significant=sig, verdict=verdict)
        pairs.append(pr)

    notes: list[str] = []
    plan_std, source = (std, "given") if std is not None else (pooled, "observed")
    deltas = [delta] if delta is not None else []
    if delta is None:
        deltas = sorted({abs(p.diff) for p in pairs if not p.tested and p.diff != 0})
    plans: list[Plan] = []
    if deltas and math.isnan(plan_std):
        notes.append(
            "no group has 2 or more runs, so the run-to-run spread is unknown: pass --std "
            "(the spread you expect between seeds) to see how many runs are needed"
        )
    else:
        upper = None
        if source == "observed" and pooled_df:
            upper = plan_std * math.sqrt(pooled_df / float(special.chdtri(pooled_df, 0.8)))
        for d in deltas:
            ss = sample_size(d, plan_std, power, alpha)
            su = sample_size(d, upper, power, alpha) if upper is not None else None
            plans.append(
                Plan(d, plan_std, source, ss.n, ss.achieved_power, upper, su.n if su else None)
            )
    if delta is None and not plans and not notes:
        notes.append("pass --delta D to see how many runs per setting resolve a difference D")
    return CompareResult(
        groups, pairs, alpha, power, higher_is_better, pooled, pooled_df, plans, notes
    )
