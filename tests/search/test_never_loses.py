"""Issue 23 as properties: the search never loses to a plan its own cost model prices better,
and the lower bounds it prunes outer settings with are bounds.

The random models are small chains of layers (an optional embedding, 1-8 identical blocks,
an optional final norm, head and loss, the head sometimes tied to the embedding) with figures
shaped like a transformer's (Korthikanti et al. 2022, sec. 4.1), on GPU clusters of 1-16
devices. A100/H100 presets only: the CPU preset has no datasheet figures, so it needs a
measured profile, and these tests price with the presets alone (profile=None).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.cost_model import CostModel, Estimate
from autoplan.errors import AutoplanError
from autoplan.feasibility import last_layer, plan_refusal, tie_groups
from autoplan.graph import LayerEdge, LayerGraph, LayerNode
from autoplan.plan import LayerPlan, Plan, check_plan, uniform_plan
from autoplan.search.search import Searcher, SearchOptions
from autoplan.search.space import Outer, layer_strategies

ELT_BYTES = 2  # bfloat16
HEAD_DIM = 64  # hidden / heads, as in GPT-3 and Llama
INDICES_CUT = "its first input is a int64 tensor (indices, not an activation)"  # as traced
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

_RECIPES = st.fixed_dictionaries({
    "blocks": st.integers(1, 8), "hidden": st.sampled_from([256, 512, 1024, 2048]),
    "seq": st.sampled_from([128, 512, 2048]), "vocab": st.sampled_from([1024, 32768]),
    "embedding": st.booleans(), "norm": st.booleans(), "head": st.booleans(),
    "loss": st.booleans(), "tied": st.booleans(), "width": st.integers(8, 16),
    "saved": st.integers(2, 20), "attention": st.booleans()})
"""What a random model is made of: width scales a block's parameters (12 h^2 in GPT), saved
its stored activations over its input (34 s h over 2 s h per sample in Korthikanti's table:
17), attention whether it keeps S x S tensors (what selective recomputation drops)."""


# ----------------------------------------------------------------------------- models


def _node(name: str, kind: str, module_type: str, **figures: Any) -> LayerNode:
    """A layer with the signature of its kind (blocks are identical, so the search ties
    their choices) and the figures given."""
    defaults = dict(shared_params=0, act_bytes_fixed=0, output_shape=(), fwd_io_bytes=0,
                    bwd_io_bytes=0)
    return LayerNode(name=name, kind=kind, module_type=module_type, signature=kind,
                     **{**defaults, **figures})


def _embedding(r: dict) -> LayerNode:
    params, out = r["vocab"] * r["hidden"], ELT_BYTES * r["seq"] * r["hidden"]
    return _node("embed", "embedding", "Embedding", params=params,
                 param_bytes=ELT_BYTES * params, fwd_flops=0.0, bwd_flops=0.0,
                 act_bytes=8 * r["seq"], input_bytes=8 * r["seq"], output_bytes=out,
                 output_shape=(1, r["seq"], r["hidden"]), fwd_io_bytes=out, bwd_io_bytes=out,
                 tie_group="embed" if _tied(r) else "", tp_divides=(r["vocab"],),
                 cut_refusal=INDICES_CUT)


def _block(r: dict, i: int) -> LayerNode:
    """A transformer block: 2 FLOPs per parameter per token plus attention's 4 s^2 h; saved
    activations `saved` times its input, plus 5 a s^2 bytes of S x S tensors (Korthikanti
    et al. 2022, eq. 1) when it keeps them."""
    h, s, heads = r["hidden"], r["seq"], r["hidden"] // HEAD_DIM
    params, io = r["width"] * h * h, ELT_BYTES * s * h
    attn_flops = 4.0 * s * s * h
    attn_bytes = 5 * heads * s * s if r["attention"] else 0
    fwd = 2.0 * params * s + attn_flops
    return _node(f"layers.{i}", "block", "Block", params=params, param_bytes=ELT_BYTES * params,
                 fwd_flops=fwd, bwd_flops=2 * fwd, act_bytes=r["saved"] * io + attn_bytes,
                 input_bytes=io, output_bytes=io, output_shape=(1, s, h),
                 fwd_io_bytes=4 * r["saved"] * io, bwd_io_bytes=8 * r["saved"] * io,
                 attn_act_bytes=attn_bytes, attn_fwd_flops=attn_flops if attn_bytes else 0.0,
                 attn_fwd_io_bytes=attn_bytes, tp_divides=(heads, h, 4 * h))


def _norm(r: dict) -> LayerNode:
    io = ELT_BYTES * r["seq"] * r["hidden"]
    return _node("norm", "norm", "LayerNorm", params=2 * r["hidden"],
                 param_bytes=ELT_BYTES * 2 * r["hidden"], fwd_flops=0.0, bwd_flops=0.0,
                 act_bytes=io + 4 * r["seq"], input_bytes=io, output_bytes=io,
                 output_shape=(1, r["seq"], r["hidden"]), fwd_io_bytes=2 * io,
                 bwd_io_bytes=3 * io)


def _head(r: dict) -> LayerNode:
    """The output projection; tied, it owns no parameter and uses the embedding's."""
    weights, io = r["vocab"] * r["hidden"], ELT_BYTES * r["seq"] * r["hidden"]
    owned = 0 if _tied(r) else weights
    fwd = 2.0 * r["seq"] * weights
    return _node("head", "head", "Linear", params=owned, shared_params=weights - owned,
                 param_bytes=ELT_BYTES * owned, fwd_flops=fwd, bwd_flops=2 * fwd,
                 act_bytes=io, input_bytes=io, output_bytes=ELT_BYTES * r["seq"] * r["vocab"],
                 output_shape=(1, r["seq"], r["vocab"]), tie_group="embed" if _tied(r) else "",
                 tp_divides=(r["vocab"],))


def _loss(previous: LayerNode) -> LayerNode:
    logits = previous.output_bytes
    return _node("loss", "loss", "loss", params=0, param_bytes=0, fwd_flops=0.0,
                 bwd_flops=0.0, act_bytes=logits + 4 * 1024, input_bytes=logits,
                 output_bytes=0, fwd_io_bytes=3 * logits, bwd_io_bytes=5 * logits)


def _tied(r: dict) -> bool:
    return r["tied"] and r["embedding"] and r["head"]


def build_graph(r: dict) -> LayerGraph:
    """The chain a recipe describes, with an edge per consecutive pair."""
    nodes = [_embedding(r)] if r["embedding"] else []
    nodes += [_block(r, i) for i in range(r["blocks"])]
    nodes += [_norm(r)] if r["norm"] else []
    nodes += [_head(r)] if r["head"] else []
    nodes += [_loss(nodes[-1])] if r["loss"] else []
    edges = tuple(LayerEdge(a.name, b.name, a.output_bytes)
                  for a, b in zip(nodes, nodes[1:], strict=False))
    return LayerGraph("random", "bfloat16", "flash", r["seq"], tuple(nodes), edges)


# ----------------------------------------------------------------------------- plans


_SHAPES = st.fixed_dictionaries({
    "pp": st.sampled_from([1, 2, 4, 8, 16]), "tp": st.sampled_from([1, 2, 4, 8]),
    "micro_batch": st.sampled_from([1, 2, 4, 8]),
    "micro_batches": st.sampled_from([1, 2, 4, 8, 16]),
    "schedule": st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]),
    "virtual_stages": st.sampled_from([2, 3, 4]), "zero": st.integers(0, 3),
    "ckpt": st.sampled_from(["none", "selective", "full"]), "sp": st.booleans()})
"""A uniform plan's raw figures: shorthand() takes the largest degrees the cluster allows
(all are powers of two), virtual stages only when interleaving, SP only with tp."""


def shorthand(shape: dict, cluster: Cluster, heads: int) -> tuple[str, int]:
    """The shorthand of `shape` on `cluster` and its global batch (a power of two: micro_batch
    x dp x micro_batches). tp keeps the search's stated space rules: it divides the stage and
    a node's GPUs, stays within them (the default max_tp) and divides the model's heads. The
    executor's own refusals are left to check_plan."""
    pp = math.gcd(shape["pp"], cluster.gpus)
    tp = math.gcd(shape["tp"], cluster.gpus // pp, cluster.gpus_per_node, heads)
    dp = cluster.gpus // (pp * tp)
    interleaved = shape["schedule"] == "interleaved_1f1b"
    text = (f"dp={dp},tp={tp},pp={pp},micro_batch={shape['micro_batch']},zero={shape['zero']},"
            f"ckpt={shape['ckpt']},schedule={shape['schedule']},"
            f"virtual_stages={shape['virtual_stages'] if interleaved else 1},"
            f"sequence_parallel={str(tp > 1 and shape['sp']).lower()}")
    return text, shape["micro_batch"] * dp * shape["micro_batches"]


def runnable_plan(text: str, graph: LayerGraph, cluster: Cluster, batch: int) -> Plan:
    """The uniform plan of `text`; a plan the executor refuses is no example (assume)."""
    try:
        plan = uniform_plan(text, graph, cluster.gpus, batch, cluster.spec)
        check_plan(plan, graph, world_size=cluster.gpus)
    except AutoplanError:
        assume(False)
    return plan


def _memory_limit(plan: Plan, graph: LayerGraph, cluster: Cluster,
                  tightness: float | None) -> int | None:
    """None (the device's memory), or the plan's own need times `tightness` (>= 1) within
    the device's: at 1 memory binds exactly at the plan, so the search must find a plan at
    least as fast in the same room."""
    if tightness is None:
        return None
    need = CostModel(graph, cluster).estimate(plan)
    wanted = int((max(need.peak_memory_bytes) + need.overhead_bytes) * tightness)
    return min(wanted, cluster.device.memory_bytes)


def _describe(graph: LayerGraph, cluster: Cluster, batch: int, limit: int | None) -> str:
    ties = "tied " if tie_groups(graph.nodes) else ""
    layers = " ".join(n.kind for n in graph.nodes)
    room = "device memory" if limit is None else f"{limit} bytes"
    return f"{ties}[{layers}] on {cluster.spec}, global batch {batch}, {room}"


def _shown(plan: Plan, estimate: Estimate) -> str:
    kinds = {(lp.dp, lp.tp, lp.sequence_parallel, lp.zero, lp.checkpoint) for lp in plan.layers}
    return (f"{estimate.step_time_s:.9g} s (pp {plan.pp}, micro-batch {plan.micro_batch_size}, "
            f"{plan.schedule} v{plan.virtual_stages}, boundaries {plan.stage_boundaries}, "
            f"layers (dp, tp, sp, zero, ckpt) {sorted(kinds)})")


def _recipe(**changes: Any) -> dict:
    """The smallest recipe (two bare blocks), changed: explicit examples name what matters."""
    base = dict(blocks=2, hidden=256, seq=128, vocab=1024, embedding=False, norm=False,
                head=False, loss=False, tied=False, width=8, saved=2, attention=False)
    return {**base, **changes}


def _shape(**changes: Any) -> dict:
    """One device's plan (pp 1, tp 1, one micro-batch of one sample, 1F1B), changed."""
    base = dict(pp=1, tp=1, micro_batch=1, micro_batches=1, schedule="1f1b", virtual_stages=2,
                zero=0, ckpt="none", sp=False)
    return {**base, **changes}


# ----------------------------------------------------------------------------- properties


@PROPERTY
@example(recipe=_recipe(), preset="a100-80g", gpus=2, tightness=None,  # found at HEAD 9de9f97:
         shape=_shape(pp=2, schedule="gpipe"))  # GPipe with fewer micro-batches than stages
@example(recipe=_recipe(blocks=1, head=True), preset="a100-80g", gpus=8, tightness=None,
         shape=_shape(pp=2, micro_batches=2, schedule="gpipe"))  # more stages than blocks
@example(recipe=_recipe(blocks=1), preset="a100-80g", gpus=4, tightness=1.0,
         shape=_shape(tp=2))  # memory binds at the plan's own need: the stage budget's reserve
@example(recipe=_recipe(hidden=2048), preset="a100-80g", gpus=16, tightness=None,
         shape=_shape())  # IndexError: the last block (no SP) ran with the blocks before it
@example(recipe=_recipe(blocks=8, hidden=1024, saved=3), preset="a100-80g", gpus=2,
         tightness=None, shape=_shape(pp=2, micro_batch=2, micro_batches=2,
                                      schedule="interleaved_1f1b", virtual_stages=3))  # uneven
@example(recipe=_recipe(blocks=4, hidden=1024, seq=2048, saved=20), preset="a100-80g", gpus=1,
         tightness=1.0, shape=_shape(micro_batch=2, ckpt="full"))  # only full checkpointing fits
@given(recipe=_RECIPES, preset=st.sampled_from(["a100-80g", "h100-sxm"]),
       gpus=st.sampled_from([1, 2, 4, 8, 16]), shape=_SHAPES,
       tightness=st.sampled_from([None, 1.0, 1.25, 2.0]))
def test_search_never_loses_to_a_uniform_plan(recipe: dict, preset: str, gpus: int,
                                              shape: dict, tightness: float | None) -> None:
    """Any uniform plan the executor runs and the search's space holds (tp divides a node's
    GPUs, stays within them and divides the heads) and that fits, priced by the same cost
    model: the search's best is at least as fast."""
    graph, cluster = build_graph(recipe), parse_cluster_spec(f"{preset}:gpus={gpus}")
    heads = recipe["hidden"] // HEAD_DIM
    text, batch = shorthand(shape, cluster, heads)
    plan = runnable_plan(text, graph, cluster, batch)
    limit = _memory_limit(plan, graph, cluster, tightness)
    estimate = CostModel(graph, cluster, memory_limit_bytes=limit).estimate(plan)
    assume(estimate.fits)
    options = SearchOptions(global_batch=batch, memory_limit_bytes=limit)
    best = Searcher(graph, cluster, options).run().best
    where = f"{_describe(graph, cluster, batch, limit)}: {text} takes {_shown(plan, estimate)}"
    assert best is not None, f"the search found nothing that fits; {where}"
    assert best.estimate.step_time_s <= estimate.step_time_s * (1 + 1e-9), \
        f"{where}; the search's best takes {_shown(best.plan, best.estimate)}"


def _mixed(plan: Plan, graph: LayerGraph, searcher: Searcher, picks: list[int]) -> Plan:
    """`plan` with layer i's strategy picks[i] (modulo) of the search's space for its outer
    setting; tied layers take one (dp, tp) layout, as the executor requires."""
    last, layouts = last_layer(graph.nodes), {}
    layers = []
    for i, node in enumerate(graph.nodes):
        choices = layer_strategies(node, plan.stage_gpus, plan.micro_batch_size, searcher.space,
                                   i == last)
        if node.tie_group in layouts:
            choices = [s for s in choices if (s.dp, s.tp) == layouts[node.tie_group]]
        assume(choices)
        strategy = choices[picks[i] % len(choices)]
        layouts.setdefault(node.tie_group or node.name, (strategy.dp, strategy.tp))
        layers.append(LayerPlan(name=node.name, **dict(strategy)))
    return Plan.model_validate({**plan.model_dump(), "layers": layers})


@PROPERTY
@example(recipe=_recipe(blocks=4, hidden=2048, seq=2048), preset="a100-80g", gpus=2,
         shape=_shape(pp=2, schedule="interleaved_1f1b"), picks=None)  # compute-bound and
# balanced: the bound is within a few % of the step, so its (pp - 1) / v term is checked
@example(recipe=_recipe(blocks=1), preset="a100-80g", gpus=2, shape=_shape(),
         picks=None)  # dp 2 over a small block: half the step is the tail (sync, optimizer)
@given(recipe=_RECIPES, preset=st.sampled_from(["a100-80g", "h100-sxm"]),
       gpus=st.sampled_from([1, 2, 4, 8, 16]), shape=_SHAPES,
       picks=st.none() | st.lists(st.integers(0, 2**16), min_size=12, max_size=12))
def test_lower_bound_is_a_lower_bound(recipe: dict, preset: str, gpus: int, shape: dict,
                                      picks: list[int] | None) -> None:
    """No plan of an outer setting steps faster than the search's bound for it, fitting or
    not (a time bound), uniform (picks None) or with each layer's strategy picked from the
    search's space."""
    graph, cluster = build_graph(recipe), parse_cluster_spec(f"{preset}:gpus={gpus}")
    heads = recipe["hidden"] // HEAD_DIM
    text, batch = shorthand(shape, cluster, heads)
    plan = runnable_plan(text, graph, cluster, batch)
    searcher = Searcher(graph, cluster, SearchOptions(global_batch=batch))
    if picks is not None:
        plan = _mixed(plan, graph, searcher, picks)
        assume(plan_refusal(plan, graph) is None)
    outer = Outer(plan.pp, plan.micro_batch_size, plan.schedule, plan.virtual_stages)
    bound, estimate = searcher.lower_bound(outer), searcher.model.estimate(plan)
    assert estimate.step_time_s >= bound * (1 - 1e-9), \
        (f"{_describe(graph, cluster, batch, None)}: {text}{' mixed' if picks else ''} takes "
         f"{_shown(plan, estimate)}, below the bound {bound:.9g} s of {outer}")
