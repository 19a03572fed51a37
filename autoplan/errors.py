"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["AutoplanError", "choices_hint"]


class AutoplanError(ValueError):
    """A user-facing error: its message names the value, the rule and, if there is one, the fix."""


def choices_hint(choices: Iterable[str]) -> str:
    """Return "; choose from a, b, c" for appending to an error message."""
    return "; choose from " + ", ".join(sorted(choices))
