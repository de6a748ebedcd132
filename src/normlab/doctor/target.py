"""Load a ``file.py:factory`` target for the doctor: import it, call it, check the result.

Shared by :func:`normlab.doctor.load_target` (the library) and ``normlab doctor`` (the
command line), which maps each failing step to its exit code.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .._loading import SpecLoadError, exec_file, own_callables

__all__ = ["DoctorTargetError", "load_target"]


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


def load_target(target: str) -> tuple[Any, Any]:
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
        names = own_callables(module)
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
    try:
        return exec_file(path, name, keep=True)
    except SpecLoadError as e:
        raise DoctorTargetError("import", target, f"{path} cannot be imported as a module.") from e
    except Exception as e:
        raise DoctorTargetError(
            "import", target, f"importing {path} failed: {type(e).__name__}: {e}"
        ) from e
