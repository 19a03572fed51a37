"""File writing that never leaves a half-written file behind."""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "utc_now"]


def utc_now() -> str:
    """The time now, UTC, to the second, as ISO 8601 (what documents record as created)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
