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
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_CLOSED_PIPE",
    "EXIT_ERRORS",
    "EXIT_FORWARD",
    "EXIT_OK",
    "EXIT_TARGET",
    "EXIT_USAGE",
    "DoctorTargetError",
    "add_parser",
    "load_factory",
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


class DoctorTargetError(RuntimeError):
    """A ``module.py:factory`` target could not be loaded.

    ``part`` says which step failed: ``"spec"`` (malformed string), ``"file"``
    (no such file), ``"import"`` (importing the module raised), ``"attribute"``
    (no such factory), ``"call"`` (the factory raised) or ``"result"`` (it did not
    return ``(model, example_inputs)``).
    """

    def __init__(self, part: str, target: str, message: str) -> None:
        super().__init__(f"{target}: {message}")
        self.part = part
        self.target = target


def load_factory(target: str) -> tuple[Any, Any]:
    """Import ``"path/to/file.py:factory"`` (or ``"package.module:factory"``) and call it.

    The contract: ``factory`` takes no arguments and returns
    ``(model, example_inputs)`` — an ``nn.Module`` in the mode to diagnose (call
    ``.eval()`` for inference) and one batch as :func:`diagnose` accepts it (a
    tensor, a list of images, a tuple of positional inputs or a dict of keyword
    inputs). A file's
    own folder is on ``sys.path`` while it is imported, so it may import its
    neighbours.

    Raises:
        DoctorTargetError: with ``part`` naming the step that failed.
    """
    from torch import nn

    if ":" not in target or target.endswith(":") or target.startswith(":"):
        raise DoctorTargetError(
            "spec",
            target,
            "expected 'path/to/file.py:factory' or 'package.module:factory' (a colon, then "
            "the name of a function returning (model, example_inputs)).",
        )
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(target, Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise DoctorTargetError(
                "import", target, f"importing module {where!r} failed: {type(e).__name__}: {e}"
            ) from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise DoctorTargetError(
            "attribute",
            target,
            f"{where} has no callable {attr!r}; callables defined there: "
            f"{', '.join(names) or 'none'}.",
        )
    try:
        result = factory()
    except Exception as e:
        raise DoctorTargetError(
            "call", target, f"calling {attr}() raised {type(e).__name__}: {e}"
        ) from e
    if (
        not isinstance(result, (tuple, list))
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        raise DoctorTargetError(
            "result",
            target,
            f"{attr}() returned {type(result).__name__}; it must return "
            "(model: nn.Module, example_inputs).",
        )
    return result[0], result[1]


def _import_file(target: str, path: Path) -> Any:
    if not path.is_file():
        raise DoctorTargetError("file", target, f"no such file: {path}")
    name = f"_normlab_doctor_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DoctorTargetError("import", target, f"{path} cannot be imported as a module.")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise DoctorTargetError(
            "import", target, f"importing {path} failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


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
    from .doctor import DoctorForwardError, diagnose

    try:
        model, inputs = load_factory(args.target)
    except DoctorTargetError as e:
        code = EXIT_TARGET if e.part in ("import", "call") else EXIT_USAGE
        return _fail(args, code, f"cannot load {e}", e)
    try:
        report = diagnose(
            model,
            inputs,
            expect_eval=True if args.expect_eval else None,
            train_batch_size=args.train_batch_size,
        )
    except DoctorForwardError as e:
        return _fail(args, EXIT_FORWARD, f"{args.target}: {e}", e)
    failed = report.has_errors or (args.strict and not report.ok)
    text = report.to_json() if args.json else report.to_table(verbose=args.verbose)
    if not _write(text):
        return EXIT_CLOSED_PIPE
    return EXIT_ERRORS if failed else EXIT_OK


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
