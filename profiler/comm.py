"""Collective bandwidth: time collectives in real processes, nccl-tests busbw, alpha-beta fits.

Message size `nbytes` follows nccl-tests (its doc/PERFORMANCE.md and the *GetBw functions in
src/*.cu): the size S of the whole per-rank buffer, the larger of one rank's input and output.

    all_reduce      S = the buffer each rank reduces (input and output are both S)
    all_gather      S = the gathered output; each rank contributes S/n
    reduce_scatter  S = the input each rank reduces; each rank keeps S/n
    all_to_all      S = each rank's send buffer; S/n goes to every rank, itself included
    send_recv       S = the bytes sent one way

algbw = S / time and busbw = algbw x bus_factor(collective, n). Tensors are float32; S is
rounded down to a multiple of 4n bytes (one element per rank at least), as nccl-tests rounds
its counts, and each point records the S actually moved.

Timing: a barrier over the group, then time.perf_counter around the op on CPU (gloo) or CUDA
events on GPU (NCCL); the slowest rank's time is kept for each repeat (an op is done when every
rank is done), then the median and spread (max - min) over repeats (below 16 MiB up to 10x
more repeats, repeats_for), taken in SWEEPS passes over the sizes so that a spell of load
from elsewhere does not land on a few neighbouring sizes only (_sweep_sizes). One op per
repeat, not nccl-tests' mean over a batch of back-to-back ops: on a shared CPU a batch's
mean takes in every time a rank loses its core, while the median of single ops sets those
repeats aside (benchmarks/results/comm_fit_notes.md). Ranks
outside the group being measured wait on the store, not in a gloo barrier, which spins and
would take cores from the ranks being timed. send_recv is a ping-pong between two ranks
(0 -> 1 -> 0) whose time is halved: one clock, no skew between hosts.

Fits (fit_alpha_beta): piecewise alpha-beta per collective, group size and scope, time =
alpha_k + S / bandwidth_k over regime k's range of sizes, each line by least squares of the
relative error; the regimes are chosen by dynamic programming over the measured sizes and
their number by a BIC-type criterion (see _fit_series), so one line stays one regime.

gloo in torch 2.13 runs every collective here, reduce_scatter_tensor and all_to_all_single
included; torch 2.13 renames all_gather_into_tensor / reduce_scatter_tensor to *_single and
warns on the old names, so the new names are used where they exist. What gloo does with them
shows in the figures (benchmarks/results/comm_fit_notes.md): its reduce_scatter clones the
input and all-reduces all of it (ProcessGroupGloo::reduce_scatter_tensor_coalesced), so it
takes as long as an all_reduce of S and its busbw is about half the all_reduce's; its
all_gather and reduce_scatter allocate an S-byte temporary per call, which glibc maps fresh
from 32 MiB up, so their busbw drops above 16 MiB (all_gather's by half); the piecewise
fit follows such a drop when at least 3 measured sizes lie on each side of it (hence the
default sizes up to 128 MiB, profiler.command.DEFAULT_COMM_SIZES).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from autoplan import fmt
from autoplan.errors import AutoplanError, choices_hint
from autoplan.launch import ProgressCount, call_workers, serve_worker
from autoplan.profile import (
    COLLECTIVES,
    CommFit,
    CommPoint,
    CommRegime,
    bus_factor,
    check_collectives,
)

__all__ = ["measure_collectives", "measure_in_world", "fit_alpha_beta"]

log = logging.getLogger(__name__)

Scope = Literal["intra", "inter"]
_DTYPE = torch.float32
_ELEMENT_BYTES = 4  # float32
_ROUND_TRIPS = {"send_recv": 2}  # a ping-pong moves the buffer twice; one way is half its time
_WORKER_MODULE = "autoplan.profiler.comm"
# Test-only fault injection for the local launcher: "exit:RANK:CODE" or "hang:RANK".
FAULT_ENV = "AUTOPLAN_COMM_FAULT"
# The smallest seconds per byte a fit may return: 1e-15 s/B = 1 PB/s, far above any link
# (NVLink 5 is 1.8 TB/s per GPU); it only keeps a flat, noisy series from a zero slope.
_MIN_SECONDS_PER_BYTE = 1e-15

# Below 16 MiB, repeats grow as 16 MiB / size, up to 10x (see repeats_for): 10x up to
# 1.6 MiB, as many as asked from 16 MiB. Ops of 0.2-3 ms on gloo are bimodal on a shared
# CPU: 13-44% of 2-rank all_gathers of 256 KiB-1.5 MiB took 3-6 ms instead of 0.2-1 ms
# (two runs of benchmarks/comm_modes.py, 200 repeats each, one in benchmarks/results/
# comm_modes.txt; comm_fit_notes.md). With a slow share of 0.4 the
# median of 42 repeats lands in the slow mode 12% of the time (binomial), of 210 0.2%; one
# such point at 512 KiB hid a 2-rank series' knee and cost 7 of its 17 held-out sizes.
_SMALL_MESSAGE_BYTES = 16 << 20
_SMALL_MESSAGE_REPEATS_MAX = 10
# Passes over the message sizes that share a point's repeats (_sweep_sizes).
SWEEPS = 3

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class _Request:
    """What to measure; checked once, shipped to workers as JSON."""

    sizes: list[int]
    collectives: list[str]
    repeats: int
    warmup: int
    timeout_s: float

    def __post_init__(self) -> None:
        check_collectives(self.collectives)
        if not self.sizes or min(self.sizes) < 1:
            raise AutoplanError(f"message sizes {self.sizes} must be a non-empty list of "
                                f"bytes >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise AutoplanError(f"repeats {self.repeats} must be >= 1 and warmup "
                                f"{self.warmup} >= 0")
        if self.timeout_s <= 0:
            raise AutoplanError(f"timeout {self.timeout_s} s must be > 0")


@dataclass(frozen=True)
class _Group:
    """Ranks that measure together; 'inter' when they span more than one node."""

    ranks: tuple[int, ...]
    scope: Scope


def _inter_node_counts(nnodes: int) -> list[int]:
    """Node counts of the inter-node groups: powers of two and all nodes, so a 128-node world
    measures 8 groups, not 127."""
    counts = {nnodes}
    k = 2
    while k < nnodes:
        counts.add(k)
        k *= 2
    return sorted(c for c in counts if c >= 2)


def _plan_groups(node_of_rank: Sequence[int]) -> list[_Group]:
    """The groups to measure, the same on every rank.

    intra: ranks 0..g-1 of rank 0's node, for every g from 2 to its size that divides it: a
    plan's groups do (every degree divides the devices), and so does a ratio of two of them
    (the hops between layouts, cost_model/communication.reshard_time_s); and the pair,
    whatever the size, for the pipeline's sends.
    inter: the pair (0, first rank of the next node), for send_recv and 2-rank collectives
    across nodes; then the ranks of the first k whole nodes, for k in _inter_node_counts.
    """
    nodes: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        nodes.setdefault(node, []).append(rank)
    members = list(nodes.values())  # ordered by lowest rank: rank 0's node first
    size = len(members[0])
    groups = [_Group(tuple(members[0][:g]), "intra") for g in range(2, size + 1)
              if size % g == 0 or g == 2]
    if len(members) < 2:
        return groups
    inter = [(0, members[1][0])]
    for k in _inter_node_counts(len(members)):
        ranks = tuple(sorted(r for node in members[:k] for r in node))
        if ranks not in inter:
            inter.append(ranks)
    return groups + [_Group(ranks, "inter") for ranks in inter]


def _ping_pong(buf: torch.Tensor, group: _Group, pg: dist.ProcessGroup) -> Callable[[], None]:
    """Send the buffer to the other rank of a pair and back (halved when timed)."""
    me, (first, second) = dist.get_rank(), group.ranks
    peer = second if me == first else first

    def op() -> None:
        if me == first:
            dist.send(buf, dst=peer, group=pg)
            dist.recv(buf, src=peer, group=pg)
        else:
            dist.recv(buf, src=peer, group=pg)
            dist.send(buf, dst=peer, group=pg)

    return op


def _make_op(collective: str, nbytes: int, group: _Group, pg: dist.ProcessGroup,
             device: torch.device) -> tuple[Callable[[], object], int]:
    """The collective as a closure over zero tensors, and its size S as nccl-tests counts it."""
    n = len(group.ranks)
    count = max(nbytes // _ELEMENT_BYTES, 1)
    per_rank = max(count // n, 1)
    full = per_rank * n * _ELEMENT_BYTES

    def zeros(numel: int) -> torch.Tensor:
        return torch.zeros(numel, dtype=_DTYPE, device=device)

    match collective:
        case "all_reduce":
            buf = zeros(count)
            return lambda: dist.all_reduce(buf, group=pg), count * _ELEMENT_BYTES
        case "all_gather":
            shard, out = zeros(per_rank), zeros(per_rank * n)
            return lambda: _ALL_GATHER(out, shard, group=pg), full
        case "reduce_scatter":
            inp, shard = zeros(per_rank * n), zeros(per_rank)
            return lambda: _REDUCE_SCATTER(shard, inp, group=pg), full
        case "all_to_all":
            inp, out = zeros(per_rank * n), zeros(per_rank * n)
            return lambda: dist.all_to_all_single(out, inp, group=pg), full
        case "send_recv":
            return _ping_pong(zeros(count), group, pg), count * _ELEMENT_BYTES
        case _:
            raise AutoplanError(f"unknown collective '{collective}'{choices_hint(COLLECTIVES)}")


def _timed_s(op: Callable[[], object], device: torch.device) -> float:
    """Seconds of one op: CUDA events on GPU (device time), perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms
    start_s = time.perf_counter()
    op()
    return time.perf_counter() - start_s


def repeats_for(repeats: int, nbytes: int) -> int:
    """Timed repeats for one message size: small messages are cheap but noisy (a rank that
    waits for a core loses milliseconds on a fraction of repeats), so they get up to
    _SMALL_MESSAGE_REPEATS_MAX times more, which keeps their median in the common case.
    Every rank derives the same count from the size, so the collectives stay matched."""
    return repeats * min(_SMALL_MESSAGE_REPEATS_MAX, max(1, _SMALL_MESSAGE_BYTES // nbytes))


def _time_repeats(op: Callable[[], object], pg: dist.ProcessGroup, device: torch.device,
                  repeats: int, warmup: int) -> list[float]:
    """The slowest rank's seconds for each repeat, after warm-up; a barrier starts each one."""
    for _ in range(warmup):
        op()
    times_s = []
    for _ in range(repeats):
        dist.barrier(group=pg)
        times_s.append(_timed_s(op, device))
    slowest = torch.tensor(times_s, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=pg)
    return slowest.tolist()


def sweep_repeats(repeats: int, nbytes: int) -> list[int]:
    """Timed repeats of one size in each sweep: repeats_for's count split as evenly as it goes
    over up to SWEEPS sweeps (every rank derives the same list from the size)."""
    total = repeats_for(repeats, nbytes)
    sweeps = min(SWEEPS, total)
    return [total // sweeps + (i < total % sweeps) for i in range(sweeps)]


def _point(collective: str, group: _Group, nbytes: int, times_s: list[float]) -> CommPoint:
    """A CommPoint from per-repeat times: median, spread and nccl-tests bandwidths."""
    time_s = statistics.median(times_s)
    algbw = nbytes / time_s if time_s > 0 else 0.0
    return CommPoint(collective=collective, group_size=len(group.ranks), scope=group.scope,
                     nbytes=nbytes, time_s=time_s, spread_s=max(times_s) - min(times_s),
                     algbw=algbw, busbw=algbw * bus_factor(collective, len(group.ranks)))


def _series_of(group: _Group, request: _Request) -> list[str]:
    """The collectives timed over `group`: send_recv on pairs only."""
    return [c for c in request.collectives if c != "send_recv" or len(group.ranks) == 2]


def _measure_group(group: _Group, pg: dist.ProcessGroup, request: _Request,
                   device: torch.device, count: ProgressCount) -> list[CommPoint]:
    """Every requested collective and size over one group (send_recv on pairs only), each a
    step of `count` (a series: one collective over one group)."""
    points: list[CommPoint] = []
    for collective in _series_of(group, request):
        found = _sweep_sizes(collective, group, pg, request, device)
        points += found
        count.step(f"{group.scope} {collective} over {len(group.ranks)} ranks: "
                   f"{fmt.seconds(found[0].time_s)} at {fmt.nbytes(found[0].nbytes)}, "
                   f"{fmt.seconds(found[-1].time_s)} at {fmt.nbytes(found[-1].nbytes)}, "
                   f"busbw up to {max(p.busbw for p in found) / 1e9:.3g} GB/s")
    return points


def _sweep_sizes(collective: str, group: _Group, pg: dist.ProcessGroup, request: _Request,
                 device: torch.device) -> list[CommPoint]:
    """One collective at every size, in up to SWEEPS passes over the sizes, each taking a
    share of the repeats; a point pools its repeats from all passes. On a shared machine the
    load drifts over seconds to minutes; measured one size after the other, a spell of load
    lands on a few neighbouring sizes and bends the series there (benchmarks/results/
    comm_fit_notes.md), while passes spread each size's repeats over the whole series."""
    sizes = [0] * len(request.sizes)
    times_s: list[list[float]] = [[] for _ in request.sizes]
    trips = _ROUND_TRIPS.get(collective, 1)
    for sweep in range(SWEEPS):
        for i, nbytes in enumerate(request.sizes):
            shares = sweep_repeats(request.repeats, nbytes)
            if sweep >= len(shares):
                continue
            op, sizes[i] = _make_op(collective, nbytes, group, pg, device)
            # later passes reallocate the buffers: one warm-up touches their pages
            warmup = request.warmup if sweep == 0 else min(request.warmup, 1)
            times_s[i] += [t / trips for t in _time_repeats(op, pg, device, shares[sweep],
                                                            warmup)]
            del op  # frees this size's buffers before the next one
    return [_point(collective, group, size, samples)
            for size, samples in zip(sizes, times_s, strict=True)]


def _measure_rank(request: _Request, groups: list[_Group], device: torch.device,
                  on_progress: Callable[[str], None] | None) -> list[CommPoint]:
    """This rank's part of the measurement; rank 0 (a member of every group) returns the points.

    Every rank creates every group (dist.new_group must be called by all), then the groups
    measure one at a time while the other ranks wait for a key in the c10d store (a gloo
    barrier would spin on their cores, which the ranks being timed share), then at a world
    barrier.
    """
    timeout = timedelta(seconds=request.timeout_s)
    pgs = [dist.new_group(list(group.ranks), timeout=timeout) for group in groups]
    rank = dist.get_rank()
    store = _idle_store()
    global _calls
    _calls += 1
    points: list[CommPoint] = []
    # counted on rank 0, which is in every group and alone reports
    count = ProgressCount(sum(len(_series_of(group, request)) for group in groups), on_progress)
    for i, (group, pg) in enumerate(zip(groups, pgs, strict=True)):
        done_key = f"autoplan-comm/{_calls}/group-{i}/done"
        if rank in group.ranks:
            found = _measure_group(group, pg, request, device, count)
            points += found if rank == 0 else []
            if store is not None and rank == group.ranks[0]:
                store.set(done_key, "1")
        elif store is not None:
            store.wait([done_key], timeout)  # blocks on a socket: no core taken
        dist.barrier()
    for group, pg in zip(groups, pgs, strict=True):
        if rank in group.ranks:
            dist.destroy_process_group(pg)
    return points


_calls = 0  # measure_in_world calls in this process: keeps each call's store keys apart


def _idle_store() -> dist.Store | None:
    """The default process group's store, where ranks outside a group wait; None (then they
    wait at the world barrier alone) if this torch does not expose it."""
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get_store() if get_store is not None else None
    except (RuntimeError, ValueError):
        return None


def _init_world(timeout_s: float) -> torch.device:
    """Join torchrun's world (env://) unless one exists; the device this rank measures on."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise AutoplanError(f"no process group and no {', '.join(missing)} in the "
                                f"environment: run under torchrun, or use measure_collectives")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        device = torch.device("cuda", local_rank) if use_nccl else torch.device("cpu")
        extra = {"device_id": device} if use_nccl else {}
        if use_nccl:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_nccl else "gloo", init_method="env://",
                                timeout=timedelta(seconds=timeout_s), **extra)
    if dist.get_world_size() < 2:
        raise AutoplanError(f"collectives need at least 2 ranks; the world has "
                            f"{dist.get_world_size()}")
    if dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _node_of_rank(device: torch.device) -> list[int]:
    """Every rank's node (torchrun's GROUP_RANK, else RANK // LOCAL_WORLD_SIZE, else 0)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    node = int(os.environ.get("GROUP_RANK", dist.get_rank() // max(local_world, 1)))
    mine = torch.tensor([node], dtype=torch.int64, device=device)
    every = torch.empty(dist.get_world_size(), dtype=torch.int64, device=device)
    _ALL_GATHER(every, mine)
    return [int(n) for n in every.tolist()]


def _share_from_rank0(points: list[CommPoint], device: torch.device) -> list[CommPoint]:
    """Rank 0's points on every rank, sent as JSON bytes (no pickle)."""
    payload = json.dumps([p.model_dump() for p in points]).encode()
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    if dist.get_rank() == 0:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return [CommPoint.model_validate(p) for p in json.loads(bytes(buf.cpu().numpy()))]


def measure_in_world(sizes: list[int], collectives: Sequence[str] = COLLECTIVES,
                     repeats: int = 5, warmup: int = 2, timeout_s: float = 60.0,
                     on_progress: Callable[[str], None] | None = None) -> list[CommPoint]:
    """Measure collectives in the current world (under torchrun), intra- and inter-node.

    Call it on every rank. It joins torchrun's world via env:// when no process group exists
    (NCCL when every local rank has a GPU, else gloo) and leaves that group up; the subgroups
    it makes are destroyed. Groups are planned by _plan_groups: intra-node prefixes of rank 0's
    node (scope "intra") and groups spanning nodes (scope "inter").

    Args:
        sizes: message sizes S in bytes (see the module docstring for S per collective).
        collectives: a subset of COLLECTIVES.
        repeats: timed repeats per size; the point keeps their median and spread.
        warmup: untimed runs before the repeats.
        timeout_s: the process-group timeout (rendezvous, new_group and each op).
        on_progress: called on rank 0 with one line per collective and group, counted
            (launch.counted_line).

    Returns:
        The points, on every rank.

    Raises:
        AutoplanError: bad arguments, no world to join, or a world of one rank.
    """
    request = _Request(list(sizes), list(collectives), repeats, warmup, timeout_s)
    device = _init_world(timeout_s)
    groups = _plan_groups(_node_of_rank(device))
    progress = on_progress if dist.get_rank() == 0 else None
    points = _measure_rank(request, groups, device, progress)
    return _share_from_rank0(points, device)


def measure_collectives(nproc: int, sizes: list[int], collectives: Sequence[str] = COLLECTIVES,
                        repeats: int = 5, warmup: int = 2, timeout_s: float = 60.0,
                        on_progress: Callable[[str], None] | None = None) -> list[CommPoint]:
    """Measure collectives over 2..nproc local ranks, each a fresh process with one thread.

    The workers run measure_in_world (gloo on CPU, NCCL when CUDA has a GPU per rank) in a
    world of nproc ranks on 127.0.0.1; groups are ranks 0..g-1 for g = 2 and every g in
    3..nproc that divides nproc, all scope "intra"; send_recv is measured on the pair (0, 1).
    Rank 0 writes the points as JSON.

    Args:
        nproc: number of local ranks, >= 2.
        sizes: message sizes S in bytes (see the module docstring for S per collective).
        collectives: a subset of COLLECTIVES.
        repeats: timed repeats per size; the point keeps their median and spread.
        warmup: untimed runs before the repeats.
        timeout_s: the parent's wall-clock limit without progress (from the start, process
            start-up and torch import included, or from the last finished collective and
            group), also the workers' process-group timeout (rendezvous, new_group, each op).
        on_progress: called in this process with one line per collective and group, counted
            (launch.counted_line).

    Returns:
        The points, sorted as measured (group, collective, size).

    Raises:
        AutoplanError: bad arguments.
        WorkerFailed: a worker died (naming its rank and exit code or signal) or the run went
            timeout_s without progress; every worker is killed first.
    """
    request = _Request(list(sizes), list(collectives), repeats, warmup, timeout_s)
    return _measure_local(nproc, request, on_progress, ranks_per_node=nproc)


def _measure_local(nproc: int, request: _Request, on_progress: Callable[[str], None] | None,
                   ranks_per_node: int) -> list[CommPoint]:
    """Run the workers (launch.call_workers) and read rank 0's points (fewer ranks_per_node
    fakes a multi-node world on one machine, for tests)."""
    if nproc < 2:
        raise AutoplanError(f"nproc {nproc} must be >= 2: a collective needs two ranks")
    if nproc > (os.cpu_count() or nproc):
        log.warning("%d ranks share %d cores: times include waiting for a core", nproc,
                    os.cpu_count())
    return call_workers(_WORKER_MODULE, asdict(request), nproc, request.timeout_s, _read_points,
                        label="comm worker", ranks_per_node=ranks_per_node,
                        on_progress=on_progress)


def _read_points(path: Path) -> list[CommPoint]:
    """The points rank 0 wrote, validated (a ValidationError is a ValueError: call_workers
    reports it as unreadable results)."""
    return [CommPoint.model_validate(p) for p in json.loads(path.read_text())["points"]]


def _maybe_fault(rank: int) -> None:
    """Test-only: exit, SIGKILL itself or hang on one rank when FAULT_ENV asks for it
    ("exit:RANK:CODE", "kill:RANK", "hang:RANK")."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    target, _, code = rest.partition(":")
    if kind in ("exit", "kill", "hang") and int(target) == rank:
        if kind == "exit":
            os._exit(int(code or 1))
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1e6)


def _serve_rank(spec: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """One local rank's part (launch.serve_worker): measure with the others; rank 0's points
    go back as JSON, with the backend and torch version they were measured on."""
    _maybe_fault(int(os.environ["RANK"]))
    torch.set_num_threads(1)
    request = _Request(**spec)
    points = measure_in_world(request.sizes, request.collectives, request.repeats,
                              request.warmup, request.timeout_s, progress)
    return {"backend": dist.get_backend(), "torch": torch.__version__,
            "points": [p.model_dump() for p in points]}


def fit_alpha_beta(points: list[CommPoint], max_regimes: int | None = None) -> list[CommFit]:
    """Fit a piecewise alpha-beta time per (collective, group_size, scope): as many regimes
    time = alpha_s + nbytes / bandwidth, each over a range of message sizes, as the data
    support.

    Each line is a least-squares fit of the relative error, since sizes span five orders of
    magnitude and a plain fit would ignore every small message; the first regime's
    alpha_s >= 0. busbw is the highest busbw seen. _fit_series says how the regimes are
    chosen.

    Args:
        points: measured points, any mix of series.
        max_regimes: the most regimes a series may have; None: as many as its sizes allow
            (_MIN_SIZES_PER_REGIME each); 1: one line.

    Returns:
        One CommFit per series, sorted by (collective, group_size, scope).

    Raises:
        AutoplanError: a point with time 0 (no relative error to weigh), or max_regimes < 1.
    """
    if max_regimes is not None and max_regimes < 1:
        raise AutoplanError(f"max_regimes {max_regimes} must be >= 1 (or None: no limit)")
    by_key: dict[tuple[str, int, str], list[CommPoint]] = {}
    for point in points:
        by_key.setdefault((point.collective, point.group_size, point.scope), []).append(point)
    fits = []
    for (collective, group_size, scope), series in sorted(by_key.items()):
        if min(p.time_s for p in series) <= 0:
            raise AutoplanError(f"{scope} {collective} over {group_size} ranks has a time of "
                                f"0 s: cannot weigh its relative error")
        regimes = _fit_series([p.nbytes for p in series], [p.time_s for p in series],
                              max_regimes)
        fits.append(CommFit(collective=collective, group_size=group_size, scope=scope,
                            regimes=regimes, busbw=max(p.busbw for p in series)))
    return fits


# A regime keeps at least this many distinct message sizes: two fix its line, the third
# leaves a residual, so a regime cannot be carved around one or two stray points (with 2,
# 18-36% of simulated one-line series with a 20% share of slow sizes split).
_MIN_SIZES_PER_REGIME = 3
# The RMS relative error below which a fit counts as exact in _criterion: a rerun does not
# reproduce times more closely (the closest tenth of the points that two committed runs of
# benchmarks/comm_fit.py share agree within 2-5%), so a fit closer than this gains nothing,
# and exact data would otherwise give log(0).
_NOISE_FLOOR_RMS = 0.02
# BIC's penalty times this. The best of many candidate breakpoints cuts the error of pure
# noise more than a parameter fixed in advance would, so plain BIC splits about a third of
# one-line series with lognormal noise (5-20%, 18 sizes); twice its penalty splits at
# most 5% of them at 9 to 35 sizes, with noise of 5% or 15%, or with a 20% share of sizes
# 1.5-3x slow (200 simulated series each; tests/profiler/test_comm_fit.py checks two).
_PENALTY_FACTOR = 2.0


def _fit_series(nbytes: list[int], times_s: list[float], max_regimes: int | None = None,
                ) -> list[CommRegime]:
    """The regimes of one series, by rising from_bytes.

    For each count K of regimes, a dynamic programme over the series' own sizes finds the
    segmentation into K runs of consecutive sizes (each at least _MIN_SIZES_PER_REGIME) with
    the least summed squared relative error (_segment_costs); K is then the one of least
    _criterion (BIC), which charges each regime its line and breakpoint. A regime starts at
    its smallest measured size, so a size between two regimes takes the lower one's line.
    """
    order = np.argsort(nbytes, kind="stable")
    x, t = np.asarray(nbytes, dtype=float)[order], np.asarray(times_s, dtype=float)[order]
    sizes = np.unique(x)
    most = len(sizes) // _MIN_SIZES_PER_REGIME
    most = max(1, most if max_regimes is None else min(most, max_regimes))
    segments = _segment_costs(x, t, sizes)
    if not segments:  # fewer sizes than one regime needs: one line over whatever there is
        segments = {(0, len(sizes)): _line(x, t, 0.0)}
    best = _best_segmentations(segments, len(sizes), most)
    _, lines = min(((_criterion(cost, len(x), len(lines)), lines) for cost, lines in best),
                   key=lambda pair: pair[0])
    return [CommRegime(from_bytes=int(start), alpha_s=alpha_s, bandwidth=1.0 / slope)
            for start, alpha_s, slope in lines]


_Line = tuple[float, float, float]  # (from_bytes, alpha_s, seconds per byte) of a regime


def _segment_costs(x: np.ndarray, t: np.ndarray, sizes: np.ndarray,
                   ) -> dict[tuple[int, int], tuple[float, _Line]]:
    """(cost, line) of every run sizes[i:j] of at least _MIN_SIZES_PER_REGIME sizes that can
    be a regime; the first run (i = 0) starts at 0 B, the others at sizes[i]. x is sorted."""
    segments = {}
    for i in range(len(sizes)):
        lo = int(np.searchsorted(x, sizes[i], side="left"))
        for j in range(i + _MIN_SIZES_PER_REGIME, len(sizes) + 1):
            hi = int(np.searchsorted(x, sizes[j - 1], side="right"))
            fitted = _line(x[lo:hi], t[lo:hi], 0.0 if i == 0 else float(sizes[i]))
            if fitted is not None:
                segments[(i, j)] = fitted
    return segments


def _line(x: np.ndarray, t: np.ndarray, from_bytes: float) -> tuple[float, _Line] | None:
    """The least-relative-error line over (x, t) with its time at from_bytes >= 0 (the
    first regime's latency >= 0), and its cost; None when that time is not positive for a
    regime starting later, which must be positive where it starts (CommFit checks)."""
    at_start, slope, cost = _fit_relative(x - from_bytes, t)
    alpha_s = at_start - slope * from_bytes
    if from_bytes > 0 and alpha_s + from_bytes / (1.0 / slope) <= 0:  # as CommRegime.time_s
        return None
    return cost, (from_bytes, alpha_s, slope)


def _best_segmentations(segments: dict[tuple[int, int], tuple[float, _Line]], count: int,
                        most: int) -> list[tuple[float, list[_Line]]]:
    """For K = 1..most regimes, the least total cost of covering sizes 0..count-1 with K
    runs from `segments`, and those runs' lines; K that cannot cover them are left out.

    Dynamic programming over prefixes (Bellman 1961, "On the approximation of curves by
    line segments using dynamic programming"): best[k][j] = min over i of
    best[k-1][i] + cost(i, j).
    """
    best: list[dict[int, tuple[float, list[_Line]]]] = [{0: (0.0, [])}]
    for _ in range(most):
        layer: dict[int, tuple[float, list[_Line]]] = {}
        for (i, j), (cost, line) in segments.items():
            if i in best[-1]:
                total = best[-1][i][0] + cost
                if j not in layer or total < layer[j][0]:
                    layer[j] = (total, best[-1][i][1] + [line])
        best.append(layer)
    return [layer[count] for layer in best[1:] if count in layer]


def _criterion(cost: float, points: int, regimes: int) -> float:
    """BIC of a fit with `regimes` regimes and summed squared relative error `cost`, with
    its penalty scaled by _PENALTY_FACTOR.

    Schwarz 1978 with Gaussian errors: n ln(RSS / n) + p ln(n); p counts two line
    parameters per regime and one breakpoint between each two (Yao 1988, "Estimating the
    number of change-points via Schwarz' criterion"). The RSS is floored at
    _NOISE_FLOOR_RMS, so fits within run-to-run noise tie and the fewest regimes win.
    """
    mean_square = max(cost / points, _NOISE_FLOOR_RMS**2)
    parameters = 3 * regimes - 1
    return points * math.log(mean_square) + _PENALTY_FACTOR * parameters * math.log(points)


def _fit_relative(x: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """(alpha_s, seconds per byte, cost) minimising cost = sum(((alpha + b x) / t - 1)^2),
    alpha >= 0, b >= _MIN_SECONDS_PER_BYTE: the best of the free optimum (when feasible) and
    each bound's own optimum, which covers every case of a convex problem in two variables.
    The cost is expanded over the sums below (a quadratic in alpha and b)."""
    u, v = 1.0 / t, x / t  # the residual is alpha * u + b * v - 1
    uu, uv, vv, u1, v1 = float(u @ u), float(u @ v), float(v @ v), float(u.sum()), float(v.sum())

    def cost(ab: tuple[float, float]) -> float:
        a, b = ab
        return max(a * a * uu + 2 * a * b * uv + b * b * vv - 2 * a * u1 - 2 * b * v1 + len(t),
                   0.0)

    b_min = _MIN_SECONDS_PER_BYTE
    candidates = [(max((u1 - b_min * uv) / uu, 0.0), b_min)]
    if vv > 0:
        candidates.append((0.0, max(v1 / vv, b_min)))
        # normal equations on unit-norm columns (u and v differ by ~1e6), by Cramer's rule
        su, sv = math.sqrt(uu), math.sqrt(vv)
        c, r_u, r_v = uv / (su * sv), u1 / su, v1 / sv
        det = 1.0 - c * c
        if det > 1e-12 and x.max() > x.min():
            alpha, b = (r_u - c * r_v) / det / su, (r_v - c * r_u) / det / sv
            if alpha >= 0 and b >= b_min:
                candidates.append((alpha, b))
    best = min(candidates, key=cost)
    return best[0], best[1], cost(best)


if __name__ == "__main__":
    serve_worker(sys.argv[1], _serve_rank)
