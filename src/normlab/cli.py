"""Command line: parse arguments, call the library, print. Nothing else lives here.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _add_check(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "check",
        help="list every layer and verify it against its float64 reference",
        description="Build every catalogue layer in float64 with random parameters, run "
        "forward and backward on fresh off-center data and compare with normlab.reference.",
    )


def _run_check(args: argparse.Namespace) -> int:
    from .catalogue import run_checks

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


def _add_doctor(subparsers: argparse._SubParsersAction) -> None:
    from .doctor_cli import add_parser

    add_parser(subparsers)


def _run_doctor(args: argparse.Namespace) -> int:
    from .doctor_cli import run

    return run(args)


def _lab_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .lab.commands import RUNNERS

        return RUNNERS[name](args)

    return run


def _run_compare(args: argparse.Namespace) -> int:
    from .lab.compare_cli import run_compare

    return run_compare(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "sweep": _lab_command("sweep"),
    "report": _lab_command("report"),
    "check": _run_check,
    "doctor": _run_doctor,
    "bench": _lab_command("bench"),
    "compare": _run_compare,
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .lab.commands import add_bench, add_report, add_sweep
    from .lab.compare_cli import add_compare

    parser = argparse.ArgumentParser(prog="normlab", description="normlab command line")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_sweep(subparsers)
    add_report(subparsers)
    _add_check(subparsers)
    _add_doctor(subparsers)
    add_bench(subparsers)
    add_compare(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normlab``; returns the exit status.

    Errors a user can fix are one line on stderr and status 2; Ctrl-C is status 130; a
    closed pipe (``normlab ... | head``) ends quietly, as a command killed by SIGPIPE; an
    output that cannot be written (``> /dev/full``, a full disk) is one line and status 2.
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as e:
        where = e.filename or "standard output"
        if e.filename is None:
            _silence_stdout()
        print(f"normlab: error: cannot write {where} ({e.strerror or e})", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _main(argv: Sequence[str] | None) -> int:
    from .lab.errors import DataError, StoreError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare":
        # Groups may stand anywhere, also after options: argparse stops filling a
        # positional list at the first option, so the later groups arrive as extras.
        args.groups = list(args.groups) + [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _COMMANDS[args.command](args)
    except (DataError, StoreError, ValueError, KeyError) as e:
        print(f"normlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if argv is None:  # the command line: the process exits now; a second ^C must wait
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"normlab {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
