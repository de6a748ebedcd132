"""``include=`` / ``exclude=``: which modules a whole-model tool may touch, decided in one place.

Every whole-model tool (``convert_norms``, ``freeze_bn``, ``unfreeze_bn``,
``fuse_conv_bn``, ``recalibrate``, ``convert_sync``, ``revert_sync``) takes the same
two filters and resolves them here, so a pattern means the same thing everywhere:

* a string or a list of strings: glob patterns (:func:`fnmatch.fnmatchcase`) on the
  dotted module path of ``model.named_modules()``, e.g. ``"backbone.body.layer1"``
  or ``"backbone.body.layer1.*"``; ``*`` also crosses dots;
* a predicate ``(name, module) -> bool``.

A pattern (or predicate) that selects a module also selects everything inside it,
so ``"layer1"`` covers ``layer1.0.bn1``. A module is chosen when one of its paths is
included (everything is, without ``include``) and not excluded. A module registered
under several names is chosen when any of its names is.

A string pattern that names no module of the model is refused, naming the closest
paths, and so is a predicate that selects nothing: a typo must not make the tool do
nothing, or, in ``exclude``, everything.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TypedDict

from torch import nn

__all__ = ["Filter", "Selection", "select_modules"]

Predicate = Callable[[str, nn.Module], bool]
#: what ``include=`` / ``exclude=`` take
Filter = str | Sequence[str] | Predicate | None


class Filters(TypedDict, total=False):
    """The two filter keywords, for the tools' typed overloads (``**options: Unpack[...]``)."""

    include: Filter
    exclude: Filter


def _ancestry(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``; ``""`` (the model) -> ``[""]``."""
    if not path:
        return [""]
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class _Rule:
    """One resolved filter: the paths it selects (with everything below them)."""

    def __init__(self, tool: str, arg: str, value: Filter, named: list[tuple[str, nn.Module]]):
        self.given = value is not None
        self.hits: set[str] = set()
        if value is None:
            return
        paths = [p for p, _ in named]
        if callable(value) and not isinstance(value, str):
            self.hits = {p for p, m in named if value(p, m)}
            if not self.hits:
                raise ValueError(
                    f"{tool}: the {arg}= predicate returned False for every module of the "
                    f"model, so it {_effect(arg)}. Check the predicate (it is called as "
                    "predicate(name, module) with the dotted path of model.named_modules())."
                )
            return
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"{tool}: {arg}= takes a glob pattern, a list of patterns or a predicate "
                f"(name, module) -> bool, got {type(value).__name__} {value!r:.60}."
            )
        for pattern in patterns:
            found = {p for p in paths if fnmatchcase(p, pattern)}
            if not found:
                close = difflib.get_close_matches(pattern, [p for p in paths if p], n=5)
                hint = f" Close matches: {', '.join(map(repr, close))}." if close else ""
                raise ValueError(
                    f"{tool}: the {arg}= pattern {pattern!r} matches no module of the model, "
                    f"so it {_effect(arg)}.{hint} Patterns are globs on the dotted paths of "
                    "model.named_modules() (e.g. 'backbone.body.layer1' or "
                    "'backbone.body.layer1.*'); a pattern selects the modules inside its "
                    "matches too."
                )
            self.hits |= found

    def covers(self, path: str) -> bool:
        return any(a in self.hits for a in _ancestry(path))


def _effect(arg: str) -> str:
    return "would select nothing" if arg == "include" else "would exclude nothing"


@dataclass(frozen=True)
class Selection:
    """The resolved filters of one tool call.

    Attributes:
        chosen: ids of the candidate modules the tool may touch.
        left_out: first paths (``"<model>"`` for the model) of the candidates the
            filters left out, in ``named_modules`` order.
        filtered: True when ``include`` or ``exclude`` was given.
    """

    chosen: frozenset[int]
    left_out: tuple[str, ...]
    filtered: bool

    def __call__(self, module: nn.Module) -> bool:
        """Whether the tool may touch ``module`` (a candidate the filters kept)."""
        return id(module) in self.chosen

    def match(self, base: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
        """``base`` restricted to the chosen modules (what the surgery walker takes)."""
        return lambda m: base(m) and id(m) in self.chosen


def select_modules(
    model: nn.Module,
    include: Filter = None,
    exclude: Filter = None,
    *,
    candidates: Callable[[nn.Module], bool] = lambda m: True,
    tool: str = "select_modules",
) -> Selection:
    """Resolve ``include`` / ``exclude`` on ``model`` for the modules ``candidates`` accepts.

    Args:
        model: the model the tool walks.
        include: patterns or a predicate; None: every module.
        exclude: patterns or a predicate; None: none.
        candidates: the modules the tool acts on (its BatchNorms, ...); only these
            are chosen or listed as left out.
        tool: the tool's name, for the messages.

    Returns:
        A :class:`Selection`.

    Raises:
        ValueError: a pattern matching no module (the message names the closest
            paths), a predicate selecting nothing, or an ``include`` that keeps
            none of the tool's candidates although the model has some.
        TypeError: a filter that is neither patterns nor a predicate.
    """
    named = list(model.named_modules(remove_duplicate=False))
    keep, drop = (_Rule(tool, "include", include, named), _Rule(tool, "exclude", exclude, named))
    chosen: set[int] = set()
    first: dict[int, str] = {}
    for path, m in named:
        if not candidates(m):
            continue
        first.setdefault(id(m), path or "<model>")
        if (not keep.given or keep.covers(path)) and not drop.covers(path):
            chosen.add(id(m))
    left_out = tuple(p for i, p in first.items() if i not in chosen)
    if (keep.given or drop.given) and first and not chosen:
        raise ValueError(
            f"{tool}: include= / exclude= leave none of the {len(first)} layer(s) this tool "
            f"acts on (e.g. {', '.join(list(first.values())[:3])}), so nothing would change. "
            "Widen include= to modules holding them (a pattern selects the modules inside "
            "its matches) or narrow exclude=."
        )
    return Selection(frozenset(chosen), left_out, keep.given or drop.given)
