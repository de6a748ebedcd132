"""Import a user's Python file or module for the commands that take ``file.py:factory``.

``normlab doctor`` and ``normlab sweep --model`` both load a factory named on the command
line; they share how a file is executed and how a missing name is explained, and word
their own errors.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["SpecLoadError", "exec_file", "own_callables"]


class SpecLoadError(ImportError):
    """Python cannot make a module of the file (no loader for it)."""


def exec_file(path: Path, key: str, *, keep: bool) -> ModuleType:
    """Execute ``path`` as the module ``key``, with its folder first on ``sys.path`` while it
    runs (so it imports its neighbours, as ``python path`` would).

    The module is in ``sys.modules`` while it executes (dataclasses and typing look it up
    there) and afterwards only with ``keep``; never after a failure. The file's own
    exceptions propagate; :class:`SpecLoadError` when Python cannot load it at all.
    """
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise SpecLoadError(f"{path} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[key] = module
    sys.path.insert(0, folder)
    done = False
    try:
        spec.loader.exec_module(module)
        done = True
    finally:
        if not (done and keep):
            sys.modules.pop(key, None)
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def own_callables(module: ModuleType) -> list[str]:
    """The public functions and classes ``module`` defines itself, sorted."""
    return sorted(
        name
        for name, value in vars(module).items()
        if callable(value)
        and not name.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
    )
