"""What the executor can run, decided from the layer graph alone: one rule for the search's
enumeration, the plan checks of estimate/inspect/run and the executor's pre-check.

Tracing records on each LayerNode what running it needs (autoplan/graph.py: its tie group,
the sizes a tp degree must divide or why tp cannot split it, why its layout cannot change,
why a pipeline stage cannot start at it) and on the graph the parameters outside every
layer. `layer_refusal` judges one layer's strategy, `plan_refusal` a whole plan; both return
the reason in one line (None when the executor runs it), so that every caller refuses with
the same words. A new dimension adds a fact to the node and a clause here, never a copy of
the rule elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from autoplan.graph import LayerGraph, LayerNode

if TYPE_CHECKING:  # plan.py checks plans with this module
    from autoplan.plan import LayerStrategy, Plan

__all__ = ["layer_refusal", "tp_split_refusal", "feasible", "cut_refusal", "layout_change_refusal",
           "gives_whole_output", "last_layer", "tie_groups", "schedule_refusal", "plan_refusal"]


def layer_refusal(node: LayerNode, strategy: LayerStrategy,
                  micro_batch_size: int | None = None) -> str | None:
    """Why the executor cannot run `node` under `strategy` (with micro-batches of
    `micro_batch_size` samples over its dp ranks, when given), or None when it can."""
    if micro_batch_size is not None and micro_batch_size // strategy.dp < node.min_samples:
        return (f"layer {node.name} needs {node.min_samples} samples per rank in each "
                f"micro-batch (a BatchNorm in training refuses fewer); dp {strategy.dp} "
                f"leaves {micro_batch_size // strategy.dp} of {micro_batch_size}")
    return tp_split_refusal(node.name, node.tp_divides, node.tp_refusal, strategy.tp)


def tp_split_refusal(name: str, sizes: Sequence[int], refusal: str, tp: int) -> str | None:
    """Why tensor parallelism of degree `tp` cannot split layer `name`, whose TP plan
    (autoplan.tp_plan) splits `sizes` (widths, head counts: tp must divide each) or refuses
    any split for `refusal` ("" when it does not). One rule for a traced node's facts and
    for a live module's plan, which the executor infers again on each rank."""
    if tp == 1:
        return None
    if refusal:
        return f"layer {name}: {refusal}"
    bad = sorted({size for size in sizes if size % tp})
    if bad:
        return (f"layer {name}: tp {tp} does not divide {', '.join(map(str, bad))} of the "
                f"sizes it splits ({', '.join(map(str, sizes))}: widths and head counts)")
    return None


def feasible(node: LayerNode, strategy: LayerStrategy,
             micro_batch_size: int | None = None) -> bool:
    """Whether the executor runs `node` under `strategy` (layer_refusal finds nothing)."""
    return layer_refusal(node, strategy, micro_batch_size) is None


def cut_refusal(graph: LayerGraph, index: int) -> str | None:
    """Why a pipeline stage cannot start at layer `index`, or None when it can."""
    node = graph.nodes[index]
    if index == 0:
        return None
    if node.cut_refusal:
        return f"a pipeline stage cannot start at layer {node.name}: {node.cut_refusal}"
    return None


def layout_change_refusal(graph: LayerGraph, index: int) -> str | None:
    """Why layer `index` cannot take another (dp, tp) than the layer before it."""
    node = graph.nodes[index]
    if graph.loose_params:
        return (f"parameters {', '.join(graph.loose_params[:3])} belong to no layer, so they "
                "have no layout: every layer must take one (dp, tp)")
    if node.layout_refusal:
        return f"layer {node.name} cannot change layout: {node.layout_refusal}"
    return None


def gives_whole_output(node: LayerNode) -> bool:
    """Whether the layer's output is whole under sequence parallelism: the executor splits
    an Embedding by rows and a Linear (an output head) by columns, giving whole outputs;
    others give sequence slices, which the model's last layer must not."""
    return node.kind == "head" or node.module_type in ("Embedding", "Linear")


def last_layer(nodes: Sequence[LayerNode]) -> int:
    """Index of the model's last layer: the last node that is not the loss (-1 if none)."""
    return max((i for i, node in enumerate(nodes) if node.kind != "loss"), default=-1)


def tie_groups(nodes: Sequence[LayerNode]) -> list[tuple[int, ...]]:
    """Indices of the layers of each tie group (layers sharing a parameter), by the owner
    tracing named: the executor holds one parameter on one (dp, tp) layout."""
    groups: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        if node.tie_group:
            groups.setdefault(node.tie_group, []).append(index)
    return [tuple(group) for group in groups.values() if len(group) > 1]


def schedule_refusal(schedule: str, pp: int, micro_batches: int) -> str | None:
    """Why torch's pipeline schedule refuses `micro_batches` micro-batches over `pp` stages
    (torch 2.13 torch.distributed.pipelining.schedules), or None when it runs them; without a
    pipeline (pp 1) the executor builds no schedule."""
    if pp == 1:
        return None
    if schedule == "1f1b" and micro_batches < pp:
        # Schedule1F1B.__init__: "Number of microbatches must be >= the number of stages"
        return (f"schedule 1f1b needs at least pp = {pp} micro-batches; the plan has "
                f"{micro_batches} (gpipe or interleaved_1f1b take fewer)")
    rounds = max(1, micro_batches // pp)  # ScheduleInterleaved1F1B's rounds
    if schedule == "interleaved_1f1b" and micro_batches % rounds:
        return (f"schedule interleaved_1f1b runs micro-batches in {rounds} rounds "
                f"(max(1, m // pp)), which must divide the {micro_batches} micro-batches")
    return None


def plan_refusal(plan: Plan, graph: LayerGraph) -> str | None:
    """Why the executor cannot run `plan` on the model of `graph`, or None when it can.
    The plan's layers must be the graph's, in order (plan.check_plan checks that first)."""
    nodes = graph.nodes
    why = schedule_refusal(plan.schedule, plan.pp, plan.num_micro_batches)
    if why:
        return why
    for node, layer in zip(nodes, plan.layers, strict=True):
        why = layer_refusal(node, layer, plan.micro_batch_size)
        if why:
            return why
    last = last_layer(nodes)
    if last >= 0 and plan.layers[last].sequence_parallel and not gives_whole_output(nodes[last]):
        return (f"layer {nodes[last].name} is the model's last layer: sequence parallelism "
                "there would give the output in sequence slices")
    layouts = [(layer.dp, layer.tp) for layer in plan.layers]
    for group in tie_groups(nodes):
        if len({layouts[i] for i in group}) > 1:
            names = ", ".join(nodes[i].name for i in group)
            return f"layers {names} share a parameter (tied weights) but differ in layout"
    for index in range(1, len(nodes)):
        if layouts[index] != layouts[index - 1]:
            why = layout_change_refusal(graph, index)
            if why:
                return why
    for start in plan.stage_boundaries[1:]:
        why = cut_refusal(graph, start)
        if why:
            return why
    return None
