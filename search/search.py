"""`autoplan search`: the fastest plan that fits memory, over pipeline degree and stage
boundaries, micro-batch size, schedule and each layer's (dp, tp, sp, ZeRO, checkpointing).

The uniform plans of the space (uniform.py) are priced first: the best is the "grid"
baseline and the first incumbent. The outer settings (space.outer_settings: the plan space
estimate and the executor accept) are enumerated cheapest lower bound first and skipped once
their bound cannot beat the best plan found; every bound is a lower bound of every plan of
its setting (lower_bound, bounds.py; tests/search/test_bounds.py). Inside one, stage
boundaries come from a min-max dynamic program over the blocks that skips only cuts a bound
excludes, and each stage's layers from an exact solver of the stage problem (ilp.py or dp.py:
the sum over layers of m x time per micro-batch + time per step, under the stage's memory
budget). Every plan found is then priced by the full cost model, which has the last word:
the search is exact for the stage problem, the cost model for the plan.

Tied layers (feasibility.tie_groups: e.g. GPT's wte and lm_head, often on the first and the last
stage) must share one (dp, tp) layout (the executor refuses plans that split them). An outer
setting is first solved without the tie; when its plan keeps the tie it is also the best
that does (fixing layouts only removes options: the budget's reserve is taken over all of a
layer's choices either way). Otherwise each group's layout becomes one more outer choice:
every layout the group may take, with its own lower bound, is solved with the tied layers'
options fixed to it (StageProblem.restricted), and the untied plan is dropped. Stage problems
that hold no tied layer do not depend on that choice and stay cached.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from autoplan.cluster import Cluster
from autoplan.cost_model import (
    CostModel,
    Estimate,
    LayerCost,
    chunk_messages,
    chunks_in_flight,
    most_held,
    receive_share,
)
from autoplan.errors import AutoplanError
from autoplan.feasibility import (
    cut_refusal,
    last_layer,
    layout_change_refusal,
    plan_refusal,
    tie_groups,
)
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import (
    LayerPlan,
    LayerStrategy,
    Plan,
    Prediction,
    Provenance,
    pipeline_units,
    split_stages,
    stage_chunks,
)
from autoplan.profile import Profile
from autoplan.search.bounds import knapsack_floor
from autoplan.search.dp import solve_dp
from autoplan.search.ilp import solve_ilp
from autoplan.search.problem import Layout, Option, Run, StageProblem, StageSolution
from autoplan.search.space import (
    BLOCKS,
    Outer,
    SearchSpace,
    count_kinds,
    layer_strategies,
    outer_settings,
    plan_respects_fix,
)
from autoplan.search.uniform import UniformPoint, best_uniform, uniform_points
from autoplan.trainers import Trainer, block_indices, refusal, searchable, trainer
from autoplan.workload import CLI_DTYPES

__all__ = ["SearchOptions", "Candidate", "SearchResult", "Searcher", "SOLVERS",
           "MAX_GLOBAL_BATCH"]

SOLVERS = ("auto", "ilp", "dp")
DP_LAYERS = 16
"""auto: stage problems of at most this many layers go to the DP, which answers them in a
millisecond or two where the ILP takes tens; longer chains go to the ILP, whose size does
not grow with a run's length, unless they have DP_RUNS runs or more. Both are exact."""
DP_RUNS = 32
"""auto: stage problems of this many runs or more (an interleaved stage of many one-block
chunks) go to the DP too: the ILP's layout variables grow with the runs (measured: Llama 3
405B on 8,192 H100s searched in 19 s this way, 42 s with the ILP, same plan); but not where
the memory has several peaks (problem.Option.memory): the DP's fronts then hold points no
other beats at every peak, which grow fast with the peaks (measured: a 1T GPT on 512 A100
searched in 77 s with the DP, 8.3 s with the ILP, same plan)."""
MAX_GLOBAL_BATCH = 2**24
"""Samples per step the search takes at most (it enumerates the batch's divisors)."""
Ties = tuple[Layout, ...]
"""The layout of each group of tied layers (Searcher.ties), in group order; None where a
search leaves tied layers free (the first try of an outer setting)."""


@dataclass(frozen=True)
class SearchOptions:
    global_batch: int
    memory_limit_bytes: int | None = None
    max_tp: int | None = None
    """Default: the GPUs of a node."""
    fix: dict[str, Any] = field(default_factory=dict)
    solver: str = "auto"
    ilp_solver: str = "highs"
    time_limit_s: float = 30.0
    top_k: int = 3
    trainer: str | None = None
    """Also the fastest plan this trainer can express (autoplan.trainers)."""

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise AutoplanError(f"solver '{self.solver}' is not one of {', '.join(SOLVERS)}")
        if self.global_batch < 1 or self.top_k < 0:
            raise AutoplanError(f"global batch must be >= 1 and top-k >= 0; got "
                                f"{self.global_batch} and {self.top_k}")
        if self.global_batch > MAX_GLOBAL_BATCH:
            raise AutoplanError(f"global batch {self.global_batch} is too large; the search "
                                f"takes at most {MAX_GLOBAL_BATCH} samples per step")
        if not self.time_limit_s > 0:
            raise AutoplanError(f"time limit must be positive seconds, got {self.time_limit_s}")
        if self.trainer is not None:
            trainer(self.trainer)  # an unknown one is refused before the search runs


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    estimate: Estimate
    origin: str
    """"search" or the baseline it is: "ddp", "fsdp", "grid"."""


@dataclass(frozen=True)
class SearchResult:
    best: Candidate | None
    runners_up: list[Candidate]
    baselines: dict[str, Candidate | None]
    search_time_s: float
    outer_settings: int
    outer_solved: int
    stage_problems: int
    unproven: int = 0
    """Stage problems the ILP left at its time limit (a feasible answer, not proven best)."""
    worst_gap: float = 0.0
    """The largest relative optimality gap among those."""
    smallest_fitting_bytes: int | None = None
    """When nothing fits: the least device memory at which a plan tried would."""
    binding: str | None = None
    """When nothing fits: what that plan's memory is mostly made of."""
    trainer: Candidate | None = None
    """With SearchOptions.trainer: the fastest plan it can express that fits, else the one
    needing the least memory (None: it can express none here)."""


@dataclass(frozen=True)
class _Choice:
    """One strategy of one layer with its cost, ready to become an Option. The sums the
    search reads of a cost are taken once here: bounds read them for every outer setting."""

    strategy: LayerStrategy
    cost: LayerCost
    micro_batch_s: float = field(init=False)
    """cost.micro_batch_s."""
    tail_s: float = field(init=False)
    """cost.step_tail_s."""
    buffer_bytes: float = field(init=False)
    """cost.peak_extra_bytes."""
    receive_shares: tuple[float, float] = (0.0, 0.0)
    """Bytes of a pipeline message this choice's rank keeps per byte per sample, whole and
    where it moves sequence slices (cost_model receive_share)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "micro_batch_s", self.cost.micro_batch_s)
        object.__setattr__(self, "tail_s", self.cost.step_tail_s)
        object.__setattr__(self, "buffer_bytes", self.cost.peak_extra_bytes)

    @property
    def layout(self) -> Layout:
        return self.strategy.dp, self.strategy.tp

    def terms(self) -> tuple[float, ...]:
        """What the search sees of the choice besides its layout (_undominated), with the
        share of a pipeline message it receives (at a chunk's ends: _pipeline_bytes)."""
        return (self.micro_batch_s, self.tail_s, self.cost.state_bytes, self.cost.saved_bytes,
                self.cost.workspace_bytes, self.buffer_bytes, *self.receive_shares)


def _receive_shares(strategy: LayerStrategy, micro_batch_size: int) -> tuple[float, float]:
    return (receive_share(strategy, micro_batch_size, False),
            receive_share(strategy, micro_batch_size, True))


class Searcher:
    """Searches plans of one model on one cluster (build once, run once)."""

    def __init__(self, graph: LayerGraph, cluster: Cluster, options: SearchOptions,
                 profile: Profile | None = None, model: CostModel | None = None) -> None:
        """`model`: the cost model to price with, when another Searcher of the same graph,
        cluster, profile and memory limit has one (its caches are shared)."""
        self.graph, self.cluster, self.options, self.profile = graph, cluster, options, profile
        self.model = model or CostModel(graph, cluster, profile,
                                        memory_limit_bytes=options.memory_limit_bytes)
        self.budget = self.model.memory_limit_bytes - self.model.overhead_bytes
        max_tp = options.max_tp or cluster.gpus_per_node
        self.space = SearchSpace(max_tp, cluster.gpus_per_node, options.fix)
        # a pipeline chunk holds at least one layer besides the loss (plan.pipeline_units)
        self.max_chunks = sum(node.kind != "loss" for node in graph.nodes)
        self.last = last_layer(graph.nodes)
        # parameters outside every layer have no layout of their own: then every layer,
        # on every stage, takes one (a tie over the whole model)
        self.ties = [tuple(range(len(graph.nodes)))] if graph.loose_params \
            else tie_groups(graph.nodes)
        self._group_of = {i: g for g, group in enumerate(self.ties) for i in group}
        # (first layer, how many) of each signature and tie group: equal layers cost alike,
        # so bounds sum each kind once
        self.kinds = count_kinds(range(len(graph.nodes)), lambda i: (
            graph.nodes[i].signature, self._group_of.get(i)))
        self._choices: dict[tuple, list[_Choice]] = {}
        self._stages: dict[tuple, StageSolution] = {}
        self._sends: dict[tuple, float] = {}
        self._stage_sends: dict[tuple, float] = {}
        self._least: dict[tuple, tuple[float, float] | None] = {}
        self._kinds_in: dict[tuple, list[tuple[int, int]]] = {}
        self._chunks: dict[tuple[int, int], list[list[tuple[int, int]]]] = {}
        self._floor_options: dict[tuple, list[_Choice]] = {}
        self._ends: dict[tuple[int, int, bool], dict[int, tuple[float, ...]]] = {}
        self.candidates: list[Candidate] = []
        self._incumbent: Candidate | None = None
        self._layer_plans: dict[tuple[int, LayerStrategy], LayerPlan] = {}

    # ------------------------------------------------------------------------- driver

    def run(self, on_progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
        started = time.perf_counter()
        baselines = self._baselines()
        outers = outer_settings(self.cluster.gpus, self.options.global_batch, self.max_chunks,
                                self.space)
        solved = 0
        for done, (bound, outer) in enumerate(self._by_bound(outers), 1):
            if self._beats_best(bound):
                solved += 1
                self._search_outer(outer)
            if on_progress:
                on_progress(f"pp {outer.pp}, micro-batch {outer.micro_batch_size}, "
                            f"{outer.schedule}", done, len(outers))
        for_trainer = None
        if self.options.trainer:
            if on_progress:
                on_progress(f"the plans {trainer(self.options.trainer).title} can express", 0, 1)
            for_trainer = self._for_trainer()
        ranked = self._ranked()
        fitting = [c for c in ranked if c.estimate.fits]
        smallest, binding = (None, None) if fitting else self._smallest_fitting(ranked)
        return SearchResult(
            best=fitting[0] if fitting else None,
            runners_up=fitting[1:1 + self.options.top_k], baselines=baselines,
            search_time_s=time.perf_counter() - started, outer_settings=len(outers),
            outer_solved=solved, stage_problems=len(self._stages),
            unproven=sum(s.status == "time_limit" for s in self._stages.values()),
            worst_gap=max((s.gap for s in self._stages.values() if s.status == "time_limit"),
                          default=0.0),
            smallest_fitting_bytes=smallest, binding=binding, trainer=for_trainer)

    def _by_bound(self, outers: list[Outer]) -> Iterator[tuple[float, Outer]]:
        """`outers` with their lower bounds, by (bound, setting), as the caller solves them:
        each yielded bound is lower_bound's where it beats the best plan found when yielded,
        else a lower bound of it (then neither does). Where the stage floors make
        lower_bound slow (_fixed_chunks), a setting waits under _quick_bound, and its bound
        is taken only if that comes first and beats the best: once one cannot, no setting
        after it can (the best only gets faster), so most bounds are never taken. A bound
        taken comes first when it is no larger than the quick bounds left, which are no
        larger than their bounds: the order is the sorted one, but for bounds cut short
        at the best plan found (lower_bound's `enough`), which are never solved."""
        queue = [(self._quick_bound(o), o, False) if self._floored(o)
                 else (self.lower_bound(o), o, True) for o in outers]
        heapq.heapify(queue)
        while queue:
            bound, outer, exact = heapq.heappop(queue)
            if exact or not self._beats_best(bound):
                yield bound, outer
            else:
                heapq.heappush(queue, (self.lower_bound(outer, enough=self._best_time()),
                                       outer, True))

    def _ranked(self) -> list[Candidate]:
        """Distinct plans that keep --fix, fastest first; ties broken by the plan's text
        (deterministic)."""
        seen, out = set(), []
        eligible = [c for c in self.candidates
                    if plan_respects_fix(self.graph.nodes, c.plan, self.options.fix)]
        for c in sorted(eligible, key=lambda c: (c.estimate.step_time_s, _plan_key(c.plan))):
            key = _plan_key(c.plan)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out

    def _best(self) -> Candidate | None:
        return self._incumbent

    def _beats_best(self, bound: float) -> bool:
        """Whether a plan of lower bound `bound` could beat the best plan found."""
        best = self._best()
        return best is None or bound < best.estimate.step_time_s

    def _best_time(self) -> float:
        """The step time of the best plan found (inf before one)."""
        best = self._best()
        return math.inf if best is None else best.estimate.step_time_s

    def _search_outer(self, outer: Outer) -> None:
        """Add the best plan of `outer` that keeps the ties: the untied optimum when it
        keeps them, else the optimum of each tie layout whose bound can beat the best."""
        found = self._solve_outer(outer, None)
        if found is None:
            return  # fixing layouts only removes options: no tie layout fits either
        if self._keeps_ties(found[1]):
            self._add(outer, found[0], self._layer_plans_of(found[1]), "search")
            return
        enough = self._best_time()  # a bound cut short there is never solved: order kept
        for bound, ties in sorted((self.lower_bound(outer, t, enough), t)
                                  for t in self._tie_layouts(outer)):
            if self._beats_best(bound):
                found = self._solve_outer(outer, ties)
                if found is not None:
                    self._add(outer, found[0], self._layer_plans_of(found[1]), "search")

    def _keeps_ties(self, strategies: list[LayerStrategy]) -> bool:
        """Whether each tie group's layers share one (dp, tp) in `strategies`."""
        return all(len({(strategies[i].dp, strategies[i].tp) for i in group}) == 1
                   for group in self.ties)

    # ------------------------------------------------------------------------- layers

    def _layer_choices(self, i: int, outer: Outer, stage: int) -> list[_Choice]:
        """The strategies of layer i in `outer`, with dominated ones dropped: same layout,
        no faster, and no smaller in any memory term."""
        key = self._choice_key(i, outer, stage)
        if key not in self._choices:
            node, (_, _, stage_gpus, _, last) = self.graph.nodes[i], key
            strategies = layer_strategies(node, stage_gpus, outer.micro_batch_size, self.space,
                                          last)
            m = self.options.global_batch // outer.micro_batch_size
            choices = [_Choice(s, self.model.layer_cost(node, s, outer.micro_batch_size, m,
                                                        stage),
                               _receive_shares(s, outer.micro_batch_size))
                       for s in strategies]
            self._choices[key] = _undominated(choices)
        return self._choices[key]

    def _choice_key(self, i: int, outer: Outer, stage: int) -> tuple:
        """What layer i's choices depend on: its signature, whether it holds tied weights
        (past the first stage: CostModel.layer_cost), the stage's GPUs, the micro-batch
        size, and whether it is the last layer."""
        node = self.graph.nodes[i]
        return (node.signature, stage > 0 and node.shared_params > 0,
                self.cluster.gpus // outer.pp, outer.micro_batch_size, i == self.last)

    def _fixed_layout(self, i: int, ties: Ties | None) -> Layout | None:
        """The layout `ties` gives layer i, or None when it is in no tie group (or free)."""
        group = self._group_of.get(i)
        return None if group is None or ties is None else ties[group]

    def _allowed_choices(self, i: int, outer: Outer, stage: int,
                         ties: Ties | None) -> list[_Choice]:
        """Layer i's choices within the layout `ties` fixes for it (all when none)."""
        fixed = self._fixed_layout(i, ties)
        return [c for c in self._layer_choices(i, outer, stage)
                if fixed is None or (c.strategy.dp, c.strategy.tp) == fixed]

    def _tie_layouts(self, outer: Outer) -> list[Ties]:
        """Every assignment of a layout to each tie group that all its layers may take in
        `outer`."""
        per_group = []
        for group in self.ties:
            common = set.intersection(*({(c.strategy.dp, c.strategy.tp)
                                         for c in self._layer_choices(i, outer, 0)}
                                        for i in group))
            per_group.append(sorted(common))
        return list(itertools.product(*per_group))

    def lower_bound(self, outer: Outer, ties: Ties | None = None,
                    enough: float = math.inf) -> float:
        """No plan of `outer` with tied layers on `ties` is faster (CostModel.step_bound_s):
        its stages take together at least each layer's fastest time per micro-batch plus
        the pipeline's sends at their cheapest (_sends_floor), and the slowest stage's tail is
        at least the mean of the layers' least tails. Where the stages' layers are known
        before solving (no pipeline, or interleaved chunks as split_stages cuts them), each
        stage takes at least the fastest its layers can be within the memory
        (bounds.knapsack_floor). inf when a layer has no choice or a stage cannot fit.
        `enough`: once the floors of the stages so far bound the step at `enough` or more,
        that bound (shrunk by 1e-9, as _quick_bound's) is returned: a caller asking whether
        a plan of `outer` can beat one that fast needs no more, and floors are slow."""
        least = self._least_sums(outer, ties)
        if least is None:
            return math.inf
        per_micro_batch, tail = least
        per_micro_batch += self._sends_floor(outer)
        floors: list[tuple[float, float]] = []
        if self._floored(outer):  # the floors hold the sends too
            stages = self._fixed_chunks(outer)
            for stage, chunks in enumerate(stages):
                floors.append(self._stage_floors(outer, stage, chunks, ties))
                if stage + 1 < len(stages) and enough < math.inf:
                    partial = self._floored_bound(outer, floors, per_micro_batch, tail)
                    if partial * (1 - 1e-9) >= enough:
                        return partial * (1 - 1e-9)
        return self._floored_bound(outer, floors, per_micro_batch, tail)

    def _floored_bound(self, outer: Outer, floors: list[tuple[float, float]],
                       per_micro_batch: float, tail: float) -> float:
        """lower_bound's step bound from the floors (time, objective) of the first stages
        (none: no stage is known) and the layers' sums: the other stages add at least 0."""
        m = self.options.global_batch // outer.micro_batch_size
        slowest, paced = 0.0, 0.0
        if any(math.isinf(time) for time, _ in floors):  # a stage that cannot fit
            return math.inf
        if floors:
            times = [time for time, _ in floors]
            slowest, per_micro_batch = max(times), max(per_micro_batch, sum(times))
            paced = self.model.paced_bound_s(floors, outer.virtual_stages)
        return max(paced, self.model.step_bound_s(slowest, per_micro_batch, m, outer.pp,
                                                  outer.virtual_stages, tail / outer.pp))

    def _floored(self, outer: Outer) -> bool:
        """Whether lower_bound bounds each stage of `outer` (its layers are known before
        solving: no pipeline, or interleaved chunks as split_stages cuts them)."""
        return outer.pp == 1 or outer.virtual_stages > 1

    def _quick_bound(self, outer: Outer) -> float:
        """A lower bound of lower_bound(outer) without the stage floors: its step bound with
        no slowest stage, the layers' least sums and each chunk boundary's two sends at the
        cheapest of any layer (_sends_floor sends each at its own layer), which the floors
        only raise. Shrunk by 1e-9: lower_bound sums the same terms in other float
        roundings."""
        least = self._least_sums(outer, None)
        if least is None:
            return math.inf
        m = self.options.global_batch // outer.micro_batch_size
        per_micro_batch, tail = least
        sends = 2 * (outer.pp * outer.virtual_stages - 1) * self._least_send(outer) \
            if outer.pp > 1 else 0.0
        bound = self.model.step_bound_s(0.0, per_micro_batch + sends, m, outer.pp,
                                        outer.virtual_stages, tail / outer.pp)
        return bound * (1 - 1e-9)

    def _least_sums(self, outer: Outer, ties: Ties | None) -> tuple[float, float] | None:
        """The sums over the layers of each one's least time per micro-batch and least tail
        in `outer`, None when a layer has no choice. Cached: they depend on the stage's GPUs
        and the micro-batch size only, which many outer settings share."""
        key = (outer.pp, outer.micro_batch_size, ties)
        if key not in self._least:
            per_micro_batch = tail = 0.0
            for i, count in self.kinds:
                choices = self._allowed_choices(i, outer, 0, ties)
                if not choices:
                    self._least[key] = None
                    return None
                per_micro_batch += count * min(c.micro_batch_s for c in choices)
                tail += count * min(c.tail_s for c in choices)
            self._least[key] = (per_micro_batch, tail)
        return self._least[key]

    def _fixed_chunks(self, outer: Outer) -> list[list[tuple[int, int]]]:
        """The chunks [first, last) of each stage where the plan space fixes them: one
        holding every layer without a pipeline; as split_stages cuts them when interleaved.
        Cached by pipeline degree and virtual stages, all they depend on: bounds ask for
        them at every micro-batch size."""
        key = (outer.pp, outer.virtual_stages)
        if key not in self._chunks:
            self._chunks[key] = stage_chunks(split_stages(self.graph, key[0] * key[1]),
                                             len(self.graph.nodes), key[0])
        return self._chunks[key]

    def _stage_floors(self, outer: Outer, stage: int, chunks: list[tuple[int, int]],
                      ties: Ties | None, sends: bool = True) -> tuple[float, float]:
        """The least time per micro-batch stage `stage` can take holding chunks [first,
        last) within the device's memory, its sends included (_chunk_sends), and the least
        m x that + its time per step (the stage problem's objective): bounds.knapsack_floor
        over what every plan's peak memory holds at least (state, saved x the micro-batches
        its chunk holds, fixed and workspace bytes: cost_model.memory.stage_memory) at one
        of the stage's peaks (a relaxation of the stage problem, which keeps them all):
        the one where the chunks' least saved bytes weigh most."""
        m = self.options.global_batch // outer.micro_batch_size
        kinds = [[(count, self._floor_choices(i, outer, stage, ties))
                  for i, count in self._floor_kinds(chunk, ties)] for chunk in chunks]
        least = [sum(count * min(c.cost.saved_bytes for c in choices)
                     for count, choices in chunk) for chunk in kinds]
        held = most_held(chunks_in_flight(outer.schedule, outer.pp, stage, m,
                                          outer.virtual_stages), least)
        items = [(count, [(c.cost.state_bytes + n * c.cost.saved_bytes + c.cost.fixed_bytes
                           + c.cost.workspace_bytes, c.micro_batch_s,
                           m * c.micro_batch_s + c.tail_s) for c in choices])
                 for n, chunk in zip(held, kinds, strict=True) for count, choices in chunk]
        # + 1: estimate rounds each stage's peak down to whole bytes
        budget = self.model.memory_limit_bytes - self.model.overhead_bytes + 1 \
            - self._pipeline_floor(outer, stage, chunks, m, held, sends)
        time, objective = (knapsack_floor([(count, [(o[0], o[term]) for o in options])
                                           for count, options in items], budget)
                           for term in (1, 2))
        sent = self._chunk_sends(outer, chunks) if sends else 0.0
        return time + sent, objective + m * sent

    def _pipeline_floor(self, outer: Outer, stage: int, chunks: list[tuple[int, int]], m: int,
                        held: tuple[int, ...], with_end: bool) -> float:
        """The least pipeline buffer bytes the stage's chunks keep, chunk c holding held[c]
        micro-batches, over every choice of their end layers (_chunk_ends; `with_end`
        False: their starts only)."""
        total = 0.0
        for n, (first, last) in zip(held, chunks, strict=True):
            for i, ends in self._chunk_ends(outer, first, last, with_end).items():
                total += min(_kept(ends, c, m, n) for c in self._layer_choices(i, outer, stage))
        return total

    def _floor_kinds(self, chunk: tuple[int, int],
                     ties: Ties | None) -> list[tuple[int, int]]:
        """(first layer, how many) of each kind of layer in chunk [first, last), in layer
        order: layers of one kind have the same choices on any stage (_layer_choices' key)
        and tie layout. Cached: they depend on the chunk and ties only, which many outer
        settings and stages share (_stage_floors)."""
        key = (chunk, ties)
        if key not in self._kinds_in:
            nodes = self.graph.nodes
            self._kinds_in[key] = count_kinds(
                range(*chunk),
                lambda i: (nodes[i].signature, nodes[i].shared_params > 0,
                           self._fixed_layout(i, ties), i == self.last))
        return self._kinds_in[key]

    def _floor_choices(self, i: int, outer: Outer, stage: int,
                       ties: Ties | None) -> list[_Choice]:
        """Layer i's allowed choices (_allowed_choices) but those another of any layout beats
        on time, tail, state, saved and workspace bytes: the knapsack floors see no layout,
        and a beaten option is never on the lower hull of (memory, time) at any micro-batches
        held (both only grow with those terms), so it changes no floor."""
        key = (self._choice_key(i, outer, stage), self._fixed_layout(i, ties))
        if key not in self._floor_options:
            self._floor_options[key] = _undominated(
                self._allowed_choices(i, outer, stage, ties),
                terms=lambda c: (c.micro_batch_s, c.tail_s, c.cost.state_bytes,
                                 c.cost.saved_bytes, c.cost.workspace_bytes),
                group=lambda c: None)
        return self._floor_options[key]

    def _sends_floor(self, outer: Outer) -> float:
        """The least time the pipeline's sends of one micro-batch take in `outer`: each
        chunk boundary sends the output of the layer before it forward and its gradient
        back (CostModel._hops). Interleaved chunks are cut where split_stages cuts them;
        elsewhere a boundary may follow any layer."""
        if outer.pp == 1:
            return 0.0
        if outer.virtual_stages > 1:
            return sum(self._chunk_sends(outer, chunks)
                       for chunks in self._fixed_chunks(outer))
        return 2 * (outer.pp - 1) * self._least_send(outer)

    def _least_send(self, outer: Outer) -> float:
        """The cheapest send of any layer's output in `outer` (_cheapest_send)."""
        return min(self._cheapest_send(outer, i) for i, _ in self.kinds)

    def _chunk_sends(self, outer: Outer, chunks: list[tuple[int, int]]) -> float:
        """The least time the sends of one micro-batch take at the ends of chunks
        [first, last) of one stage: its output forward unless it ends the model, its
        input's gradient back unless it starts it (CostModel._hops). Cached by pipeline
        degree, micro-batch and chunks: bounds ask it for every stage of many settings."""
        if outer.pp == 1:
            return 0.0
        key = (outer.pp, outer.micro_batch_size, *chunks)
        if key not in self._stage_sends:
            layers = len(self.graph.nodes)
            self._stage_sends[key] = sum(
                (self._cheapest_send(outer, last - 1) if last < layers else 0.0)
                + (self._cheapest_send(outer, first - 1) if first > 0 else 0.0)
                for first, last in chunks)
        return self._stage_sends[key]

    def _cheapest_send(self, outer: Outer, i: int) -> float:
        """Layer i's output sent once, at the cheapest of its choices (a send's cost depends
        on the layer's dp and tp: CostModel.hop_s)."""
        stage_gpus = self.cluster.gpus // outer.pp
        key = (self.graph.nodes[i].signature, i == self.last, stage_gpus,
               outer.micro_batch_size)
        if key not in self._sends:
            self._sends[key] = min((self.model.hop_s(self.graph.nodes[i], c.strategy,
                                                     outer.micro_batch_size, stage_gpus)
                                    for c in self._layer_choices(i, outer, 0)), default=0.0)
        return self._sends[key]

    def _least_times(self, outer: Outer, ties: Ties | None) -> list[float]:
        """Prefix sums over the layers of each one's fastest time per micro-batch in `outer`:
        a stage of layers a..b-1 takes at least [b] - [a] per micro-batch."""
        sums = [0.0]
        for i in range(len(self.graph.nodes)):
            choices = self._allowed_choices(i, outer, 0, ties)
            least = min((c.micro_batch_s for c in choices), default=math.inf)
            sums.append(sums[-1] + least)
        return sums

    # ------------------------------------------------------------------------- stages

    def _solve_outer(self, outer: Outer,
                     ties: Ties | None) -> tuple[list[int], list[LayerStrategy]] | None:
        """The stage boundaries and layer strategies of `outer`'s best plan with tied layers
        on `ties`, or None when nothing fits."""
        if outer.pp == 1:
            chunks_of = {0: [list(range(len(self.graph.nodes)))]}
        elif outer.virtual_stages > 1:
            starts = split_stages(self.graph, outer.pp * outer.virtual_stages)
            if any(cut_refusal(self.graph, b) for b in starts[1:]):
                return None
            chunks_of = {s: [list(range(a, b)) for a, b in chunks]
                         for s, chunks in enumerate(self._fixed_chunks(outer))}
        else:
            chunks_of = self._partition(outer, ties)
            if chunks_of is None:
                return None
        picks: dict[int, LayerStrategy] = {}
        for stage, chunks in chunks_of.items():
            solution, layers = self._stage(outer, stage, chunks, ties)
            if not solution.feasible:
                return None
            for i, strategy in zip(layers, _flatten(solution, self, outer, stage, layers),
                                   strict=True):
                picks[i] = strategy
        # chunk c runs on stage c mod pp, as its (c div pp)-th chunk
        boundaries = [chunks_of[c % outer.pp][c // outer.pp][0]
                      for c in range(outer.pp * outer.virtual_stages)]
        return boundaries, [picks[i] for i in range(len(self.graph.nodes))]

    def _stage(self, outer: Outer, stage: int, chunks: list[list[int]],
               ties: Ties | None, with_end: bool = True) -> tuple[StageSolution, list[int]]:
        """Solve (cached) the stage problem of the layers in `chunks` on stage `stage`, tied
        layers on their layouts in `ties` (the key holds only the layouts of tied layers
        present, so stages without any share one solution across tie choices), and the
        pipeline buffers at the chunks' ends (_chunk_ends)."""
        m = self.options.global_batch // outer.micro_batch_size
        held = chunks_in_flight(outer.schedule, outer.pp, stage, m, outer.virtual_stages)
        layers = [i for chunk in chunks for i in chunk]
        nodes = self.graph.nodes
        key = (outer, held, stage > 0, with_end,
               tuple((nodes[chunk[0] - 1].signature if chunk and chunk[0] else None,
                      nodes[chunk[-1] + 1].signature if chunk and chunk[-1] + 1 < len(nodes)
                      else None,
                      *((nodes[i].signature, self._fixed_layout(i, ties)) for i in chunk))
                     for chunk in chunks))
        if key not in self._stages:
            kept = self._free_keeps(outer, stage, chunks, ties, with_end)
            self._stages[key] = kept or self._solve(self._problem(outer, stage, chunks, m,
                                                                  held, ties, with_end))
        return self._stages[key], layers

    def _free_keeps(self, outer: Outer, stage: int, chunks: list[list[int]],
                    ties: Ties | None, with_end: bool) -> StageSolution | None:
        """The stage's solution with tied layers free when it is also the answer with them
        on `ties` (it is infeasible, or already puts them there: fixing layouts only removes
        options), which saves a solve; else None."""
        if ties is None:
            return None
        free, layers = self._stage(outer, stage, chunks, None, with_end)
        if not free.feasible:
            return free
        strategies = _flatten(free, self, outer, stage, layers)
        if all(self._fixed_layout(i, ties) in (None, (s.dp, s.tp))
               for i, s in zip(layers, strategies, strict=True)):
            return free
        return None

    def _solve(self, problem: StageProblem) -> StageSolution:
        solver = self.options.solver
        if solver == "auto":
            layers = sum(run.count for run in problem.runs)
            solver = "dp" if layers <= DP_LAYERS or (len(problem.runs) >= DP_RUNS
                                                     and problem.peaks == 1) else "ilp"
        if solver == "dp":
            return solve_dp(problem)
        return solve_ilp(problem, self.options.time_limit_s, self.options.ilp_solver)

    def _chunk_ends(self, outer: Outer, first: int, last: int,
                    with_end: bool) -> dict[int, tuple[float, float, float, float]]:
        """Layer -> the bytes per sample of the pipeline messages its rank keeps for chunk
        [first, last) (cost_model chunk_messages): (whole, sequence-sliced) kept for every
        micro-batch of the step, then (whole, sliced) per micro-batch in flight; a choice
        costs them as _kept says, as CostModel._pipeline_bytes prices them. `with_end`
        False leaves out those at the chunk's end (a longer stage may end at a smaller
        output). Cached: many outer settings cut the same chunks."""
        if outer.pp == 1:
            return {}
        key = (first, last, with_end)
        if key not in self._ends:
            nodes, ends = self.graph.nodes, {}
            for msg in chunk_messages(nodes, first, last):
                if msg.at_end and not with_end:
                    continue
                at = (0 if msg.per_step else 2) + msg.sliced
                terms = list(ends.get(msg.layer, (0.0,) * 4))
                terms[at] += nodes[msg.sent].output_bytes
                ends[msg.layer] = tuple(terms)
            self._ends[key] = ends
        return self._ends[key]

    def _problem(self, outer: Outer, stage: int, chunks: list[list[int]], m: int,
                 held: tuple[tuple[int, ...], ...], ties: Ties | None,
                 with_end: bool = True) -> StageProblem:
        """Runs of identical consecutive layers (tied ones apart); option time = m x per
        micro-batch + per step; memory at each peak (a vector of `held`: the micro-batches
        each chunk holds) = state + held x saved + fixed + workspace + pipeline buffers at
        the chunks' ends (_chunk_ends). The budget keeps room for the largest transient,
        FSDP prefetch and reduce buffers any choice could bring (conservative; over all
        choices, so fixing tied layers' layouts, done last, only removes options)."""
        runs: list[Run] = []
        edges: list[dict] = []
        fixed: dict[int, Layout] = {}
        worst = 0.0
        for at, chunk in enumerate(chunks):
            start = len(runs)
            ends = self._chunk_ends(outer, chunk[0], chunk[-1] + 1, with_end) if chunk else {}
            for i in chunk:
                node = self.graph.nodes[i]
                choices = self._layer_choices(i, outer, stage)
                worst = max([worst, *(c.buffer_bytes for c in choices)])
                # one run: layers with the same choices (_layer_choices' key) and tie group;
                # a layer at a chunk's end (its pipeline buffers) is a run of its own on the
                # layout of the one it would have joined (the edge forbids a change)
                before = self.graph.nodes[i - 1]
                same = (len(runs) > start and before.signature == node.signature
                        and self._group_of.get(i - 1) == self._group_of.get(i)
                        and (before.shared_params > 0) == (node.shared_params > 0)
                        and i != self.last)
                if same and i not in ends and i - 1 not in ends:
                    runs[-1] = Run(runs[-1].count + 1, runs[-1].options)
                    continue
                options = _pareto_options([
                    Option(k, (choice.strategy.dp, choice.strategy.tp),
                           m * choice.micro_batch_s + choice.tail_s,
                           tuple(choice.cost.state_bytes + peak[at] * choice.cost.saved_bytes
                                 + choice.cost.fixed_bytes + choice.cost.workspace_bytes
                                 + _kept(ends.get(i), choice, m, peak[at]) for peak in held))
                    for k, choice in enumerate(choices)])
                if same:
                    edges.append({(a, b): math.inf for a in runs[-1].layouts()
                                  for b in {o.layout for o in options} if a != b})
                elif len(runs) > start:
                    edges.append(self._edge(node, runs[-1], options, outer, m))
                elif runs:
                    edges.append({})
                layout = self._fixed_layout(i, ties)
                if layout is not None:
                    fixed[len(runs)] = layout
                runs.append(Run(1, options))
        return StageProblem(tuple(runs), tuple(edges), self.budget - worst).restricted(fixed)

    def _edge(self, node: LayerNode, before: Run, after: tuple[Option, ...], outer: Outer,
              m: int) -> dict:
        """Resharding cost between two runs by their layouts; a change the executor cannot
        make at `node` costs infinity (the solvers forbid it)."""
        costs = {}
        pinned = layout_change_refusal(self.graph, self.graph.index[node.name]) is not None
        for a in {o.layout for o in before.options}:
            for b in {o.layout for o in after}:
                if a != b and pinned:
                    costs[a, b] = math.inf
                elif a != b:
                    costs[a, b] = m * self.model.reshard_s(
                        node, LayerStrategy(dp=a[0], tp=a[1]), LayerStrategy(dp=b[0], tp=b[1]),
                        outer.micro_batch_size)
        return costs

    def _partition(self, outer: Outer, ties: Ties | None) -> dict[int, list[list[int]]] | None:
        """Stage boundaries by dynamic programming over the pipeline units: minimise the
        slowest stage's objective, its pipeline sends included (then the sum). Every cut the
        executor accepts is tried but two kinds, skipped by proof: a stage whose layers' least
        times already make every plan holding it no faster than the best found
        (_may_beat_best), and a stage longer than one that does not fit at the same start (it
        holds all of its layers)."""
        pp, layers = outer.pp, len(self.graph.nodes)
        m = self.options.global_batch // outer.micro_batch_size
        units = pipeline_units(self.graph, pp)
        n, least = len(units), self._least_times(outer, ties)
        # best[k][j]: (slowest, total, starts) for k stages over the first j units
        best: list[dict[int, tuple[float, float, tuple[int, ...]]]] = [{0: (0.0, 0.0, ())}]
        for k in range(pp):
            row: dict[int, tuple[float, float, tuple[int, ...]]] = {}
            for j0, (slowest, total, starts) in sorted(best[k].items()):
                first = 0 if k == 0 else units[j0]
                if cut_refusal(self.graph, first):
                    continue
                ends = [n] if k == pp - 1 else range(j0 + 1, n - (pp - k - 1) + 1)
                for j1 in ends:
                    last = layers if j1 == n else units[j1]
                    verdict = self._may_beat_best(outer, least, first, last, k, ties)
                    if verdict == "longer":
                        continue
                    if verdict == "never":
                        break
                    solution, _ = self._stage(outer, k, [list(range(first, last))], ties)
                    if not solution.feasible:
                        # a longer stage holds at least this one's layers but another end
                        if not self._stage(outer, k, [list(range(first, last))], ties,
                                           with_end=False)[0].feasible:
                            break
                        continue
                    # with its pipeline sends, as the estimate times a stage (CostModel._hops)
                    objective = solution.objective + m * self._chunk_sends(outer, [(first, last)])
                    value = (max(slowest, objective), total + objective, (*starts, first))
                    if j1 not in row or value < row[j1]:
                        row[j1] = value
            best.append(row)
        if n not in best[pp]:
            return None
        starts = [*best[pp][n][2], layers]
        return {s: [list(range(starts[s], starts[s + 1]))] for s in range(pp)}

    def _may_beat_best(self, outer: Outer, least: list[float], first: int, last: int,
                       stage: int, ties: Ties | None) -> str:
        """Whether a plan of `outer` whose stage `stage` holds layers first..last-1 can beat
        the best plan found: its slowest stage is at least this one (at least its least time
        within memory, _stage_floors), the mean of the stages before it and the mean of
        those after (least: prefix sums of least times); and its step is at least this
        stage's m x time + tail plus the other layers' least times (paced_bound_s). "yes";
        "longer" when only a longer stage could (the stages after are too slow); "never"
        when no stage from `first` of this length or longer can (both floors only grow
        with the stage: a layer added brings at least its least time to the first and
        takes as much from the second)."""
        incumbent = self._best()
        if incumbent is None:
            return "yes"
        m = self.options.global_batch // outer.micro_batch_size
        after = outer.pp - stage - 1
        mine = least[last] - least[first]
        # sends at its start only: those at its end could shrink as the stage grows
        floor, objective = self._stage_floors(outer, stage, [(first, last)], ties, sends=False)
        start = self._cheapest_send(outer, first - 1) if first > 0 else 0.0
        floor, objective = floor + start, objective + m * start
        before = least[first] / stage if stage else 0.0
        rest = (least[-1] - least[last]) / after if after else 0.0

        def beats(slowest: float) -> bool:
            return self.model.step_bound_s(slowest, least[-1], m, outer.pp, 1,
                                           0.0) < incumbent.estimate.step_time_s

        paced = self.model.paced_bound_s([(floor, objective), (least[-1] - mine, 0.0)], 1)
        if paced >= incumbent.estimate.step_time_s or not beats(max(floor, before)):
            return "never"
        return "yes" if beats(max(floor, before, rest)) else "longer"

    # ------------------------------------------------------------------------- plans

    def _add(self, outer: Outer, boundaries: list[int], layers: list[LayerPlan],
             origin: str) -> Candidate | None:
        candidate = self._priced(outer, boundaries, layers, origin)
        self.candidates.append(candidate)
        best, estimate, plan = self._incumbent, candidate.estimate, candidate.plan
        if estimate.fits and (best is None or estimate.step_time_s < best.estimate.step_time_s) \
                and plan_respects_fix(self.graph.nodes, plan, self.options.fix):
            self._incumbent = candidate
        return candidate

    def _priced(self, outer: Outer, boundaries: list[int], layers: list[LayerPlan],
                origin: str) -> Candidate:
        """The plan, with the cost model's estimate."""
        m = self.options.global_batch // outer.micro_batch_size
        plan = Plan(
            model=self.graph.model, model_hash=self.graph.structural_hash,
            cluster=self.cluster.spec, world_size=self.cluster.gpus,
            global_batch=self.options.global_batch, micro_batch_size=outer.micro_batch_size,
            num_micro_batches=m, pp=outer.pp, virtual_stages=outer.virtual_stages,
            schedule=outer.schedule, stage_boundaries=boundaries,
            layers=layers,
            provenance=Provenance(profile_hash=self.profile.content_hash if self.profile
                                  else None))
        estimate = self.model.estimate(plan)
        plan = plan.model_copy(update={"prediction": Prediction(
            step_time_s=estimate.step_time_s, tokens_per_s=estimate.tokens_per_s,
            mfu=estimate.mfu, peak_memory_bytes=estimate.peak_memory_bytes)})
        return Candidate(plan, estimate, origin)

    def _layer_plans_of(self, strategies: list[LayerStrategy]) -> list[LayerPlan]:
        return [self._layer_plan(i, s) for i, s in enumerate(strategies)]

    def _layer_plan(self, i: int, strategy: LayerStrategy) -> LayerPlan:
        """Layer i's LayerPlan under `strategy`, made once (plans share them; they are
        frozen)."""
        key = (i, strategy)
        if key not in self._layer_plans:
            self._layer_plans[key] = _as_layer(self.graph.nodes[i], strategy)
        return self._layer_plans[key]

    def _baselines(self) -> dict[str, Candidate | None]:
        """Pure DDP, pure FSDP (ZeRO 3) and the best uniform plan ("grid"), each the fastest
        of its family that fits, else the one needing the least memory (search/uniform.py).
        """
        points = uniform_points(self.graph, self.model, self.space, self.cluster.gpus,
                                self.options.global_batch)
        return best_uniform(
            self.graph, self.model, points, self.options.global_batch,
            refused=lambda plan: plan_refusal(plan, self.graph) is not None,
            price=lambda point, bounds, layers: self._add(point.outer, bounds, layers,
                                                          point.families[0]),
            layer_plan=self._layer_plan)

    def _for_trainer(self) -> Candidate | None:
        """The fastest plan the trainer of SearchOptions can express, among the uniform
        plans (search/uniform.py) of the strategies and schedules it runs, checkpointing only
        the blocks: stages cut as plan.split_stages cuts them, which it must accept
        (trainers.refusal), and where it takes any cut, each cut of the search's space
        (_free_cuts). Kept apart from the search's own candidates.

        Raises:
            AutoplanError: when the trainer does not train in the graph's dtype.
        """
        t = trainer(self.options.trainer)
        dtype = CLI_DTYPES.get(self.graph.dtype, self.graph.dtype)
        if dtype not in t.dtypes:
            raise AutoplanError(f"--for {t.name}: {t.title} trains in "
                                f"{' or '.join(t.dtypes)}, not {dtype}")
        blocks = frozenset(block_indices([node.name for node in self.graph.nodes]))
        points = uniform_points(
            self.graph, self.model, self.space, self.cluster.gpus, self.options.global_batch,
            trainer=lambda outer, s: searchable(t, outer.pp, outer.schedule, s),
            family=t.name, blocks=blocks)
        found = best_uniform(
            self.graph, self.model, points, self.options.global_batch,
            refused=lambda plan: (plan_refusal(plan, self.graph) is not None
                                  or refusal(plan, t, dtype) is not None),
            price=lambda point, bounds, layers: self._priced(point.outer, bounds, layers,
                                                             t.name),
            layer_plan=self._layer_plan, blocks=blocks)
        if t.even_split or not t.schedules:
            return found[t.name]
        return self._free_cuts(t, points, frozenset(self.graph.nodes[i].name for i in blocks),
                               found[t.name], dtype)

    def _free_cuts(self, t: Trainer, points: list[UniformPoint], blocks: frozenset[str],
                   best: Candidate | None, dtype: str) -> Candidate | None:
        """`best`, or a faster plan cutting stages elsewhere than split_stages: for each
        pipelined point whose bound can still beat the best, cheapest bound first, the best
        cut this search finds with every knob of the point fixed (the bound holds for every
        cut of its point). Interleaved chunks the search itself cuts evenly (_fixed_chunks).
        One Searcher per fixed strategy, sharing this one's cost model."""
        searchers: dict[tuple, Searcher] = {}
        for point in points:
            if best is not None and best.estimate.fits \
                    and point.bound >= best.estimate.step_time_s:
                break
            outer, s = point.outer, point.strategy
            if outer.pp == 1 or outer.schedule == "interleaved_1f1b":
                continue
            key = (s.tp, s.sequence_parallel, s.zero, s.checkpoint)
            if key not in searchers:
                fix = {"tp": s.tp, "sequence_parallel": s.sequence_parallel, "zero": s.zero,
                       "ckpt": s.checkpoint, BLOCKS: blocks}
                searchers[key] = Searcher(self.graph, self.cluster, replace(
                    self.options, fix=fix, trainer=None), self.profile, self.model)
            sub = searchers[key]
            tried = len(sub.candidates)
            sub._search_outer(outer)
            for c in sub.candidates[tried:]:
                if c.estimate.fits and (best is None or not best.estimate.fits
                                        or c.estimate.step_time_s < best.estimate.step_time_s) \
                        and refusal(c.plan, t, dtype) is None:
                    best = Candidate(c.plan, c.estimate, t.name)
        return best

    def _smallest_fitting(self, ranked: list[Candidate]) -> tuple[int | None, str | None]:
        if not ranked:
            return None, None
        least = min(ranked, key=lambda c: max(c.estimate.peak_memory_bytes))
        stage = max(least.estimate.stages, key=lambda s: s.memory.peak)
        parts = {k: v for k, v in stage.memory.as_dict().items() if k != "peak"}
        part = max(parts, key=parts.get)
        need = max(least.estimate.peak_memory_bytes) + least.estimate.overhead_bytes
        middle = least.plan.layers[len(least.plan.layers) // 2]
        return need, (f"{part} ({parts[part] / 2**30:.1f} GiB of stage {stage.stage}) in the "
                      f"plan that needs the least memory: pp {least.plan.pp}, dp {middle.dp}, "
                      f"tp {middle.tp}, zero {middle.zero}, checkpoint {middle.checkpoint}")


def _as_layer(node: LayerNode, strategy: LayerStrategy) -> LayerPlan:
    """A LayerPlan without validating again what LayerStrategy validated."""
    return LayerPlan.model_construct(name=node.name, **dict(strategy))


def _plan_key(plan: Plan) -> str:
    return plan.model_dump_json(exclude={"prediction", "provenance"})


def _flatten(solution: StageSolution, searcher: Searcher, outer: Outer, stage: int,
             layers: list[int]) -> list[LayerStrategy]:
    """The stage's picks as one strategy per layer, in layer order."""
    flat = [index for run in solution.picks for index in run]
    return [searcher._layer_choices(i, outer, stage)[k].strategy
            for i, k in zip(layers, flat, strict=True)]


def _kept(ends: tuple[float, ...] | None, choice: _Choice, m: int, held: int) -> float:
    """Pipeline buffer bytes `choice` keeps for the messages at its layer (_chunk_ends;
    None: none) in a step of `m` micro-batches with `held` in flight in its chunk."""
    if ends is None:
        return 0.0
    whole, sliced = m * ends[0] + held * ends[2], m * ends[1] + held * ends[3]
    return whole * choice.receive_shares[0] + sliced * choice.receive_shares[1]


def _pareto_options(options: list[Option]) -> tuple[Option, ...]:
    """Per layout, the options no other of that layout beats on time and on memory at every
    peak: the stage problem sees nothing else of an option, so dropping the rest loses no
    optimum. A beater comes first by (time, memory, index)."""
    kept: dict[Layout, list[Option]] = {}
    for o in sorted(options, key=lambda o: (o.time, o.memory, o.index)):
        mine = kept.setdefault(o.layout, [])
        if not any(all(map(operator.le, q.memory, o.memory)) for q in mine):
            mine.append(o)
    return tuple(sorted((o for mine in kept.values() for o in mine), key=lambda o: o.index))


def _undominated(choices: list[_Choice],
                 terms: Callable[[_Choice], tuple[float, ...]] = _Choice.terms,
                 group: Callable[[_Choice], Any] = operator.attrgetter("layout")
                 ) -> list[_Choice]:
    """The choices no other of their group (default: their layout) beats: no worse in every
    term (default: _Choice.terms) and better in one. Order kept. A beater comes first in the
    terms' sorted order, and whatever beats a dropped choice beats what it beats, so each
    choice is checked against the kept ones before it only."""
    values = [terms(c) for c in choices]
    kept: dict[Any, list[tuple[float, ...]]] = {}
    beaten = set()
    for k in sorted(range(len(choices)), key=values.__getitem__):
        front, mine = kept.setdefault(group(choices[k]), []), values[k]
        if any(other != mine and all(map(operator.le, other, mine)) for other in front):
            beaten.add(k)
        else:
            front.append(mine)
    return [c for k, c in enumerate(choices) if k not in beaten]
