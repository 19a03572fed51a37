"""The cost model: (layer graph, cluster, profile or preset, plan) -> predicted step time and
per-rank memory, with the breakdown that explains them.

Pure arithmetic over the graph (DESIGN.md): a CostModel is built once per model and cluster
and evaluates plans without torch. Each concern's formulas live in their own module:
compute.py (layer times), communication.py (what each parallelism moves), pipeline.py
(schedules), memory.py (bytes per rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autoplan.cluster import Cluster
from autoplan.cost_model.analytic import (
    DTYPE_BYTES,
    OPTIMIZER_STATE_BYTES_PER_PARAM,
    measured_part,
    tp_shards,
)
from autoplan.cost_model.collectives import CommModel
from autoplan.cost_model.communication import (
    fsdp_time_s,
    grad_sync_time_s,
    p2p_time_s,
    reshard_time_s,
    tp_time_s,
)
from autoplan.cost_model.compute import ComputeModel
from autoplan.cost_model.figures import GPU_FRAMEWORK_OVERHEAD_BYTES
from autoplan.cost_model.memory import (
    LayerCost,
    StageMemory,
    layer_state_bytes,
    loss_backward_bytes,
    saved_bytes_at,
    saved_bytes_per_sample,
    stage_memory,
    stage_pipeline_bytes,
    stage_tail,
    unsharded_grad_bytes,
)
from autoplan.cost_model.pipeline import (
    chunks_in_flight,
    pipeline_time_bound_s,
    pipeline_time_s,
)
from autoplan.efficiency import memory_efficiency
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import LayerPlan, LayerStrategy, Plan, stage_chunks
from autoplan.profile import Profile
from autoplan.workload import Workload

__all__ = ["STEP_PARTS", "StageEstimate", "Estimate", "CostModel", "LayerCost"]

STEP_PARTS = ("forward", "backward", "recompute", "tp_comm", "fsdp_comm", "reshard",
              "pp_comm", "bubble", "dp_comm", "optimizer")
"""The breakdown of a step on its critical path (seconds; they add up to the step time)."""

_MICRO_BATCH_PARTS = STEP_PARTS[:7]

ONE_WEIGHT_KINDS = frozenset({"embedding", "head"})
"""Kinds whose gradient is one weight's, nearly all of the layer's: where gradients
accumulate over micro-batches (ZeRO 0-1, or no data parallelism), autograd makes each
micro-batch's gradient of a weight before adding it to the one kept (AccumulateGrad), so a
second copy of that weight's gradient lives during the layer's backward. Only these kinds
are counted: a block's weights are many, and one of them is a few percent of the stage
(measured with `autoplan run --dry-run`: two copies of a 64 MiB embedding gradient at its
backward under ZeRO 1, tests/executor/test_dry_run.py)."""


@dataclass(frozen=True)
class StageEstimate:
    stage: int
    layers: list[str]
    per_micro_batch_s: dict[str, float]
    """Seconds one rank of the stage spends per micro-batch, by _MICRO_BATCH_PARTS."""
    tail_s: dict[str, float]
    """Seconds after the last micro-batch: exposed gradient sync and the optimizer step."""
    memory: StageMemory

    @property
    def micro_batch_s(self) -> float:
        return sum(self.per_micro_batch_s.values())


@dataclass(frozen=True)
class Estimate:
    """A plan's predicted step: time, throughput, memory per stage and what makes them."""

    step_time_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    """Model FLOPs (forward and backward, no recompute) per second per GPU, in TFLOP/s."""
    hardware_tflops_per_gpu: float
    """The same counting recomputation."""
    mfu: float
    """model FLOP/s over the device's peak; 0 where the device has no peak figure."""
    peak_memory_bytes: list[int]
    memory_limit_bytes: int
    overhead_bytes: int
    fits: bool
    breakdown: dict[str, float]
    stages: list[StageEstimate]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu, "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "overhead_bytes": self.overhead_bytes, "fits": self.fits,
            "breakdown": self.breakdown,
            "stages": [{"stage": s.stage, "first_layer": s.layers[0], "last_layer": s.layers[-1],
                        "layers": len(s.layers), "micro_batch_s": s.per_micro_batch_s,
                        "tail_s": s.tail_s, "memory_bytes": s.memory.as_dict()}
                       for s in self.stages],
            "notes": self.notes,
        }


class CostModel:
    """Predicts plans of one model on one cluster.

    Args:
        graph: the model's layer graph.
        cluster: the target cluster (its preset's figures serve where no profile is given).
        profile: a measured profile; without one, layer times and collectives come from
            the cluster's datasheet figures (cost_model/analytic.py). An analytic profile is
            those same formulas written down: it is checked to be of the cluster's device and
            then priced as no profile, so that the two cannot disagree.
        optimizer: "adamw" or "sgd"; with a bf16/fp16 graph its state is mixed precision.
        memory_limit_bytes: the budget per device; default the device's memory.
    """

    def __init__(self, graph: LayerGraph, cluster: Cluster, profile: Profile | None = None,
                 optimizer: str = "adamw", memory_limit_bytes: int | None = None) -> None:
        self.graph, self.cluster = graph, cluster
        self.elt_bytes = DTYPE_BYTES.get(graph.dtype.removeprefix("torch."), 2)
        precision = "fp32" if self.elt_bytes == 4 else "mixed"
        key = f"{optimizer}/{precision}"
        if key not in OPTIMIZER_STATE_BYTES_PER_PARAM:
            raise AutoplanError(f"optimizer '{optimizer}' is not modelled; choose adamw or sgd")
        self.optimizer_bytes = OPTIMIZER_STATE_BYTES_PER_PARAM[key]
        self.optimizer = optimizer
        measured = measured_part(profile, cluster)
        self.compute = ComputeModel(cluster, self.elt_bytes, measured)
        self.comm = CommModel(cluster, measured)
        on_gpu = cluster.device.peak_flops is not None
        self.overhead_bytes = int(GPU_FRAMEWORK_OVERHEAD_BYTES.value) if on_gpu else 0
        self.memory_limit_bytes = memory_limit_bytes or cluster.device.memory_bytes
        self.notes = [] if profile is None else [f"profile {profile.mode} {profile.content_hash}"]
        self._layer_costs: dict[tuple, LayerCost] = {}
        self._parts: dict[tuple, Any] = {}

    @classmethod
    def of(cls, work: Workload, optimizer: str = "adamw") -> CostModel:
        """The cost model of a Workload (every command's front door)."""
        return cls(work.graph, work.cluster, work.profile, optimizer, work.memory_limit_bytes)

    # ------------------------------------------------------------------------- the plan

    def estimate(self, plan: Plan) -> Estimate:
        """Step time and memory of `plan`.

        Raises:
            AutoplanError: when the plan is for another world size than the cluster or names
                layers the graph does not have.
        """
        self._check(plan)
        layers = list(zip(self.graph.nodes, plan.layers, strict=True))
        chunks = stage_chunks(plan.stage_boundaries, len(plan.layers), plan.pp)
        stages = [self._stage(plan, s, layers, [list(range(first, last)) for first, last in c])
                  for s, c in enumerate(chunks)]
        m = plan.num_micro_batches
        pipe = pipeline_time_s([s.micro_batch_s for s in stages], m, plan.virtual_stages)
        busy = sum(m * s.micro_batch_s for s in stages) / (plan.pp * pipe) if pipe else 1.0
        relief = self.compute.waiting_relief(busy)
        tail = max(stages, key=lambda s: sum(s.tail_s.values()))
        step = relief * pipe + sum(tail.tail_s.values())
        pace = max(stages, key=lambda s: s.micro_batch_s)
        breakdown = {part: relief * m * pace.per_micro_batch_s[part]
                     for part in _MICRO_BATCH_PARTS}
        breakdown |= {"bubble": relief * (pipe - m * pace.micro_batch_s), **tail.tail_s}
        return self._summary(plan, step, breakdown, stages, layers)

    def step_bound_s(self, slowest_s: float, total_s: float, micro_batches: int, pp: int,
                     virtual: int, tail_s: float) -> float:
        """No plan is faster whose slowest stage takes at least `slowest_s` per micro-batch,
        whose stages take at least `total_s` together and whose tail (the largest stage's)
        is at least `tail_s`: estimate's step, relief x pipeline + tail, bounded term by
        term. On oversubscribed cores, relief x pipeline = max(pipeline / threads,
        m x sum_s T_s / pp) (ComputeModel.waiting_relief with busy = m sum_s T_s / (pp
        pipeline)); elsewhere relief is 1."""
        pipe = pipeline_time_bound_s(slowest_s, total_s, micro_batches, pp, virtual)
        if self.compute.oversubscribed:
            pipe = max(pipe / self.compute.rank_threads, micro_batches * total_s / pp)
        return pipe + tail_s

    def paced_bound_s(self, floors: list[tuple[float, float]], virtual: int) -> float:
        """No plan is faster whose stage s takes at least floors[s][0] per micro-batch and
        at least floors[s][1] as m x that + its tail: for every s, the step is at least
        m T_s + tail_s + (sum of the other stages' T) / v (pipeline_time_s's first term with
        T_max >= T_s, m >= 1/v; the largest tail >= tail_s). 0 on oversubscribed cores,
        where waiting relief makes the step shorter than its pipeline."""
        if self.compute.oversubscribed:
            return 0.0
        total = sum(time for time, _ in floors)
        return max(objective + (total - time) / virtual for time, objective in floors)

    def _check(self, plan: Plan) -> None:
        if plan.world_size != self.cluster.gpus:
            raise AutoplanError(f"plan is for {plan.world_size} devices; cluster "
                                f"'{self.cluster.spec}' has {self.cluster.gpus}")
        if [layer.name for layer in plan.layers] != self.graph.names:
            raise AutoplanError(f"plan layers do not match model {self.graph.model}'s; make the "
                                "plan for this model")

    def fits(self, peaks: list[int]) -> bool:
        """Whether stages of these peaks fit the device with the framework's overhead."""
        return max(peaks) + self.overhead_bytes <= self.memory_limit_bytes

    def in_flight(self, plan: Plan, stage: int) -> tuple[tuple[int, ...], ...]:
        """The micro-batches each chunk of stage `stage` may hold at its peak
        (pipeline.chunks_in_flight)."""
        return chunks_in_flight(plan.schedule, plan.pp, stage, plan.num_micro_batches,
                                plan.virtual_stages)

    def _stage(self, plan: Plan, stage: int, layers: list[tuple[LayerNode, LayerPlan]],
               chunks: list[list[int]]) -> StageEstimate:
        """Stage `stage`, running the layer indices of each of `chunks` (plan.stage_chunks)."""
        costs: list[list[LayerCost]] = []
        parts = dict.fromkeys(_MICRO_BATCH_PARTS, 0.0)
        for chunk in chunks:
            costs.append([])
            for i in chunk:
                cost = self.layer_cost(*layers[i], plan.micro_batch_size,
                                       plan.num_micro_batches, stage)
                costs[-1].append(cost)
                for part, seconds in cost.per_micro_batch_s.items():
                    parts[part] += seconds
                if i > chunk[0] and layers[i - 1][1].dp != layers[i][1].dp:  # else free
                    parts["reshard"] += self.reshard_s(layers[i][0], layers[i - 1][1],
                                                       layers[i][1], plan.micro_batch_size)
            parts["pp_comm"] += self._hops(plan, layers, chunk)
        return StageEstimate(stage=stage, layers=[layers[i][0].name for c in chunks for i in c],
                             per_micro_batch_s=parts,
                             tail_s=stage_tail([c for chunk in costs for c in chunk]),
                             memory=stage_memory(costs, self.in_flight(plan, stage),
                                                 *self._pipeline_bytes(plan, layers, chunks)))

    def layer_cost(self, node: LayerNode, layer: LayerStrategy, micro_batch_size: int,
                   micro_batches: int, stage: int = 0) -> LayerCost:
        """What `node` costs one rank under `layer`'s strategy, apart from its neighbours
        (resharding, pipeline hops) and from the schedule (micro-batches in flight), in a step
        of `micro_batches`. Past the first stage a layer also holds the tied weights it
        shares (Megatron keeps a copy of the embedding on the last stage)."""
        shared = stage > 0 and node.shared_params > 0
        accumulates = micro_batches > 1
        key = (node.signature, shared, layer.dp, layer.tp, layer.sequence_parallel, layer.zero,
               layer.checkpoint, micro_batch_size, accumulates)
        if key not in self._layer_costs:  # equal signatures cost the same: search asks often
            self._layer_costs[key] = self._layer_cost(node, layer, micro_batch_size, shared,
                                                      accumulates)
        return self._layer_costs[key]

    def _layer_cost(self, node: LayerNode, layer: LayerStrategy, micro_batch_size: int,
                    shared: bool, accumulates: bool) -> LayerCost:
        samples = micro_batch_size // layer.dp
        sig, dp, tp, sp, zero = node.signature, layer.dp, layer.tp, layer.sequence_parallel, \
            layer.zero
        times = self._part(("times", sig, samples, tp, sp, layer.checkpoint),
                           lambda: self.compute.times(node, samples, tp, sp, layer.checkpoint))
        tp_fwd, tp_bwd = (0.0, 0.0) if self.compute.tp_comm_in_layers else \
            self._part(("tp", sig, samples, tp, sp),
                       lambda: tp_time_s(self.comm, node, layer, samples))
        tp_recompute = tp_fwd if layer.checkpoint == "full" else 0.0
        # FSDP prefetch hides a gather behind the previous layer's compute (Zhao et al. 2023,
        # sec. 3.3): only what compute cannot cover is exposed; on oversubscribed CPU cores
        # nothing hides, since gloo's copies and sums need the cores compute is using.
        exposed = self.compute.oversubscribed
        in_situ = self.compute.data_parallel_times(node, samples, layer.dp, layer.tp,
                                                   layer.zero, layer.checkpoint)
        if in_situ is not None:  # timed with its gathers and sync: nothing to add or hide
            times, sync = in_situ
            fsdp, gather, exposed = 0.0, 0.0, True
            if zero >= 2:  # the sync a step of one micro-batch adds, after every one
                fsdp, sync = sync, 0.0
        else:
            fsdp = self._part(("fsdp", sig, dp, tp, zero),
                              lambda: fsdp_time_s(self.comm, node, layer, self.elt_bytes))
            # A layer's gradient sync starts when its backward ends and runs beside the
            # backward of the layers before it, taken as long as its own (PyTorch DDP/FSDP2
            # overlap, Li et al. 2020); what that does not cover is exposed once per step.
            sync, gather = self._part(("sync", sig, dp, tp, zero), lambda: grad_sync_time_s(
                self.comm, node, layer, self.elt_bytes))
        compute = times.fwd_s + times.bwd_s + times.recompute_s
        weights, grads, optimizer = layer_state_bytes(node, layer, self.elt_bytes,
                                                      self.optimizer_bytes, shared)
        kept = reduce = 0.0
        unsharded = unsharded_grad_bytes(node, layer, self.elt_bytes, shared)
        if layer.dp > 1:  # FSDP2 (replicate() too): executor/data_parallel.py
            if layer.zero <= 2:  # the gathered weights stay beside the shard all step
                kept += weights * (layer.dp if layer.zero else 1)
            if layer.zero <= 1 and accumulates:  # whole gradients until the last micro-batch
                kept += unsharded - grads
            if layer.zero >= 2:  # reduced after each backward: autograd's and the copy
                reduce = 2 * unsharded
        if (layer.dp == 1 or layer.zero <= 1) and accumulates and node.kind in ONE_WEIGHT_KINDS:
            reduce = unsharded  # the new gradient beside the one accumulated (ONE_WEIGHT_KINDS)
        saved = samples * saved_bytes_per_sample(node, layer)
        # what the layer saves without checkpointing: recomputed in its backward
        whole = samples * saved_bytes_at(node, tp, sp, "none") \
            if layer.checkpoint != "none" else 0.0
        return LayerCost(
            per_micro_batch_s={"forward": times.fwd_s, "backward": times.bwd_s,
                               "recompute": times.recompute_s,
                               "tp_comm": tp_fwd + tp_bwd + tp_recompute,
                               "fsdp_comm": fsdp if exposed else max(0.0, fsdp - compute)},
            tail_s={"dp_comm": (sync if exposed else max(0.0, sync - times.bwd_s)) + gather,
                    "optimizer": self._part(("optimizer", sig, tp, dp if zero else 1),
                                            lambda: self._optimizer_s(node, layer))},
            state_bytes=weights + grads + optimizer + kept,
            state_parts=(weights, grads, optimizer),
            saved_bytes=saved, fixed_bytes=node.act_bytes_fixed,
            workspace_bytes=samples * loss_backward_bytes(node),
            transient_bytes=whole,
            gathered_bytes=weights * layer.dp if layer.zero >= 3 and layer.dp > 1 else 0.0,
            reduce_bytes=reduce, kept_bytes=kept)

    def _part(self, key: tuple, make: Callable[[], Any]) -> Any:
        """make(), taken once per key: a piece of a layer's cost that many strategies share
        (compute by samples per rank, collectives by layout), keyed by what it reads of the
        strategy and by the layer's signature (equal signatures cost alike: layer_cost)."""
        if key not in self._parts:
            self._parts[key] = make()
        return self._parts[key]

    def reshard_s(self, node: LayerNode, before: LayerStrategy, after: LayerStrategy,
                  micro_batch_size: int) -> float:
        """Seconds per micro-batch to move the activation into `node` from `before`'s layout
        to `after`'s (at an embedding, the output of the layer before it: reshard_bytes)."""
        at = self.graph.index[node.name]
        previous = self.graph.nodes[at - 1] if at > 0 else None
        return reshard_time_s(self.comm, node, before, after, micro_batch_size, previous)

    def _pipeline_bytes(self, plan: Plan, layers: list[tuple[LayerNode, LayerPlan]],
                        chunks: list[list[int]]) -> tuple[float, list[float]]:
        """StageMemory.pipeline of a stage's chunks, kept all step and per micro-batch in
        flight by chunk (stage_pipeline_bytes; nothing without a pipeline)."""
        if plan.pp == 1:
            return 0.0, [0.0] * len(chunks)
        return stage_pipeline_bytes([n for n, _ in layers], [lp for _, lp in layers],
                                    [(c[0], c[-1] + 1) for c in chunks],
                                    plan.micro_batch_size, plan.num_micro_batches)

    def _hops(self, plan: Plan, layers: list[tuple[LayerNode, LayerPlan]],
              chunk: list[int]) -> float:
        """Pipeline sends of one chunk per micro-batch: its output forward (unless it ends the
        model) and its input's gradient backward (unless it starts the model)."""
        if plan.pp == 1:
            return 0.0
        ends = [chunk[-1]] if chunk[-1] + 1 < len(layers) else []
        ends += [chunk[0] - 1] if chunk[0] > 0 else []
        return sum(self.hop_s(*layers[i], plan.micro_batch_size, plan.stage_gpus) for i in ends)

    def hop_s(self, node: LayerNode, layer: LayerStrategy, micro_batch_size: int,
              stage_gpus: int) -> float:
        """One pipeline send of `node`'s output (or its gradient) per micro-batch."""
        samples = micro_batch_size // layer.dp
        return self._part(("hop", node.signature, layer.tp, samples, stage_gpus),
                          lambda: p2p_time_s(self.comm, node, layer, samples, stage_gpus))

    def _optimizer_s(self, node: LayerNode, layer: LayerStrategy) -> float:
        """The optimizer step over this rank's share of `node`: measured in situ (ZeRO
        divides it by dp), else memory-bound: each state byte read and written, the gradient
        read and the weight written."""
        measured = self.compute.optimizer_s(node, layer.tp, self.optimizer)
        if measured is not None:
            return measured / (layer.dp if layer.zero else 1)
        bandwidth = self.cluster.device.memory_bandwidth
        if not bandwidth:
            return 0.0
        per_param = 2 * self.optimizer_bytes + 2 * self.elt_bytes
        params = node.params / tp_shards(node, layer.tp)[0] / (layer.dp if layer.zero else 1)
        nbytes = params * per_param
        return nbytes / (bandwidth * memory_efficiency(nbytes, bandwidth)) if nbytes else 0.0

    # ------------------------------------------------------------------------- summary

    def _summary(self, plan: Plan, step: float, breakdown: dict[str, float],
                 stages: list[StageEstimate],
                 layers: list[tuple[LayerNode, LayerPlan]]) -> Estimate:
        model_flops = plan.global_batch * sum(n.fwd_flops + n.bwd_flops for n in self.graph.nodes)
        recompute = plan.global_batch * sum(
            {"none": 0.0, "selective": n.attn_fwd_flops, "full": n.fwd_flops}[lp.checkpoint]
            for n, lp in layers)
        world, peak = plan.world_size, self.cluster.device.peak_flops
        tokens = plan.global_batch * (self.graph.tokens_per_sample or 1)
        peaks = [int(s.memory.peak) for s in stages]
        return Estimate(
            step_time_s=step, tokens_per_s=tokens / step,
            model_tflops_per_gpu=model_flops / step / world / 1e12,
            hardware_tflops_per_gpu=(model_flops + recompute) / step / world / 1e12,
            mfu=model_flops / step / world / peak if peak else 0.0,
            peak_memory_bytes=peaks, memory_limit_bytes=self.memory_limit_bytes,
            overhead_bytes=self.overhead_bytes,
            fits=self.fits(peaks),
            breakdown=breakdown, stages=stages, notes=list(self.notes))
