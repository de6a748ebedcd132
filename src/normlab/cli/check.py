"""``normlab check``: every catalogue layer against its float64 reference, one line each."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "check",
        help="list every layer and verify it against its float64 reference",
        description="Build every catalogue layer in float64 with random parameters, run "
        "forward and backward on fresh off-center data and compare with normlab.reference.",
    )


def run(args: argparse.Namespace) -> int:
    from ..catalogue import run_checks

    results = run_checks()
    print(f"{'layer':52} {'family':10} {'max |dy|':>10} {'max |dgrad|':>12}  result")
    for r in results:
        verdict = "ok" if r.ok else "FAIL"
        print(
            f"{r.name:52} {r.family:10} {r.max_abs_err_y:10.2e} {r.max_abs_err_grads:12.2e}"
            f"  {verdict}"
        )
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
