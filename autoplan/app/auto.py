"""autoplan.auto(model, example_inputs, global_batch=...): profile, search and parallelize a
user's module in one call, inside the torch.distributed world it runs in (or a world of one).

Like autoplan.search, this module is callable (it is `auto`): importing the submodule makes
it the package's attribute `auto`, which must stay callable.

The steps, on every rank unless said otherwise:
1. check the arguments (every rank sees the same ones, so every rank fails alike, early);
2. trace the module into a LayerGraph on meta tensors and check that every rank traced the
   same model (one all-gather of the graph's hash);
3. when the cluster has no datasheet figures (the current world is `local-cpu`) and no
   profile is given, time the collectives of this world (every rank takes part);
4. rank 0 alone times the layers, searches, and keeps the fastest plan the executor runs; it
   sends the plan to the others as JSON (or the error that stopped it, so no rank waits
   for a plan that will not come). Only rank 0 decides because measured profiles differ
   from rank to rank, and different plans on different ranks would deadlock;
5. parallelize the module under that plan and return the Runner (runner.plan is the plan).

Nothing here draws random numbers from the caller's generators (measuring layers does, under
a forked RNG), so a model trained after auto() matches one trained without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoplan import fmt
from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.cost_model import PRICED_COLLECTIVES, TP_SHARDED_KINDS
from autoplan.errors import AutoplanError
from autoplan.executor import LossFn, Runner, parallelize
from autoplan.graph import LayerGraph
from autoplan.models.build import BuiltModel, default_loss, sum_loss
from autoplan.models.spec import ModelSpec
from autoplan.plan import plan_from_json
from autoplan.profile import CommPoint, Profile, load_profile
from autoplan.profiler import MeasureSettings
from autoplan.search import (
    SearchOptions,
    SearchResult,
    describe,
    divisors,
    no_plan_message,
    parse_fix,
    search_workload,
)
from autoplan.tracing import layer_graph, meta_copy, meta_inputs
from autoplan.workload import Workload, check_profile, memory_limit_bytes

__all__ = ["auto", "default_loss"]

log = logging.getLogger(__name__)

Inputs = torch.Tensor | tuple | list | Callable[[int], tuple]
"""A tensor, a tuple of tensors (batch in dim 0, any batch size), or batch -> tuple."""

_MEASURE_MICRO_BATCHES = (1, 2, 4)
"""A cheap layer profile: three micro-batch sizes fix each layer's linear fit (the search
extrapolates it); `autoplan profile` measures 1 to 8 with more repeats."""
_MEASURE_REPEATS = 5
"""Timed runs per point, whose median is kept: on a shared CPU, three medians still caught a
rank losing its core and gave a negative per-sample slope."""
_MEASURE_WARMUP = 2
_COMM_SIZES = (2**12, 2**16, 2**20, 2**22)
"""4 KiB to 4 MiB: latency and bandwidth of one line per collective, in about a second on
gloo (profiler/comm.py repeats small messages more). `autoplan profile` goes as far as
the model's messages (app/profile.priced_comm_sizes)."""
_COMM_REPEATS = 3


@dataclass(frozen=True)
class _World:
    """The torch.distributed world auto() runs in (a world of one without a process group)."""

    rank: int
    size: int
    local_size: int
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE), for the cluster's node size."""
    device: torch.device
    """Where collective tensors live: cuda for NCCL, else cpu."""


@dataclass(frozen=True)
class _Request:
    """The checked arguments of one auto() call."""

    example: Any
    options: SearchOptions
    cluster: Cluster
    profile: Profile | str | Path | None
    device: torch.device

    @property
    def measure(self) -> bool:
        """Whether layers and collectives are timed here: no profile given and the cluster
        has no datasheet figures for the cost model to derive times from."""
        return self.profile is None and not self.cluster.device.has_datasheet


def auto(model: nn.Module, example_inputs: Inputs, *, global_batch: int,
         cluster: str | Cluster | None = None, loss_fn: LossFn | None = None,
         profile: Profile | str | Path | None = None, memory_limit_gib: float | None = None,
         fix: str | None = None, device: str | torch.device | None = None,
         tp_overrides: dict[str, dict[str, str]] | None = None) -> Runner:
    """Profile `model`, search the fastest plan that fits and runs, and parallelize it.

    Call it on every rank with the same model (same seed) and arguments, after
    torch.distributed.init_process_group (torchrun), or in a plain process for a world of one.

    Args:
        model: the module; its units (autoplan.units.find_units) become the plan's layers.
        example_inputs: the model's positional inputs with the batch in dim 0 (any batch
            size; only shapes and dtypes are read), or a function batch_size -> tuple.
        global_batch: samples per training step, over all data-parallel ranks.
        cluster: None for the current world (local-cpu with one process per rank, timed
            here); a spec ("h100-sxm:gpus=8", "local-cpu:procs=2") or a Cluster, whose device
            count must be the world size. Presets with datasheet figures are not timed.
        loss_fn: (output, targets) -> scalar averaged over the batch; default: cross entropy
            for integer targets (logits in the last dim), mean squared error for float ones.
        profile: a Profile or profile.json of this model to use instead of timing.
        memory_limit_gib: memory per device the plan must fit; default: the cluster's (on a
            GPU, that GPU's memory).
        fix: fields every plan must keep, as `autoplan search --fix` takes them ("zero=1").
        device: where the model runs (default: cuda when available, else cpu).
        tp_overrides: layer FQN -> {sub-module FQN: "colwise" | "rowwise"}, as parallelize
            takes them.

    Returns:
        The Runner of parallelize(): .step(inputs, targets, optimizer) -> loss, .plan (the
        chosen plan, with its predicted step time and memory), .parameters().

    Raises:
        AutoplanError: bad arguments, a model that differs between ranks, or no plan that
            fits and the executor runs (on every rank, with rank 0's reason).

    Example:
        runner = autoplan.auto(model, (tokens,), global_batch=32)
        optimizer = torch.optim.AdamW(runner.parameters(), lr=3e-4)
        loss = runner.step(tokens, targets, optimizer)
    """
    world = _current_world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    request = _check_request(model, example_inputs, global_batch, cluster, profile,
                             memory_limit_gib, fix, device, world)             # step 1
    with _rng_kept(device):
        graph = layer_graph(model, request.example, name=type(model).__name__,
                            dtype=_param_dtype(model))                         # step 2
    _check_same_model(graph, world)
    comm = _measure_comm(world) if request.measure and world.size > 1 else []  # step 3
    text = _from_rank0(world, lambda: _decide(model, graph, request, comm, world))  # step 4
    plan = plan_from_json(text, "the plan rank 0 sent")
    return parallelize(model, plan, loss_fn or default_loss, graph=graph,     # step 5
                       tp_overrides=tp_overrides, device=device)


# ------------------------------------------------------------------------------ step 1


def _current_world() -> _World:
    if not dist.is_initialized():
        return _World(0, 1, 1, torch.device("cpu"))
    size = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return _World(dist.get_rank(), size, local if 0 < local <= size else size, device)


def _check_request(model: Any, example: Any, global_batch: Any, cluster: str | Cluster | None,
                   profile: Profile | str | Path | None, memory_limit_gib: float | None,
                   fix: str | None, device: torch.device, world: _World) -> _Request:
    """The arguments checked and resolved, the same way on every rank.

    Raises:
        AutoplanError: naming the bad argument and what it should be.
    """
    if not isinstance(model, nn.Module):
        raise AutoplanError(f"auto() takes an nn.Module, got {type(model).__name__}")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise AutoplanError(f"global_batch must be an integer >= 1 (samples per step), got "
                            f"{global_batch!r}")
    resolved = _resolve_cluster(cluster, world)
    limit = memory_limit_bytes(memory_limit_gib)
    if limit is None and device.type == "cuda" and not resolved.device.has_datasheet:
        limit = torch.cuda.get_device_properties(device).total_memory
    options = SearchOptions(global_batch=global_batch, memory_limit_bytes=limit,
                            fix=parse_fix(fix))
    return _Request(_check_example(example), options, resolved, profile, device)


def _check_example(example: Any) -> Any:
    """A tensor becomes a 1-tuple; a tuple or list must hold a tensor with a batch dim."""
    if callable(example) and not isinstance(example, torch.Tensor):
        return example
    example = (example,) if isinstance(example, torch.Tensor) else example
    if not isinstance(example, (tuple, list)):
        raise AutoplanError(f"example_inputs must be a tensor, a tuple of tensors or a "
                            f"function batch_size -> tuple, got {type(example).__name__}")
    if not any(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in example):
        raise AutoplanError("example_inputs hold no tensor with a batch dimension (dim 0)")
    return tuple(example)


def _resolve_cluster(cluster: str | Cluster | None, world: _World) -> Cluster:
    """The cluster to plan for: the current world by default; a given one must match it."""
    if cluster is None:
        per_node = f",gpus_per_node={world.local_size}" if world.local_size < world.size else ""
        return parse_cluster_spec(f"local-cpu:procs={world.size}{per_node}")
    resolved = parse_cluster_spec(cluster) if isinstance(cluster, str) else cluster
    if not isinstance(resolved, Cluster):
        raise AutoplanError(f"cluster must be a spec such as 'h100-sxm:gpus=8' or a Cluster, "
                            f"got {type(cluster).__name__}")
    if resolved.gpus != world.size:
        raise AutoplanError(f"cluster '{resolved.spec}' has {resolved.gpus} devices but this "
                            f"world has {world.size} ranks; auto() plans for the world it runs "
                            f"in: leave cluster out or give {world.size} devices")
    return resolved


def _param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model trains in (its first floating parameter's), for the trace."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Random numbers drawn inside (a user's example_inputs function, random weights of
    timed layers) leave the caller's generators as they were."""
    if device.type != "cuda":
        devices = []
    else:
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


# ------------------------------------------------------------------------------ step 2-3


def _check_same_model(graph: LayerGraph, world: _World) -> None:
    """Every rank traced the same model, else they would apply one plan to different ones.

    Raises:
        AutoplanError: naming the ranks whose model differs from rank 0's.
    """
    if world.size == 1:
        return
    digest = hashlib.sha256(graph.structural_hash.encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:7], "big")], dtype=torch.int64,
                        device=world.device)
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    odd = [rank for rank, value in enumerate(every) if int(value) != int(every[0])]
    if odd:
        raise AutoplanError(f"ranks {odd} built another model than rank 0 (layer graphs "
                            "differ); build the same model, with the same seed, on every rank")


def _measure_comm(world: _World) -> list[CommPoint]:
    """This world's collectives, timed by every rank together (the points are rank 0's)."""
    from autoplan.profiler import measure_in_world

    if world.rank == 0:
        log.info("auto: timing collectives over %d ranks", world.size)
    return measure_in_world(list(_COMM_SIZES), PRICED_COLLECTIVES, repeats=_COMM_REPEATS,
                            warmup=1)


# ------------------------------------------------------------------------------ step 4


def _from_rank0(world: _World, decide: Callable[[], str]) -> str:
    """What rank 0's `decide()` returns, on every rank, sent as JSON text (never pickled).

    Raises:
        AutoplanError: on every rank when decide() failed on rank 0 (rank 0 re-raises the
            original error; the others name it).
    """
    if world.size == 1:
        return decide()
    failure: BaseException | None = None
    message = None
    if world.rank == 0:
        try:
            message = json.dumps({"plan": decide()})
        except Exception as err:  # every rank must hear of it, or they wait forever
            failure = err
            message = json.dumps({"error": f"{type(err).__name__}: {err}"})
    received = json.loads(_broadcast_text(message, world))
    if failure is not None:
        raise failure
    if "error" in received:
        raise AutoplanError(f"rank 0 could not plan: {received['error']}")
    return received["plan"]


def _broadcast_text(text: str | None, world: _World) -> str:
    """Rank 0's text on every rank: its length, then its UTF-8 bytes."""
    payload = text.encode() if world.rank == 0 and text is not None else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=world.device)
    dist.broadcast(length, src=0)
    if world.rank == 0:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(world.device)
    else:
        buf = torch.empty(int(length.item()), dtype=torch.uint8, device=world.device)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy()).decode()


def _decide(model: nn.Module, graph: LayerGraph, request: _Request, comm: list[CommPoint],
            world: _World) -> str:
    """Rank 0: profile, search, and the chosen plan as JSON."""
    with _rng_kept(request.device):
        profile = _profile(model, graph, request, comm, world)
    options = replace(request.options, max_tp=_max_tp(request.cluster, profile))
    work = Workload(graph, request.cluster, profile, options.memory_limit_bytes, graph.model)
    result = search_workload(work, options,
                             explain=lambda found, limit: _no_plan(found, limit, world))
    chosen = result.best  # the search returns only plans the executor runs (feasibility)
    source = ("given" if request.profile is not None else "measured here" if request.measure
              else "datasheet")
    log.info("auto: %s on %s: %s; predicted %s per step, peak %s per device (profile %s, "
             "search %s)", graph.model, request.cluster.spec, describe(chosen),
             fmt.seconds(chosen.estimate.step_time_s),
             fmt.nbytes(max(chosen.estimate.peak_memory_bytes)), source,
             fmt.seconds(result.search_time_s))
    return chosen.plan.to_json()


def _profile(model: nn.Module, graph: LayerGraph, request: _Request, comm: list[CommPoint],
             world: _World) -> Profile | None:
    """The given profile, one measured here, or None (the cost model uses the datasheet).

    Raises:
        AutoplanError: a given profile that cannot be read or is of another model.
    """
    if request.measure:
        return _measured_profile(model, graph, request, comm, world)
    if request.profile is None:
        return None
    profile = request.profile if isinstance(request.profile, Profile) \
        else load_profile(request.profile)
    check_profile(profile, graph)
    return profile


def _measured_profile(model: nn.Module, graph: LayerGraph, request: _Request,
                      comm: list[CommPoint], world: _World) -> Profile:
    """Each distinct layer timed here on a copy (the model's weights are not touched), at the
    TP degrees a node of this world allows, with this rank's thread count."""
    from autoplan.profiler import fit_alpha_beta, measured_profile

    dtype = _param_dtype(model)
    meta = meta_copy(model, dtype)
    inputs = meta_inputs(request.example, dtype)
    built = BuiltModel(ModelSpec(graph.model, "module"), meta, inputs, sum_loss, None)
    tps = tuple(tp for tp in divisors(world.size) if tp <= request.cluster.gpus_per_node)
    settings = MeasureSettings(_MEASURE_MICRO_BATCHES, tps, _MEASURE_REPEATS, _MEASURE_WARMUP,
                               device=request.device.type, dtype=dtype)
    log.info("auto: timing %d distinct layers at tp %s", len(graph.by_signature()), tps)
    return measured_profile(built, graph, request.cluster, settings,
                            (comm, fit_alpha_beta(comm) if comm else []))


def _max_tp(cluster: Cluster, profile: Profile | None) -> int:
    """The largest TP degree such that it and every smaller one the search may try was timed
    (with a profile) for each layer the cost model times at that degree; which degrees
    split each layer is the graph's own fact (autoplan.feasibility), which the search keeps."""
    timed = [{fit.tp for fit in layer.fits} for layer in profile.layers
             if layer.kind in TP_SHARDED_KINDS] if profile is not None else []
    best = 1
    for tp in divisors(cluster.gpus)[1:]:
        if any(tp not in have for have in timed):
            break
        best = tp
    return best


def _no_plan(result: SearchResult, limit_bytes: int, world: _World) -> str:
    """Why the search found nothing, in the words of auto()'s arguments."""
    if result.smallest_fitting_bytes is not None:
        return (no_plan_message(result, limit_bytes) + "; give a larger memory_limit_gib or "
                "a smaller global_batch")
    return (f"no plan splits the global batch over {world.size} ranks within the fixed fields "
            f"and the TP degrees this model's layers divide by; try a global_batch that is a "
            f"multiple of {world.size}, or fewer fixed fields")


class _CallableModule(types.ModuleType):
    """This module, called: `autoplan.auto(...)` is auto(...) whichever the package holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Runner:
        return auto(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
