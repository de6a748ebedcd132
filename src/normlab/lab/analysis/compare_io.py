"""Where ``normlab compare`` gets its groups: command-line specs, a CSV, a sweep store.

Every reader returns :class:`~normlab.lab.analysis.compare.Group` objects in the order the user
gave them, and raises :class:`ValueError` with a one-line message that names the bad
value, row or column and the way out.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .compare import Group

if TYPE_CHECKING:
    from .cells import Cell

__all__ = ["groups_from_csv", "groups_from_specs", "groups_from_store", "parse_number"]


def parse_number(text: str, where: str) -> float:
    """``text`` as a finite float; the error names ``where`` it came from."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def _unique(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"group {name!r} is given twice; put all its runs in one {name}=V1,V2,... "
                "or give the second a name of its own"
            )
        seen.add(name)


def groups_from_specs(specs: Sequence[str]) -> list[Group]:
    """Groups from ``NAME=V1,V2,...`` arguments (``bs4=74.1,73.0,75.2``)."""
    groups = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected NAME=V1,V2,... such as bs4=74.1,73.0,75.2, got {spec!r}")
        texts = [v for v in values.split(",") if v.strip()]
        if not texts:
            raise ValueError(f"group {name!r} has no values; give them as {name}=V1,V2,...")
        groups.append(Group(name, tuple(parse_number(v, f"group {name!r}") for v in texts)))
    _unique([g.name for g in groups])
    return groups


def groups_from_csv(path: str | Path, group: str, metric: str) -> list[Group]:
    """Groups from a long-format CSV (one row per run): the ``group`` column names the
    setting, the ``metric`` column holds the run's value. Groups keep their first-seen order."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
            if not columns:
                raise ValueError(f"{path}: empty file, expected a header row and one row per run")
            for role, col in (("--group", group), ("--metric", metric)):
                if col not in columns:
                    raise ValueError(
                        f"{path}: no column {col!r} for {role}; the columns are "
                        f"{', '.join(repr(c) for c in columns)}"
                    )
            values: dict[str, list[float]] = {}
            for row in reader:
                line = reader.line_num
                key = (row.get(group) or "").strip()
                cell = row.get(metric)
                if not key and not (cell or "").strip():
                    continue  # a blank line
                if not key:
                    raise ValueError(f"{path} line {line}: the {group!r} cell is empty")
                if cell is None or not cell.strip():
                    raise ValueError(f"{path} line {line}: the {metric!r} cell is empty")
                where = f"{path} line {line}, column {metric!r}"
                values.setdefault(key, []).append(parse_number(cell, where))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass the CSV of your runs to --csv") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    if not values:
        raise ValueError(f"{path}: no runs below the header row")
    return [Group(k, tuple(v)) for k, v in values.items()]


_CELL = re.compile(r"^\s*(?P<norm>[^@\[\]]+?)\s*@\s*(?P<bs>\d+)\s*(?:\[(?P<proto>[^\]]*)\])?\s*$")


def _cell_norms(text: str) -> set[str]:
    """The report names a cell's norm may have: its one spelling
    (:func:`~normlab.lab.models.resnet.canonical_norm`: ``BN`` is ``bn``), with a data-parallel
    row's ``×K`` (written ``xK`` too)."""
    from ..models.resnet import canonical_norm

    names = set()
    for form in (text.strip().lower(), text.strip().lower().replace("x", "×")):
        base, times, ranks = form.partition("×")
        try:
            base = canonical_norm(base)
        except ValueError:
            pass  # not a norm: it matches no cell, and the error lists the cells
        names.add(base + times + ranks)
    return names


def groups_from_store(db: str | Path, cells: Sequence[str]) -> list[Group]:
    """Groups of final test error (%) from cells of a sweep store: ``NORM@BATCH`` such as
    ``bn@2`` (``bn×2@4`` for a data-parallel row), with ``[PROTOCOL]`` such as
    ``bn@2[epochs=1]`` when the store holds runs of several protocols."""
    from ..sweep.store import RunStore
    from .report import summarize

    with RunStore(db, readonly=True) as store:
        records = store.records()
    if not records:
        raise ValueError(f"{db}: the store holds no runs yet; run `normlab sweep --db {db}`")
    table = summarize(records)

    def name(c: Cell) -> str:
        return f"{c.norm}@{c.batch_size}" + (f"[{c.protocol}]" if c.protocol else "")

    available = ", ".join(name(c) for c in table)
    groups = []
    given: dict[str, str] = {}  # cell name -> the spec that named it
    for spec in cells:
        m = _CELL.match(spec)
        if m is None:
            raise ValueError(f"expected a cell NORM@BATCH such as bn@2, got {spec!r}")
        norms = _cell_norms(m["norm"])
        found = [c for c in table if c.norm in norms and c.batch_size == int(m["bs"])]
        if m["proto"] is not None:
            found = [c for c in found if c.protocol == m["proto"].strip()]
        if not found:
            raise ValueError(f"{db}: no runs in cell {spec!r}; the cells are {available}")
        if len(found) > 1:
            raise ValueError(
                f"{db}: cell {spec!r} holds runs of {len(found)} protocols; name one: "
                + ", ".join(name(c) for c in found)
            )
        cell = name(found[0])
        if cell in given:
            raise ValueError(
                f"cells {given[cell]!r} and {spec.strip()!r} are the same cell {cell} (norm "
                "names ignore case and -/_); name each cell once"
            )
        given[cell] = spec.strip()
        groups.append(Group(cell, tuple(found[0].errors)))
    return groups
