"""Hardware presets: datasheet figures of each device and its links, with their source.

Figures are peaks as published (see ../shared/HARDWARE.md); the efficiencies that turn them
into achievable rates belong beside them once the analytic profiler states them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DevicePreset", "HARDWARE_PRESETS", "local_cpu_preset"]

GB = 10**9  # link and memory bandwidths are quoted in powers of ten
GiB = 2**30  # memory sizes are binary: nvidia-smi shows 40960 MiB on an A100 40GB


@dataclass(frozen=True)
class DevicePreset:
    name: str
    peak_flops: float | None
    """Dense bf16/fp16 tensor peak, FLOP/s; None where only a measurement can tell."""
    memory_bytes: int
    memory_bandwidth: float | None
    """Bytes/s of device memory."""
    intra_node_bandwidth: float | None
    """Bytes/s per device, each direction, inside a node (NVLink through NVSwitch)."""
    inter_node_bandwidth: float | None
    """Bytes/s per device, each direction, between nodes (one NIC per GPU)."""
    gpus_per_node: int
    source: str
    cores_per_node: int | None = None
    """CPU cores a node's processes share (local-cpu); None for GPUs, one per process."""

    @property
    def has_datasheet(self) -> bool:
        """Whether layers can be priced from this device's figures alone (no profile)."""
        return self.peak_flops is not None and self.memory_bandwidth is not None


_A100 = "NVIDIA A100 datasheet; DGX A100: 8x HDR 200 Gb/s InfiniBand (HARDWARE.md)"
_H100 = "NVIDIA H100 SXM datasheet; DGX H100: 8x NDR 400 Gb/s InfiniBand (HARDWARE.md)"
_H200 = "NVIDIA H200 SXM datasheet; NDR 400 Gb/s InfiniBand per GPU (HARDWARE.md)"

HARDWARE_PRESETS: dict[str, DevicePreset] = {
    "a100-40g": DevicePreset("a100-40g", 312e12, 40 * GiB, 1.555e12, 300 * GB, 25 * GB, 8, _A100),
    "a100-80g": DevicePreset("a100-80g", 312e12, 80 * GiB, 2.039e12, 300 * GB, 25 * GB, 8, _A100),
    "h100-sxm": DevicePreset("h100-sxm", 989e12, 80 * GiB, 3.35e12, 450 * GB, 50 * GB, 8, _H100),
    "h200": DevicePreset("h200", 989e12, 141 * GiB, 4.8e12, 450 * GB, 50 * GB, 8, _H200),
}


def local_cpu_preset(procs: int | None = None) -> DevicePreset:
    """This machine as a one-node cluster of `procs` CPU processes sharing its memory.

    Compute and link rates are unknown until `autoplan profile` measures them.
    """
    procs = procs or os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DevicePreset("local-cpu", None, memory // procs, None, None, None, procs,
                        "this machine: os.cpu_count() and physical memory shared by procs",
                        cores_per_node=os.cpu_count() or 1)
