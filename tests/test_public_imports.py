"""Every import of normlab that README.md and examples/ show works, read from those files.

The names are parsed from the README's ``python`` blocks and from the examples' source
(function-local imports included), so a renamed or moved public name fails here before a
reader copies the line.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(source: str) -> set[tuple[str, str | None]]:
    """``(module, name)`` for every normlab import in ``source`` (name None: the module)."""
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "normlab":
            found |= {(node.module or "", a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {(a.name, None) for a in node.names if a.name.split(".")[0] == "normlab"}
    return found


def _readme_imports() -> set[tuple[str, str | None]]:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    found: set[tuple[str, str | None]] = set()
    for block in blocks:
        lines = [ln for ln in block.splitlines() if re.match(r"\s*(from|import) normlab", ln)]
        found |= _imports("\n".join(ln.strip() for ln in lines))
    return found


def _example_imports() -> set[tuple[str, str | None]]:
    found: set[tuple[str, str | None]] = set()
    for path in sorted((ROOT / "examples").glob("*.py")):
        found |= _imports(path.read_text())
    return found


PUBLIC = sorted(_readme_imports() | _example_imports(), key=lambda mn: (mn[0], mn[1] or ""))


def test_the_documents_are_read():
    """Not vacuous: the README's quickstart lines are among the parsed imports."""
    readme = _readme_imports()
    wanted = {
        ("normlab.convert", "convert_norms"),
        ("normlab.doctor", "diagnose"),
        ("normlab.recalibrate", "recalibrate"),
        ("normlab.registry", "norm_layer"),
    }
    assert wanted <= readme, wanted - readme
    assert ("normlab.convert", "convert_norms") in _example_imports()


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m}:{n}" for m, n in PUBLIC])
def test_public_import_works(module: str, name: str | None) -> None:
    if module.startswith("normlab.integrations."):
        # lightning (through torchmetrics) and mmengine import torchvision, whose CUDA build
        # needs the tests' CPU nms provision beside a CPU torch (tests only).
        from zoo._zoo import require

        # Their import-time deprecation notices are theirs (require() lets them pass).
        require("torchvision")
        imported = require(module)
    else:
        imported = importlib.import_module(module)
    if name is not None:
        assert getattr(imported, name) is not None, f"from {module} import {name}"
