"""Lazy package attributes (PEP 562), shared by ``normlab``, ``normlab.lab`` and the tools.

A package lists its exported names and the submodule each lives in; the submodule is
imported on first access, so importing the package costs nothing until a name is used
(``normlab compare`` then never imports torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any


def lazy_attributes(
    package: str,
    namespace: dict[str, Any],
    sources: dict[str, tuple[str, str | None]],
    exported: Iterable[str],
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    ``sources`` maps a name to (relative submodule, attribute there, or None for the
    submodule itself). Any other public submodule is imported on access too. A resolved
    name is stored in ``namespace`` (the package's globals), so it resolves once.
    """
    names = set(exported)

    def getattr_(name: str) -> Any:
        if name in sources:
            module_name, attr = sources[name]
            module = importlib.import_module(module_name, package)
            value = module if attr is None else getattr(module, attr)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | names)

    return getattr_, dir_


def names_from(modules: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, str | None]]:
    """The ``sources`` of :func:`lazy_attributes` from each module and the names it exports."""
    return {name: (module, name) for module, names in modules.items() for name in names}


def lazy_package(
    package: str,
    namespace: dict[str, Any],
    modules: dict[str, tuple[str, ...]],
    private: dict[str, tuple[str, str | None]] | None = None,
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` of a package from its one module table.

    ``modules`` maps each relative module to the public names it exports; ``__all__``
    is those names, sorted. ``private`` adds names resolved the same way but not
    exported. For type checkers the package imports the same names under
    ``TYPE_CHECKING`` as explicit re-exports (``from .m import x as x``).
    """
    sources = {**names_from(modules), **(private or {})}
    exported = sorted(name for names in modules.values() for name in names)
    return (exported, *lazy_attributes(package, namespace, sources, exported))
