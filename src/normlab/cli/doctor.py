"""``normlab doctor``: load a model from a ``file.py:factory`` target, diagnose it, print.

Exit codes (also in ``normlab doctor --help``):

===  =======================================================================
0    no error findings (warnings and info may be printed; ``--strict``: none)
1    error findings (``--strict``: error or warning findings)
2    usage: bad arguments, or the target cannot be found (malformed
     ``file.py:factory``, no such file, no such factory, or the factory did
     not return ``(model, example_inputs)``)
3    the target's code failed: importing its module or calling the factory
     raised
4    the model's forward on ``example_inputs`` raised
141  stdout was closed early (``| head``): the output stops quietly
===  =======================================================================

Failures print one line to stderr (``--traceback`` for the full traceback). When
the reader of stdout goes away (``normlab doctor t.py:f | head -1``), the
command stops writing and exits quietly with status 141.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..doctor.target import DoctorTargetError, load_target

__all__ = [
    "EXIT_CLOSED_PIPE",
    "EXIT_ERRORS",
    "EXIT_FORWARD",
    "EXIT_OK",
    "EXIT_TARGET",
    "EXIT_USAGE",
    "DoctorTargetError",
    "add_parser",
    "load_target",
    "run",
]

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2
EXIT_TARGET = 3
EXIT_FORWARD = 4
EXIT_CLOSED_PIPE = 141  # as a command killed by SIGPIPE, like the other normlab commands

_DESCRIPTION = """\
Load a model from 'path/to/file.py:factory' (or 'package.module:factory'; the
factory takes no arguments and returns (model, example_inputs)), run it once
with hooks and report findings: one line per finding code with the modules it
was found in, then why each matters and the fix.

A model in eval mode is judged as evaluated (running statistics, layers left in
training mode); a model in training mode at the example's batch size. Add
--train-batch-size N to judge the batch statistics training will compute."""

_EPILOG = """\
exit codes:
  0    no error findings (warnings and info may be printed; with --strict: none)
  1    error findings (with --strict: error or warning findings)
  2    usage: bad arguments, or the target cannot be found (malformed target, no
       such file or factory, or the factory did not return (model, example_inputs))
  3    the target's code failed: importing its module or calling the factory raised
  4    the model's forward on example_inputs raised
  141  stdout was closed early (e.g. | head): the output stops quietly
"""


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- the command


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand and its options to ``subparsers``."""
    p = subparsers.add_parser(
        "doctor",
        help="find BatchNorm pitfalls in a model",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="path/to/file.py:factory or package.module:factory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--expect-eval",
        action="store_true",
        help="say that you are evaluating: flags layers still in training mode",
    )
    p.add_argument(
        "--train-batch-size",
        type=_positive_int,
        metavar="N",
        help="judge the batch statistics training computes at batch size N (N × H × W "
        "values per statistic at each layer), also for a model in eval mode",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="list every module and the layer table"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument(
        "--traceback", action="store_true", help="print the full traceback when the target fails"
    )
    return p


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(args: argparse.Namespace, code: int, message: str, error: BaseException) -> int:
    if getattr(args, "traceback", False):
        traceback.print_exception(error, file=sys.stderr)
    hint = "" if getattr(args, "traceback", False) else " (--traceback for details)"
    print(f"normlab doctor: {_one_line(message)}{hint}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Run ``normlab doctor`` on parsed ``args``; returns the exit code (see the module doc)."""
    from ..doctor import DoctorForwardError, diagnose

    try:
        model, inputs = load_target(args.target)
    except DoctorTargetError as e:
        code = EXIT_TARGET if e.part in ("import", "call") else EXIT_USAGE
        return _fail(args, code, f"cannot load {e}", e)
    except SystemExit as e:
        return _fail(args, EXIT_TARGET, f"cannot load {args.target}: {_exited(e, 'its code')}", e)
    try:
        report = diagnose(
            model,
            inputs,
            expect_eval=True if args.expect_eval else None,
            train_batch_size=args.train_batch_size,
        )
    except DoctorForwardError as e:
        return _fail(args, EXIT_FORWARD, f"{args.target}: {e}", e)
    except SystemExit as e:
        return _fail(args, EXIT_FORWARD, f"{args.target}: {_exited(e, 'the forward pass')}", e)
    failed = report.has_errors or (args.strict and not report.ok)
    text = report.to_json() if args.json else report.to_table(verbose=args.verbose)
    if not _write(text):
        return EXIT_CLOSED_PIPE
    return EXIT_ERRORS if failed else EXIT_OK


def _exited(e: SystemExit, who: str) -> str:
    """Why a target's ``sys.exit`` is not obeyed."""
    return (
        f"{who} called sys.exit({e.code!r}), which would end normlab itself; a factory "
        "returns (model, example_inputs) and a forward returns outputs. Remove the exit call"
    )


def _write(text: str) -> bool:
    """Print ``text``; False if the reader went away (then stdout is silenced, no traceback)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice (signal docs, "Note on SIGPIPE"): point stdout at devnull so
        # the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return False
    return True
