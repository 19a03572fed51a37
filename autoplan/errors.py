"""The exception types the CLI turns into one line: bad user input exits 2, a runtime fault
(a worker process died or stalled) exits 1."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["AutoplanError", "WorkerFailed", "choices_hint", "first_line"]


class AutoplanError(ValueError):
    """A user-facing error: its message names the value, the rule and, if there is one, the fix."""


class WorkerFailed(AutoplanError):
    """A runtime fault, not bad input: a worker process died, stalled or ended without its
    results (the message names the rank and how). The CLI exits 1 for it, not 2."""


def first_line(err: BaseException) -> str:
    """"Type: the message's first line", at most 200 characters: another library's (or the
    user's) error quoted inside one of ours, which must stay one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else '(no message)'}"[:200]


def choices_hint(choices: Iterable[str]) -> str:
    """Return "; choose from a, b, c" for appending to an error message."""
    return "; choose from " + ", ".join(sorted(choices))
