"""autoplan.profiler: measured and datasheet figures of layers, devices and links.

Today it holds the hardware presets (presets.py); measurement of layer times, memory and
collective bandwidth comes with the profiler issue.
"""

from autoplan.profiler.presets import HARDWARE_PRESETS, DevicePreset

__all__ = ["HARDWARE_PRESETS", "DevicePreset"]
