"""The uniform plans: every plan the shorthand writes (one strategy on every layer, stages
cut by plan.split_stages) in the search's plan space (space.outer_settings, and the (dp, tp)
that space.uniform_strategies allows). Their best is the "grid" baseline users compare
with; pure DDP and pure FSDP over all GPUs are two families among them. They are candidates
of the search, so its answer is never slower than a uniform plan of that space.

There are many (for Llama 3 405B on 16,384 GPUs about 10^5): each is bounded from its
layer kinds' costs (CostModel.step_bound_s), visited cheapest bound first, skipped once its
bound cannot beat its families' best, and priced only when its memory, checked first
(CostModel.peak_memory_bytes), fits.

A trainer's plans (search --for, autoplan.trainers) are uniform plans too, with two
differences: only the strategies and schedules it runs, and checkpointing on the repeated
blocks alone (`blocks`), as the trainers wrap blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from autoplan.cost_model import (
    ChunkMessage,
    CostModel,
    chunk_messages,
    chunks_in_flight,
    counted_stage_memory,
    stage_pipeline_bytes,
    undominated,
)
from autoplan.feasibility import gives_whole_output, last_layer
from autoplan.graph import LayerGraph
from autoplan.plan import LayerPlan, LayerStrategy, Plan, split_stages, stage_chunks
from autoplan.search.space import (
    Outer,
    SearchSpace,
    checkpoint_modes,
    count_kinds,
    count_runs,
    outer_settings,
    uniform_strategies,
)

__all__ = ["FAMILIES", "UniformPoint", "uniform_points", "uniform_layers", "best_uniform"]

FAMILIES = ("ddp", "fsdp", "grid")


@dataclass(frozen=True)
class UniformPoint:
    bound: float
    """No plan of this point is faster (CostModel.step_bound_s)."""
    outer: Outer
    strategy: LayerStrategy
    families: tuple[str, ...]


def uniform_layers(graph: LayerGraph, strategy: LayerStrategy,
                   blocks: Collection[int] | None = None) -> list[LayerStrategy]:
    """`strategy` on every layer, as _on_layer adjusts it: once per distinct answer of the
    questions _on_layer asks of a layer (many layers are alike)."""
    last = last_layer(graph.nodes)
    made: dict[tuple, LayerStrategy] = {}
    out = []
    for i, node in enumerate(graph.nodes):
        key = (tuple(checkpoint_modes(node)), i == last and not gives_whole_output(node),
               _off_blocks(i, blocks))
        if key not in made:
            made[key] = _on_layer(graph, i, strategy, last, blocks)
        out.append(made[key])
    return out


def _off_blocks(i: int, blocks: Collection[int] | None) -> bool:
    """Whether layer i is outside the checkpointed blocks (never, when all may be)."""
    return blocks is not None and i not in blocks


def _on_layer(graph: LayerGraph, i: int, strategy: LayerStrategy, last: int,
              blocks: Collection[int] | None = None) -> LayerStrategy:
    """A uniform strategy on layer i: without checkpointing where the layer has none to do
    (it saves no more than its input: checkpointing would only add recomputation) or lies
    outside `blocks`, and without sequence parallelism on the `last` layer where it would
    leave the output in slices (as the shorthand's expansion, plan.uniform_plan, drops it
    there)."""
    node = graph.nodes[i]
    update: dict[str, Any] = {}
    if strategy.checkpoint not in ("none", *checkpoint_modes(node)) or (
            strategy.checkpoint != "none" and _off_blocks(i, blocks)):
        update["checkpoint"] = "none"
    if i == last and strategy.sequence_parallel and not gives_whole_output(node):
        update["sequence_parallel"] = False
    return strategy.model_copy(update=update) if update else strategy


def _families(outer: Outer, strategy: LayerStrategy, gpus: int) -> tuple[str, ...]:
    """DDP: no pipeline, every GPU a data-parallel replica; FSDP: the same with ZeRO 3 (on
    one GPU both are the plain model)."""
    if outer.pp > 1 or strategy.tp > 1:
        return ("grid",)
    ddp, fsdp = strategy.zero == 0, strategy.zero == 3 or gpus == 1
    return (*(("ddp",) if ddp else ()), *(("fsdp",) if fsdp else ()), "grid")


def uniform_points(graph: LayerGraph, model: CostModel, space: SearchSpace, gpus: int,
                   global_batch: int, trainer: Callable[[Outer, LayerStrategy], bool]
                   | None = None, family: str = "", blocks: Collection[int] | None = None
                   ) -> list[UniformPoint]:
    """Every uniform plan of the space (the user's --fix aside: baselines are what users
    compare with), with its bound, cheapest first. With `trainer`: only those it runs
    (`trainer(outer, strategy)`), checkpointing only `blocks`, all of `family`."""
    free = replace(space, fix={})
    chunks = sum(node.kind != "loss" for node in graph.nodes)
    last = last_layer(graph.nodes)
    # equal layers cost alike under one strategy, but for the last layer's own adjustment
    # and checkpointing outside the blocks
    kinds = count_kinds(range(len(graph.nodes)), lambda i: (
        graph.nodes[i].signature, i == last, _off_blocks(i, blocks)))
    # per stage size, micro-batch and pipelining (which fixes pp): each strategy's sums
    # (_kind_sums) and families
    sums: dict[tuple, list[tuple[LayerStrategy, float, float, float, tuple[str, ...]]]] = {}
    adjusted: dict[tuple, LayerStrategy] = {}
    points = []
    bound_of = model.step_bound_s
    for outer in outer_settings(gpus, global_batch, chunks, free):
        stage_gpus = gpus // outer.pp
        m = global_batch // outer.micro_batch_size
        key = (stage_gpus, outer.micro_batch_size, outer.pp > 1)
        if key not in sums:
            sends: dict[tuple[int, int], float] = {}
            sums[key] = [(strategy, *_kind_sums(graph, model, strategy, outer, m, stage_gpus,
                                                kinds, last, adjusted, sends, blocks),
                          (family,) if trainer else _families(outer, strategy, gpus))
                         for strategy in uniform_strategies(stage_gpus, outer.micro_batch_size,
                                                            free)]
        pp, virtual = outer.pp, outer.virtual_stages
        hops = 2 * (pp * virtual - 1)
        for strategy, per_micro_batch, tail, send, families in sums[key]:
            if trainer and not trainer(outer, strategy):
                continue
            bound = bound_of(0.0, per_micro_batch + hops * send, m, pp, virtual, tail / pp)
            points.append(UniformPoint(bound, outer, strategy, families))
    # ties in bound: the enumeration's order, which is deterministic
    order = sorted(range(len(points)), key=lambda k: (points[k].bound, k))
    return [points[k] for k in order]


def _kind_sums(graph: LayerGraph, model: CostModel, strategy: LayerStrategy, outer: Outer,
               m: int, stage_gpus: int, kinds: list[tuple[int, int]], last: int,
               adjusted: dict[tuple, LayerStrategy], sends: dict[tuple[int, int], float],
               blocks: Collection[int] | None) -> tuple[float, float, float]:
    """Over the layers under `strategy` (as _on_layer adjusts it): the sum of times per
    micro-batch, the sum of tails, and the cheapest pipeline send. `adjusted` caches
    _on_layer by (layer, strategy); `sends` the cheapest send by (dp, tp), all a send's
    cost depends on (CostModel.hop_s) at one stage size and micro-batch."""
    per_micro_batch = tail = 0.0
    for i, count in kinds:
        cost = model.layer_cost(graph.nodes[i],
                                _adjusted(graph, i, strategy, last, adjusted, blocks),
                                outer.micro_batch_size, m)
        per_micro_batch += count * cost.micro_batch_s
        tail += count * cost.step_tail_s
    if outer.pp == 1:
        return per_micro_batch, tail, 0.0
    layout = (strategy.dp, strategy.tp)
    if layout not in sends:
        sends[layout] = min(model.hop_s(graph.nodes[i], strategy, outer.micro_batch_size,
                                        stage_gpus) for i, _ in kinds)
    return per_micro_batch, tail, sends[layout]


def _adjusted(graph: LayerGraph, i: int, strategy: LayerStrategy, last: int,
              cache: dict[tuple, LayerStrategy],
              blocks: Collection[int] | None) -> LayerStrategy:
    """_on_layer, made once per (layer, strategy): each strategy recurs at every
    micro-batch size. Keyed by the fields: hashing the model itself is slower (`blocks` is
    one per cache)."""
    key = (i, strategy.dp, strategy.tp, strategy.sequence_parallel, strategy.zero,
           strategy.checkpoint)
    if key not in cache:
        cache[key] = _on_layer(graph, i, strategy, last, blocks)
    return cache[key]


@dataclass
class _Family:
    best: Any = None
    """The fastest fitting candidate priced."""
    least: tuple[int, UniformPoint] | None = None
    """(peak bytes, point) of the plan needing the least memory, while none fits."""


def best_uniform(graph: LayerGraph, model: CostModel, points: list[UniformPoint],
                 global_batch: int, refused: Callable[[Plan], bool],
                 price: Callable[[UniformPoint, list[int], list[LayerPlan]], Any],
                 layer_plan: Callable[[int, LayerStrategy], LayerPlan],
                 blocks: Collection[int] | None = None) -> dict[str, Any]:
    """Each family's fastest plan that fits, else the one needing the least memory (None
    when the family has no point). `price(point, boundaries, layers)` makes the candidate;
    `refused(plan)`: whether the executor (or the trainer) refuses it; `layer_plan(i,
    strategy)`: layer i's LayerPlan (the caller's, shared by its plans); `blocks`: the
    layers checkpointed, as uniform_points was given them."""
    names = dict.fromkeys([*FAMILIES, *(name for p in points for name in p.families)])
    families = {name: _Family() for name in names}
    memory = _UniformMemory(graph, model, global_batch, layer_plan, blocks)

    def misses(peak: float) -> bool:
        # the grouped sums may differ from estimate's by rounding: only a clear miss skips
        return peak + model.overhead_bytes > model.memory_limit_bytes * (1 + 1e-9)

    skip_at: dict[tuple[str, ...], float | None] = {}  # _skip_at, until a best changes
    for point in points:
        if point.families not in skip_at:
            skip_at[point.families] = _skip_at(families, point.families)
        at = skip_at[point.families]
        if at is not None and point.bound >= at:
            continue
        peak = memory.peak(point, lambda peak, p=point: misses(peak)
                           and not _may_be_least(families, p, peak))
        if misses(peak):
            _note_least(families, point, peak, lambda p=point: refused(memory.plan(p)))
            continue
        plan = memory.plan(point)
        if refused(plan):
            continue
        candidate = price(point, plan.stage_boundaries, plan.layers)
        for name in point.families:
            best = families[name].best
            if candidate.estimate.fits and (best is None or candidate.estimate.step_time_s
                                            < best.estimate.step_time_s):
                families[name].best = candidate
                skip_at.clear()
    out = {}
    for name, family in families.items():
        if family.best is None and family.least is not None:
            point = family.least[1]
            bounds = split_stages(graph, point.outer.pp * point.outer.virtual_stages)
            family.best = price(point, bounds, memory.layer_plans(point.strategy))
        out[name] = family.best
    return out


def _skip_at(families: dict[str, _Family], names: tuple[str, ...]) -> float | None:
    """The bound from which a point of families `names` cannot beat any of their fastest
    plans (the slowest of them), so best_uniform skips it; None while one has none. Taken
    once per families until a best changes: tens of thousands of points read it."""
    if any(families[name].best is None for name in names):
        return None
    return max(families[name].best.estimate.step_time_s for name in names)


def _may_be_least(families: dict[str, _Family], point: UniformPoint, peak: float) -> bool:
    """Whether a plan of `point` needing `peak` bytes or more may become one of its families'
    least-memory plan (_note_least); when not, a part of its peak decides a miss."""
    return any(families[name].best is None and (families[name].least is None
                                                or peak < families[name].least[0])
               for name in point.families)


def _note_least(families: dict[str, _Family], point: UniformPoint, peak: float,
                is_refused: Callable[[], bool]) -> None:
    """Keep `point` as its families' least-memory plan while none of them fits."""
    for name in point.families:
        family = families[name]
        if family.best is None and (family.least is None or peak < family.least[0]) \
                and not is_refused():
            family.least = (peak, point)


class _UniformMemory:
    """The peak memory of uniform plans, from one layer cost per kind of layer on each
    stage (counted_stage_memory: estimate's stage_memory, grouped), and the plans
    themselves with only what the cost model and the executor's check read."""

    def __init__(self, graph: LayerGraph, model: CostModel, global_batch: int,
                 layer_plan: Callable[[int, LayerStrategy], LayerPlan],
                 blocks: Collection[int] | None = None) -> None:
        self.graph, self.model, self.global_batch = graph, model, global_batch
        self.layer_plan, self.blocks = layer_plan, blocks
        self.last = last_layer(graph.nodes)
        self._kinds: dict[tuple[int, int], list[list[_ChunkGroup]]] = {}
        self._flights: dict[tuple, tuple[tuple[int, ...], ...]] = {}
        self._layers: dict[LayerStrategy, list[LayerStrategy]] = {}
        self._layer_plans: dict[LayerStrategy, list[LayerPlan]] = {}

    def layers(self, strategy: LayerStrategy) -> list[LayerStrategy]:
        if strategy not in self._layers:
            self._layers[strategy] = uniform_layers(self.graph, strategy, self.blocks)
        return self._layers[strategy]

    def layer_plans(self, strategy: LayerStrategy) -> list[LayerPlan]:
        """layers(strategy) as the caller's LayerPlans, made once per strategy: every
        uniform plan of it (at each pipeline degree and micro-batch) shares them."""
        if strategy not in self._layer_plans:
            self._layer_plans[strategy] = [self.layer_plan(i, layer)
                                           for i, layer in enumerate(self.layers(strategy))]
        return self._layer_plans[strategy]

    def plan(self, point: UniformPoint) -> Plan:
        """`point` as a plan (Plan.model_construct: no validation)."""
        outer = point.outer
        return Plan.model_construct(
            pp=outer.pp, virtual_stages=outer.virtual_stages, schedule=outer.schedule,
            micro_batch_size=outer.micro_batch_size, global_batch=self.global_batch,
            num_micro_batches=self.global_batch // outer.micro_batch_size,
            stage_boundaries=split_stages(self.graph, outer.pp * outer.virtual_stages),
            layers=self.layer_plans(point.strategy))

    def peak(self, point: UniformPoint,
             enough: Callable[[float], bool] | None = None) -> float:
        """The largest stage peak of `point`'s plan, in bytes; or, once a stage's peak is
        `enough` (a miss the stages after it cannot undo), the largest so far."""
        outer, nodes = point.outer, self.graph.nodes
        m = self.global_batch // outer.micro_batch_size
        layers = self.layers(point.strategy)
        peaks = []
        for stage, alike in enumerate(self._stages(outer.pp, outer.virtual_stages)):
            costs = [[(self.model.layer_cost(nodes[i], layers[i], outer.micro_batch_size, m,
                                             stage), count) for i, count in group.runs]
                     for group in alike]
            receive, outputs = 0.0, []
            for group in alike:  # equal chunks keep equal messages (_stages' key)
                kept, (output,) = stage_pipeline_bytes(
                    nodes, layers, [group.chunk], outer.micro_batch_size, m,
                    [group.messages]) if outer.pp > 1 else (0.0, (0.0,))
                receive += len(group.members) * kept
                outputs.append(output)
            peaks.append(counted_stage_memory(costs, self._in_flight(outer, stage, alike),
                                              receive, outputs).peak)
            if enough is not None and enough(peaks[-1]):
                break
        return max(peaks)

    def _in_flight(self, outer: Outer, stage: int,
                   alike: list[_ChunkGroup]) -> tuple[tuple[int, ...], ...]:
        """chunks_in_flight summed over each group of equal chunks (they weigh alike), but
        the sums another holds at least as many of in every group. Cached."""
        m = self.global_batch // outer.micro_batch_size
        key = (outer.schedule, outer.pp, stage, m, outer.virtual_stages)
        if key not in self._flights:
            self._flights[key] = tuple(sorted(undominated(
                tuple(sum(held[c] for c in group.members) for group in alike)
                for held in chunks_in_flight(*key))))
        return self._flights[key]

    def _stages(self, pp: int, virtual: int) -> list[list[_ChunkGroup]]:
        """Per stage, its chunks (chunk c on stage c mod pp) in groups of equal ones: the
        same runs of kinds of layer, in order (counted_stage_memory reads the order; layers
        of one signature cost alike under one strategy, but for tied weights held past the
        first stage and the last layer's own adjustments), and the same pipeline messages.
        Cached: every plan of the same pp and virtual stages asks."""
        if (pp, virtual) not in self._kinds:
            nodes, stages = self.graph.nodes, []

            def kind(i: int) -> tuple:
                return (nodes[i].signature, nodes[i].shared_params > 0, i == self.last,
                        _off_blocks(i, self.blocks))

            for chunks in stage_chunks(split_stages(self.graph, pp * virtual),
                                       len(self.graph.nodes), pp):
                groups: dict[tuple, _ChunkGroup] = {}
                for c, (first, last) in enumerate(chunks):
                    runs = count_runs(range(first, last), kind)
                    messages = chunk_messages(nodes, first, last)
                    key = (tuple((kind(i), count) for i, count in runs),
                           tuple((kind(msg.layer), nodes[msg.sent].signature, msg.sliced,
                                  msg.per_step) for msg in messages))
                    group = groups.setdefault(key, _ChunkGroup((first, last), runs, messages))
                    group.members.append(c)
                stages.append(list(groups.values()))
            self._kinds[pp, virtual] = stages
        return self._kinds[pp, virtual]


@dataclass
class _ChunkGroup:
    """Equal chunks of one stage: the first's bounds, runs of kinds of layer and pipeline
    messages, and which chunks they are (indices among the stage's chunks)."""

    chunk: tuple[int, int]
    runs: list[tuple[int, int]]
    messages: list[ChunkMessage]
    members: list[int] = field(default_factory=list)
