"""Measured memory of one layer: weights, gradients, optimizer state and saved activations.

Saved activations are counted with saved_tensors_hooks on the real layer (deduplicated by
storage, parameters excluded), at batch 1 and 2: the difference is per sample. Optimizer
state is what torch.optim actually allocates after one step, on meta copies of the weights.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.checkpoint import checkpoint

from autoplan.graph import LayerNode
from autoplan.profile import LayerMemory
from autoplan.profiler.compute import (
    MeasureSettings,
    UnitCall,
    make_inputs,
    materialize,
    output_grads,
)
from autoplan.tracing import trace_batch

__all__ = ["saved_bytes", "optimizer_state_bytes", "live_peaks", "measure_memory"]

_BACKWARD_MARK = "autoplan::backward"

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, foreach=False),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False),
}


def saved_bytes(run: Callable[[], Any], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `run()` executes."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def optimizer_state_bytes(unit: nn.Module) -> dict[str, int]:
    """State bytes per optimizer and precision, after one step on meta copies of the weights.

    "mixed" is bf16 training with fp32 master weights (Micikevicius et al. 2018): the fp32
    optimizer state plus a 4-byte master copy of every weight.
    """
    out: dict[str, int] = {}
    for name, make in OPTIMIZERS.items():
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out[f"{name}/{precision}"] = _state_after_step(unit, make, dtype)
        master = sum(p.numel() * 4 for p in unit.parameters())
        out[f"{name}/mixed"] = out[f"{name}/fp32"] + master
    return out


def _state_after_step(unit: nn.Module, make: Callable, dtype: torch.dtype) -> int:
    params = [torch.empty(p.shape, dtype=dtype, device="meta", requires_grad=True)
              for p in unit.parameters()]
    if not params:
        return 0
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = make(params)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side prints a line at start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def live_peaks(run_forward: Callable[[], Any], device: str) -> tuple[int, int]:
    """(forward peak, backward peak) of the bytes the allocator holds, counted from the start
    of forward, read from torch.profiler's memory events (CPU and CUDA allocators alike).

    The backward peak includes what forward left alive (saved activations, outputs).
    """
    kind = "CUDA" if device.startswith("cuda") else "CPU"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kind == "CUDA" else [])
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        out = run_forward()
        with record_function(_BACKWARD_MARK):  # the gradients of ones count as backward
            torch.autograd.backward(*output_grads(out))
    events = list(prof.profiler.kineto_results.events())
    backward_ns = next(e.start_ns() for e in events if e.name() == _BACKWARD_MARK)
    memory = sorted((e for e in events if e.name() == "[memory]"
                     and str(e.device_type()).endswith(kind)), key=lambda e: e.start_ns())
    live = forward_peak = backward_peak = 0
    for event in memory:
        live += event.nbytes()
        if event.start_ns() < backward_ns:
            forward_peak = max(forward_peak, live)
        else:
            backward_peak = max(backward_peak, live)
    return forward_peak, max(backward_peak, forward_peak)


def measure_memory(unit: nn.Module, node: LayerNode, call: UnitCall,
                   settings: MeasureSettings) -> LayerMemory:
    """Weights, gradients, optimizer state and saved activations of one layer (tp = 1)."""
    real = materialize(unit, settings.device, settings.dtype)
    weights = list(real.parameters())
    plain, ckpt, peaks = [], [], []
    first = trace_batch(unit)  # 2 where BatchNorm refuses one value per channel
    for batch in (first, 2 * first):
        args, kwargs = make_inputs(call, batch, settings.device, settings.dtype)
        plain.append(saved_bytes(partial(real, *args, **kwargs), weights))
        ckpt.append(saved_bytes(partial(checkpoint, real, *args, use_reentrant=False, **kwargs),
                                weights))
        peaks.append(live_peaks(partial(real, *args, **kwargs), settings.device))
    # A tied weight (an output head sharing the embedding's) is owned by its first layer:
    # this layer holds only its own share of weights, gradients and optimizer state.
    owned = node.params / (node.params + node.shared_params) if node.shared_params else 1.0
    param_bytes = round(owned * sum(p.numel() * p.element_size() for p in weights))
    optimizer = {k: round(owned * v) for k, v in optimizer_state_bytes(unit).items()}
    cuda_peak = _cuda_peak(real, call, settings) if settings.device.startswith("cuda") else None
    return LayerMemory(
        params=node.params, param_bytes=param_bytes, grad_bytes=param_bytes,
        optimizer_bytes=optimizer,
        act_bytes_per_sample=max(plain[1] - plain[0], 0) // first,
        act_bytes_per_sample_ckpt=max(ckpt[1] - ckpt[0], 0) // first,
        peak_fwd_bytes_per_sample=max(peaks[1][0] - peaks[0][0], 0) // first,
        peak_bwd_bytes_per_sample=max(peaks[1][1] - peaks[0][1], 0) // first,
        cuda_max_allocated_bytes=cuda_peak)


def _cuda_peak(real: nn.Module, call: UnitCall, settings: MeasureSettings) -> int:
    """torch.cuda.max_memory_allocated over one forward and backward at batch 1, above
    what was allocated before (weights and inputs)."""
    args, kwargs = make_inputs(call, 1, settings.device, settings.dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.backward(*output_grads(real(*args, **kwargs)))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
