"""The floors of the house (../shared/DESIGN.md): imports only go down.

    core (autoplan/*, autoplan/models) <- cost_model <- search;  core <- executor;
    profiler on core and executor;  the application floor (autoplan/app) on top of all.

Every import statement of every module is read (module level, inside functions and under
TYPE_CHECKING alike: an arrow is an arrow), so a lazy import cannot hide a way back up.
`autoplan/__init__.py` and `__main__.py` are the package's public front (`autoplan.search`,
`autoplan.auto`, `python -m autoplan`), so they count as the application floor. A name with
a leading underscore is private to its package: no other package imports it. And a domain
package is entered through its front (its `__init__`, which lists what it offers), never
through one of its modules; the ground floor's modules are each a front of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"autoplan": "autoplan", "profiler": "autoplan.profiler",
           "cost_model": "autoplan.cost_model", "search": "autoplan.search",
           "executor": "autoplan.executor"}
"""Top-level folder -> the package it is (pyproject's package-dir)."""
BELOW = {
    "core": {"core"},
    "cost_model": {"core", "cost_model"},
    "search": {"core", "cost_model", "search"},
    "executor": {"core", "executor"},
    "profiler": {"core", "executor", "profiler"},
    "app": {"core", "cost_model", "search", "executor", "profiler", "app"},
}
"""Each floor, and the floors it may import from (itself included)."""
FRONT = {"autoplan", "autoplan.__main__"}


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    if rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([FOLDERS[folder], *rest])


def floor(module: str) -> str:
    if module in FRONT:
        return "app"
    for package in ("app", "cost_model", "search", "executor", "profiler"):
        if module == f"autoplan.{package}" or module.startswith(f"autoplan.{package}."):
            return package
    return "core"


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every autoplan import in `path`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return [(target, names, line) for target, names, line in found
            if target == "autoplan" or target.startswith("autoplan.")]


def sources() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path: Path) -> None:
    here = floor(module_name(path))
    for target, names, line in imports(path):
        # `from autoplan import fmt` takes a module of core; `from autoplan.search import x`
        # the package front of search
        modules = [f"{target}.{name}" for name in names] if target == "autoplan" else [target]
        for module in modules:
            assert floor(module) in BELOW[here], (
                f"{path.relative_to(ROOT)}:{line}: {here} imports {module} "
                f"({floor(module)}), an arrow back up")


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_package(path: Path) -> None:
    here = floor(module_name(path))
    for target, names, line in imports(path):
        private = [name for name in names if name.startswith("_") and not name.startswith("__")]
        assert not private or floor(target) == here, (
            f"{path.relative_to(ROOT)}:{line}: imports {', '.join(private)} from {target}, "
            f"private to {floor(target)}")


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_other_packages_are_entered_through_their_front(path: Path) -> None:
    here = floor(module_name(path))
    for target, _, line in imports(path):
        there = floor(target)
        if there in (here, "core", "app"):  # app: only the package's own front imports it
            continue
        assert target == f"autoplan.{there}", (
            f"{path.relative_to(ROOT)}:{line}: imports {target}; import from "
            f"autoplan.{there}, its front (add the name to its __all__)")


def test_the_walk_sees_every_floor() -> None:
    """The walk itself: it finds modules on every floor, and it would see an arrow up."""
    floors = {floor(module_name(path)) for path in sources()}
    assert floors == set(BELOW)
    cost = ROOT / "cost_model" / "estimate.py"
    assert floor(module_name(cost)) == "cost_model"
    assert not {"search", "executor", "profiler", "app"} <= BELOW["cost_model"]
    assert any(target.startswith("autoplan.cost_model") for target, _, _ in
               imports(ROOT / "search" / "search.py"))
