"""Communication of a plan, per layer and per step: what each parallelism moves, as
(collective, bytes) on a group, timed by CommModel.

Sources: Megatron-LM tensor parallelism (Shoeybi et al. 2019, sec. 3: two all-reduces per
block in forward, two in backward; vocabulary-parallel embedding and head) and sequence
parallelism (Korthikanti et al. 2022, sec. 4.2.2: each all-reduce becomes an all-gather and a
reduce-scatter of the same volume); pipeline scatter/gather (Narayanan et al. 2021, sec. 4.1:
each TP rank sends 1/tp of a boundary activation); ZeRO (Rajbhandari et al. 2020, sec. 5) and
FSDP (Zhao et al. 2023, sec. 3).
"""

from __future__ import annotations

from collections.abc import Iterable

from autoplan.cost_model.collectives import CommModel
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import LayerStrategy

__all__ = ["tp_time_s", "fsdp_time_s", "grad_sync_time_s", "reshard_time_s", "reshard_bytes",
           "p2p_time_s", "priced_message_bytes", "PRICED_COLLECTIVES"]

PRICED_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
"""The collectives the functions below price (no all_to_all yet): what a profile times."""

# Per pass: (collective, what is moved) for each TP-sharded kind; "out" the layer's output
# per sample, "in" its input. Without SP an all-reduce; with SP the pair that replaces it.
_TP_FORWARD = {"block": ("out", 2), "embedding": ("out", 1), "head": ("in", 0)}
_TP_BACKWARD = {"block": ("in", 2), "embedding": ("out", 0), "head": ("in", 1)}


def _tp_pass_s(comm: CommModel, node: LayerNode, layer: LayerStrategy, samples: int,
               table: dict[str, tuple[str, int]]) -> float:
    which, count = table.get(node.kind, ("out", 0))
    nbytes = samples * (node.output_bytes if which == "out" else node.input_bytes)
    if layer.tp < 2 or count == 0:
        return 0.0
    if layer.sequence_parallel:
        one = (comm.time_s("all_gather", nbytes, layer.tp)
               + comm.time_s("reduce_scatter", nbytes, layer.tp))
    else:
        one = comm.time_s("all_reduce", nbytes, layer.tp)
    return count * one


def tp_time_s(comm: CommModel, node: LayerNode, layer: LayerStrategy,
              samples: int) -> tuple[float, float]:
    """(forward, backward) TP collective seconds of `node` per micro-batch on one rank; the
    forward's repeat under full recomputation is the caller's (it multiplies the forward)."""
    return (_tp_pass_s(comm, node, layer, samples, _TP_FORWARD),
            _tp_pass_s(comm, node, layer, samples, _TP_BACKWARD))


def _shard_bytes(node: LayerNode, tp: int, elt_bytes: int) -> float:
    """A TP rank's bytes of the layer's weights."""
    sharded = node.kind in ("block", "embedding", "head")
    return node.params * elt_bytes / (tp if sharded else 1)


def fsdp_time_s(comm: CommModel, node: LayerNode, layer: LayerStrategy, elt_bytes: int) -> float:
    """ZeRO 2 and 3 per micro-batch, over the dp group (members tp apart): reduce-scatter
    the gradients (executor/data_parallel.gradient_sync); ZeRO 3 first gathers the weights
    for forward and again for backward."""
    if layer.zero < 2 or layer.dp < 2:
        return 0.0
    nbytes = _shard_bytes(node, layer.tp, elt_bytes)
    gathers = 2 * comm.time_s("all_gather", nbytes, layer.dp, layer.tp) if layer.zero >= 3 \
        else 0.0
    return gathers + comm.time_s("reduce_scatter", nbytes, layer.dp, layer.tp)


def grad_sync_time_s(comm: CommModel, node: LayerNode, layer: LayerStrategy,
                     elt_bytes: int) -> tuple[float, float]:
    """(gradient sync, weight all-gather) seconds per step of a layer under ZeRO 0-2: an
    all-reduce (ZeRO 0) or reduce-scatter (1) of its gradients over the dp group, and for
    ZeRO 1-2 an all-gather of the updated weights; one collective per layer, as FSDP2 issues
    them (ZeRO 2 and 3 reduce every micro-batch: fsdp_time_s)."""
    if layer.dp < 2 or layer.zero >= 3:
        return 0.0, 0.0
    nbytes = _shard_bytes(node, layer.tp, elt_bytes)
    sync = 0.0 if layer.zero == 2 else comm.time_s(
        "all_reduce" if layer.zero == 0 else "reduce_scatter", nbytes, layer.dp, layer.tp)
    gather = comm.time_s("all_gather", nbytes, layer.dp, layer.tp) if layer.zero else 0.0
    return sync, gather


def reshard_time_s(comm: CommModel, node: LayerNode, before: LayerStrategy, after: LayerStrategy,
                   micro_batch: int, previous: LayerNode | None = None) -> float:
    """Moving the activation into `node` between two layouts of the same stage, forward (the
    activation) and backward (its gradient): each rank gathers the samples its new dp shard
    needs from the max(dp) / min(dp) ranks that hold them; equal dp with other tp is a
    regroup inside the node that keeps the samples (free: both layouts hold the whole
    activation per rank). `previous`: the layer before `node` (see reshard_bytes)."""
    if (before.dp, before.tp) == (after.dp, after.tp) or before.dp == after.dp:
        return 0.0
    group = max(before.dp, after.dp) // min(before.dp, after.dp)
    nbytes = reshard_bytes(node, previous) * micro_batch / min(before.dp, after.dp)
    return 2 * comm.time_s("all_gather", nbytes, group, min(before.tp, after.tp))


def reshard_bytes(node: LayerNode, previous: LayerNode | None) -> int:
    """Bytes per sample that a layout change at `node` moves. Its input, except at an
    embedding after another layer: an embedding takes indices (GPT's wpe takes position ids,
    input_bytes 0), so the executor moves the output of the layer before it instead, the
    activation that the glue adds the embedding's output to (executor/hops.py,
    apply_output_hops)."""
    if node.kind == "embedding" and previous is not None:
        return previous.output_bytes
    return node.input_bytes


def p2p_time_s(comm: CommModel, node: LayerNode, layer: LayerStrategy, samples: int,
               stage_gpus: int) -> float:
    """One pipeline hop of `node`'s output per micro-batch: each of tp ranks sends 1/tp."""
    nbytes = samples * node.output_bytes / layer.tp
    return comm.time_s("send_recv", nbytes, 2, stage_gpus)


def priced_message_bytes(graph: LayerGraph, samples: Iterable[int], tps: Iterable[int],
                         elt_bytes: int) -> list[int]:
    """The message sizes (bytes, as CommModel takes them) that the functions above price for
    `graph` at these samples per rank and TP degrees: each layer's weights, whole or a TP
    shard (gradient sync, ZeRO gathers), and its input and output for a micro-batch, whole
    or a TP share (TP collectives, pipeline hops, hops between layouts). A profile that times
    the collectives around these sizes fits what the search will ask of it."""
    sizes = set()
    for node in graph.nodes:
        for tp in tps:
            sizes.add(round(_shard_bytes(node, tp, elt_bytes)))
            for count in samples:
                for per_sample in (node.input_bytes, node.output_bytes):
                    sizes |= {count * per_sample, round(count * per_sample / tp)}
    return sorted(size for size in sizes if size > 0)
