"""``normlab report``: re-render a sweep store's table, plot and Markdown report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..lab.sweep.paths import check_report_outputs, check_store_path
from .task import print_results

__all__ = ["add_parser", "add_report_outputs", "run"]


def add_report_outputs(p: argparse.ArgumentParser, *, progress: bool) -> None:
    """``--out``, ``--json`` and ``--quiet``, shared by ``normlab sweep`` and ``normlab report``."""
    p.add_argument("--out", default="normlab-report", help="report folder (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON to this path")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, no table" if progress else "print nothing (no table)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render the report of a sweep store",
        description="Re-render the table, plot and Markdown report from a run store.",
    )
    p.add_argument("db", help="SQLite run store written by `normlab sweep`")
    add_report_outputs(p, progress=False)


def run(args: argparse.Namespace) -> int:
    check_report_outputs(args.out, args.json)
    check_store_path(args.db, write=False, option="store")
    from ..lab.analysis.report import summarize, write_json, write_report
    from ..lab.sweep.store import RunStore

    with RunStore(args.db, readonly=True) as store:
        records = store.records()
    if not records:
        print(f"{args.db}: the store holds no runs yet; run `normlab sweep`", file=sys.stderr)
        return 1
    files = write_report(records, args.out)
    if args.json:
        write_json(summarize(records), args.json)
    if not args.quiet:
        print_results(records)
        print(f"\nReport: {files.markdown}")
    return 0
