"""autoplan.profiler: measured and datasheet figures of layers, devices and links.

presets.py holds the datasheet figures, analytic.py derives profiles from them, measure.py
and comm.py measure layers and collectives on the machine at hand; profile.py is the format.
"""

from autoplan.profiler.presets import HARDWARE_PRESETS, DevicePreset

__all__ = ["HARDWARE_PRESETS", "DevicePreset"]
