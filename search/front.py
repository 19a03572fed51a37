"""The search package's front: search a Workload, or a model named as the CLI names it.

`autoplan.search(model, cluster=..., global_batch=...)` is search_plan; commands and
`autoplan.auto` that hold a Workload call search_workload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.hardware import GiB
from autoplan.plan import Plan
from autoplan.profile import Profile
from autoplan.search.report import describe
from autoplan.search.search import Candidate, Searcher, SearchOptions, SearchResult
from autoplan.search.space import parse_fix
from autoplan.trainers import trainer
from autoplan.workload import Workload, load_workload

__all__ = ["search_workload", "search_plan", "no_plan_message", "trainer_plan"]


def search_workload(work: Workload, options: SearchOptions,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    explain: Callable[[SearchResult, int], str] | None = None) -> SearchResult:
    """The search's result for `work`; the Workload's memory limit is the one searched under.

    Raises:
        AutoplanError: when no plan fits, in explain's words (default: no_plan_message,
            naming the memory that would do).
    """
    options = replace(options, memory_limit_bytes=work.memory_limit_bytes)
    searcher = Searcher(work.graph, work.cluster, options, work.profile)
    result = searcher.run(on_progress)
    if result.best is None:
        raise AutoplanError((explain or no_plan_message)(result,
                                                         searcher.model.memory_limit_bytes))
    return result


def no_plan_message(result: SearchResult, limit: int) -> str:
    """Why no plan came back: none exists, or the least memory one needs."""
    if result.smallest_fitting_bytes is None:
        return "no plan exists for these settings (check --fix, --max-tp and the batch)"
    return (f"no plan fits in {limit / GiB:.1f} GiB per device; the least memory a plan tried "
            f"needs is {result.smallest_fitting_bytes / GiB:.1f} GiB, most of it {result.binding}")


def trainer_plan(result: SearchResult, name: str) -> Candidate:
    """The plan of trainer `name` that a search with SearchOptions.trainer found.

    Raises:
        AutoplanError: when the trainer can express no plan, or none that fits (saying
            what the least memory one needs).
    """
    title = trainer(name).title
    found = result.trainer
    if found is None:
        raise AutoplanError(f"{title} can express no plan of this model on this cluster and "
                            f"batch (its rules: autoplan.trainers)")
    if not found.estimate.fits:
        need = max(found.estimate.peak_memory_bytes) + found.estimate.overhead_bytes
        raise AutoplanError(f"no plan {title} can express fits in "
                            f"{found.estimate.memory_limit_bytes / GiB:.1f} GiB per device; "
                            f"the least memory one needs is {need / GiB:.1f} GiB "
                            f"(pp {found.plan.pp}, {describe(found)}); the unrestricted plan "
                            f"takes {result.best.estimate.step_time_s:.3g} s per step")
    return found


def search_plan(model: str | LayerGraph, *, cluster: str, global_batch: int,
                seq: int | None = None, profile: str | Profile | None = None,
                solver: str = "auto", top_k: int = 3, memory_limit_gib: float | None = None,
                max_tp: int | None = None, fix: str | None = None, dtype: str = "bf16",
                attention: str = "flash", time_limit_s: float = 30.0,
                output: str | None = None, for_trainer: str | None = None) -> Plan:
    """The fastest plan for `model` (a spec such as "llama3-8b", a graph.json path, or a
    LayerGraph from autoplan.tracing.layer_graph for your own nn.Module) on `cluster`;
    `fix` pins settings ("pp=8,zero=1"), `output` saves the plan; with `for_trainer`
    ("torchtitan", "megatron", "deepspeed"), the fastest plan that trainer can express
    (autoplan.trainers), for `autoplan export`.

    Raises:
        AutoplanError: on bad input or when no plan (no plan the trainer can express) fits.
    """
    if max_tp is not None and max_tp < 1:
        raise AutoplanError(f"--max-tp must be at least 1, got {max_tp}")
    work = load_workload(model, cluster, profile, dtype, attention, seq, memory_limit_gib)
    options = SearchOptions(global_batch=global_batch, max_tp=max_tp, fix=parse_fix(fix),
                            solver=solver, time_limit_s=time_limit_s, top_k=top_k,
                            trainer=for_trainer)
    result = search_workload(work, options)
    plan = trainer_plan(result, for_trainer).plan if for_trainer else result.best.plan
    if output:
        plan.save(Path(output))
    return plan
