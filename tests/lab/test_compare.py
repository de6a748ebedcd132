"""``normlab compare``: numbers against scipy, published power tables, simulation and
hand computation; verdict wording; the three input paths and their errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from normlab.cli import main
from normlab.lab.analysis.compare import (
    Group,
    compare,
    hedges_g,
    holm,
    min_detectable_difference,
    power_two_sample,
    sample_size,
)
from normlab.lab.run.train import EpochStats, RunConfig, RunRecord
from normlab.lab.sweep.store import RunStore

BS4 = (74.1, 73.0, 75.2)
BS8 = (70.3, 71.9, 69.8)


# --- power and sample size ---------------------------------------------------------------


@pytest.mark.parametrize("d, n, power", [(0.2, 394, 0.8006), (0.5, 64, 0.8015), (0.8, 26, 0.8075)])
def test_sample_size_matches_power_tables(d, n, power):
    # Two-sided two-sample t-test, alpha 0.05, power 0.8: 394 / 64 / 26 per group, as in
    # G*Power's exact computation (Cohen 1988, table 2.4.1, lists 393 / 64 / 26 from an
    # approximation).
    ss = sample_size(d, 1.0, power=0.8, alpha=0.05)
    assert ss.n == n
    assert ss.achieved_power == pytest.approx(power, abs=1e-4)
    assert sample_size(3 * d, 3.0).n == n  # only delta / std matters


@pytest.mark.parametrize("delta, std, power, alpha", [(4, 1.1, 0.8, 0.05), (1, 3, 0.9, 0.01)])
def test_sample_size_is_the_smallest(delta, std, power, alpha):
    n = sample_size(delta, std, power, alpha).n
    assert power_two_sample(delta, std, n, alpha=alpha) >= power
    assert n == 2 or power_two_sample(delta, std, n - 1, alpha=alpha) < power


def test_power_against_simulation():
    # d = 1 with 10 runs per group: power 0.562 (exact). 40,000 simulated t-tests.
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, size=(40_000, 10))
    b = rng.normal(0.0, 1.0, size=(40_000, 10))
    p = st.ttest_ind(a, b, axis=1).pvalue
    exact = power_two_sample(1.0, 1.0, 10)
    assert exact == pytest.approx(0.5620, abs=5e-4)
    assert float(np.mean(p < 0.05)) == pytest.approx(exact, abs=0.012)


def test_min_detectable_difference_inverts_power():
    mdd = min_detectable_difference(2.0, 3, 5, power=0.8, alpha=0.05)
    assert power_two_sample(mdd, 2.0, 3, 5) == pytest.approx(0.8, abs=1e-9)
    # 64 per group resolve d = 0.5 with power 0.8015, so a little under 0.5 at exactly 0.8.
    assert 0.49 < min_detectable_difference(1.0, 64) < 0.5
    assert min_detectable_difference(0.0, 3) == 0.0


def test_hedges_g_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    sp = math.sqrt((3 * 5 / 3 + 4 * 10) / 7)
    j = math.gamma(3.5) / (math.sqrt(3.5) * math.gamma(3.0))
    assert hedges_g(a, b) == pytest.approx(j * -3.5 / sp, rel=1e-12)
    assert j == pytest.approx(1 - 3 / (4 * 7 - 1), abs=2e-3)  # Hedges' approximation
    assert math.isnan(hedges_g([1.0], b)) and math.isnan(hedges_g([1.0, 1.0], [2.0, 2.0]))


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])


# --- compare -----------------------------------------------------------------------------


def test_compare_readme_example_against_scipy():
    r = compare([Group("bs4", BS4), Group("bs8", BS8)], delta=4, higher_is_better=True)
    (pair,) = r.pairs
    ref = st.ttest_ind(BS4, BS8, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert pair.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert pair.df == pytest.approx(float(ref.df), rel=1e-12)
    assert pair.p == pytest.approx(float(ref.pvalue), rel=1e-10) and pair.p_adjusted == pair.p
    assert (pair.ci_low, pair.ci_high) == pytest.approx((float(ci.low), float(ci.high)))
    assert pair.significant
    assert pair.verdict == "bs4 is better than bs8: higher by 3.43 (95% CI 0.94..5.92), p = 0.019"
    pooled = math.sqrt((np.var(BS4, ddof=1) + np.var(BS8, ddof=1)) / 2)
    assert r.pooled_std == pytest.approx(pooled) and r.pooled_df == 4
    assert pair.resolvable == pytest.approx(min_detectable_difference(pooled, 3, 3))
    (plan,) = r.plans
    assert plan.n == sample_size(4, pooled).n == 3
    upper = pooled * math.sqrt(4 / st.chi2.ppf(0.2, 4))
    assert plan.std_upper == pytest.approx(upper) and plan.n_upper == sample_size(4, upper).n


def test_compare_wording():
    lower = compare([Group("bs4", BS4), Group("bs8", BS8)], higher_is_better=False)
    assert lower.pairs[0].verdict.startswith("bs8 is better than bs4: lower by 3.43")
    neutral = compare([Group("bs8", BS8), Group("bs4", BS4)])
    assert neutral.pairs[0].verdict.startswith("bs4 is higher than bs8 by 3.43 (95% CI 0.94..")
    same = compare([Group("a", (70.0, 72.0, 71.0)), Group("b", (71.0, 70.5, 72.5))])
    assert not same.pairs[0].significant
    assert same.pairs[0].verdict.startswith("not distinguishable from seed-to-seed variation")
    assert "pass --delta" in same.notes[0]


def test_compare_holm_over_pairs():
    r = compare([Group("a", BS4), Group("b", BS8), Group("c", (70.1, 69.9, 70.5))])
    assert len(r.pairs) == 3
    assert [p.p_adjusted for p in r.pairs] == pytest.approx(holm([p.p for p in r.pairs]))
    ab = r.pairs[0]
    assert ab.p < 0.05 <= ab.p_adjusted and not ab.significant
    assert "once every pair is tested" in ab.verdict and "Holm" in ab.verdict


def test_single_runs_explain_and_plan():
    r = compare([Group("bs4", (74.0,)), Group("bs8", (70.0,))], std=1.5)
    (pair,) = r.pairs
    assert not pair.tested and math.isnan(pair.p)
    assert pair.verdict.startswith("no verdict: bs4 and bs8 have a single run")
    (plan,) = r.plans  # for the observed difference, with the given std
    assert (plan.delta, plan.std, plan.std_source) == (4.0, 1.5, "given")
    assert plan.n == sample_size(4.0, 1.5).n and plan.std_upper is None
    bare = compare([Group("bs4", (74.0,)), Group("bs8", (70.0,))])
    assert not bare.plans and "pass --std" in bare.notes[0]
    mixed = compare([Group("bs4", BS4), Group("bs8", (70.0,))], delta=2)
    assert mixed.pairs[0].verdict.startswith("no verdict: bs8 has a single run")
    assert mixed.plans[0].std == pytest.approx(np.std(BS4, ddof=1))


@pytest.mark.parametrize(
    "groups, kw, match",
    [
        ([Group("a", BS4)], {}, "at least 2 groups, got 1"),
        ([Group("a", BS4), Group("a", BS8)], {}, "'a' is given twice"),
        ([Group("a", BS4), Group("b", ())], {}, "'b' has no values"),
        ([Group("a", BS4), Group("b", (1.0, math.nan))], {}, "not a finite number"),
        ([Group("a", BS4), Group("b", BS8)], {"delta": 0.0}, "delta must be"),
        ([Group("a", BS4), Group("b", BS8)], {"power": 1.5}, "power must be between 0 and 1"),
        ([Group("a", BS4), Group("b", BS8)], {"power": 0.01}, "not above alpha"),
        ([Group("a", BS4), Group("b", BS8)], {"std": -1.0}, "std must be"),
    ],
)
def test_compare_bad_input(groups, kw, match):
    with pytest.raises(ValueError, match=match):
        compare(groups, **kw)


# --- the command line --------------------------------------------------------------------


def _cli(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_readme_example(capsys):
    code, out, err = _cli(
        capsys, "bs4=74.1,73.0,75.2", "bs8=70.3,71.9,69.8", "--higher-is-better", "--delta", "4"
    )
    assert code == 0 and err == ""
    assert "bs4 vs bs8: bs4 is better than bs8: higher by 3.43 (95% CI 0.94..5.92)" in out
    assert "to resolve a difference of 4 with 80% power" in out and "3 runs per setting" in out


def test_cli_groups_may_follow_options(capsys):
    """Groups after an option land in the same comparison as groups before it."""
    ref = _cli(capsys, "bs4=74.1,73.0,75.2", "bs8=70.3,71.9,69.8", "--delta", "4")
    mixed = _cli(capsys, "--delta", "4", "bs4=74.1,73.0,75.2", "bs8=70.3,71.9,69.8")
    split = _cli(capsys, "bs4=74.1,73.0,75.2", "--delta", "4", "bs8=70.3,71.9,69.8")
    assert ref[0] == 0 and "bs4 vs bs8" in ref[1]
    assert mixed == ref and split == ref
    with pytest.raises(SystemExit):  # an unknown option is still refused
        main(["compare", "a=1,2", "--bogus", "b=3,4"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_cli_json(capsys, tmp_path):
    code, out, _ = _cli(capsys, "a=1,2,3", "b=2,3,5", "--json", "-")
    data = json.loads(out)
    assert code == 0 and [g["n"] for g in data["groups"]] == [3, 3]
    assert data["pairs"][0]["p"] == pytest.approx(
        st.ttest_ind([1, 2, 3], [2, 3, 5], equal_var=False).pvalue
    )
    assert data["pairs"][0]["effect_size_kind"].startswith("Hedges' g")
    path = tmp_path / "out" / "c.json"
    code, out, _ = _cli(capsys, "a=1", "b=2", "--std", "0.5", "--json", str(path))
    data = json.loads(path.read_text())
    assert data["pairs"][0]["p"] is None and data["plans"][0]["runs_per_setting"] >= 2
    assert "no verdict" in out
    # No spread: t is infinite, written as null so that the file stays strict JSON.
    code, out, _ = _cli(capsys, "a=1,1,1", "b=2,2,2", "--json", "-")
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["pairs"][0]["t"] is None and data["pairs"][0]["p"] == 0.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bs4=74,7x,75", "bs8=70,71"], "group 'bs4': '7x' is not a number"),
        (["bs4=74,75"], "at least 2 groups, got 1 (bs4)"),
        (["bs4=74,75", "bs4=70,71"], "group 'bs4' is given twice"),
        (["bs4", "bs8=70,71"], "expected NAME=V1,V2,..."),
        (["a=1,2", "b=3,4", "--delta", "0"], "--delta must be a finite difference > 0"),
        (["a=1,2", "b=3,4", "--power", "1.5"], "power must be between 0 and 1"),
        (["a=1,2", "b=3,4", "--csv", "x.csv"], "give the groups one way"),
        ([], "give the groups one way"),
        (["--csv", "x.csv", "--metric", "AP"], "--csv needs --group COLUMN"),
        (["--db", "x.db"], "--db needs --cells"),
        (["a=1,2", "b=3,4", "--cells", "bn@2"], "--cells goes with --db"),
        (["--db", "x.db", "--cells", "bn@2", "--metric", "AP"], "--metric goes with --csv"),
        (["a=1,2", "b=3,4", "--json", "/proc/no/c.json"], "cannot write --json"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("normlab compare: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_csv(capsys, tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text(
        "batch_size,seed,AP\n8,0,70.3\n4,0,74.1\n4,1,73.0\n8,1,71.9\n\n4,2,75.2\n8,2,69.8\n"
    )
    code, out, _ = _cli(
        capsys, "--csv", str(path), "--group", "batch_size", "--metric", "AP", "--json", "-"
    )
    data = json.loads(out)
    assert code == 0 and data["metric"] == "AP"
    assert [(g["name"], g["n"]) for g in data["groups"]] == [("8", 3), ("4", 3)]
    assert data["pairs"][0]["diff"] == pytest.approx(np.mean(BS8) - np.mean(BS4))
    code, _, err = _cli(capsys, "--csv", str(path), "--group", "bs", "--metric", "AP")
    assert code == 2 and "no column 'bs' for --group; the columns are 'batch_size', 'seed'" in err
    path.write_text("batch_size,AP\n4,74.1\n4,n/a\n")
    code, _, err = _cli(capsys, "--csv", str(path), "--group", "batch_size", "--metric", "AP")
    assert code == 2 and "line 3, column 'AP': 'n/a' is not a number" in err
    code, _, err = _cli(capsys, "--csv", str(tmp_path / "no.csv"), "--group", "a", "--metric", "b")
    assert code == 2 and "no such file" in err


def _store(path, cells):
    with RunStore(path) as store:
        for (norm, bs), errors in cells.items():
            for seed, e in enumerate(errors):
                cfg = RunConfig(norm=norm, batch_size=bs, seed=seed, epochs=1)
                store.add(RunRecord(cfg, [EpochStats(1, 1.0, e, e, 0.01)], e, 1.0, False, 8, 4, 1))


def test_cli_store(capsys, tmp_path):
    db = tmp_path / "runs.db"
    _store(db, {("bn", 2): (30.0, 31.5, 29.0), ("bn", 32): (20.0, 21.0, 20.5), ("gn", 2): (25.0,)})
    code, out, _ = _cli(capsys, "--db", str(db), "--cells", "bn@2,bn@32")
    assert code == 0 and "final test error (%)" in out
    assert "bn@32 is better than bn@2: lower by 9.67" in out  # lower error is better
    code, out, _ = _cli(capsys, "--db", str(db), "--cells", "bn@2,gn@2", "--std", "1")
    assert "no verdict: gn@2 has a single run" in out and "runs per setting" in out
    code, _, err = _cli(capsys, "--db", str(db), "--cells", "bn@2,bn@8")
    assert code == 2 and "no runs in cell 'bn@8'; the cells are bn@2, bn@32, gn@2" in err
    code, _, err = _cli(capsys, "--db", str(tmp_path / "none.db"), "--cells", "bn@2,bn@8")
    assert code == 2 and "no such run store" in err


def test_cli_store_protocols(capsys, tmp_path):
    db = tmp_path / "runs.db"
    with RunStore(db, allow_mixed_protocols=True) as store:
        for epochs, errors in ((1, (30.0, 31.0)), (2, (25.0, 26.0))):
            for seed, e in enumerate(errors):
                cfg = RunConfig(norm="bn", batch_size=2, seed=seed, epochs=epochs)
                store.add(RunRecord(cfg, [EpochStats(1, 1.0, e, e, 0.01)], e, 1.0, False, 8, 4, 1))
    code, _, err = _cli(capsys, "--db", str(db), "--cells", "bn@2,bn@2[epochs=2]")
    assert (
        code == 2 and "holds runs of 2 protocols; name one: bn@2[epochs=1], bn@2[epochs=2]" in err
    )
    code, out, _ = _cli(capsys, "--db", str(db), "--cells", "bn@2[epochs=1],bn@2[epochs=2]")
    assert code == 0 and "bn@2[epochs=2] is better than bn@2[epochs=1]: lower by 5.00" in out
