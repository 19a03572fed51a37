"""`autoplan profile --mode measure`: time and size every distinct layer on this machine,
time the collectives between local processes, and assemble the Profile."""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from autoplan.cluster import Cluster
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.io import utc_now
from autoplan.launch import ProgressCount
from autoplan.meta_state import prepare_for_timing
from autoplan.models.build import BuiltModel
from autoplan.profile import (
    LayerProfile,
    Machine,
    Profile,
    TimePoint,
    fits_from_points,
)
from autoplan.profiler.compute import (
    MeasureSettings,
    UnitCall,
    capture_unit_calls,
    make_inputs,
    materialize,
    runs_on_meta,
    shard_copy,
    time_unit,
    unit_module,
)
from autoplan.profiler.memory import measure_memory
from autoplan.tracing import trace_batch

if TYPE_CHECKING:
    from autoplan.profiler.in_situ import LayerTimings

__all__ = ["measure_layers", "machine_info", "measured_profile"]

Progress = Callable[[str], None]
log = logging.getLogger(__name__)


def measure_layers(built: BuiltModel, graph: LayerGraph, settings: MeasureSettings,
                   on_step: Progress | None = None,
                   timings: LayerTimings | None = None) -> list[LayerProfile]:
    """One LayerProfile per distinct signature: time points, fits per TP degree, memory.

    Args:
        timings: times already taken in situ (profiler/in_situ.py); None times each layer
            here, alone.

    Raises:
        AutoplanError: naming the layer that failed to run for real, and its error.
    """
    prepare_for_timing(built.module, built.spec)
    calls = capture_unit_calls(built, graph)
    layers = []
    by_signature = graph.by_signature()
    # the most points there can be: a TP degree that would split a head is skipped
    planned = len(by_signature) * len({1, *settings.tps}) * len(settings.micro_batches)
    step = ProgressCount(planned, on_step).step if on_step else None
    for signature, nodes in by_signature.items():
        try:
            layers.append(_measure_layer(built, nodes, calls[signature], settings, step,
                                         timings[signature] if timings is not None else None))
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            message = (str(err).strip().splitlines() or [""])[0]
            raise AutoplanError(f"layer {nodes[0].name} could not be timed on "
                                f"{settings.device}: {type(err).__name__}: {message}") from err
    return layers


def _measure_layer(built: BuiltModel, nodes: list[LayerNode], call: UnitCall,
                   settings: MeasureSettings, on_step: Progress | None,
                   timed: tuple | None) -> LayerProfile:
    """The LayerProfile of the layers `nodes` (one signature), timed here unless `timed`."""
    node = nodes[0]
    unit = unit_module(built, node)
    points, optimizer, data_parallel = timed if timed is not None else (
        _time_points(unit, node.name, call, settings, on_step), [], [])
    memory = measure_memory(unit, node, call, settings)
    return LayerProfile(signature=node.signature, kind=node.kind,
                        names=[n.name for n in nodes], points=points,
                        fits=fits_from_points(points), memory=memory,
                        optimizer=optimizer, data_parallel=data_parallel)


def _time_points(unit: nn.Module, name: str, call: UnitCall, settings: MeasureSettings,
                 on_step: Progress | None) -> list[TimePoint]:
    """Time one layer at every (tp, micro-batch); tp = 1 always, so every layer has a fit.
    A layer with a BatchNorm in training mode is timed from 2 samples up (tracing.trace_batch:
    BatchNorm refuses one value per channel)."""
    first = trace_batch(unit)
    micro_batches = sorted({max(m, first) for m in settings.micro_batches})
    points = []
    for tp in sorted({1, *settings.tps}):
        shard = shard_copy(unit, tp)
        if shard is None or not runs_on_meta(shard, call):
            log.info("%s: no shard shapes for tp=%d, not profiled at that degree", name, tp)
            continue
        real = materialize(shard, settings.device, settings.dtype)
        for micro_batch in micro_batches:
            if on_step:
                on_step(f"{name} tp={tp} micro_batch={micro_batch}")
            inputs = make_inputs(call, micro_batch, settings.device, settings.dtype)
            points.append(TimePoint(micro_batch=micro_batch, tp=tp, repeats=settings.repeats,
                                    **time_unit(real, inputs, settings)))
    return points


def machine_info(settings: MeasureSettings, ranks_timing: int = 1) -> Machine:
    device = (torch.cuda.get_device_name(torch.device(settings.device))
              if settings.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)")
    return Machine(hostname=socket.gethostname(), platform=platform.platform(),
                   python=platform.python_version(), torch=torch.__version__, device=device,
                   threads=torch.get_num_threads(), ranks_timing=ranks_timing)


def measured_profile(built: BuiltModel, graph: LayerGraph, cluster: Cluster,
                     settings: MeasureSettings, comm: tuple[list, list] = ([], []),
                     on_step: Progress | None = None,
                     in_situ: tuple[LayerTimings, int] | None = None) -> Profile:
    """The Profile of a measured run: layers timed here (or given with the number of ranks
    that timed them in situ), collectives given as (points, fits)."""
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        layers = measure_layers(built, graph, settings, on_step,
                                in_situ[0] if in_situ else None)
        machine = machine_info(settings, in_situ[1] if in_situ else 1)
    finally:
        torch.set_num_threads(threads)
    return Profile(
        mode="measure", model=graph.model, model_hash=graph.structural_hash,
        dtype=str(settings.dtype).removeprefix("torch."), cluster=cluster.to_dict(),
        machine=machine, created=utc_now(),
        layers=layers, comm_points=comm[0], comm=comm[1],
        notes=["layer times: median of repeats, perf_counter (CPU) or synchronised (CUDA)"
               + (f"; in situ: {in_situ[1]} ranks at once, tp > 1 as DTensors with their "
                  "collectives" if in_situ else ""),
               "memory peaks: torch.profiler allocator events, per sample from batches 1 and 2"])
