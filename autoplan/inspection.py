"""`autoplan inspect`: model spec -> LayerGraph, and optionally a plan checked against it."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.graph import LayerGraph
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.workload import load_graph

__all__ = ["InspectResult", "inspect_model"]


@dataclass(frozen=True)
class InspectResult:
    graph: LayerGraph
    plan: Plan | None


def inspect_model(spec_text: str, dtype: str = "bf16", attention: str = "flash",
                  plan: str | None = None, world_size: int | None = None,
                  global_batch: int | None = None, cache: bool = True) -> InspectResult:
    """A model spec's LayerGraph (from the graph cache when `cache`); with `plan`, load and
    check that plan too.

    Raises:
        AutoplanError: on a bad spec, dtype or plan.
    """
    graph = load_graph(spec_text, dtype, attention, cache=cache)
    if plan is None:
        return InspectResult(graph, None)
    loaded = load_plan(plan, graph, world_size, global_batch)
    check_plan(loaded, graph, world_size=world_size)
    return InspectResult(graph, loaded)
