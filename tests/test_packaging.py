"""The top-level folders are the subpackages autoplan.profiler, .cost_model, .search, .executor."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["profiler", "cost_model", "search", "executor"])
def test_top_level_folders_are_autoplan_subpackages(folder: str) -> None:
    module = importlib.import_module(f"autoplan.{folder}")
    assert Path(module.__file__).resolve().parent == ROOT / folder


def test_search_and_executor_do_not_import_each_other() -> None:
    # DESIGN.md: a Plan is the only thing search/ and executor/ share.
    for here, other in (("search", "executor"), ("executor", "search")):
        for path in (ROOT / here).rglob("*.py"):
            text = path.read_text()
            assert f"autoplan.{other}" not in text and f"from {other}" not in text, path
