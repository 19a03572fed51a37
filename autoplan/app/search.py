"""`autoplan search`: load what the options name, search, write the plan."""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autoplan import fmt
from autoplan.errors import AutoplanError
from autoplan.search import SearchOptions, SearchResult, parse_fix, search_workload, trainer_plan
from autoplan.workload import Workload, WorkloadOptions, is_saved_graph

if TYPE_CHECKING:
    from autoplan.app.dry_run import DryRunReport

__all__ = ["SearchCommand", "check_line", "dry_run_check", "run_search"]


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
    check: bool = False
    """Dry-run the chosen plan's fullest rank (dry_run_check)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        if self.max_tp is not None and self.max_tp < 1:
            raise AutoplanError(f"--max-tp must be at least 1, got {self.max_tp}")
        if self.check and is_saved_graph(self.model):
            raise AutoplanError("--check builds the model: give a model spec, not a saved "
                                "graph.json")
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


def dry_run_check(command: SearchCommand, result: SearchResult) -> DryRunReport:
    """The written plan's fullest rank played as `autoplan run --dry-run` plays it: torch's
    fake process group, the executor's own code, in fp32 as `autoplan run` trains (so it
    is weighed against the fp32 prediction of the same plan, not the search's dtype)."""
    from autoplan.app.dry_run import dry_run
    from autoplan.app.run import RunOptions
    from autoplan.models.spec import spec_with_seq

    chosen = trainer_plan(result, command.for_trainer) if command.for_trainer else result.best
    model = spec_with_seq(command.model, command.seq) if command.seq else command.model
    with tempfile.TemporaryDirectory(prefix="autoplan-check-") as folder:
        path = Path(folder) / "plan.json"
        chosen.plan.save(path)
        options = RunOptions(model=model, plan=str(path), cluster=command.cluster,
                             memory_limit_gib=command.memory_limit_gib, cache=command.cache)
        return dry_run(options)


def check_line(report: DryRunReport) -> str:
    """What the dry run of --check found, for the line beside the predicted peak."""
    mem = report.ranks[0]
    text = (f"rank {mem.rank} (stage {mem.stage}) played in fp32 ({report.tensors} tensors, "
            f"fake process group): peak {fmt.nbytes(mem.peak)}")
    stage = report.predicted(mem)
    if stage is None:
        return text + f"; {report.note}"
    return (text + f", fp32 prediction {fmt.nbytes(stage.peak)} "
            f"({report.peak_error(mem):+.1%})")
