"""autoplan.cost_model: step time and per-rank memory of a Plan, with a breakdown.

CostModel(graph, cluster, profile).estimate(plan) -> Estimate. Pure arithmetic: no torch.
Every formula lives here, the analytic layer and collective times included (analytic.py);
this front is what the floors above import.
"""

from autoplan.cost_model.analytic import TP_SHARDED_KINDS, analytic_profile
from autoplan.cost_model.communication import PRICED_COLLECTIVES, priced_message_bytes
from autoplan.cost_model.compute import data_parallel_key
from autoplan.cost_model.estimate import STEP_PARTS, CostModel, Estimate, StageEstimate
from autoplan.cost_model.memory import (
    ChunkMessage,
    LayerCost,
    StageMemory,
    chunk_messages,
    counted_stage_memory,
    receive_bytes,
    receive_share,
    sequence_sliced,
    stage_pipeline_bytes,
)
from autoplan.cost_model.pipeline import (
    chunks_in_flight,
    micro_batches_in_flight,
    most_held,
    undominated,
)
from autoplan.cost_model.report import estimate_tables
from autoplan.cost_model.schedule import Timeline, plan_timeline

__all__ = ["CostModel", "Estimate", "StageEstimate", "STEP_PARTS", "LayerCost",
           "counted_stage_memory", "StageMemory", "receive_bytes", "receive_share",
           "ChunkMessage", "chunk_messages", "stage_pipeline_bytes", "sequence_sliced",
           "micro_batches_in_flight", "chunks_in_flight", "most_held", "undominated",
           "TP_SHARDED_KINDS",
           "analytic_profile", "estimate_tables", "Timeline", "plan_timeline",
           "PRICED_COLLECTIVES", "priced_message_bytes", "data_parallel_key"]
