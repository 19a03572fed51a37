"""`autoplan estimate`: model + cluster + plan (+ profile) -> Estimate."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.cost_model import CostModel, Estimate
from autoplan.errors import AutoplanError
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.workload import load_workload, memory_limit_bytes

__all__ = ["EstimateOptions", "run_estimate"]

@dataclass(frozen=True)
class EstimateOptions:
    model: str
    """A model spec, or a graph.json written by `autoplan inspect -o` (no tracing)."""
    cluster: str
    global_batch: int
    plan: str
    seq: int | None = None
    profile: str | None = None
    dtype: str = "bf16"
    attention: str = "flash"
    memory_limit_gib: float | None = None
    optimizer: str = "adamw"
    cache: bool = True
    """Whether a spec's graph may come from, and go to, the graph cache (--no-cache: no)."""

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        if self.seq is not None and self.seq < 1:
            raise AutoplanError(f"--seq must be at least 1, got {self.seq}")
        memory_limit_bytes(self.memory_limit_gib)


def run_estimate(options: EstimateOptions) -> tuple[Plan, Estimate]:
    """Load everything `options` names, check the plan against the model and cluster, and
    estimate it.

    Raises:
        AutoplanError: on any bad input, naming it.
    """
    work = load_workload(options.model, options.cluster, options.profile, options.dtype,
                         options.attention, options.seq, options.memory_limit_gib,
                         cache=options.cache)
    cluster = work.cluster
    plan = load_plan(options.plan, work.graph, cluster.gpus, options.global_batch, cluster.spec)
    if plan.global_batch != options.global_batch:
        raise AutoplanError(f"plan is for global batch {plan.global_batch}, not "
                            f"{options.global_batch}")
    check_plan(plan, work.graph, world_size=cluster.gpus)
    return plan, CostModel.of(work, options.optimizer).estimate(plan)
