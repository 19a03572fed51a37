"""Parsing of the `key=value,key=value` text shared by model, cluster and plan specs."""

from __future__ import annotations

from collections.abc import Collection

from autoplan.errors import AutoplanError, choices_hint

__all__ = ["parse_kv", "parse_int", "parse_bool", "parse_float", "shown"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_kv(text: str, what: str, allowed: Collection[str]) -> dict[str, str]:
    """Split "a=1,b=2" into {"a": "1", "b": "2"}.

    Args:
        text: the comma-separated pairs; empty text gives {}.
        what: how the error messages name the spec ("model spec", "plan").
        allowed: the valid keys.

    Raises:
        AutoplanError: on a pair without "=", an unknown key or a repeated key.
    """
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise AutoplanError(f"{what}: '{part}' is not key=value")
        if key not in allowed:
            raise AutoplanError(f"{what}: unknown key '{key}'{choices_hint(allowed)}")
        if key in out:
            raise AutoplanError(f"{what}: key '{key}' given twice")
        out[key] = value
    return out


def shown(value: object, limit: int = 40) -> str:
    """`value` as text for an error message, cut to `limit` characters."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def parse_int(value: str, what: str, minimum: int = 1) -> int:
    """Parse an integer of at least `minimum`, naming `what` in the error."""
    try:
        number = int(value)
    except ValueError:
        raise AutoplanError(f"{what} must be an integer, got '{shown(value)}'") from None
    if number < minimum:
        raise AutoplanError(f"{what} must be at least {minimum}, got {shown(number)}")
    return number


def parse_float(value: str, what: str, minimum: float = 0.0) -> float:
    """Parse a finite float of at least `minimum`, naming `what` in the error."""
    try:
        number = float(value)
    except ValueError:
        raise AutoplanError(f"{what} must be a number, got '{shown(value)}'") from None
    if not number >= minimum or number == float("inf"):
        raise AutoplanError(f"{what} must be a finite number >= {minimum}, got {shown(value)}")
    return number


def parse_bool(value: str, what: str) -> bool:
    """Parse true/false (also 1/0, yes/no, on/off)."""
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise AutoplanError(f"{what} must be true or false, got '{shown(value)}'")
