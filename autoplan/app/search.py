"""`autoplan search` and `autoplan.search()`: load what the options name, search, write."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoplan.app.estimate import load_graph, memory_limit_bytes
from autoplan.cluster import parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.hardware import GiB
from autoplan.plan import Plan
from autoplan.profile import Profile, load_profile
from autoplan.search.search import Searcher, SearchOptions, SearchResult
from autoplan.search.space import parse_fix

__all__ = ["SearchCommand", "run_search", "search_plan", "no_plan_message"]

_CLI_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
"""Trace dtype (LayerGraph.dtype, Profile.dtype) -> the name --dtype takes."""


@dataclass(frozen=True)
class SearchCommand:
    model: str
    cluster: str
    global_batch: int
    seq: int | None = None
    profile: str | None = None
    solver: str = "auto"
    top_k: int = 3
    memory_limit_gib: float | None = None
    max_tp: int | None = None
    fix: str | None = None
    dtype: str = "bf16"
    attention: str = "flash"
    time_limit_s: float = 30.0
    output: str | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        memory_limit_bytes(self.memory_limit_gib)
        if self.max_tp is not None and self.max_tp < 1:
            raise AutoplanError(f"--max-tp must be at least 1, got {self.max_tp}")
        if self.top_k < 0 or not self.time_limit_s > 0:
            raise AutoplanError(f"--top-k must be >= 0 and --time-limit positive, got "
                                f"{self.top_k} and {self.time_limit_s}")


def run_search(command: SearchCommand,
               on_progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Search as `command` says and write the best plan to its output, if it names one.

    Raises:
        AutoplanError: on bad input, or when no plan fits (naming the memory that would do).
    """
    graph, heads = load_graph(command.model, command.dtype, command.attention, command.seq)
    result = _search(graph, command, heads, on_progress)
    if command.output:
        result.best.plan.save(Path(command.output))
    return result


def _search(graph: LayerGraph, command: SearchCommand, heads: dict,
            on_progress: Callable[[str, int, int], None] | None) -> SearchResult:
    cluster = parse_cluster_spec(command.cluster)
    profile = load_profile(command.profile) if command.profile else None
    if profile is None and (cluster.device.peak_flops is None
                            or cluster.device.memory_bandwidth is None):
        raise AutoplanError(_profile_first(command, graph, cluster.gpus))
    if profile is not None and profile.model_hash != graph.structural_hash:
        raise AutoplanError(_profile_mismatch(command, profile, graph))
    options = SearchOptions(global_batch=command.global_batch,
                            memory_limit_bytes=memory_limit_bytes(command.memory_limit_gib),
                            max_tp=command.max_tp, fix=parse_fix(command.fix),
                            solver=command.solver, time_limit_s=command.time_limit_s,
                            top_k=command.top_k)
    searcher = Searcher(graph, cluster, options, profile, heads.get("heads"),
                        heads.get("kv_heads"))
    result = searcher.run(on_progress)
    if result.best is None:
        raise AutoplanError(no_plan_message(result, searcher.model.memory_limit_bytes))
    return result


def _profile_first(command: SearchCommand, graph: LayerGraph, procs: int) -> str:
    """Why a cluster without datasheet figures (local-cpu) needs a profile, and the command
    that measures one (fp32, as `autoplan profile` times on a CPU) for the model (a saved
    graph records the spec it was traced from)."""
    model = shlex.quote(_is_saved_graph(command.model) and graph.model or command.model)
    dtype = "" if command.dtype == "fp32" else " --dtype fp32"
    return (f"cluster '{command.cluster}' has no datasheet figures to price layers with; "
            f"measure them first: autoplan profile --model {model} --nproc {procs} -o "
            f"profile-{procs}, then search again with --profile profile-{procs}{dtype}")


def _profile_mismatch(command: SearchCommand, profile: Profile, graph: LayerGraph) -> str:
    """Why the profile is not of the graph searched: another dtype (and the --dtype that
    matches it), or another model."""
    made = _CLI_DTYPES.get(profile.dtype, profile.dtype)
    traced = _CLI_DTYPES.get(graph.dtype, graph.dtype)
    if made != traced and _is_saved_graph(command.model):  # it keeps the dtype it was traced in
        return (f"profile '{command.profile}' was made in {made}, and the graph "
                f"'{command.model}' was traced in {traced}: inspect the model again with "
                f"--dtype {made} -o DIR (or profile with --dtype {traced})")
    if made != traced:
        return (f"profile '{command.profile}' was made in {made}, and this search traces "
                f"the model in {traced}: give --dtype {made} (or profile with --dtype {traced})")
    return (f"profile '{command.profile}' is of model {profile.model} (hash "
            f"{profile.model_hash}), not {graph.model} ({graph.structural_hash}); profile "
            "this model")


def _is_saved_graph(model: str) -> bool:
    """True when --model names a graph.json (as load_graph reads it), not a spec."""
    return model.endswith(".json") and not model.startswith("hf:")


def no_plan_message(result: SearchResult, limit: int) -> str:
    if result.smallest_fitting_bytes is None:
        return "no plan exists for these settings (check --fix, --max-tp and the batch)"
    return (f"no plan fits in {limit / GiB:.1f} GiB per device; the least memory a plan tried "
            f"needs is {result.smallest_fitting_bytes / GiB:.1f} GiB, most of it {result.binding}")


def search_plan(model: str | LayerGraph, *, cluster: str, global_batch: int,
                **options: Any) -> Plan:
    """The fastest plan for `model` (a spec such as "llama3-8b", a graph.json path, or a
    LayerGraph from autoplan.tracing.layer_graph for your own nn.Module) on `cluster`.

    Options are SearchCommand's: seq, profile, solver, top_k, memory_limit_gib, max_tp, fix
    ("pp=8,zero=1"), dtype, attention, time_limit_s, output.

    Raises:
        AutoplanError: on bad input or when no plan fits.
    """
    if isinstance(model, LayerGraph):
        command = SearchCommand(model=model.model, cluster=cluster, global_batch=global_batch,
                                **options)
        result = _search(model, command, {}, None)
        if command.output:
            result.best.plan.save(Path(command.output))
        return result.best.plan
    command = SearchCommand(model=model, cluster=cluster, global_batch=global_batch, **options)
    return run_search(command).best.plan
