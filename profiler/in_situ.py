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
way. So is the layer under the executor's data parallelism (replicate, fully_shard) on each
dp x tp layout that fits the world, with the gradient sync off and on: on oversubscribed
cores gloo's collectives wait for their peers to be scheduled, and FSDP's gathers, copies
and hooks take the cores compute needs, which collective timings alone do not show (the
DDP and FSDP baselines ran 20-24% slower than predicted from them). Rank 0's means are the
profile's points.

Timed together, not one op at a time: with more ranks than cores, an op shorter than the
scheduler's time slice often runs start to end on a core while another rank waits before
its own starts, so per-op clocks (median or mean) miss the waiting. On this machine they gave
a 4-sample block forward anywhere from its time alone to 3.7x that, run to run. So after
warm-up every rank meets at the barrier, runs `repeats` passes back to back and then as many
untimed ones as it warmed up with (so that no rank's timed passes run on emptier cores); a
point is the window from the first rank's start to the last rank's end, over the repeats,
split between forward and backward as the ranks' own clocks split it: the time per pass of
ranks that all need the cores, as a run's do.
"""

from __future__ import annotations

import json
import logging
import os
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
from autoplan.executor.data_parallel import apply_fsdp, apply_replicate
from autoplan.executor.tensor_parallel import tp_styles
from autoplan.graph import LayerNode
from autoplan.io import atomic_write_text
from autoplan.models import DTYPES, build_model
from autoplan.models.build import BuiltModel
from autoplan.profiler.compute import (
    MeasureSettings,
    UnitCall,
    capture_unit_calls,
    make_inputs,
    materialize,
    output_grads,
    runs_on_meta,
    shard_copy,
    timed_pass,
    unit_module,
)
from autoplan.profiler.launch import run_workers, watch_parent
from autoplan.profiler.profile import DataParallelPoint, OptimizerPoint, TimePoint
from autoplan.tracing import layer_graph_of_built

__all__ = ["LayerTimings", "time_layers_in_situ"]

log = logging.getLogger(__name__)

LayerTimings = dict[str, tuple[list[TimePoint], list[OptimizerPoint], list[DataParallelPoint]]]
"""signature -> (time points, optimizer points, data-parallel points)."""
_GROUP_TIMEOUT = timedelta(seconds=120)  # every collective gives up after this (issue 9)
_BARRIER_POLL_S = 0.002
OPTIMIZER = "adamw"
ZERO_STAGES = (0, 2, 3)
"""Timed under data parallelism: replicate (0) and fully_shard keeping (2) or freeing (3) the
gathered weights after forward; ZeRO 1 runs as 2 in the executor (executor/data_parallel.py)."""


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
                  [OptimizerPoint(**p) for p in entry["optimizer"]],
                  [DataParallelPoint(**p) for p in entry["data_parallel"]])
            for sig, entry in raw.items()}


# ---------------------------------------------------------------------------- in a worker


def _time_together(iteration: Callable[[], tuple[float, ...]], settings: MeasureSettings,
                   barrier: _Barrier) -> tuple[list[float], list[float]]:
    """(seconds per run of each part of `iteration`, their spread over ranks) when every rank
    runs it at once (see the module's docstring); `iteration` returns its parts' own
    perf_counter seconds. A collective over the world: every rank calls it."""
    for _ in range(settings.warmup):
        iteration()
    barrier.wait()
    start, sums = time.monotonic(), None  # CLOCK_MONOTONIC: one clock for every process here
    for _ in range(settings.repeats):
        parts = iteration()
        sums = list(parts) if sums is None else [a + b for a, b in zip(sums, parts, strict=True)]
    end = time.monotonic()
    for _ in range(settings.warmup):
        iteration()
    mine = torch.tensor([start, end, *sums], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    ranks = torch.stack(every)
    per_run = (ranks[:, 1].max() - ranks[:, 0].min()).item() / settings.repeats
    totals = ranks[:, 2:].sum(0)
    shares = (totals / totals.sum()).tolist() if totals.sum() > 0 else [0.0] * len(sums)
    spreads = ((ranks[:, 2:].max(0).values - ranks[:, 2:].min(0).values)
               / settings.repeats).tolist()
    return [per_run * share for share in shares], spreads


def _time_layer(module: nn.Module, inputs: tuple, settings: MeasureSettings,
                barrier: _Barrier) -> dict[str, float]:
    """A layer's forward and backward seconds timed together (TimePoint's fields)."""
    (fwd, bwd), (fwd_spread, bwd_spread) = _time_together(
        lambda: timed_pass(module, inputs, "cpu"), settings, barrier)
    return {"fwd_s": fwd, "bwd_s": bwd, "fwd_spread_s": fwd_spread, "bwd_spread_s": bwd_spread}


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
    """Seconds (timed together, see the module's docstring) of one AdamW step over the unit's
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

    def step() -> tuple[float]:
        start = time.perf_counter()
        optimizer.step()
        return (time.perf_counter() - start,)

    (seconds,), _ = _time_together(step, settings, barrier)
    unit.zero_grad(set_to_none=True)
    return seconds


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


def _layouts(tps: tuple[int, ...], world: int) -> dict[tuple[int, int], DeviceMesh]:
    """A (rest, dp, tp) mesh for each layout with data parallelism that fits the world: the
    dp and tp sub-meshes of one mesh, as the executor builds them (executor/mesh.py), which
    fully_shard needs to take tensor-parallel DTensors."""
    return {(dp, tp): init_device_mesh("cpu", (world // (dp * tp), dp, tp),
                                       mesh_dim_names=("rest", "dp", "tp"))
            for tp in sorted({1, *tps}) for dp in range(2, world // tp + 1)
            if world % (dp * tp) == 0}


def _time_data_parallel(built: BuiltModel, node: LayerNode, call: UnitCall,
                        request: _Request, settings: MeasureSettings, barrier: _Barrier,
                        layouts: dict[tuple[int, int], DeviceMesh],
                        progress: Callable[[str], None]) -> list[dict]:
    """The layer under replicate / fully_shard on each layout and ZeRO stage, per
    micro-batch (samples per rank): forward and backward with the gradient sync off, as a
    step runs every micro-batch but its last, then the backward with it on. Its gathers,
    hooks, copies and collectives share the cores with the other ranks' compute, as in a
    run, where they cannot be timed apart."""
    dtype, out = settings.dtype, []
    for (dp, tp), mesh in layouts.items():
        for zero in ZERO_STAGES:
            real = _sharded_unit(unit_module(built, node), call, tp, {tp: mesh["tp"]}, dtype)
            if real is None or not any(p.requires_grad for p in real.parameters()):
                continue
            apply = apply_replicate if zero == 0 else apply_fsdp
            apply(real, [(("",), zero)], mesh["dp"], root=False)
            for micro_batch in request.micro_batches:
                progress(f"{node.name} dp={dp} tp={tp} zero={zero} micro_batch={micro_batch}")
                inputs = make_inputs(call, micro_batch, "cpu", dtype)
                times = []
                for sync in (False, True):
                    real.set_requires_gradient_sync(sync)
                    times.append(_time_layer(real, inputs, settings, barrier))
                out.append(DataParallelPoint(
                    dp=dp, tp=tp, zero=zero, micro_batch=micro_batch, fwd_s=times[0]["fwd_s"],
                    bwd_s=times[0]["bwd_s"], sync_bwd_s=times[1]["bwd_s"]).model_dump())
    return out


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
    layouts = _layouts(request.tps, dist.get_world_size())
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
                points.append(TimePoint(micro_batch=micro_batch, tp=tp, repeats=request.repeats,
                                        **_time_layer(real, inputs, settings, barrier))
                              .model_dump())
            step_s = _time_optimizer(real, inputs, settings, barrier, world_mesh)
            optimizer.append(OptimizerPoint(tp=tp, optimizer=OPTIMIZER,
                                            step_s=step_s).model_dump())
        data_parallel = _time_data_parallel(built, node, call, request, settings, barrier,
                                            layouts, progress)
        out[signature] = {"points": points, "optimizer": optimizer,
                          "data_parallel": data_parallel}
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
