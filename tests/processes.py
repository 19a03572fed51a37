"""Finding the processes a test started, and bounding how long a test may run: workers
inherit a tagged environment variable, so whatever is left of them after a kill test shows
up here; a test that would hang fails at its limit instead."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def processes_with(variable: str, tag: str) -> list[int]:
    """Live processes (other than this one) whose environment holds variable=tag."""
    needle = f"{variable}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class TimeLimitExceeded(Exception):
    """A test ran past its limit (not an OSError, so the CLI's handlers let it through)."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeLimitExceeded in the main thread once `seconds` pass (SIGALRM; pytest-timeout
    is not used), instead of letting a test hang the suite."""
    def _expired(signum: int, frame: object) -> None:
        raise TimeLimitExceeded(f"test ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)



TAG_ENV = "AUTOPLAN_TEST_TAG"
"""Workers inherit it from the test that starts them (fixture `tag`, tests/conftest.py), so
any left behind are found by it."""
