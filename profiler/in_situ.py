"""Layer times as a local run sees them: every rank times the same layer at the same moment.

Timing a layer alone in one process misses what the ranks of a local run do to each other
and what the executor adds around the layer. On this 2-core machine four one-thread ranks
run a layer about 2x slower than one rank alone (../shared/NOTES-torch.md), other jobs on the
machine slow them further, and a tensor-parallel layer runs as DTensors with a gloo
collective after its row-wise Linear, whose dispatch and communication cost more than the
matmuls on these sizes (benchmarks/results/validate: TP plans ran up to 3.6x slower than the
isolated profile predicted).

So in situ, `nproc` worker processes (one per rank of the run, with the run's threads per
rank) each build the model, and for every distinct layer, TP degree and micro-batch:
wait for each other (a sleeping barrier on the store, so waiting costs no core), then time
the layer together. At tp > 1 the ranks form groups of tp consecutive ranks (tp innermost,
as the executor's mesh does) and the layer is sharded with the executor's own TP styles
(executor/tensor_parallel.tp_styles, no sequence parallelism), so its time
includes DTensor dispatch and the TP collectives. The optimizer step (AdamW, one tensor at a
time as `autoplan run` steps it) over the layer's parameters, as DTensors, is timed the same
way. Rank 0's means are the profile's points.

Means, not medians: with more ranks than cores, an op shorter than the scheduler's time slice
often runs start to end on a core while another rank waits, and times as if it ran alone;
the waiting shows up only in the ops that straddle a slice. On this machine the median of a
4 ms block forward in four ranks on two cores was its time alone, 4x below the 8-sample
point, whose ops all straddle slices (benchmarks/results/validate/profile before the change).
Over the repeats of every rank, the mean holds the waiting in proportion, which is what a
run whose ranks are all busy pays per op.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import parallelize_module

from autoplan.errors import AutoplanError
from autoplan.executor.tensor_parallel import tp_styles
from autoplan.io import atomic_write_text
from autoplan.models import DTYPES, build_model
from autoplan.profiler.compute import (
    MeasureSettings,
    UnitCall,
    capture_unit_calls,
    make_inputs,
    materialize,
    output_grads,
    runs_on_meta,
    shard_copy,
    time_unit,
    unit_module,
)
from autoplan.profiler.launch import run_workers, watch_parent
from autoplan.profiler.profile import OptimizerPoint, TimePoint
from autoplan.tracing import layer_graph_of_built

__all__ = ["LayerTimings", "time_layers_in_situ"]

log = logging.getLogger(__name__)

LayerTimings = dict[str, tuple[list[TimePoint], list[OptimizerPoint]]]
"""signature -> (time points, optimizer points)."""
_GROUP_TIMEOUT = timedelta(seconds=120)  # every collective gives up after this (issue 9)
_BARRIER_POLL_S = 0.002
OPTIMIZER = "adamw"


@dataclass(frozen=True)
class _Request:
    model: str
    dtype: str
    micro_batches: tuple[int, ...]
    tps: tuple[int, ...]
    repeats: int
    warmup: int
    threads: int
    result: str
    progress: str
    timeout_s: float


def time_layers_in_situ(model: str, dtype: str, settings: MeasureSettings, nproc: int,
                        timeout_s: float = 300.0,
                        on_progress: Callable[[str], None] | None = None) -> LayerTimings:
    """Time every distinct layer of `model` in `nproc` local ranks at once (CPU, gloo).

    Args:
        model: the model spec, built again in each worker.
        dtype: a key of DTYPES.
        settings: micro-batches, TP degrees, repeats, warm-up and threads per rank.
        nproc: ranks of the run being predicted.
        timeout_s: how long the workers may go without finishing a time point.
        on_progress: called with each progress line.

    Raises:
        AutoplanError: on a device other than the CPU, or when nproc < 2.
        WorkerFailed: a worker died or stalled (every worker is stopped first).
    """
    if settings.device != "cpu":
        raise AutoplanError("in-situ timing runs on the CPU (gloo); time GPU layers alone")
    if nproc < 2:
        raise AutoplanError(f"in-situ timing needs --nproc >= 2, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="autoplan-in-situ-") as tmp:
        folder = Path(tmp)
        request = _Request(model, dtype, tuple(settings.micro_batches), tuple(settings.tps),
                           settings.repeats, settings.warmup, settings.threads or 1,
                           str(folder / "result.json"), str(folder / "progress.log"),
                           timeout_s)
        atomic_write_text(folder / "request.json", json.dumps(asdict(request)))
        argv = [sys.executable, "-m", "autoplan.profiler.in_situ", str(folder / "request.json")]
        result = folder / "result.json"
        run_workers(nproc, argv, folder, timeout_s, progress_path=folder / "progress.log",
                    on_progress=on_progress, done=result.exists, label="layer-timing worker")
        if not result.exists():
            raise AutoplanError("layer-timing workers ended without writing their times")
        raw = json.loads(result.read_text())
    return {sig: ([TimePoint(**p) for p in entry["points"]],
                  [OptimizerPoint(**p) for p in entry["optimizer"]])
            for sig, entry in raw.items()}


# ---------------------------------------------------------------------------- in a worker


class _Barrier:
    """All ranks meet here without spinning: a count on the store, polled with sleeps."""

    def __init__(self, store: dist.Store, world: int, timeout_s: float) -> None:
        self.store, self.world, self.timeout_s, self.count = store, world, timeout_s, 0

    def wait(self) -> None:
        self.count += 1
        key = f"in_situ/{self.count}"
        self.store.add(key, 1)
        deadline = time.monotonic() + self.timeout_s
        while int(self.store.add(key, 0)) < self.world:
            if time.monotonic() > deadline:
                raise AutoplanError(f"ranks did not meet at timing point {self.count} within "
                                    f"{self.timeout_s:g} s")
            time.sleep(_BARRIER_POLL_S)


def _sharded_unit(unit: nn.Module, call: UnitCall, tp: int, meshes: dict[int, DeviceMesh],
                  dtype: torch.dtype) -> nn.Module | None:
    """The real unit as a run at `tp` holds it, or None when tp cannot shard it (then the
    run keeps it whole, and its tp = 1 time serves)."""
    if tp == 1:
        return materialize(unit, "cpu", dtype)
    shard = shard_copy(unit, tp)
    if tp not in meshes or shard is None or not runs_on_meta(shard, call):
        return None
    real = materialize(unit, "cpu", dtype)
    return parallelize_module(real, meshes[tp], tp_styles(real, sequence_parallel=False))


def _time_optimizer(unit: nn.Module, inputs: tuple, settings: MeasureSettings,
                    barrier: _Barrier, world_mesh: DeviceMesh) -> float:
    """Mean seconds (see the module's docstring) of one AdamW step over the unit's
    parameters (foreach off, as executor/run.py steps them), after a forward and backward
    gave them gradients.

    Parameters a TP shard left whole are stepped as DTensors replicated over the world, as
    the executor's data parallelism (replicate / fully_shard) holds them: DTensor dispatch
    costs more per tensor than the arithmetic on layers of a few MB."""
    args, kwargs = inputs
    outs, grads = output_grads(unit(*args, **kwargs))
    torch.autograd.backward(outs, grads)
    params = [p if isinstance(p, DTensor) else _replicated(p, world_mesh)
              for p in unit.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=False)
    barrier.wait()
    times = []
    for index in range(settings.warmup + settings.repeats):
        start = time.perf_counter()
        optimizer.step()
        if index >= settings.warmup:
            times.append(time.perf_counter() - start)
    unit.zero_grad(set_to_none=True)
    return statistics.fmean(times)


def _replicated(param: nn.Parameter, mesh: DeviceMesh) -> nn.Parameter:
    """A copy of `param` (and its gradient) as a DTensor replicated over `mesh`."""
    copy = nn.Parameter(DTensor.from_local(param.detach().clone(), mesh, [Replicate()],
                                           run_check=False))
    copy.grad = DTensor.from_local(param.grad.detach().clone(), mesh, [Replicate()],
                                   run_check=False)
    return copy


def _meshes(tps: tuple[int, ...], world: int) -> dict[int, DeviceMesh]:
    """A 1-D mesh of tp consecutive ranks for each degree that divides the world."""
    return {tp: init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("rest", "tp"))["tp"]
            for tp in sorted(set(tps)) if tp > 1 and world % tp == 0}


def _time_all(request: _Request, barrier: _Barrier,
              progress: Callable[[str], None]) -> dict:
    dtype = DTYPES[request.dtype]
    built = build_model(request.model, dtype=dtype)
    graph = layer_graph_of_built(built, dtype)
    calls = capture_unit_calls(built, graph)
    settings = MeasureSettings(request.micro_batches, request.tps, request.repeats,
                               request.warmup, "cpu", dtype, request.threads)
    meshes = _meshes(request.tps, dist.get_world_size())
    world_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for signature, nodes in graph.by_signature().items():
        node, call = nodes[0], calls[signature]
        points, optimizer = [], []
        for tp in sorted({1, *request.tps}):
            real = _sharded_unit(unit_module(built, node), call, tp, meshes, dtype)
            if real is None:
                continue
            for micro_batch in request.micro_batches:
                progress(f"{node.name} tp={tp} micro_batch={micro_batch}")
                inputs = make_inputs(call, micro_batch, "cpu", dtype)
                barrier.wait()
                points.append(TimePoint(micro_batch=micro_batch, tp=tp, repeats=request.repeats,
                                        **time_unit(real, inputs, settings, statistics.fmean,
                                                  trailing=settings.warmup)).model_dump())
            step_s = _time_optimizer(real, inputs, settings, barrier, world_mesh)
            optimizer.append(OptimizerPoint(tp=tp, optimizer=OPTIMIZER,
                                            step_s=step_s).model_dump())
        out[signature] = {"points": points, "optimizer": optimizer}
    return out


def _worker_main(request_path: str) -> None:
    """One rank: time every layer with the others; rank 0 writes the medians."""
    watch_parent()
    request = _Request(**json.loads(Path(request_path).read_text()))
    torch.set_num_threads(request.threads)
    dist.init_process_group("gloo", timeout=_GROUP_TIMEOUT)
    rank = dist.get_rank()

    def progress(line: str) -> None:
        if rank == 0:
            with open(request.progress, "a") as f:
                f.write(line + "\n")

    barrier = _Barrier(dist.distributed_c10d._get_default_store(), dist.get_world_size(),
                       request.timeout_s)
    result = _time_all(request, barrier, progress)
    if rank == 0:
        atomic_write_text(Path(request.result), json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips interpreter teardown, where gloo rarely aborts (NOTES-torch.md)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
