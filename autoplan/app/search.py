"""`autoplan search`: load what the options name, search, write the plan."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoplan.errors import AutoplanError
from autoplan.search import SearchOptions, SearchResult, parse_fix, search_workload, trainer_plan
from autoplan.workload import Workload, WorkloadOptions, is_saved_graph

__all__ = ["SearchCommand", "run_search"]


@dataclass(frozen=True, kw_only=True)
class SearchCommand(WorkloadOptions):
    global_batch: int
    solver: str = "auto"
    top_k: int = 3
    max_tp: int | None = None
    fix: str | None = None
    time_limit_s: float = 30.0
    output: str | None = None
    for_trainer: str | None = None
    """Also the fastest plan this trainer can express; the output is then that plan."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        if self.max_tp is not None and self.max_tp < 1:
            raise AutoplanError(f"--max-tp must be at least 1, got {self.max_tp}")
        if self.top_k < 0 or not self.time_limit_s > 0:
            raise AutoplanError(f"--top-k must be >= 0 and --time-limit positive, got "
                                f"{self.top_k} and {self.time_limit_s}")


def run_search(command: SearchCommand,
               on_progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Search as `command` says and write the best plan (with for_trainer: the trainer's)
    to its output, if it names one.

    Raises:
        AutoplanError: on bad input, or when no plan fits (naming the memory that would do);
            with for_trainer, when no plan the trainer can express fits.
    """
    work = command.load()
    if work.profile is None and not work.cluster.device.has_datasheet:
        raise AutoplanError(_profile_first(command, work))
    result = search_workload(work, _options(command), on_progress)
    written = trainer_plan(result, command.for_trainer) if command.for_trainer else result.best
    if command.output:
        written.plan.save(Path(command.output))
    return result


def _options(command: SearchCommand) -> SearchOptions:
    return SearchOptions(global_batch=command.global_batch,
                         max_tp=command.max_tp, fix=parse_fix(command.fix),
                         solver=command.solver, time_limit_s=command.time_limit_s,
                         top_k=command.top_k, trainer=command.for_trainer)


def _profile_first(command: SearchCommand, work: Workload) -> str:
    """Why a cluster without datasheet figures (local-cpu) needs a profile, and the command
    that measures one (fp32, as `autoplan profile` times on a CPU) for the model (a saved
    graph records the spec it was traced from)."""
    procs = work.cluster.gpus
    model = shlex.quote(is_saved_graph(command.model) and work.graph.model or command.model)
    dtype = "" if command.dtype == "fp32" else " --dtype fp32"
    return (f"cluster '{command.cluster}' has no datasheet figures to price layers with; "
            f"measure them first: autoplan profile --model {model} --nproc {procs} -o "
            f"profile-{procs}, then search again with --profile profile-{procs}{dtype}")


