"""`autoplan inspect`: model spec -> LayerGraph, and optionally a plan checked against it."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.models import DTYPES, build_model, parse_model_spec
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.tracing import layer_graph_of_built

__all__ = ["InspectResult", "inspect_model"]



@dataclass(frozen=True)
class InspectResult:
    graph: LayerGraph
    plan: Plan | None


def inspect_model(spec_text: str, dtype: str = "bf16", attention: str = "flash",
                  plan: str | None = None, world_size: int | None = None,
                  global_batch: int | None = None) -> InspectResult:
    """Trace a model spec into its LayerGraph; with `plan`, load and check that plan too.

    Raises:
        AutoplanError: on a bad spec, dtype or plan.
    """
    if dtype not in DTYPES:
        raise AutoplanError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    spec = parse_model_spec(spec_text)
    graph = layer_graph_of_built(build_model(spec, dtype=DTYPES[dtype]), DTYPES[dtype], attention)
    if plan is None:
        return InspectResult(graph, None)
    loaded = load_plan(plan, graph, world_size, global_batch)
    check_plan(loaded, graph, world_size=world_size)
    return InspectResult(graph, loaded)
