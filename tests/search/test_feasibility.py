"""The executor's contract on the graph (autoplan/feasibility.py): tracing records what running
each layer needs, and the search never returns a plan that the executor's pre-check refuses.

The random models mix the patterns that break a wrapper around models nobody here wrote: a
tied head, a parameter outside every layer, a long skip connection, a side input that every
block takes (as a decoder takes the encoder's output) and a fused projection split in forward.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from autoplan.cluster import parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.executor import precheck
from autoplan.feasibility import plan_refusal, tie_groups
from autoplan.plan import check_plan, uniform_plan
from autoplan.search.dp import solve_dp
from autoplan.search.ilp import solve_ilp
from autoplan.search.problem import Option, Run, StageProblem, brute_force
from autoplan.search.search import Searcher, SearchOptions
from autoplan.tracing import layer_graph

VOCAB = 32


class _Block(nn.Module):
    def __init__(self, width: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(width if fused else 2 * width, width)
        self.width = width

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None:
            x = x + extra
        if self.fused:  # one projection split in two halves in forward (a fused gate/up)
            gate, value = self.up(x).split(self.width, dim=-1)
            return x + self.down(torch.sigmoid(gate) * value)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _RandomNet(nn.Module):
    def __init__(self, blocks: int, width: int, tokens: bool, tie: bool, loose: bool,
                 skip: bool, side: bool, fused: bool) -> None:
        super().__init__()
        self.tokens, self.skip, self.side = tokens, skip, side
        self.embed = nn.Embedding(VOCAB, width) if tokens else nn.Linear(6, width)
        self.blocks = nn.ModuleList(_Block(width, fused and i == 0) for i in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB if tokens else 4, bias=False)
        if tie and tokens:
            self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(width)) if loose else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.scale is not None:
            h = h * self.scale
        source, first = h, None
        for index, block in enumerate(self.blocks):
            extra = source if self.side else None
            if self.skip and index == len(self.blocks) - 1:
                extra = first
            h = block(h, extra)
            first = h if first is None else first
        return self.head(self.norm(h))

    def example(self, batch: int) -> tuple[torch.Tensor]:
        if self.tokens:
            return (torch.zeros(batch, 8, dtype=torch.long),)
        return (torch.zeros(batch, 8, 6),)


def _net(**recipe: object) -> tuple[_RandomNet, object]:
    with torch.device("meta"):
        model = _RandomNet(**recipe)
    graph = layer_graph(model, model.example, dtype=torch.float32, tokens_per_sample=8)
    return model, graph


def test_tracing_records_what_running_each_layer_needs() -> None:
    model, graph = _net(blocks=3, width=16, tokens=True, tie=True, loose=False, skip=True,
                        side=False, fused=True)
    nodes = {n.name: n for n in graph.nodes}
    assert tie_groups(graph.nodes) == [(graph.index["embed"], graph.index["head"])]
    assert nodes["head"].tie_group == "embed"
    assert "int64" in nodes["embed"].cut_refusal  # token ids are no activation
    # blocks.2 also takes blocks.0's output: no stage may start after blocks.0 up to it
    assert "layer blocks.2 also takes the output of blocks.0" in nodes["blocks.1"].cut_refusal
    assert "besides its first input" in nodes["blocks.2"].cut_refusal
    assert nodes["blocks.0"].cut_refusal == nodes["norm"].cut_refusal == ""
    # its projection is split in forward: tp leaves that pair whole (nothing to divide)
    assert nodes["blocks.0"].tp_divides == () and nodes["blocks.0"].tp_refusal == ""
    assert nodes["blocks.1"].tp_refusal == "" and nodes["blocks.1"].tp_divides == (32,)
    assert "CausalLM" not in nodes["loss"].layout_refusal
    assert graph.loose_params == ()


def test_side_inputs_and_loose_parameters_are_refused_with_their_reason() -> None:
    _, graph = _net(blocks=2, width=8, tokens=False, tie=False, loose=True, skip=False,
                    side=True, fused=False)
    assert graph.loose_params == ("scale",)
    assert "embed" in graph["blocks.1"].cut_refusal
    with pytest.raises(AutoplanError, match="cannot start at layer blocks.1: besides its "
                                            "first input it takes the output of embed"):
        check_plan(uniform_plan("pp=2", graph, 2, 4), graph, world_size=2)
    plan = uniform_plan("dp=2", graph, 2, 4)  # every stage holds loose parameters: one layout
    mixed = plan.model_copy(update={"layers": [
        layer.model_copy(update={"dp": 1, "tp": 2}) if layer.name == "head" else layer
        for layer in plan.layers]})
    with pytest.raises(AutoplanError, match="scale belong to no layer, so they have no layout"):
        check_plan(mixed, graph, world_size=2)


def test_refusals_name_the_layer_and_the_rule() -> None:
    _, graph = _net(blocks=2, width=12, tokens=True, tie=False, loose=False, skip=False,
                    side=False, fused=True)
    assert plan_refusal(uniform_plan("tp=2", graph, 2, 2), graph) is None
    why = plan_refusal(uniform_plan("tp=16", graph, 16, 16), graph)
    assert why is not None
    assert why.startswith("layer blocks.1: tp 16 does not divide 24 of the sizes")


def _problem(forbidden: bool) -> StageProblem:
    """Two runs whose fast options differ in layout: the cheap change between them is
    forbidden or costs 1."""
    a = Run(1, (Option(0, (1, 2), 1.0, 1.0), Option(1, (2, 1), 5.0, 1.0)))
    b = Run(1, (Option(0, (1, 2), 5.0, 1.0), Option(1, (2, 1), 1.0, 1.0)))
    cost = math.inf if forbidden else 1.0
    return StageProblem((a, b), ({((1, 2), (2, 1)): cost, ((2, 1), (1, 2)): cost},), 10.0)


@pytest.mark.parametrize("forbidden", [False, True])
def test_solvers_never_take_a_forbidden_layout_change(forbidden: bool) -> None:
    problem = _problem(forbidden)
    expected = brute_force(problem)
    assert expected.objective == (6.0 if forbidden else 3.0)
    for solution in (solve_dp(problem), solve_ilp(problem)):
        assert solution.objective == pytest.approx(expected.objective)
        assert solution.picks == expected.picks


_RECIPES = st.fixed_dictionaries({
    "blocks": st.integers(2, 4), "width": st.sampled_from([8, 12, 16]),
    "tokens": st.booleans(), "tie": st.booleans(), "loose": st.booleans(),
    "skip": st.booleans(), "side": st.booleans(), "fused": st.booleans()})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(recipe={"blocks": 2, "width": 8, "tokens": False, "tie": False, "loose": True,
                 "skip": False, "side": False, "fused": True}, gpus=4, per_gpu=1,
         fix={"pp": 2})  # found once: stages of one layout each, loose parameters beside
@given(recipe=_RECIPES, gpus=st.sampled_from([2, 4, 8]), per_gpu=st.sampled_from([1, 2]),
       fix=st.sampled_from([{}, {"pp": 2}, {"tp": 2}, {"dp": 1}]))
def test_every_plan_the_search_returns_passes_the_executor_precheck(
        recipe: dict, gpus: int, per_gpu: int, fix: dict) -> None:
    model, graph = _net(**recipe)
    options = SearchOptions(global_batch=gpus * per_gpu * 2, fix=fix, top_k=3)
    result = Searcher(graph, parse_cluster_spec(f"h100-sxm:gpus={gpus}"), options).run()
    found = [result.best, *result.runners_up, *result.baselines.values()]
    for candidate in (c for c in found if c is not None):
        assert plan_refusal(candidate.plan, graph) is None
        check_plan(candidate.plan, graph, world_size=gpus)
        precheck(model, candidate.plan, graph, world_size=gpus)


def test_tied_parameters_split_alike_and_embeddings_that_look_up_their_own_indices() -> None:
    """T5's embedding is tied into whole encoder/decoder units and a head that tp splits by
    rows: tp is refused there. BART's learned positions look up indices they make
    themselves: that unit stays whole under tp (nothing to divide) while its token
    embeddings split."""
    from autoplan.models import build_model
    from autoplan.tracing import layer_graph_of_built

    t5 = layer_graph_of_built(build_model("hf:tests/zoo/configs/t5.json,seq=32"))
    assert t5["encoder"].tie_group == t5["lm_head"].tie_group == "encoder"
    assert "shares a parameter with lm_head" in t5["encoder"].tp_refusal
    bart = layer_graph_of_built(build_model("hf:tests/zoo/configs/bart.json"))
    assert bart["model.encoder.embed_positions"].tp_divides == ()
    assert bart["model.encoder.embed_tokens"].tp_divides == (128,)
    assert plan_refusal(uniform_plan("tp=2", bart, 2, 2), bart) is None
