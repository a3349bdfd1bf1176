"""Module boundaries: no file uses another module's private names, nor a library's internals.

A name that starts with one underscore belongs to the module that defines it. This test parses
every Python file of the repository and fails on
  * `from package.module import _name` of any module (first-party or not);
  * `module._name` where `module` is a name bound by an import of a module (`import a.b as m`,
    `from opdplus_jax import trainer`), e.g. `trainer._rollout` or `stages._cached`;
  * an import of a library's private package (`jax._src`, `orbax.checkpoint._src`, ...).
Dunder names (`__version__`, `__file__`) are public.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("opdplus_jax", "tests", "benchmarks", "experiments", "notebooks", "scripts", "configs")


def _files() -> list[pathlib.Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def violations(path: pathlib.Path) -> list[str]:
    """`file:line: what` for every private use in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"{where(node)}: imports the private module {alias.name}")
                modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{where(node)}: imports from the private module {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where(node)}: imports {node.module}.{alias.name}")
                elif _is_module(f"{node.module}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"{where(node)}: uses {node.value.id}.{node.attr}")
    return found


def test_the_rule_catches_what_it_should():
    bad = ROOT / "tests" / "_private_names_probe.py"
    bad.write_text(
        "import jax._src.core\n"
        "from opdplus_jax import sampling\n"
        "from opdplus_jax.trainer import _dtype\n"
        "x = sampling._Static\n"
        "y = sampling.generate\n"
        "z = __name__\n",
        encoding="utf-8",
    )
    try:
        found = violations(bad)
    finally:
        bad.unlink()
    assert len(found) == 3, found
    assert any("jax._src.core" in f for f in found)
    assert any("opdplus_jax.trainer._dtype" in f for f in found)
    assert any("sampling._Static" in f for f in found)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_modules(path):
    assert violations(path) == []
