"""The bounds the search skips settings by are lower bounds of every plan they skip, shown on
the cases where a loose or a wrong one would skip the optimum: a measured profile on
oversubscribed cores (the bound once ignored waiting relief and skipped the four best plans of
the README's validation), and a pipeline whose best cut is far from even (the stage DP once
tried only even splits +-1)."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import Plan, uniform_plan
from autoplan.profile import load_profile
from autoplan.search.bounds import knapsack_floor
from autoplan.search.search import Searcher, SearchOptions
from autoplan.search.space import Outer
from autoplan.workload import load_graph
from tests.graphs import synthetic_block

VALIDATION = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "validate"
VALIDATION_MODEL = "gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024"  # README Validation


def test_knapsack_floor_is_at_most_every_choice_that_fits() -> None:
    rng = random.Random(7)
    for _ in range(300):
        items = [(rng.randint(1, 3), [(rng.uniform(0, 10), rng.uniform(0, 10))
                                      for _ in range(rng.randint(1, 4))])
                 for _ in range(rng.randint(1, 3))]
        budget = rng.uniform(0, 40)
        layers = [options for count, options in items for _ in range(count)]
        fitting = [sum(t for _, t in pick) for pick in itertools.product(*layers)
                   if sum(m for m, _ in pick) <= budget]
        floor = knapsack_floor(items, budget)
        if fitting:
            assert floor <= min(fitting) + 1e-9
        else:  # nothing fits: the floor says so unless blends fit where no choice does
            least = sum(count * min(m for m, _ in options) for count, options in items)
            assert (floor == float("inf")) == (least > budget)


def _outer(plan: Plan) -> Outer:
    return Outer(plan.pp, plan.micro_batch_size, plan.schedule, plan.virtual_stages)


def test_a_measured_profile_on_shared_cores_keeps_the_best_plans() -> None:
    """README's validation: 4 processes on 2 cores, where a waiting pipeline rank frees its
    core. Every plan run there must bound above its setting's bound and the search."""
    graph = load_graph(VALIDATION_MODEL, dtype="fp32")
    profile = load_profile(str(VALIDATION / "profile"))
    assert profile.model_hash == graph.structural_hash, "the validation profile is stale"
    cluster = parse_cluster_spec("local-cpu:procs=4")
    searcher = Searcher(graph, cluster, SearchOptions(global_batch=16), profile)
    best = searcher.run().best
    model = CostModel(graph, cluster, profile)
    plans = json.loads((VALIDATION / "summary.json").read_text())["plans"]
    for row in plans:
        plan = uniform_plan(row["plan"], graph, cluster.gpus, 16, cluster.spec)
        estimate = model.estimate(plan)
        assert searcher.lower_bound(_outer(plan)) <= estimate.step_time_s * (1 + 1e-9), row
        if estimate.fits:
            assert best.estimate.step_time_s <= estimate.step_time_s * (1 + 1e-9), row


def _head_heavy(blocks: int) -> LayerGraph:
    """Identical blocks and an output head that computes as much as 5 of them."""
    block = synthetic_block(0)
    head = LayerNode(name="head", kind="head", module_type="Linear", signature="h",
                     params=block.params, shared_params=0, param_bytes=block.param_bytes,
                     fwd_flops=5 * block.fwd_flops, bwd_flops=5 * block.bwd_flops,
                     act_bytes=block.act_bytes, act_bytes_fixed=0, input_bytes=block.input_bytes,
                     output_bytes=block.output_bytes, output_shape=(1, 8, 8),
                     fwd_io_bytes=block.fwd_io_bytes, bwd_io_bytes=block.bwd_io_bytes)
    return LayerGraph("head-heavy", "bfloat16", "flash", 1024,
                      (*(synthetic_block(i) for i in range(blocks)), head), ())


@pytest.mark.parametrize("pp", [2, 4])
def test_a_pipeline_cut_far_from_even_is_found(pp: int) -> None:
    """The best cut leaves the head's stage with few blocks (an even split +-1 would miss
    it): the search is no slower than any uniform plan cut at any blocks."""
    graph, cluster = _head_heavy(12), parse_cluster_spec(f"a100-80g:gpus={pp}")
    searcher = Searcher(graph, cluster, SearchOptions(global_batch=16, fix={"pp": pp}))
    best = searcher.run().best
    model = CostModel(graph, cluster)
    fastest = float("inf")
    for cuts in itertools.combinations(range(1, len(graph.nodes) - 1), pp - 1):
        plan = uniform_plan(f"pp={pp}", graph, pp, 16).model_copy(
            update={"stage_boundaries": [0, *cuts]})
        estimate = model.estimate(plan)
        assert searcher.lower_bound(_outer(plan)) <= estimate.step_time_s * (1 + 1e-9)
        if estimate.fits:
            fastest = min(fastest, estimate.step_time_s)
    even = model.estimate(uniform_plan(f"pp={pp}", graph, pp, 16))
    assert fastest < even.step_time_s  # the case is what it claims: uneven cuts pay
    assert best.estimate.step_time_s <= fastest * (1 + 1e-9)
    assert best.plan.stage_boundaries[-1] > 12 - 12 // pp  # the head's stage is short


def _send_heavy(blocks: int) -> LayerGraph:
    """Blocks whose outputs are as large as their saved activations: pipeline sends cost
    about as much as compute, so a bound that counted them twice would pass the step."""
    return LayerGraph("send-heavy", "bfloat16", "flash", 1024, tuple(
        replace(synthetic_block(i), output_bytes=4 * 10**9, input_bytes=4 * 10**9)
        for i in range(blocks)), ())


@pytest.mark.parametrize("shorthand", ["pp=2,virtual_stages=2", "pp=2,virtual_stages=3",
                                       "pp=2,virtual_stages=6", "pp=2", "pp=2,virtual_stages=4"])
def test_bounds_hold_where_pipeline_sends_cost_as_much_as_compute(shorthand: str) -> None:
    """Stages on nodes of their own: every send crosses the network. The device memory is
    taken as large as the pipeline's receive buffers of such outputs need (terabytes): the
    bound on time is what is checked, over plans that fit."""
    graph, cluster = _send_heavy(12), parse_cluster_spec("a100-80g:gpus=16")
    limit = 10 * 2**40
    searcher = Searcher(graph, cluster, SearchOptions(global_batch=32, memory_limit_bytes=limit))
    plan = uniform_plan(shorthand, graph, 16, 32)
    estimate = CostModel(graph, cluster, memory_limit_bytes=limit).estimate(plan)
    assert estimate.fits and estimate.breakdown["pp_comm"] > 0.2 * estimate.step_time_s
    assert searcher.lower_bound(_outer(plan)) <= estimate.step_time_s * (1 + 1e-9)
