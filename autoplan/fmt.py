"""Human-readable numbers for tables: the only place where units are scaled."""

from __future__ import annotations

__all__ = ["count", "flops", "nbytes", "seconds"]


def _scaled(value: float, base: float, units: tuple[str, ...], suffix: str = "") -> str:
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.3g} {unit}{suffix}".replace("  ", " ").strip()
        value /= base
    return f"{value:.3g} {units[-1]}{suffix}".strip()


def count(value: float) -> str:
    """1234567 -> '1.23M'."""
    return _scaled(value, 1000, ("", "K", "M", "B", "T")).replace(" ", "")


def flops(value: float) -> str:
    """FLOPs with SI prefixes: 3.4e9 -> '3.4 GFLOP'."""
    return _scaled(value, 1000, ("", "K", "M", "G", "T", "P", "E"), "FLOP")


def nbytes(value: float) -> str:
    """Bytes with binary prefixes: 66560 -> '65 KiB'."""
    return _scaled(value, 1024, ("", "Ki", "Mi", "Gi", "Ti", "Pi"), "B")


def seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.3g} us"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"
