"""Analytic profiles: layer times, memory and collective fits derived from datasheet figures.

`autoplan profile --mode analytic --cluster PRESET` writes down, for hardware that is not at
hand, what the cost model applies when no profile is given (measured_part): no
measurement, only the preset's peaks (autoplan/hardware.py) scaled by the achievable fractions
of autoplan/efficiency.py. Pure arithmetic, no torch: it runs in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autoplan.cluster import Cluster
from autoplan.efficiency import (
    NCCL_BASE_LATENCY_S,
    NETWORK_BUS_FRACTION,
    NETWORK_RING_STEP_S,
    NETWORK_TREE_STEP_S,
    NVLINK_BUS_FRACTION,
    NVLINK_RING_STEP_S,
    NVLINK_TREE_STEP_S,
    figure_notes,
    matmul_efficiency,
    memory_efficiency,
)
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.hardware import DevicePreset
from autoplan.io import utc_now
from autoplan.profile import (
    COLLECTIVES,
    CommFit,
    LayerMemory,
    LayerProfile,
    Profile,
    TimePoint,
    bus_factor,
    fits_from_points,
)

__all__ = [
    "DTYPE_BYTES", "TP_SHARDED_KINDS", "OPTIMIZER_STATE_BYTES_PER_PARAM", "PassWork",
    "analytic_profile",
    "layer_pass_work", "pass_time_s", "layer_time_point", "replicated_fraction", "tp_shards",
    "BLOCK_REPLICATED_HIDDEN_TENSORS", "layer_memory",
    "comm_group_sizes", "ranks_per_node", "bus_bandwidth", "collective_fit",
    "collective_fits",
]

TP_SHARDED_KINDS = frozenset({"block", "embedding", "head"})
"""Kinds whose weights and matmuls tensor parallelism splits tp ways: column/row-parallel
blocks, vocab-parallel embedding and head (Shoeybi et al. 2019, Megatron-LM, sec. 3). Other
kinds (norm, loss, other) run replicated on every TP rank."""

BLOCK_REPLICATED_HIDDEN_TENSORS = 10
"""Hidden-state-sized tensors that a transformer block's memory-bound ops move outside its
column/row-parallel pairs, replicated on every TP rank unless sequence parallelism shards
them: each of two norms reads and writes one, each of two residual adds reads two and writes
one (Shoeybi et al. 2019, fig. 3; Korthikanti et al. 2022, sec. 4.2.2)."""


OPTIMIZER_STATE_BYTES_PER_PARAM: dict[str, int] = {
    # Keyed "optimizer/precision": "mixed" keeps fp32 states plus an fp32 master copy beside
    # low-precision weights; "fp32" keeps fp32 states beside fp32 weights (they are the
    # master); "bf16" keeps bf16 states. Weight and gradient bytes are counted apart.
    "adamw/mixed": 12,  # fp32 master + momentum + variance: HARDWARE.md; ZeRO (2020) sec. 3.1
    "adamw/fp32": 8,  # fp32 momentum + variance
    "adamw/bf16": 4,  # bf16 momentum + variance
    "sgd/mixed": 8,  # fp32 master + momentum
    "sgd/fp32": 4,  # fp32 momentum
    "sgd/bf16": 2,  # bf16 momentum
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}  # IEEE / bf16 widths

_TRAFFIC_NOTE = (
    "layer time = FLOPs / (peak x matmul efficiency) + bytes / (HBM x memory efficiency) per "
    "pass and rank; FLOPs are the traced matmul FLOPs, bytes what the traced memory-bound ops "
    "read and write (eager, unfused); both divide by tp for kinds "
    + ", ".join(sorted(TP_SHARDED_KINDS)) + " except a block's "
    f"{BLOCK_REPLICATED_HIDDEN_TENSORS} hidden-state tensors of norms and residual adds; "
    "TP communication is not included")
_PLACEMENT_NOTE = (
    "inter-node collective fits assume the group spread over as many nodes as the cluster has "
    "(tp innermost: ranks of a DP group sit on distinct nodes), ceil(group / nodes) per node; "
    "with r ranks per node NCCL's rings use r NICs: busbw = min(NVLink, r x NIC) per rank")


# ------------------------------------------------------------------------- the profile


def measured_part(profile: Profile | None, cluster: Cluster) -> Profile | None:
    """What of `profile` the cost model reads: a measured profile whole; None for an
    analytic one, whose figures are this module's formulas on its cluster's device, which
    the cost model then applies itself (one road from a preset to a price, not a fit of the
    formulas beside the formulas).

    Raises:
        AutoplanError: for an analytic profile of another device than the cluster's.
    """
    if profile is None or profile.mode != "analytic":
        return profile
    made_for = profile.cluster.get("device", {})
    if made_for != asdict(cluster.device):
        raise AutoplanError(f"the analytic profile is of device {made_for.get('name', '?')}, "
                            f"the cluster's is {cluster.device.name}: analytic profiles are "
                            "the datasheet formulas of their device; leave --profile out to "
                            f"price {cluster.device.name} from its datasheet")
    return None



def analytic_profile(graph: LayerGraph, cluster: Cluster,
                     micro_batches: tuple[int, ...] = (1, 2, 4, 8),
                     tps: tuple[int, ...] = (1, 2, 4, 8)) -> Profile:
    """Derive a Profile of `graph` on `cluster` from datasheet peaks, with no measurement.

    One LayerProfile per distinct signature with a TimePoint per (micro_batch, tp) for each tp
    that fits in a node, a least-squares LinearFit per tp and the LayerMemory; one CommFit per
    collective, group size and scope (see collective_fits).

    Args:
        graph: the model's layer graph (per-sample FLOPs, bytes and activations).
        cluster: a preset cluster with peak figures (not local-cpu).
        micro_batches: micro-batch sizes to evaluate, samples per rank.
        tps: tensor-parallel degrees; those above the GPUs of a node are left out.

    Returns:
        A Profile with mode "analytic"; its notes list every figure and its source.

    Raises:
        AutoplanError: for a device without peak figures (use --mode measure), an unknown
            dtype, or empty or non-positive micro_batches / tps.
    """
    device = _check_device(cluster)
    elt_bytes = _element_bytes(graph.dtype)
    micro_batches = _positive_sorted(micro_batches, "micro_batches")
    tps = tuple(tp for tp in _positive_sorted(tps, "tps") if tp <= cluster.gpus_per_node)
    if not tps:
        raise AutoplanError(f"no tp degree fits in a node of {cluster.gpus_per_node} GPUs; "
                            "include tp=1")
    layers = [_layer_profile(nodes, micro_batches, tps, device, elt_bytes)
              for nodes in graph.by_signature().values()]
    return Profile(
        mode="analytic", model=graph.model, model_hash=graph.structural_hash,
        dtype=graph.dtype, cluster=cluster.to_dict(),
        created=utc_now(),
        layers=layers, comm=collective_fits(cluster),
        notes=[f"analytic profile of {device.name} ({device.source})", _TRAFFIC_NOTE,
               _PLACEMENT_NOTE, *figure_notes()],
    )


def _check_device(cluster: Cluster) -> DevicePreset:
    """The cluster's device, refused when it lacks a figure the analytic mode needs."""
    device = cluster.device
    needed = [device.peak_flops, device.memory_bandwidth]
    needed += [device.intra_node_bandwidth] if cluster.gpus_per_node > 1 else []
    needed += [device.inter_node_bandwidth] if cluster.nodes > 1 else []
    if any(figure is None for figure in needed):
        raise AutoplanError(f"cluster '{cluster.spec}' ({device.name}) has no datasheet peak "
                            "figures for an analytic profile; use --mode measure")
    return device


def _element_bytes(dtype: str) -> int:
    name = dtype.removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise AutoplanError(f"layer graph dtype '{dtype}' is not supported by the analytic "
                            f"profiler; choose from {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _positive_sorted(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    if not values or any(int(v) != v or v < 1 for v in values):
        raise AutoplanError(f"{what} must be positive integers, got {list(values)}")
    return tuple(sorted({int(v) for v in values}))


def _layer_profile(nodes: list[LayerNode], micro_batches: tuple[int, ...],
                   tps: tuple[int, ...], device: DevicePreset, elt_bytes: int) -> LayerProfile:
    node = nodes[0]  # equal signatures have equal structure and cost
    points = [layer_time_point(node, mb, tp, device, elt_bytes)
              for tp in tps for mb in micro_batches]
    return LayerProfile(signature=node.signature, kind=node.kind,
                        names=[n.name for n in nodes], points=points,
                        fits=fits_from_points(points),
                        memory=layer_memory(node, elt_bytes))


# -------------------------------------------------------------------------- layer times


@dataclass(frozen=True)
class PassWork:
    """Matmul FLOPs and memory-bound HBM bytes of one layer's forward and backward on a rank."""

    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float


def replicated_fraction(node: LayerNode) -> float:
    """Share of a TP-sharded layer's memory-bound traffic that stays whole on every TP rank
    without sequence parallelism: BLOCK_REPLICATED_HIDDEN_TENSORS of a block, none of an
    embedding or head (their traffic is in the vocabulary-sharded tensors)."""
    if node.kind != "block" or node.fwd_io_bytes <= 0:
        return 0.0
    return min(1.0, BLOCK_REPLICATED_HIDDEN_TENSORS * node.output_bytes / node.fwd_io_bytes)


def tp_shards(node: LayerNode, tp: int, sequence_parallel: bool = False) -> tuple[float, float]:
    """(FLOP divisor, traffic divisor) of `node` under TP degree `tp`.

    TP_SHARDED_KINDS split their matmuls tp ways; their memory-bound traffic splits too except
    the replicated_fraction, which sequence parallelism splits as well (and with it the norms).
    """
    if node.kind in TP_SHARDED_KINDS:
        whole = 0.0 if sequence_parallel else replicated_fraction(node)
        return tp, 1.0 / (whole + (1.0 - whole) / tp)
    if sequence_parallel and node.kind == "norm":
        return 1, tp
    return 1, 1


def layer_pass_work(node: LayerNode, micro_batch: int, tp: int, elt_bytes: int,
                    sequence_parallel: bool = False) -> PassWork:
    """The work of `node` at `micro_batch` samples per rank and TP degree `tp`.

    FLOPs are the traced matmul-class FLOPs. Bytes are what the layer's memory-bound ops move,
    as traced (LayerNode.fwd_io_bytes, bwd_io_bytes: eager kernels, no fusion). A graph from
    before those were recorded falls back to: weights once (forward; an embedding reads only
    the rows it gathers) or twice (backward) plus each sample's input, output and saved
    activations. tp_shards() says what tensor parallelism divides.
    """
    flop_div, byte_div = tp_shards(node, tp, sequence_parallel)
    if node.fwd_io_bytes or node.bwd_io_bytes:
        fwd_bytes = micro_batch * node.fwd_io_bytes / byte_div
        bwd_bytes = micro_batch * node.bwd_io_bytes / byte_div
    else:
        weight_bytes = (node.param_bytes + node.shared_params * elt_bytes) / flop_div
        per_sample = node.input_bytes + node.output_bytes + node.act_bytes / flop_div
        fwd_weights = weight_bytes
        if node.kind == "embedding":
            fwd_weights = min(weight_bytes, micro_batch * node.output_bytes / flop_div)
        fwd_bytes = fwd_weights + micro_batch * per_sample
        bwd_bytes = 2 * weight_bytes + micro_batch * per_sample
    return PassWork(fwd_flops=node.fwd_flops * micro_batch / flop_div,
                    bwd_flops=node.bwd_flops * micro_batch / flop_div,
                    fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def pass_time_s(flops: float, nbytes: float, device: DevicePreset) -> float:
    """Matmul time plus memory-bound time, each at the efficiency its size reaches
    (autoplan/efficiency.py). They add: a layer's kernels run one after another on a stream,
    so its matmuls and its elementwise ops do not overlap (the roofline's max holds inside one
    kernel, Williams et al. 2009, not across a layer's many)."""
    return (_compute_time_s(flops, device.peak_flops)
            + _memory_time_s(nbytes, device.memory_bandwidth))


def _compute_time_s(flops: float, peak_flops: float) -> float:
    if flops <= 0:
        return 0.0
    return flops / (peak_flops * matmul_efficiency(flops, peak_flops))


def _memory_time_s(nbytes: float, bandwidth: float) -> float:
    if nbytes <= 0:
        return 0.0
    return nbytes / (bandwidth * memory_efficiency(nbytes, bandwidth))


def layer_time_point(node: LayerNode, micro_batch: int, tp: int, device: DevicePreset,
                     elt_bytes: int) -> TimePoint:
    """Forward and backward time of `node` from its PassWork (no sequence parallelism)."""
    work = layer_pass_work(node, micro_batch, tp, elt_bytes)
    return TimePoint(micro_batch=micro_batch, tp=tp,
                     fwd_s=pass_time_s(work.fwd_flops, work.fwd_bytes, device),
                     bwd_s=pass_time_s(work.bwd_flops, work.bwd_bytes, device))


def layer_memory(node: LayerNode, elt_bytes: int) -> LayerMemory:
    """Bytes of `node` at tp = 1: gradients in the weights' dtype (HARDWARE.md: 2 bytes in
    bf16), optimizer state per OPTIMIZER_STATE_BYTES_PER_PARAM, and full checkpointing keeping
    only the layer's input (the graph's input_bytes)."""
    return LayerMemory(
        params=node.params, param_bytes=node.param_bytes, grad_bytes=node.param_bytes,
        optimizer_bytes={key: per_param * node.params
                         for key, per_param in OPTIMIZER_STATE_BYTES_PER_PARAM.items()},
        act_bytes_per_sample=node.act_bytes, act_bytes_per_sample_ckpt=node.input_bytes)


# -------------------------------------------------------------------------- collectives


def comm_group_sizes(cluster: Cluster) -> list[int]:
    """Group sizes to fit: powers of two up to the cluster, the node size and the cluster."""
    sizes = {cluster.gpus_per_node, cluster.gpus}
    sizes.update(2 ** k for k in range(1, cluster.gpus.bit_length()) if 2 ** k <= cluster.gpus)
    return sorted(size for size in sizes if size >= 2)


def collective_fits(cluster: Cluster) -> list[CommFit]:
    """A CommFit per collective in COLLECTIVES, group size (comm_group_sizes) and scope.

    "intra" for every size that fits in one node; "inter" for every size when the cluster
    has several nodes (a group of 2 can span nodes too), placed as ranks_per_node() says.
    """
    fits = []
    for size in comm_group_sizes(cluster):
        scopes = ["intra"] if size <= cluster.gpus_per_node else []
        scopes += ["inter"] if cluster.nodes > 1 else []
        fits += [collective_fit(name, size, scope, cluster)
                 for scope in scopes for name in COLLECTIVES]
    return fits


def ranks_per_node(group_size: int, scope: str, cluster: Cluster) -> int:
    """Where a group sits: all in one node (intra), or spread over as many nodes as there are
    (inter: ceil(group / nodes) per node, as for a DP group with tp filling each node)."""
    if scope == "intra":
        return group_size
    return min(cluster.gpus_per_node, math.ceil(group_size / cluster.nodes))


def bus_bandwidth(device: DevicePreset, scope: str, ranks_on_node: int = 1) -> float:
    """Achievable NCCL bus bandwidth per rank, bytes/s, inside a node or across nodes.

    Across nodes with r ranks of the group on each node, NCCL runs a ring per NIC (one NIC per
    GPU, HARDWARE.md), so each node moves r NICs' worth: busbw = min(NVLink, r x NIC).
    """
    nvlink = (device.intra_node_bandwidth or 0.0) * NVLINK_BUS_FRACTION.value
    if scope == "intra":
        return nvlink
    network = ranks_on_node * (device.inter_node_bandwidth or 0.0) * NETWORK_BUS_FRACTION.value
    return min(nvlink, network) if ranks_on_node > 1 else network


def collective_fit(collective: str, group_size: int, scope: str, cluster: Cluster,
                   ranks_on_node: int | None = None) -> CommFit:
    """Alpha-beta fit of one collective: time = alpha_s + nbytes / bandwidth.

    nbytes follows nccl-tests: the whole buffer of all_reduce, the gathered output of
    all_gather, the whole input of reduce_scatter and all_to_all, the message of send_recv.
    Bandwidth is the ring's: busbw / bus_factor. Latency is NCCL's ring model, and for an
    all_reduce across nodes the double binary tree's when lower: the fit is then the lower
    envelope of tree (small messages) and ring (large ones), as NCCL's tuner chooses.

    Args:
        collective: one of COLLECTIVES.
        group_size: ranks in the group, at least 2.
        scope: "intra" (one node, NVLink) or "inter" (spans nodes, network).
        cluster: the cluster; its device gives the link figures.
        ranks_on_node: ranks of the group per node; default ranks_per_node().

    Raises:
        AutoplanError: on an unknown collective or scope, or a group the cluster cannot hold.
    """
    _check_group(group_size, scope, cluster)
    per_node = ranks_on_node or ranks_per_node(group_size, scope, cluster)
    nodes = math.ceil(group_size / per_node)
    _check_placement(group_size, scope, cluster, per_node, nodes)
    busbw = bus_bandwidth(cluster.device, scope, per_node)
    alpha_s = _ring_latency_s(collective, group_size, nodes)
    if collective == "all_reduce" and nodes > 1:
        alpha_s = min(alpha_s, _tree_latency_s(per_node, nodes))
    return CommFit(collective=collective, group_size=group_size, scope=scope, alpha_s=alpha_s,
                   bandwidth=busbw / bus_factor(collective, group_size), busbw=busbw)


def _check_group(group_size: int, scope: str, cluster: Cluster) -> None:
    if scope not in ("intra", "inter"):
        raise AutoplanError(f"unknown scope '{scope}'; choose from intra, inter")
    if not 2 <= group_size <= cluster.gpus:
        raise AutoplanError(f"group of {group_size} ranks on cluster '{cluster.spec}': "
                            f"use 2 to {cluster.gpus}")
    if scope == "intra" and group_size > cluster.gpus_per_node:
        raise AutoplanError(f"an intra-node group of {group_size} ranks does not fit a node "
                            f"of {cluster.gpus_per_node} GPUs; use scope inter")
    if scope == "inter" and cluster.nodes < 2:
        raise AutoplanError(f"cluster '{cluster.spec}' has one node; use scope intra")


def _check_placement(group_size: int, scope: str, cluster: Cluster, per_node: int,
                     nodes: int) -> None:
    if scope == "intra" and per_node != group_size:
        raise AutoplanError(f"an intra-node group of {group_size} has all {group_size} ranks on "
                            f"its node, not {per_node}")
    if scope == "inter" and not (per_node <= cluster.gpus_per_node and 2 <= nodes <= cluster.nodes):
        raise AutoplanError(f"{per_node} ranks per node for an inter-node group of {group_size} "
                            f"on {cluster.nodes} nodes of {cluster.gpus_per_node}: use "
                            f"{math.ceil(group_size / cluster.nodes)} to "
                            f"{min(cluster.gpus_per_node, math.ceil(group_size / 2))}")


def _ring_steps(collective: str, ranks: int) -> int:
    """Sequential steps of the ring algorithm (NCCL tuning.cc nsteps; all_to_all as pairwise
    exchange, Thakur et al. 2005; send_recv one hop)."""
    if collective == "all_reduce":
        return 2 * (ranks - 1)
    if collective == "send_recv":
        return 1
    return ranks - 1


def _ring_latency_s(collective: str, ranks: int, nodes: int) -> float:
    """NCCL tuning.cc ring latency: base + intra-node steps x NVLink + node-crossing steps x
    network, node-crossing steps being the ring steps of the node count."""
    steps = _ring_steps(collective, ranks)
    inter_steps = _ring_steps(collective, nodes) if nodes > 1 else 0
    return (NCCL_BASE_LATENCY_S.value + (steps - inter_steps) * NVLINK_RING_STEP_S.value
            + inter_steps * NETWORK_RING_STEP_S.value)


def _tree_latency_s(per_node: int, nodes: int) -> float:
    """NCCL tuning.cc tree latency: up and down a chain of the node's ranks and a binary tree
    of depth ceil(log2 nodes) (double binary trees, Sanders et al. 2009)."""
    depth = math.ceil(math.log2(nodes))
    return NCCL_BASE_LATENCY_S.value + 2 * (
        (per_node - 1) * NVLINK_TREE_STEP_S.value + depth * NETWORK_TREE_STEP_S.value)
