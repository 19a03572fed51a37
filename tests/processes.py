"""Finding the processes a test started: workers inherit a tagged environment variable, so
whatever is left of them after a kill test shows up here."""

from __future__ import annotations

import os
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
