"""What a newcomer's fresh machine gets is what CI tests.

* ``.ci/run`` makes its own virtual environment and runs, inside it, literally the
  README's test command (command 2), so nothing installed by hand on the CI machine can
  hide a missing install step.
* Every third-party module the package, the tests, the examples and the benchmarks import
  is named by a requirement of the extra that installs it: the package's by the core
  dependencies (or the optional extra that is its reason to exist), the rest by the core
  dependencies plus the ``test`` extra.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"

#: Imported by torch.testing._internal.common_utils, which tests/compat loads: torch warns
#: without hypothesis, and warnings are errors in the suite.
TORCH_TESTING_NEEDS = ("hypothesis", "expecttest")


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block, "README.md has no ```bash block with the two commands"
    lines = block.group(1).splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("# 2.")]
    assert marks, "the README's command block has no '# 2.' line (the test command)"
    return lines[marks[0] + 1].strip()


def _ci_commands() -> list[str]:
    lines = CI_RUN.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    assert command.startswith("pip install torch==") and command.endswith("pytest"), command
    commands = _ci_commands()
    assert commands[-1] == command, (
        f".ci/run's last command\n  {commands[-1]}\nis not the README's command 2\n  {command}"
    )


def test_ci_makes_and_enters_a_fresh_virtual_environment_first():
    commands = _ci_commands()
    made = [i for i, c in enumerate(commands) if re.match(r"python3? -m venv ", c)]
    entered = [i for i, c in enumerate(commands) if re.match(r"(\.|source) .*/bin/activate", c)]
    assert made and entered, ".ci/run must make a venv (python3 -m venv) and activate it"
    assert made[0] < entered[0] < len(commands) - 1
    assert "mktemp -d" in CI_RUN.read_text(encoding="utf-8"), "the venv lives in a fresh folder"


def _requirements() -> dict[str, set[str]]:
    """Distribution names per extra (``""``: the core dependencies), normalised."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {
        k: {_norm(re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0]) for r in v} for k, v in groups.items()
    }


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported(folder: Path) -> set[str]:
    """Top-level modules imported in ``folder``: import statements (function-local ones
    included) and ``importorskip``/``import_module``/zoo ``require`` calls with a literal
    name."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None))
                in ("importorskip", "import_module", "require")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value.split(".")[0])
    return found


def _third_party(modules: set[str], local: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def _local_names() -> set[str]:
    """Modules of this repository (normlab, and the helpers tests import by name)."""
    names = {"normlab"}
    for folder in (ROOT / "tests", *(p for p in (ROOT / "tests").iterdir() if p.is_dir())):
        names.update(p.stem for p in folder.glob("*.py"))
        names.update(p.name for p in folder.iterdir() if p.is_dir())
    return names


def _providers(module: str) -> set[str]:
    return {_norm(d) for d in metadata.packages_distributions().get(module, [])}


def _unnamed(modules: set[str], allowed: set[str]) -> list[str]:
    missing = []
    for module in sorted(modules):
        providers = _providers(module) or {_norm(module)}
        if not providers & allowed:
            missing.append(f"{module} (from {sorted(providers)})")
    return missing


def test_the_package_imports_only_what_its_dependencies_name():
    req = _requirements()
    allowed = req[""] | req["triton"] | req["onnx"] | req["lightning"] | req["mmengine"]
    used = _third_party(_imported(ROOT / "src" / "normlab"), {"normlab"})
    assert not _unnamed(used, allowed), _unnamed(used, allowed)


@pytest.mark.parametrize("folder", ["tests", "examples", "benchmarks"])
def test_the_test_extra_names_everything_the_suite_imports(folder):
    req = _requirements()
    allowed = req[""] | req["test"]
    used = _third_party(_imported(ROOT / folder), _local_names())
    missing = _unnamed(used, allowed)
    assert not missing, f"{folder}/ imports modules no requirement names: {missing}"


def test_the_test_extra_brings_what_torch_testing_imports():
    test_extra = _requirements()["test"]
    assert set(TORCH_TESTING_NEEDS) <= test_extra, sorted(set(TORCH_TESTING_NEEDS) - test_extra)
