"""The ``normlab`` command line: every argparse parser and handler of normlab lives here.

One module per subcommand (``sweep``, ``report``, ``check``, ``doctor``, ``bench``,
``compare``), each with ``add_parser(subparsers)`` and ``run(args) -> int``; ``args``,
``length``, ``model`` and ``task`` hold the sweep's option types and groups, and
``entry`` the parser and :func:`main`. The libraries below return records and never parse
arguments. Building the parser imports no torch, so ``normlab --help`` is fast.
"""

from __future__ import annotations

from .entry import build_parser, main

__all__ = ["build_parser", "main"]
