"""A pipeline schedule played out in time: which micro-batch each pipeline rank runs when.

pipeline.py gives the closed form of a step; this module simulates the schedule op by op
with its dependencies, for pictures and for checking the closed form. A forward of
micro-batch i in model chunk g starts once chunk g - 1 has finished that forward (on its
rank), a backward once chunk g + 1 has finished that backward (the last chunk: once its own
forward has), and each rank runs its ops in the schedule's fixed order:

- GPipe: every forward, then every backward (Huang et al. 2019).
- 1F1B: pp - s - 1 forwards on rank s, then one forward and one backward in turn, then
  the remaining backwards (Narayanan et al. 2021, sec. 2.2.1; Megatron-LM's
  forward_backward_pipelining_without_interleaving).
- Interleaved 1F1B with v chunks per rank: micro-batches go in rounds of g through chunk 0,
  then chunk 1, ...; rank s warms up with 2 (pp - s - 1) + (v - 1) g forwards, where
  g = pp when pp divides m (Narayanan et al. 2021, sec. 2.2.2; torch.distributed.pipelining
  ScheduleInterleaved1F1B, whose rounds are max(1, m // pp), g = m / rounds rounded up).

Sends are taken as asynchronous: a pipeline hop's time is part of the op that sends it.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.cost_model.estimate import CostModel, Estimate
from autoplan.cost_model.pipeline import OpKind, op_order
from autoplan.plan import Plan

__all__ = ["ChunkTimes", "ScheduledOp", "Timeline", "op_order", "simulate_schedule",
           "chunk_times_from_estimate", "plan_timeline"]

_COMM_PARTS = ("tp_comm", "fsdp_comm", "reshard", "pp_comm")


@dataclass(frozen=True)
class ChunkTimes:
    """Seconds one micro-batch spends in one model chunk on its pipeline rank."""

    forward_s: float
    backward_s: float
    recompute_s: float = 0.0
    comm_s: float = 0.0
    """Exposed TP, FSDP, resharding and pipeline-send time, split between the chunk's forward
    and backward op in proportion to their compute (the cost model sums them per micro-batch)."""

    def parts(self, kind: OpKind) -> tuple[tuple[str, float], ...]:
        """The op's pieces in the order drawn: (part, seconds)."""
        compute = self.forward_s + self.backward_s + self.recompute_s
        forward_share = self.forward_s / compute if compute else 0.5
        if kind == "forward":
            return (("forward", self.forward_s), ("comm", self.comm_s * forward_share))
        return (("recompute", self.recompute_s), ("backward", self.backward_s),
                ("comm", self.comm_s * (1 - forward_share)))

    def op_s(self, kind: OpKind) -> float:
        return sum(seconds for _, seconds in self.parts(kind))


@dataclass(frozen=True)
class ScheduledOp:
    rank: int
    """Pipeline rank (stage) that runs the op."""
    chunk: int
    """Global model chunk: chunk g runs on rank g mod pp."""
    micro_batch: int
    kind: OpKind
    start_s: float
    end_s: float
    parts: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Timeline:
    pp: int
    micro_batches: int
    ops: list[ScheduledOp]

    @property
    def makespan_s(self) -> float:
        return max(op.end_s for op in self.ops)

    def busy_s(self, rank: int) -> float:
        return sum(op.end_s - op.start_s for op in self.ops if op.rank == rank)

    def bubble_fraction(self) -> float:
        """Idle share of all ranks over the makespan."""
        total = self.pp * self.makespan_s
        return 1 - sum(self.busy_s(r) for r in range(self.pp)) / total if total else 0.0


def simulate_schedule(schedule: str, pp: int, micro_batches: int,
                      chunk_times: list[ChunkTimes], virtual: int = 1) -> Timeline:
    """Play a pipeline schedule out in time.

    Args:
        schedule: "gpipe", "1f1b" or "interleaved_1f1b".
        pp: pipeline ranks.
        micro_batches: micro-batches per step.
        chunk_times: one entry per global chunk (pp x virtual); chunk g runs on rank g mod pp.
        virtual: chunks per rank.

    Returns:
        Every op with its start and end; with equal stages of T seconds per micro-batch,
        GPipe and 1F1B end at (m + pp - 1) T.

    Raises:
        ValueError: on a chunk count other than pp x virtual or an unknown schedule.

    Example:
        >>> simulate_schedule("1f1b", 2, 4, [ChunkTimes(1.0, 2.0)] * 2).makespan_s
        15.0
    """
    if len(chunk_times) != pp * virtual:
        raise ValueError(f"{len(chunk_times)} chunk times given; pp {pp} x virtual {virtual} "
                         f"chunks run")
    orders = [op_order(schedule, pp, r, micro_batches, virtual) for r in range(pp)]
    done: dict[tuple[OpKind, int, int], float] = {}
    free_at, cursor, ops = [0.0] * pp, [0] * pp, []
    last = pp * virtual - 1
    while any(cursor[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            while cursor[rank] < len(orders[rank]):
                kind, local, mb = orders[rank][cursor[rank]]
                chunk = local * pp + rank
                dep = (("forward", chunk - 1, mb) if kind == "forward" else
                       ("forward", chunk, mb) if chunk == last else ("backward", chunk + 1, mb))
                if kind == "forward" and chunk == 0:
                    ready = 0.0
                elif dep in done:
                    ready = done[dep]
                else:
                    break
                times = chunk_times[chunk]
                start = max(free_at[rank], ready)
                end = start + times.op_s(kind)
                ops.append(ScheduledOp(rank, chunk, mb, kind, start, end, times.parts(kind)))
                done[(kind, chunk, mb)] = free_at[rank] = end
                cursor[rank] += 1
                progressed = True
        if not progressed:  # an order that waits on itself: a bug in op_order, not input
            raise RuntimeError(f"schedule {schedule} deadlocked at {cursor}")
    return Timeline(pp=pp, micro_batches=micro_batches, ops=ops)


def chunk_times_from_estimate(estimate: Estimate, pp: int, virtual: int = 1,
                              chunk_weights: list[float] | None = None) -> list[ChunkTimes]:
    """Per-chunk times from an Estimate's per-stage times per micro-batch.

    Args:
        estimate: the plan's estimate (stages[s].per_micro_batch_s).
        pp, virtual: the plan's pipeline ranks and chunks per rank.
        chunk_weights: one weight per global chunk (e.g. its layers' compute time); a stage's
            time is divided among its chunks in proportion. Default: equal shares.

    Returns:
        pp x virtual ChunkTimes, in global chunk order; per stage they add up to the estimate.
    """
    weights = chunk_weights or [1.0] * (pp * virtual)
    times = []
    for chunk in range(pp * virtual):
        stage = estimate.stages[chunk % pp].per_micro_batch_s
        mine = range(chunk % pp, pp * virtual, pp)
        total = sum(weights[c] for c in mine)
        share = weights[chunk] / total if total else 1 / virtual
        times.append(ChunkTimes(
            forward_s=stage["forward"] * share, backward_s=stage["backward"] * share,
            recompute_s=stage["recompute"] * share,
            comm_s=sum(stage[p] for p in _COMM_PARTS) * share))
    return times


def plan_timeline(model: CostModel, plan: Plan, estimate: Estimate) -> Timeline:
    """Simulate `plan`'s schedule with `estimate`'s per-stage times, each stage's time divided
    among its chunks by the compute time of their layers (CostModel.layer_cost).

    Raises:
        ValueError: on a plan whose schedule op_order does not know.
    """
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    weights = []
    for chunk in range(len(bounds) - 1):
        stage = chunk % plan.pp
        costs = (model.layer_cost(model.graph.nodes[i], plan.layers[i], plan.micro_batch_size,
                                  plan.num_micro_batches,
                                  stage) for i in range(bounds[chunk], bounds[chunk + 1]))
        weights.append(sum(sum(c.per_micro_batch_s.values()) for c in costs))
    times = chunk_times_from_estimate(estimate, plan.pp, plan.virtual_stages, weights)
    return simulate_schedule(plan.schedule, plan.pp, plan.num_micro_batches, times,
                             plan.virtual_stages)
