"""What every saved document (graph, plan, profile, cluster) shares: a format version that
is checked on load, and pydantic errors turned into one line that names the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from autoplan import __version__
from autoplan.errors import AutoplanError
from autoplan.specs import shown

__all__ = ["check_version", "first_error"]


def check_version(data: Any, what: str, supported: int) -> None:
    """Refuse a document of another format version, naming both versions.

    A document without a version field is taken as the current one.

    Raises:
        AutoplanError: (a ValueError, so pydantic validators may raise it too).
    """
    version = data.get("version", supported) if isinstance(data, dict) else supported
    if isinstance(version, bool) or not isinstance(version, int):
        raise AutoplanError(f"{what} format version must be an integer, got "
                            f"{shown(repr(version))} (this autoplan {__version__} reads "
                            f"version {supported})")
    if version != supported:
        raise AutoplanError(f"{what} format version {version} is not supported "
                            f"(this autoplan {__version__} reads version {supported})")


def first_error(err: ValidationError) -> str:
    """'field.path: what is wrong' for the first error pydantic found."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
