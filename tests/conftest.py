"""Fixtures shared by the tests: the graph cache every test uses, and those of the tests
that start worker processes."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoplan.graph_cache import CACHE_DIR_ENV
from tests.processes import TAG_ENV, time_limit

FAULT_TEST_LIMIT_S = 90
"""No test that asks for `time_limited` may run longer; SIGALRM ends it (no pytest-timeout)."""


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The graph cache of this test session (autoplan/graph_cache.py): never the user's, and
    set in os.environ so that CLI subprocesses and workers use it too."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("graph-cache")
        patch.setenv(CACHE_DIR_ENV, str(folder))
        yield folder


@pytest.fixture
def tag(monkeypatch: pytest.MonkeyPatch) -> str:
    """A unique value of TAG_ENV in the environment of every worker this test starts."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, value)
    return value


@pytest.fixture
def time_limited() -> Iterator[None]:
    """Fail a test that runs past FAULT_TEST_LIMIT_S instead of hanging the suite."""
    with time_limit(FAULT_TEST_LIMIT_S):
        yield


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this test even when pytest started with SIGINT
    ignored, as a background job of a non-interactive shell does (`make test &`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests where CUDA is not available (benchmarks/gpu/check.py runs
    them where it is)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
