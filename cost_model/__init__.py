"""autoplan.cost_model: step time and per-rank memory of a Plan, with a breakdown.

CostModel(graph, cluster, profile).estimate(plan) -> Estimate. Pure arithmetic: no torch.
"""

from autoplan.cost_model.estimate import STEP_PARTS, CostModel, Estimate, StageEstimate

__all__ = ["CostModel", "Estimate", "StageEstimate", "STEP_PARTS"]
