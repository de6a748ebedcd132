"""``normlab compare``: parse arguments, read the groups, call :func:`compare`, print.

Also the two renderings of a :class:`~normlab.lab.analysis.compare.CompareResult`: the text the
command prints (:func:`render_text`) and the JSON it writes (:func:`result_dict`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .args import finite_float as _float

if TYPE_CHECKING:  # scipy loads only when compare runs, not for every `normlab` command
    from ..lab.analysis.compare import CompareResult, Group

__all__ = ["add_parser", "render_text", "result_dict", "run"]

_EXAMPLES = """examples:
  normlab compare bs4=74.1,73.0,75.2 bs8=70.3,71.9,69.8 --higher-is-better --delta 4
  normlab compare --csv runs.csv --group batch_size --metric AP --higher-is-better
  normlab compare --db normlab-sweep.db --cells bn@2,bn@32,gn@2
  normlab compare bs4=74 bs8=70 --std 1.2 --delta 4     (one run each: plan only)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``normlab compare``."""
    p = subparsers.add_parser(
        "compare",
        help="is the difference between settings real? Welch tests, effect sizes, runs needed",
        description="Compare a metric between two or more settings, one value per run (seed):\n"
        "per pair Welch's t-test, the 95% CI of the difference, Hedges' g and a verdict;\n"
        "the smallest difference the runs resolve; with --delta, the runs per setting\n"
        "needed to resolve it (exact, noncentral t). Give the NAME=... groups first.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "groups", nargs="*", metavar="NAME=V1,V2,...", help="a group per argument: its runs' values"
    )
    src = p.add_argument_group("or read the groups from a file")
    src.add_argument("--csv", type=Path, metavar="FILE", help="long-format CSV, one row per run")
    src.add_argument("--group", metavar="COLUMN", help="with --csv: the column naming the setting")
    src.add_argument("--metric", metavar="COLUMN", help="with --csv: the column holding the metric")
    src.add_argument(
        "--db",
        type=Path,
        metavar="STORE",
        help="a sweep store; the metric is final test error (%%)",
    )
    src.add_argument(
        "--cells",
        help="with --db: comma-separated cells NORM@BATCH (bn@2,bn@32); add [PROTOCOL] "
        "(bn@2[epochs=1]) when the store holds several protocols",
    )
    better = p.add_mutually_exclusive_group()
    better.add_argument(
        "--higher-is-better",
        dest="higher_is_better",
        action="store_const",
        const=True,
        help="the metric is a score (accuracy, AP): verdicts say better/worse",
    )
    better.add_argument(
        "--lower-is-better",
        dest="higher_is_better",
        action="store_const",
        const=False,
        help="the metric is an error or a loss (the default with --db)",
    )
    p.add_argument(
        "--alpha", type=_float, default=0.05, help="significance level (default: %(default)s)"
    )
    p.add_argument(
        "--power", type=_float, default=0.8, help="power for planning (default: %(default)s)"
    )
    p.add_argument(
        "--delta", type=_float, metavar="D", help="the difference to resolve: runs needed for it"
    )
    p.add_argument(
        "--std",
        type=_float,
        metavar="S",
        help="run-to-run std to plan with, instead of the one observed in the groups",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="also write the result as JSON to this path ('-': stdout only)",
    )


def _read_groups(args: argparse.Namespace) -> list[Group]:
    from ..lab.analysis.compare_io import groups_from_csv, groups_from_specs, groups_from_store

    sources = [
        s
        for s, given in (("NAME=...", args.groups), ("--csv", args.csv), ("--db", args.db))
        if given
    ]
    if len(sources) != 1:
        raise ValueError(
            "give the groups one way: NAME=V1,V2,... arguments, --csv FILE, or --db STORE"
            + (f" (got {' and '.join(sources)})" if sources else "")
        )
    misplaced = {"NAME=...": ("group", "metric", "cells"), "--csv": ("cells",)}
    misplaced["--db"] = ("group", "metric")
    for flag in misplaced[sources[0]]:
        if getattr(args, flag) is not None:
            owner = "--db" if flag == "cells" else "--csv"
            raise ValueError(f"--{flag} goes with {owner}, not with {sources[0]}")
    if args.csv is not None:
        missing = [f for f in ("group", "metric") if getattr(args, f) is None]
        if missing:
            raise ValueError(
                f"--csv needs --group COLUMN and --metric COLUMN (missing --{missing[0]})"
            )
        return groups_from_csv(args.csv, args.group, args.metric)
    if args.db is not None:
        if not args.cells:
            raise ValueError("--db needs --cells, e.g. --cells bn@2,bn@32")
        return groups_from_store(args.db, [c for c in args.cells.split(",") if c.strip()])
    return groups_from_specs(args.groups)


def run(args: argparse.Namespace) -> int:
    """Run ``normlab compare``; errors a user can fix are raised as ValueError."""
    from ..lab.analysis.compare import compare

    groups = _read_groups(args)
    higher = args.higher_is_better
    if higher is None and args.db is not None:
        higher = False  # the store's metric is test error
    result = compare(
        groups,
        alpha=args.alpha,
        power=args.power,
        delta=args.delta,
        std=args.std,
        higher_is_better=higher,
    )
    metric = "final test error (%)" if args.db is not None else args.metric
    if args.json == "-":
        print(json.dumps(result_dict(result, metric), indent=2))
        return 0
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result_dict(result, metric), indent=2) + "\n")
        except OSError as e:
            msg = f"cannot write --json {path} ({e.strerror or e}); pass another path"
            raise ValueError(msg) from None
    print(render_text(result, metric))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def _num(x: float) -> float | None:
    """A float for JSON: undefined (NaN) and infinite values (no spread) become null."""
    return float(x) if math.isfinite(x) else None


def result_dict(r: CompareResult, metric: str | None = None) -> dict[str, Any]:
    """The result as JSON-ready data, numbers unrounded; undefined ones are ``null``."""
    effect = "Hedges' g (pooled std, exact small-sample correction)"
    return {
        "metric": metric,
        "higher_is_better": r.higher_is_better,
        "alpha": r.alpha,
        "power": r.power,
        "groups": [
            {"name": g.name, "n": g.n, "mean": _num(g.mean), "std": _num(g.std)} for g in r.groups
        ],
        "pooled_std": _num(r.pooled_std),
        "pooled_df": r.pooled_df,
        "pairs": [
            {
                "a": p.a,
                "b": p.b,
                "diff": _num(p.diff),
                "ci": [_num(p.ci_low), _num(p.ci_high)],
                "ci_level": 1.0 - r.alpha,
                "test": "Welch's t-test, two-sided",
                "t": _num(p.t),
                "df": _num(p.df),
                "p": _num(p.p),
                "p_holm": _num(p.p_adjusted),
                "effect_size": _num(p.hedges_g),
                "effect_size_kind": effect,
                "resolvable_at_power": _num(p.resolvable),
                "tested": p.tested,
                "significant": p.significant,
                "verdict": p.verdict,
            }
            for p in r.pairs
        ],
        "plans": [
            {
                "delta": pl.delta,
                "std": _num(pl.std),
                "std_source": pl.std_source,
                "power": r.power,
                "alpha": r.alpha,
                "runs_per_setting": pl.n,
                "achieved_power": _num(pl.achieved_power),
                "std_upper_80": None if pl.std_upper is None else _num(pl.std_upper),
                "runs_per_setting_at_std_upper": pl.n_upper,
            }
            for pl in r.plans
        ],
        "notes": r.notes,
    }


def _cell(x: float, dec: int) -> str:
    return "–" if math.isnan(x) else f"{x:.{dec}f}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def render_text(r: CompareResult, metric: str | None = None) -> str:
    """The report ``normlab compare`` prints: groups, pairs, verdicts, resolution, plan."""
    from ..lab.analysis.compare import decimals_for, fmt_p

    dec = decimals_for(r.groups)
    level = f"{100 * (1 - r.alpha):g}%"
    out = [f"metric: {metric}", ""] if metric else []
    rows = [["group", "n", "mean", "std"]]
    rows += [[g.name, str(g.n), _cell(g.mean, dec), _cell(g.std, dec)] for g in r.groups]
    out += _table(rows, {1, 2, 3})
    rows = [["pair", "diff", f"{level} CI", "t", "df", "p", "Hedges' g"]]
    for p in r.pairs:
        ci = "–" if not p.tested else f"{p.ci_low:.{dec}f}..{p.ci_high:.{dec}f}"
        rows.append(
            [
                f"{p.a} - {p.b}",
                _cell(p.diff, dec),
                ci,
                _cell(p.t, 2),
                _cell(p.df, 1),
                "–" if math.isnan(p.p) else fmt_p(p.p),
                _cell(p.hedges_g, 2),
            ]
        )
    out += ["", *_table(rows, {1, 2, 3, 4, 5, 6})]
    out += ["", "verdict (Welch's t-test, two-sided, alpha " + f"{r.alpha:g}):"]
    out += [f"  {p.a} vs {p.b}: {p.verdict}" for p in r.pairs]
    resolved = [p for p in r.pairs if p.tested]
    if resolved:
        out += [
            "",
            f"resolution: the smallest true difference these runs find with "
            f"{100 * r.power:g}% power (alpha {r.alpha:g}, the pair's pooled std):",
        ]
        out += [f"  {p.a} vs {p.b}: {p.resolvable:.{dec}f}" for p in resolved]
    if not math.isnan(r.pooled_std):
        out += [
            "",
            f"spread: pooled std {r.pooled_std:.{dec}f} between runs of one setting "
            f"({r.pooled_df} df).",
        ]
    for pl in r.plans:
        where = "given" if pl.std_source == "given" else "observed"
        need = f"{pl.n} runs per setting" if pl.n is not None else "more than 10,000,000 runs"
        line = (
            f"plan: to resolve a difference of {pl.delta:g} with {100 * r.power:g}% power at "
            f"alpha {r.alpha:g} (two-sided) with the {where} std {pl.std:.{dec}f}: {need}"
        )
        if pl.n is not None:
            line += f" (power {pl.achieved_power:.3f})"
        out += ["", line + "."]
        if pl.std_upper is not None and pl.n_upper != pl.n:
            n_up = f"{pl.n_upper}" if pl.n_upper is not None else "more than 10,000,000"
            out.append(
                f"      the std is estimated from few runs; at its 80% upper bound "
                f"{pl.std_upper:.{dec}f}: {n_up} runs per setting."
            )
    out += ["", *[f"note: {n}" for n in r.notes]] if r.notes else []
    return "\n".join(out)
