"""The ``normlab`` command: one parser, each subcommand a module of this package.

Every subcommand module (``sweep``, ``report``, ``check``, ``doctor``, ``bench``,
``compare``, ``data``) has ``add_parser(subparsers)`` and ``run(args) -> int``; this module builds
the parser from them and turns the errors a user can fix into one line and a status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType

from . import bench, check, compare, data, doctor, report, sweep

__all__ = ["build_parser", "main"]

#: The subcommands in the order ``normlab --help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "sweep": sweep,
    "report": report,
    "check": check,
    "doctor": doctor,
    "bench": bench,
    "compare": compare,
    "data": data,
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="normlab", description="normlab command line")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(subparsers)
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
    from ..lab.errors import DataError, StoreError

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
        return COMMANDS[args.command].run(args)
    except (DataError, StoreError, ValueError, KeyError) as e:
        print(f"normlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if argv is None:  # the command line: the process exits now; a second ^C must wait
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"normlab {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
