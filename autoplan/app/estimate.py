"""`autoplan estimate`: model + cluster + plan (+ profile) -> Estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.estimate import CostModel, Estimate
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.hardware import GiB
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.profile import load_profile

__all__ = ["EstimateOptions", "load_graph", "memory_limit_bytes", "run_estimate"]



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

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        if self.seq is not None and self.seq < 1:
            raise AutoplanError(f"--seq must be at least 1, got {self.seq}")
        memory_limit_bytes(self.memory_limit_gib)


def memory_limit_bytes(gib: float | None) -> int | None:
    """`--memory-limit` in bytes; None leaves the device's own memory.

    Raises:
        AutoplanError: unless it is a positive, finite number of GiB.
    """
    if gib is None:
        return None
    if not 0 < gib < math.inf:
        raise AutoplanError(f"--memory-limit must be positive finite GiB, got {gib}")
    return int(gib * GiB)


def load_graph(model: str, dtype: str = "bf16", attention: str = "flash",
               seq: int | None = None) -> tuple[LayerGraph, dict]:
    """The layer graph of a spec (traced) or of a saved graph.json, and the model's head
    counts for plan checks (empty for a saved graph)."""
    if model.endswith(".json") and not model.startswith("hf:"):  # hf: names a config.json
        if seq is not None:
            raise AutoplanError("--seq applies to a model spec, not to a saved graph.json")
        return LayerGraph.load(model), {}
    from autoplan.inspection import inspect_model  # torch: only when a model is traced
    from autoplan.models.spec import spec_with_seq

    spec = model if seq is None else spec_with_seq(model, seq)
    result = inspect_model(spec, dtype=dtype, attention=attention)
    from autoplan.models import parse_model_spec

    config = parse_model_spec(spec).config
    heads = {"heads": getattr(config, "heads", None), "kv_heads": getattr(config, "kv_heads",
                                                                           None)}
    return result.graph, heads


def run_estimate(options: EstimateOptions) -> tuple[Plan, Estimate]:
    """Load everything `options` names, check the plan against the model and cluster, and
    estimate it.

    Raises:
        AutoplanError: on any bad input, naming it.
    """
    cluster = parse_cluster_spec(options.cluster)
    graph, heads = load_graph(options.model, options.dtype, options.attention, options.seq)
    plan = load_plan(options.plan, graph, cluster.gpus, options.global_batch, cluster.spec)
    if plan.global_batch != options.global_batch:
        raise AutoplanError(f"plan is for global batch {plan.global_batch}, not "
                            f"{options.global_batch}")
    check_plan(plan, graph, world_size=cluster.gpus, **heads)
    profile = load_profile(options.profile) if options.profile else None
    if profile is not None and profile.model_hash != graph.structural_hash:
        raise AutoplanError(f"profile '{Path(options.profile)}' is of model {profile.model} "
                            f"(hash {profile.model_hash}), not {graph.model} "
                            f"({graph.structural_hash})")
    limit = memory_limit_bytes(options.memory_limit_gib)
    model = CostModel(graph, cluster, profile, options.optimizer, limit)
    return plan, model.estimate(plan)
