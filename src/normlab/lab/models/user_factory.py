"""Loading the user's model factory for ``normlab sweep --model``, without importing torch.

``--model path/to/file.py:build`` or ``--model package.module:build`` names a function or
class that returns the network. The factory may take any of ``num_classes=``,
``in_channels=`` and ``norm_layer=`` (named parameters; ``**kwargs`` alone is not taken
as accepting them); :mod:`normlab.lab.models.user_model` builds and converts the model.

:attr:`UserFactory.source_hash` hashes the factory's source file, so runs of an edited
file are new runs rather than stale resumed ones. A :class:`UserFactory` pickles as its
spec and reloads in spawned worker processes, refusing a file edited in between.
This module imports no torch, so the CLI can catch :class:`ModelFactoryError` cheaply
(importing the user's file usually imports torch, of course).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._loading import SpecLoadError, exec_file, own_callables

__all__ = ["OFFERED", "ModelFactoryError", "UserFactory", "load_factory"]

#: The keyword arguments the lab passes to a factory that names them.
OFFERED = ("num_classes", "in_channels", "norm_layer")
_FORMS = "'path/to/file.py:factory' or 'package.module:factory'"


class ModelFactoryError(ValueError):
    """The user's model factory cannot be loaded, called, converted or trained as given."""


@dataclass(frozen=True)
class UserFactory:
    """A loaded model factory.

    Attributes:
        factory: the callable (function or class) that returns the model.
        name: display name, e.g. ``"my_model.py:build"``.
        source_hash: first 16 hex digits of the sha256 of the source file bytes (the
            module's file; the file that defines the factory too when it is another).
        spec: the spec with an absolute path, enough to load it again elsewhere.
        accepts: which of ``num_classes``, ``in_channels``, ``norm_layer`` it names.
    """

    factory: Callable[..., Any] = field(repr=False, compare=False)
    name: str
    source_hash: str
    spec: str
    accepts: frozenset[str]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reload, (self.spec, self.source_hash))


def _reload(spec: str, source_hash: str) -> UserFactory:
    """Load ``spec`` again (in a worker process) and refuse a source that changed."""
    loaded = load_factory(spec)
    if loaded.source_hash != source_hash:
        raise ModelFactoryError(
            f"{loaded.name}: the source changed since the sweep started (hash "
            f"{loaded.source_hash}, expected {source_hash}), so its runs would mix two models; "
            "rerun the sweep (the edited file gets new runs)."
        )
    return loaded


def load_factory(spec: str) -> UserFactory:
    """Load ``file.py:name`` (path relative to the cwd, or absolute) or ``module:name``.

    A file is imported under a private module name that is in ``sys.modules`` only while
    it executes, with its folder first on ``sys.path`` meanwhile (so it can import its
    neighbours, as ``python file.py`` could). ``name`` may be dotted (``Net.create``).

    Raises:
        ModelFactoryError: no colon, missing file, failing import, missing or
            non-callable attribute, or required parameters the lab cannot supply.
    """
    where, colon, attr = str(spec).rpartition(":")
    if not colon or not where or not attr:
        raise ModelFactoryError(
            f"--model {spec!r}: expected {_FORMS} (a ':' then the name of the function or "
            "class that returns the model), e.g. examples/my_model.py:build."
        )
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    if is_file:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ModelFactoryError(
                f"--model {spec!r}: file {path} does not exist (a relative path is read from "
                f"the current directory, {Path.cwd()}); fix the path, or write a module as "
                "'package.module:factory'."
            )
        if path.suffix != ".py":
            raise ModelFactoryError(
                f"--model {spec!r}: {path.name} is not a .py file; point at the Python file "
                "that defines the factory."
            )
        name, resolved = f"{path.name}:{attr}", f"{path}:{attr}"
        module, hashed = _import_file(path, name)
    else:
        if not all(part.isidentifier() for part in where.split(".")):
            raise ModelFactoryError(
                f"--model {spec!r}: {where!r} is neither a .py file nor a module name; "
                f"use {_FORMS}."
            )
        name = resolved = f"{where}:{attr}"
        module = _import_module(where, name)
        hashed = getattr(module, "__file__", None)
        if hashed is None:
            raise ModelFactoryError(
                f"{name}: module {where} has no source file to hash (a namespace package or "
                "a built-in), so edits could not be told apart; use a module with a file."
            )
    factory = _attribute(module, attr, name)
    files = [Path(hashed).resolve()]
    defining = _defining_file(factory)
    if defining is not None and defining not in files:
        files.append(defining)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return UserFactory(factory, name, digest.hexdigest()[:16], resolved, _accepts(factory, name))


def _import_file(path: Path, name: str) -> tuple[Any, Path]:
    """Execute the file as a private module; it is removed from sys.modules afterwards."""
    key = f"_normlab_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    try:
        module = exec_file(path, key, keep=False)
    except SpecLoadError as e:
        raise ModelFactoryError(f"{name}: Python cannot load {path} as a module.") from e
    except (Exception, SystemExit) as e:
        raise ModelFactoryError(
            f"{name}: importing {path} failed with {type(e).__name__}: {e}. Fix the file "
            f"(`python {path}` shows the traceback)."
        ) from e
    return module, path


def _import_module(where: str, name: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name is not None and (where == e.name or where.startswith(e.name + ".")):
            raise ModelFactoryError(
                f"{name}: there is no module named {e.name!r} on the Python path; install "
                "its package or add its folder to PYTHONPATH, or give a file as "
                "path/to/file.py:factory."
            ) from e
        raise ModelFactoryError(
            f"{name}: importing {where} failed with ModuleNotFoundError: {e}."
        ) from e
    except (Exception, SystemExit) as e:
        raise ModelFactoryError(
            f"{name}: importing {where} failed with {type(e).__name__}: {e}. Fix the module "
            f"(`python -c 'import {where}'` shows the traceback)."
        ) from e


def _attribute(module: Any, attr: str, name: str) -> Callable[..., Any]:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            own = own_callables(module)
            defined = (
                f"the callables it defines are: {', '.join(own)}"
                if own
                else "it defines no public function or class"
            )
            raise ModelFactoryError(
                f"{name}: {attr!r} is not defined in the module ({defined}); name the "
                "function or class that returns the model after the ':'."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFactoryError(
            f"{name}: {attr!r} is a {type(obj).__name__} ({short_text(obj)}), not callable; "
            "name a function or class that returns the nn.Module."
        )
    return obj  # type: ignore[no-any-return]


def _defining_file(factory: Callable[..., Any]) -> Path | None:
    """The file that defines a function, or a class of an importable module; else None."""
    if isinstance(factory, type):
        found = getattr(sys.modules.get(factory.__module__), "__file__", None)
    else:
        found = getattr(getattr(factory, "__code__", None), "co_filename", None)
    if found is None or not Path(found).is_file():
        return None
    return Path(found).resolve()


def _accepts(factory: Callable[..., Any], name: str) -> frozenset[str]:
    """The offered keywords the factory names; refuse required parameters the lab lacks."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): pass nothing
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepts = frozenset(p.name for p in params if p.name in OFFERED and p.kind in named)
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in accepts
    ]
    if required:
        raise ModelFactoryError(
            f"{name}: the factory requires {', '.join(required)}, which the lab cannot pass "
            f"(it passes only {', '.join(f'{k}=' for k in OFFERED)} as keywords); give them "
            "defaults, or wrap it in a function that fills them in."
        )
    return accepts


def short_text(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
