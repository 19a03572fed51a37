"""Figures the cost model assumes beyond the profile and the presets, each with its source."""

from __future__ import annotations

from autoplan.efficiency import Figure

__all__ = ["GPU_FRAMEWORK_OVERHEAD_BYTES", "FIGURES"]

# ASSUMPTION: memory a GPU process holds outside tensors: the CUDA context (about 0.5 GiB on
# A100/H100 as nvidia-smi shows for an idle torch process) plus NCCL communicator buffers and
# the caching allocator's fragmentation. torch.cuda.max_memory_allocated does not count it.
GPU_FRAMEWORK_OVERHEAD_BYTES = Figure(
    "gpu_framework_overhead_bytes", 2 * 2**30, "bytes per GPU",
    "our assumption: CUDA context ~0.5 GiB + NCCL buffers + allocator fragmentation",
    assumption=True)

FIGURES = (GPU_FRAMEWORK_OVERHEAD_BYTES,)
