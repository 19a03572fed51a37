"""`autoplan inspect`: model spec -> LayerGraph, and optionally a plan checked against it."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.models import DTYPES, build_model, parse_model_spec
from autoplan.plan import Plan, check_plan, load_plan
from autoplan.tracing import layer_graph_of_built
from autoplan.workload import load_graph

__all__ = ["InspectResult", "inspect_model", "trace_spec"]



@dataclass(frozen=True)
class InspectResult:
    graph: LayerGraph
    plan: Plan | None


def trace_spec(spec_text: str, dtype: str = "bf16", attention: str = "flash") -> LayerGraph:
    """Build a model spec on meta tensors and trace it into its LayerGraph (every time:
    autoplan.workload.load_graph is the cached way in).

    Raises:
        AutoplanError: on a bad spec or dtype.
    """
    if dtype not in DTYPES:
        raise AutoplanError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    built = build_model(parse_model_spec(spec_text), dtype=DTYPES[dtype])
    return layer_graph_of_built(built, DTYPES[dtype], attention)


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
