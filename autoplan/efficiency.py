"""Achievable fractions of datasheet peaks, and link latencies, that analytic profiles assume.

Every figure that turns a preset's peak into an achievable rate lives here, once, with its
source. A figure marked `assumption=True` is our choice, not a published measurement: replace
it with `autoplan profile --mode measure` where the hardware is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Figure", "MATMUL_PEAK_FRACTION", "MEMORY_PEAK_FRACTION", "OP_OVERHEAD_S",
    "NVLINK_BUS_FRACTION", "NETWORK_BUS_FRACTION", "NCCL_BASE_LATENCY_S",
    "NVLINK_RING_STEP_S", "NVLINK_TREE_STEP_S", "NETWORK_RING_STEP_S", "NETWORK_TREE_STEP_S",
    "FIGURES", "matmul_efficiency", "memory_efficiency", "figure_notes",
]


@dataclass(frozen=True)
class Figure:
    """One efficiency or latency figure: its value, unit and where it came from."""

    name: str
    value: float
    unit: str
    source: str
    assumption: bool = False
    """True when no published measurement backs the exact value."""

    def note(self) -> str:
        """One line for Profile.notes: name = value unit (source)."""
        kind = "ASSUMPTION" if self.assumption else "source"
        return f"{self.name} = {self.value:g} {self.unit} ({kind}: {self.source})"


# ------------------------------------------------------------------------------- compute

# Source: HARDWARE.md, "large bf16 GEMMs reach roughly 70-80% of peak"; we take the midpoint.
MATMUL_PEAK_FRACTION = Figure(
    "matmul_peak_fraction", 0.75, "of the dense bf16 tensor peak",
    "../shared/HARDWARE.md: large bf16 GEMMs reach roughly 70-80% of peak; the midpoint")

# ASSUMPTION: no published figure in HARDWARE.md; streaming kernels (norms, elementwise,
# copies, embedding gathers) are taken to sustain 80% of the datasheet HBM bandwidth.
MEMORY_PEAK_FRACTION = Figure(
    "memory_peak_fraction", 0.80, "of the datasheet HBM bandwidth",
    "our assumption for streaming kernels; no published measurement used", assumption=True)

# ASSUMPTION: the fixed cost of one op (kernel launch, first-wave ramp-up, tail), of the
# order of a CUDA kernel launch. It places the knee of both efficiency curves below.
OP_OVERHEAD_S = Figure(
    "op_overhead_s", 5e-6, "s per op",
    "our assumption, of the order of a CUDA kernel launch plus wave tail", assumption=True)


# --------------------------------------------------------------------------------- links

# Source: HARDWARE.md, "NCCL all-reduce bus bandwidth inside an NVSwitch node reaches roughly
# 70-85% of the NVLink figure"; the midpoint, of the per-GPU per-direction NVLink figure.
NVLINK_BUS_FRACTION = Figure(
    "nvlink_bus_fraction", 0.775, "of NVLink bytes/s per GPU per direction",
    "../shared/HARDWARE.md: NCCL all-reduce busbw in an NVSwitch node is roughly 70-85% of "
    "NVLink; the midpoint")

# ASSUMPTION: NCCL bus bandwidth between nodes reaches 80% of the per-GPU NIC line rate
# (NDR 50 GB/s on DGX H100, HDR 25 GB/s on DGX A100, HARDWARE.md). NCCL's own tuning model
# takes the full NIC speed per channel; we leave a margin for protocol and congestion.
NETWORK_BUS_FRACTION = Figure(
    "network_bus_fraction", 0.80, "of the per-GPU NIC line rate",
    "our assumption; NCCL's tuning model (src/graph/tuning.cc) assumes the full NIC speed",
    assumption=True)

# Latencies of NCCL's own cost model, NVIDIA/nccl src/graph/tuning.cc (baseLat, hwLat), for
# the Simple protocol that carries large messages: time = base + steps x per-step latency.
_NCCL_TUNING = "NVIDIA/nccl src/graph/tuning.cc"
NCCL_BASE_LATENCY_S = Figure(
    "nccl_base_latency_s", 8.4e-6, "s per collective", f"{_NCCL_TUNING}: baseLat Ring/Simple")
NVLINK_RING_STEP_S = Figure(
    "nvlink_ring_step_s", 3.4e-6, "s per ring step",
    f"{_NCCL_TUNING}: hwLat[NVLINK][Ring][Simple]")
NVLINK_TREE_STEP_S = Figure(
    "nvlink_tree_step_s", 4.0e-6, "s per tree hop",
    f"{_NCCL_TUNING}: hwLat[NVLINK][Tree][Simple]")
NETWORK_RING_STEP_S = Figure(
    "network_ring_step_s", 14e-6, "s per ring step", f"{_NCCL_TUNING}: hwLat[NET][Ring][Simple]")
NETWORK_TREE_STEP_S = Figure(
    "network_tree_step_s", 14e-6, "s per tree hop", f"{_NCCL_TUNING}: hwLat[NET][Tree][Simple]")

FIGURES: tuple[Figure, ...] = (
    MATMUL_PEAK_FRACTION, MEMORY_PEAK_FRACTION, OP_OVERHEAD_S, NVLINK_BUS_FRACTION,
    NETWORK_BUS_FRACTION, NCCL_BASE_LATENCY_S, NVLINK_RING_STEP_S, NVLINK_TREE_STEP_S,
    NETWORK_RING_STEP_S, NETWORK_TREE_STEP_S,
)


# ---------------------------------------------------------------------------- the curves


def matmul_efficiency(flops: float, peak_flops: float) -> float:
    """Fraction of `peak_flops` that one matmul-class op of `flops` work reaches.

    Small ops are overhead-bound, large ones approach MATMUL_PEAK_FRACTION; see _saturating.
    """
    return _saturating(flops, peak_flops, MATMUL_PEAK_FRACTION.value)


def memory_efficiency(nbytes: float, bandwidth: float) -> float:
    """Fraction of HBM `bandwidth` that one memory-bound op moving `nbytes` reaches."""
    return _saturating(nbytes, bandwidth, MEMORY_PEAK_FRACTION.value)


def _saturating(work: float, peak_rate: float, saturation: float) -> float:
    """e(W) = s W / (W + s R t0): the efficiency of an op that takes t0 + W / (s R).

    Why this shape: an op of work W at rate R pays a fixed overhead t0 (OP_OVERHEAD_S) and then
    runs at the saturated fraction s, so its time stays exactly linear in W (linear fits over
    micro-batches reproduce it) while its efficiency rises with size: half of s at W = s R t0.
    """
    if peak_rate <= 0:
        raise ValueError(f"peak rate must be positive, got {peak_rate}")
    if work <= 0:
        return 0.0
    return saturation * work / (work + saturation * peak_rate * OP_OVERHEAD_S.value)


def figure_notes() -> list[str]:
    """Every figure above as one line each, for the notes of a Profile."""
    return [figure.note() for figure in FIGURES]
