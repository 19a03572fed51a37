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
DDP and FSDP baselines ran 20-24% slower than predicted from them). Rank 0 writes the points.

Timed together, not one op at a time: with more ranks than cores, an op shorter than the
scheduler's time slice often runs start to end on a core while another rank waits before
its own starts, so per-op clocks (median or mean) miss the waiting. On this machine they gave
a 4-sample block forward anywhere from its time alone to 3.7x that, run to run. So after
warm-up every rank meets at the barrier, runs SAMPLE_PASSES passes back to back and then as
many untimed ones as it warmed up with (so that no rank's timed passes run on emptier
cores); a sample is the window from the first rank's start to the last rank's end, over
those passes, split between forward and backward as the ranks' own clocks split it: the
time per pass of ranks that all need the cores, as a run's do. The points of a layer are
timed in (at least) SWEEPS passes over all of them, and each keeps its median sample, so
that a spell of load from elsewhere spoils one sample rather than the point.

How many sweeps is the point's own noise: each sweep adds one sample (SAMPLE_PASSES passes
of every rank); after the SWEEPS-th, a point whose 95% confidence interval of the mean
sample lies within TARGET of its median is done, the others are swept again, up to the
ceiling `repeats` passes allow (max_sweeps). Quiet points cost three samples, noisy ones
more. Points that run the same code are timed once (an optimizer step over parameters of
the same shapes, whichever layer holds them), and a caller that knows which plans it will
price asks for their data-parallel points alone (`data_parallel`), not for every layout.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import parallelize_module

from autoplan.errors import AutoplanError
from autoplan.executor import apply_fsdp, apply_replicate, tp_styles
from autoplan.graph import LayerNode
from autoplan.launch import ProgressCount, call_workers, serve_worker
from autoplan.meta_state import prepare_for_timing
from autoplan.models import DTYPES, build_model
from autoplan.models.build import BuiltModel
from autoplan.profile import DataParallelPoint, OptimizerPoint, TimePoint
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
from autoplan.tracing import layer_graph_of_built

__all__ = ["LayerTimings", "ZERO_STAGES", "data_parallel_layouts", "max_sweeps", "settled",
           "time_layers_in_situ"]

log = logging.getLogger(__name__)

LayerTimings = dict[str, tuple[list[TimePoint], list[OptimizerPoint], list[DataParallelPoint]]]
"""signature -> (time points, optimizer points, data-parallel points)."""
_GROUP_TIMEOUT = timedelta(seconds=120)  # every collective gives up after this (issue 9)
_BARRIER_POLL_S = 0.002
OPTIMIZER = "adamw"
SWEEPS = 3
"""The fewest passes over a layer's points, a sample of each point per pass; a point keeps
the median, so that a spell of other load on the machine (which halved every block point of
one validation profile for a minute) moves one sample, not the point."""
SAMPLE_PASSES = 4
"""Timed passes of the ranks in one sample (the window over them, per pass); fewer when
`repeats` asks for fewer. A window holds the ranks' start skew once, so a shorter sample
holds more of it: with samples of 2 passes, a 12-layer GPT's validation came out +8% to +40%
slow in every plan (MAPE 18%, benchmarks/results/validate_notes.md); 4 passes per sample is
what the three sweeps of 10 repeats took before, with MAPE 7.7%."""
TARGET = 0.03
"""A point is done when the 95% confidence interval of its mean sample is within +-3% of its
median sample (settled)."""
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
        10: 2.262}
"""Student's t, two-sided 95%, by number of samples (n - 1 degrees of freedom; any table)."""

ZERO_STAGES = (0, 2, 3)
"""Timed under data parallelism: replicate (0) and fully_shard keeping (2) or freeing (3) the
gathered weights after forward; a step of one micro-batch runs the same under ZeRO 1 as under
2 (executor/data_parallel.py: they differ in when later micro-batches reduce)."""


DataParallelWanted = dict[str, list[tuple[int, int, int, int]]]
"""signature -> the (dp, tp, zero, micro_batch) points to time under data parallelism."""


@dataclass(frozen=True)
class _Request:
    model: str
    dtype: str
    micro_batches: tuple[int, ...]
    tps: tuple[int, ...]
    repeats: int
    warmup: int
    threads: int
    timeout_s: float
    layers: bool = True
    """Time the layers at every TP degree and micro-batch, and the optimizer step."""
    data_parallel: dict[str, list[list[int]]] | None = None
    """The data-parallel points to time by signature; None: every layout, ZeRO stage and
    micro-batch."""


def _sample_passes(repeats: int) -> int:
    return min(SAMPLE_PASSES, repeats)


def max_sweeps(repeats: int) -> int:
    """The most samples of a point: `repeats` timed passes, SWEEPS samples at least."""
    return max(SWEEPS, -(-repeats // _sample_passes(repeats)))


def settled(samples: list[float]) -> bool:
    """Whether a point has SWEEPS samples or more and the 95% t-interval of their mean lies
    within TARGET of their median (the rule of the module's docstring)."""
    n = len(samples)
    if n < SWEEPS:
        return False
    half_width = _T95.get(n, 1.96) * statistics.stdev(samples) / math.sqrt(n)
    return half_width <= TARGET * statistics.median(samples)


def time_layers_in_situ(model: str, dtype: str, settings: MeasureSettings, nproc: int,
                        timeout_s: float = 300.0,
                        on_progress: Callable[[str], None] | None = None, *,
                        layers: bool = True,
                        data_parallel: DataParallelWanted | None = None) -> LayerTimings:
    """Time the distinct layers of `model` in `nproc` local ranks at once (CPU, gloo).

    Args:
        model: the model spec, built again in each worker.
        dtype: a key of DTYPES.
        settings: micro-batches, TP degrees, the ceiling on timed passes per point
            (`repeats`, see max_sweeps), warm-up and threads per rank.
        nproc: ranks of the run being predicted.
        timeout_s: how long the workers may go without finishing a time point.
        on_progress: called with a line per sample taken, counted (launch.counted_line):
            the samples planned grow when a noisy point needs more.
        layers: time each layer at every TP degree and micro-batch, and the optimizer
            step (False: the data-parallel points alone).
        data_parallel: the data-parallel points wanted, by signature; None: all of them.

    Raises:
        AutoplanError: on a device other than the CPU, or when nproc < 2.
        WorkerFailed: a worker died or stalled (every worker is stopped first), or the
            workers ended without writing their times.
    """
    if settings.device != "cpu":
        raise AutoplanError("in-situ timing runs on the CPU (gloo); time GPU layers alone")
    if nproc < 2:
        raise AutoplanError(f"in-situ timing needs --nproc >= 2, got {nproc}")
    wanted = None if data_parallel is None else \
        {sig: [list(point) for point in points] for sig, points in data_parallel.items()}
    request = _Request(model, dtype, tuple(settings.micro_batches), tuple(settings.tps),
                       settings.repeats, settings.warmup, settings.threads or 1, timeout_s,
                       layers, wanted)
    return call_workers("autoplan.profiler.in_situ", asdict(request), nproc, timeout_s,
                        _read_timings, label="layer-timing worker", on_progress=on_progress)


def _read_timings(path: Path) -> LayerTimings:
    """The points rank 0 wrote, by signature."""
    return {sig: ([TimePoint(**p) for p in entry["points"]],
                  [OptimizerPoint(**p) for p in entry["optimizer"]],
                  [DataParallelPoint(**p) for p in entry["data_parallel"]])
            for sig, entry in json.loads(path.read_text()).items()}


# ---------------------------------------------------------------------------- in a worker


def _time_together(iteration: Callable[[], tuple[float, ...]], settings: MeasureSettings,
                   barrier: _Barrier) -> list[float]:
    """Seconds per run of each part of `iteration` when every rank runs it at once (see the
    module's docstring); `iteration` returns its parts' own perf_counter seconds. A collective
    over the world: every rank calls it."""
    for _ in range(settings.warmup):
        iteration()
    barrier.wait()
    start, sums = time.monotonic(), None  # CLOCK_MONOTONIC: one clock for every process here
    for _ in range(settings.repeats):
        parts = iteration()
        sums = list(parts) if sums is None else [a + b for a, b in zip(sums, parts, strict=True)]
    end = time.monotonic()
    for _ in range(settings.warmup):  # the others may still be timing: keep them company
        iteration()
    mine = torch.tensor([start, end, *sums], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    ranks = torch.stack(every)
    per_run = (ranks[:, 1].max() - ranks[:, 0].min()).item() / settings.repeats
    totals = ranks[:, 2:].sum(0)
    shares = (totals / totals.sum()).tolist() if totals.sum() > 0 else [0.0] * len(sums)
    return [per_run * share for share in shares]


def _time_layer(module: nn.Module, inputs: tuple, settings: MeasureSettings,
                barrier: _Barrier) -> dict[str, float]:
    """A layer's forward and backward seconds timed together."""
    fwd, bwd = _time_together(lambda: timed_pass(module, inputs, "cpu"), settings, barrier)
    return {"fwd_s": fwd, "bwd_s": bwd}


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
                    barrier: _Barrier, world_mesh: DeviceMesh) -> dict[str, float]:
    """Seconds (timed together, see the module's docstring) of one AdamW step over the unit's
    parameters (foreach off, as autoplan/app/run.py steps them), after a forward and backward
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
        return {"step_s": 0.0}
    optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=False)

    def step() -> tuple[float]:
        start = time.perf_counter()
        optimizer.step()
        return (time.perf_counter() - start,)

    (seconds,) = _time_together(step, settings, barrier)
    unit.zero_grad(set_to_none=True)
    return {"step_s": seconds}


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


def data_parallel_layouts(tps: tuple[int, ...], world: int) -> list[tuple[int, int]]:
    """The (dp, tp) layouts with data parallelism that fit the world."""
    return [(dp, tp) for tp in sorted({1, *tps}) for dp in range(2, world // tp + 1)
            if world % (dp * tp) == 0]


def _layouts(tps: tuple[int, ...], world: int) -> dict[tuple[int, int], DeviceMesh]:
    """A (rest, dp, tp) mesh for each layout with data parallelism that fits the world: the
    dp and tp sub-meshes of one mesh, as the executor builds them (executor/mesh.py), which
    fully_shard needs to take tensor-parallel DTensors."""
    return {(dp, tp): init_device_mesh("cpu", (world // (dp * tp), dp, tp),
                                       mesh_dim_names=("rest", "dp", "tp"))
            for dp, tp in data_parallel_layouts(tps, world)}


@dataclass(frozen=True)
class _Task:
    """One point to time: what it is (its fixed fields) and how to time it."""

    label: str
    kind: str
    """points, optimizer or data_parallel: the list of the signature's entry it joins."""
    fields: dict
    measure: Callable[[MeasureSettings], dict[str, float]]
    same_as: tuple = ()
    """Tasks with the same non-empty key run the same code: the first one's times serve all."""


def _time_synced(module: nn.Module, inputs: tuple, settings: MeasureSettings,
                 barrier: _Barrier) -> dict[str, float]:
    """A data-parallel layer with the gradient sync off (as a step runs every micro-batch but
    its last), then its backward with the sync on (DataParallelPoint's fields)."""
    times = []
    for sync in (False, True):
        module.set_requires_gradient_sync(sync)
        times.append(_time_layer(module, inputs, settings, barrier))
    return {"fwd_s": times[0]["fwd_s"], "bwd_s": times[0]["bwd_s"],
            "sync_bwd_s": times[1]["bwd_s"]}


def _tasks(built: BuiltModel, node: LayerNode, call: UnitCall, request: _Request,
           barrier: _Barrier, meshes: dict[int, DeviceMesh], world_mesh: DeviceMesh,
           layouts: dict[tuple[int, int], DeviceMesh]) -> list[_Task]:
    """The points of one layer the request asks for: each TP degree and micro-batch and the
    optimizer step per TP degree (request.layers), and the layer under replicate /
    fully_shard on each layout and ZeRO stage per micro-batch (samples per rank), whose
    gathers, hooks, copies and collectives share the cores with the other ranks' compute as
    in a run, where they cannot be timed apart (request.data_parallel: which ones)."""
    dtype, tasks = DTYPES[request.dtype], []
    for tp in sorted({1, *request.tps}) if request.layers else ():
        real = _sharded_unit(unit_module(built, node), call, tp, meshes, dtype)
        if real is None:
            continue
        for micro_batch in request.micro_batches:
            inputs = make_inputs(call, micro_batch, "cpu", dtype)
            tasks.append(_Task(f"{node.name} tp={tp} micro_batch={micro_batch}", "points",
                               {"micro_batch": micro_batch, "tp": tp},
                               partial(_time_layer, real, inputs, barrier=barrier)))
        shapes = tuple(tuple(p.shape) for p in real.parameters() if p.requires_grad)
        tasks.append(_Task(f"{node.name} tp={tp} optimizer", "optimizer",
                           {"tp": tp, "optimizer": OPTIMIZER},
                           partial(_time_optimizer, real, inputs, barrier=barrier,
                                   world_mesh=world_mesh), ("optimizer", tp, shapes)))
    wanted = _wanted_data_parallel(request, node, layouts)
    for (dp, tp), mesh in layouts.items():
        for zero in ZERO_STAGES:
            micro_batches = [m for m in request.micro_batches if (dp, tp, zero, m) in wanted]
            if not micro_batches:
                continue
            real = _sharded_unit(unit_module(built, node), call, tp, {tp: mesh["tp"]}, dtype)
            if real is None or not any(p.requires_grad for p in real.parameters()):
                continue
            apply = apply_replicate if zero == 0 else apply_fsdp
            apply(real, [(("",), zero)], mesh["dp"], root=False)
            for micro_batch in micro_batches:
                inputs = make_inputs(call, micro_batch, "cpu", dtype)
                tasks.append(_Task(
                    f"{node.name} dp={dp} tp={tp} zero={zero} micro_batch={micro_batch}",
                    "data_parallel", {"dp": dp, "tp": tp, "zero": zero,
                                      "micro_batch": micro_batch},
                    partial(_time_synced, real, inputs, barrier=barrier)))
    return tasks


def _wanted_data_parallel(request: _Request, node: LayerNode,
                          layouts: dict[tuple[int, int], DeviceMesh]) -> set[tuple]:
    """The (dp, tp, zero, micro_batch) points of `node` to time under data parallelism."""
    if request.data_parallel is None:
        return {(dp, tp, zero, m) for dp, tp in layouts for zero in ZERO_STAGES
                for m in request.micro_batches}
    return {tuple(point) for point in request.data_parallel.get(node.signature, [])}


def _sweep_settings(settings: MeasureSettings, sweep: int) -> MeasureSettings:
    """One sample: SAMPLE_PASSES timed passes; the first sweep warms up as asked, later ones
    once."""
    return replace(settings, repeats=_sample_passes(settings.repeats),
                   warmup=settings.warmup if sweep == 0 else min(1, settings.warmup))


def _sample_total(result: dict[str, float]) -> float:
    return sum(result.values())


def _sweep(tasks: list[_Task], settings: MeasureSettings, counter: ProgressCount,
           timed: dict[tuple, list[dict[str, float]]]) -> dict[str, list[dict]]:
    """Time every task in SWEEPS or more passes over them, a sample each per pass, until each
    is settled or has max_sweeps samples. Each field is the median over the samples, but
    forward and backward split the median pass as the samples' clocks together split it (the
    split of a few passes is noisier than their sum); a time point's spreads are the range
    of its times over the samples. A task whose `same_as` key is in `timed` takes those
    samples without running (every rank decides alike: the samples are the gathered
    windows, equal on all ranks)."""
    found: list[list[dict[str, float]]] = [timed.get(t.same_as, []) if t.same_as else []
                                            for t in tasks]
    pending = [i for i, t in enumerate(tasks) if not (t.same_as and t.same_as in timed)]
    most = max_sweeps(settings.repeats)
    for sweep in range(most):
        for i in pending:
            counter.step(f"{tasks[i].label} (sample {sweep + 1})")
            found[i].append(tasks[i].measure(_sweep_settings(settings, sweep)))
        if sweep + 1 >= SWEEPS:
            pending = [i for i in pending
                       if not settled([_sample_total(r) for r in found[i]])]
            counter.planned += len(pending) if sweep + 1 < most else 0
        if not pending:
            break
    for task, results in zip(tasks, found, strict=True):
        if task.same_as:
            timed.setdefault(task.same_as, results)
    return _points(tasks, found, settings)


def _points(tasks: list[_Task], found: list[list[dict[str, float]]],
            settings: MeasureSettings) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"points": [], "optimizer": [], "data_parallel": []}
    for task, results in zip(tasks, found, strict=True):
        point = task.fields | {key: statistics.median(r[key] for r in results)
                               for key in results[0]}
        if "fwd_s" in point:  # the median pass, split as all samples' clocks split it
            passes = [r["fwd_s"] + r["bwd_s"] for r in results]
            share = sum(r["fwd_s"] for r in results) / sum(passes) if sum(passes) else 0.5
            median_pass = statistics.median(passes)
            point["fwd_s"], point["bwd_s"] = median_pass * share, median_pass * (1 - share)
        if task.kind == "points":
            for part in ("fwd", "bwd"):
                times = [r[f"{part}_s"] for r in results]
                point[f"{part}_spread_s"] = max(times) - min(times)
            point["repeats"] = _sample_passes(settings.repeats) * len(results)
        out[task.kind].append(point)
    return out


def _time_all(request: _Request, barrier: _Barrier,
              progress: Callable[[str], None]) -> dict:
    dtype = DTYPES[request.dtype]
    built = build_model(request.model, dtype=dtype)
    graph = layer_graph_of_built(built, dtype)
    prepare_for_timing(built.module, built.spec)
    calls = capture_unit_calls(built, graph)
    settings = MeasureSettings(request.micro_batches, request.tps, request.repeats,
                               request.warmup, "cpu", dtype, request.threads)
    meshes = _meshes(request.tps, dist.get_world_size())
    world_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layouts = _layouts(request.tps, dist.get_world_size())
    tasks = {signature: _tasks(built, nodes[0], calls[signature], request, barrier, meshes,
                               world_mesh, layouts)
             for signature, nodes in graph.by_signature().items()}
    keys = {t.same_as or id(t) for layer in tasks.values() for t in layer}
    counter, timed = ProgressCount(SWEEPS * len(keys), progress), {}
    return {signature: _sweep(layer, settings, counter, timed)
            for signature, layer in tasks.items()}


def _serve_rank(spec: dict[str, Any], progress: Callable[[str], None]) -> dict:
    """One rank's part (launch.serve_worker): time every layer with the others; rank 0's
    medians go back as JSON."""
    request = _Request(**spec)
    torch.set_num_threads(request.threads)
    dist.init_process_group("gloo", timeout=_GROUP_TIMEOUT)
    barrier = _Barrier(dist.distributed_c10d._get_default_store(), dist.get_world_size(),
                       request.timeout_s)
    return _time_all(request, barrier, progress)


if __name__ == "__main__":
    serve_worker(sys.argv[1], _serve_rank)
