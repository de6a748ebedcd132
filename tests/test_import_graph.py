"""The import graph of normlab: floors, no cycles, every module importable on its own.

Floors, each importing only from the floors below it (a module may import from its
own floor):

    _core  <-  kernels  <-  functional  <-  nn  <-  tools  <-  lab  <-  cli

with ``_core`` importing nothing of normlab outside ``_core`` (and, outside the
standard library, only torch, plus triton to probe whether the kernels can run),
and ``reference`` (the float64 NumPy references) importing only NumPy and ``_core``.
Every import counts: top level, function-local, and ``TYPE_CHECKING`` ones for the
floors (they are what a reader follows); the cycle check follows the imports that
run (all but ``TYPE_CHECKING``), including the implicit import of a module's parent
packages.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap
from functools import cache

import pytest

import normlab

SRC = pathlib.Path(normlab.__file__).parent
#: The floor of every top-level name in normlab, package or module, by its name alone
#: (no prefix rules): the tool families are packages (``normlab.doctor``, ``normlab.fuse``,
#: ...), and a new top-level name fails the test until it is placed here.
TOP = {
    "_core": "_core", "_lazy": "_lazy", "reference": "reference", "kernels": "kernels",
    "functional": "functional", "nn": "nn",
    "convert": "tools", "fuse": "tools", "recalibrate": "tools", "doctor": "tools",
    "catalogue": "tools", "registry": "tools", "distributed": "tools", "kinds": "tools",
    "feed": "tools", "guard": "tools", "_loading": "tools", "integrations": "tools",
    "lab": "lab",
    "cli": "cli", "__main__": "cli",
}  # fmt: skip
FLOOR = {"_core": 0, "_lazy": 0, "reference": 0, "kernels": 1, "functional": 2, "nn": 3}
FLOOR.update(root=3, tools=4, lab=5, cli=6)

# Tolerated violations, as (importer, imported) edges with the reason; there are none.
# The test fails on any violation not listed here, and on an entry that is no longer a
# violation (delete it then).
ALLOWED: dict[tuple[str, str], str] = {}


@cache
def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Every module of normlab: dotted name -> (file, is a package)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


@cache
def imports(module: str) -> tuple[tuple[str, bool], ...]:
    """``(imported, type_checking_only)`` for every import in ``module``'s source.

    Imported names are resolved to the deepest normlab module (``from .x import y``
    is module ``.x.y`` where that is a module); other libraries keep their top name.
    """
    path, is_pkg = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = _type_checking_nodes(tree)
    package = module if is_pkg else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub if sub in modules() else target, id(node) in typing_only))
    resolved = []
    for name, typing in found:
        if name == "normlab" or name.startswith("normlab."):
            while name not in modules():
                name = name.rpartition(".")[0]
        else:
            name = name.partition(".")[0]
        resolved.append((name, typing))
    return tuple(dict.fromkeys(resolved))


def floor_of(module: str) -> tuple[str, int]:
    if module == "normlab":
        return "root", FLOOR["root"]
    top = module.split(".")[1]
    if top not in TOP:
        raise AssertionError(f"{module}: not on any floor; add {top!r} to TOP in this test")
    return TOP[top], FLOOR[TOP[top]]


def _normlab_edges(typing_too: bool) -> set[tuple[str, str]]:
    return {
        (m, t)
        for m in modules()
        for t, typing in imports(m)
        if t in modules() and t != m and (typing_too or not typing)
    }


def floor_violations() -> set[tuple[str, str]]:
    bad = set()
    for m, t in _normlab_edges(typing_too=True):
        (fm, lm), (ft, lt) = floor_of(m), floor_of(t)
        walled = fm in ("_core", "reference", "_lazy") and ft != fm and ft != "_core"
        if lt > lm or walled or (fm == "_core" and ft != "_core"):
            bad.add((m, t))
    return bad


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def runtime_graph() -> dict[str, set[str]]:
    """Imports that run, plus the parent packages that importing a module runs first."""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for m, t in _normlab_edges(typing_too=False):
        graph[m].add(t)
        graph[m] |= {a for a in _ancestors(t) if a not in _ancestors(m) and a != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of more than one module that reach each other through imports, each sorted."""
    reach = {v: _reachable(graph, v) for v in graph}
    found, placed = [], set()
    for v in sorted(graph):
        if v not in placed:
            group = sorted({v} | {w for w in reach[v] if v in reach[w]})
            placed.update(group)
            if len(group) > 1:
                found.append(group)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


# ----------------------------------------------------------------------------- tests


def test_every_module_is_on_a_floor() -> None:
    for m in modules():
        floor_of(m)


def test_floors_are_respected() -> None:
    bad = floor_violations() - set(ALLOWED)
    assert not bad, "upward or walled-off imports:\n" + "\n".join(sorted(map(str, bad)))


def test_core_and_reference_libraries() -> None:
    """_core: torch (and the triton probe); reference: NumPy. Nothing else installed."""
    std = set(sys.stdlib_module_names) | {"__future__"}
    allowed = {"_core": {"torch", "triton"}, "reference": {"numpy"}}
    for m in modules():
        floor, _ = floor_of(m)
        if floor in allowed:
            libs = {t for t, _ in imports(m) if t not in modules() and t not in std}
            assert libs <= allowed[floor], (m, libs - allowed[floor])


def test_no_import_cycles() -> None:
    graph = runtime_graph()
    for m, t in ALLOWED:
        graph[m].discard(t)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_allow_list_is_current() -> None:
    """Every allowed edge exists and is still a violation (an upward import or on a cycle)."""
    graph = runtime_graph()
    upward = floor_violations()
    for (m, t), why in ALLOWED.items():
        assert (m, t) in _normlab_edges(typing_too=True), f"stale: {m} no longer imports {t}"
        assert (m, t) in upward or m in _reachable(graph, t), f"stale ({why}): {m} -> {t} is fine"


def test_the_checks_can_fail() -> None:
    """The cycle finder and the floor rule on a made-up graph and a made-up edge."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor_of("normlab._core.stats")[1] < floor_of("normlab.functional.evonorm")[1]
    assert floor_of("normlab.lab.sweep.orchestrate")[1] < floor_of("normlab.cli")[1]
    assert floor_of("normlab.doctor.checks") == floor_of("normlab.registry") == ("tools", 4)
    with pytest.raises(AssertionError, match="not on any floor"):
        floor_of("normlab.doctor_helpers")  # a prefix is no floor: only the names in TOP are


#: The lab's sub-packages, each importing only from the ones before it (and the lab's own
#: ``defaults`` and ``errors``); docs/design.md lists them in this order.
LAB_ORDER = ("data", "models", "tasks", "run", "sweep", "analysis", "bench")
#: A task builds its model from a run's config: the type, for hints alone.
LAB_TYPING_ONLY = {
    ("normlab.lab.tasks.segmentation", "normlab.lab.run.config"),
    ("normlab.lab.tasks.detection", "normlab.lab.run.config"),
    ("normlab.lab.tasks.registry", "normlab.lab.run.config"),
}


def _lab_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "lab" and parts[2] in LAB_ORDER else None


def test_lab_sub_packages_import_downward() -> None:
    """No lab sub-package imports a later one (so none imports another in a circle)."""
    upward = set()
    for m, t in _normlab_edges(typing_too=True):
        a, b = _lab_part(m), _lab_part(t)
        if a and b and LAB_ORDER.index(b) > LAB_ORDER.index(a):
            upward.add((m, t))
    assert upward == LAB_TYPING_ONLY, sorted(upward ^ LAB_TYPING_ONLY)
    assert all(t in dict(imports(m)) and dict(imports(m))[t] for m, t in LAB_TYPING_ONLY)
    assert {p.name for p in (SRC / "lab").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        *LAB_ORDER
    }


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one fresh process per module")
def test_every_module_imports_on_its_own() -> None:
    """Each module in a process that has imported nothing of normlab before it."""
    names = [m for m in modules() if m != "normlab.__main__"]
    script = textwrap.dedent(
        """
        import importlib, os, sys, traceback
        import numpy, torch  # what every module needs; normlab itself is not imported
        sys.path.insert(0, sys.argv.pop(1))
        try:  # lightning imports torchvision: the zoo's CPU provision for its ops
            from zoo._zoo import import_torchvision
            import_torchvision()
        except ImportError:
            pass
        assert not [m for m in sys.modules if m.startswith("normlab")]
        failed, running = [], {}
        def reap():
            pid, status = os.wait()
            if status:
                failed.append(running[pid])
            del running[pid]
        for name in sys.argv[1:]:
            while len(running) >= max(2, os.cpu_count() or 2):
                reap()
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    print(f"--- {name}", file=sys.stderr)
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            running[pid] = name
        while running:
            reap()
        sys.exit(f"failed on its own: {sorted(failed)}" if failed else 0)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(pathlib.Path(__file__).parent), *names],
        capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
