"""`autoplan estimate`: model + cluster + plan (+ profile) -> Estimate."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.cost_model import CostModel, Estimate
from autoplan.errors import AutoplanError
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.workload import WorkloadOptions

__all__ = ["EstimateOptions", "run_estimate"]

@dataclass(frozen=True, kw_only=True)
class EstimateOptions(WorkloadOptions):
    global_batch: int
    plan: str
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")


def run_estimate(options: EstimateOptions) -> tuple[Plan, Estimate]:
    """Load everything `options` names, check the plan against the model and cluster, and
    estimate it.

    Raises:
        AutoplanError: on any bad input, naming it.
    """
    work = options.load()
    cluster = work.cluster
    plan = load_plan(options.plan, work.graph, cluster.gpus, options.global_batch, cluster.spec)
    if plan.global_batch != options.global_batch:
        raise AutoplanError(f"plan is for global batch {plan.global_batch}, not "
                            f"{options.global_batch}")
    check_plan(plan, work.graph, world_size=cluster.gpus)
    return plan, CostModel.of(work, options.optimizer).estimate(plan)
