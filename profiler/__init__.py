"""autoplan.profiler: measurement only, of layers and collectives on the machine at hand.

measure.py times and weighs each distinct layer alone (compute.py, memory.py), in_situ.py
times them in a world of local ranks, comm.py measures collectives and fits them; output.py
writes and shows a profile. The Profile they fill is a ground-floor format
(autoplan/profile.py); the datasheet figures and formulas that stand in for a measurement
live in autoplan/hardware.py and cost_model/analytic.py.

This front is what the application floor imports. Its names load their module on first use
(PEP 562): measuring imports torch, and a command that only shows a profile need not.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "measure_collectives": "comm", "measure_in_world": "comm", "fit_alpha_beta": "comm",
    "FAULT_ENV": "comm",
    "MeasureSettings": "compute",
    "measured_profile": "measure",
    "time_layers_in_situ": "in_situ", "data_parallel_layouts": "in_situ",
    "ZERO_STAGES": "in_situ",
    "profile_tables": "output", "write_profile": "output",
    "LiveBytes": "live_bytes",
}
"""Each public name -> the module of this package that holds it."""

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'autoplan.profiler' has no attribute {name!r}")
    return getattr(importlib.import_module(f"autoplan.profiler.{_HOMES[name]}"), name)
