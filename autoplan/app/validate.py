"""`autoplan validate`: profile here, predict many plans, run them for real, and say how well
prediction and measurement agree (MAPE, Spearman, regret, memory error).

The profile is taken in situ (profiler/in_situ.py): the layers are timed in nproc ranks at
once, TP layers as DTensors with their collectives, and the optimizer step too, so that it
sees what the runs will: ranks sharing the cores, whatever else loads the machine, and the
executor's own dispatch.

The plans are uniform (one (dp, tp) layout, ZeRO stage and checkpointing for all layers):
every point of pp x tp x dp x ZeRO x checkpointing x micro-batch the executor runs on the
local processes, priced by the cost model with the measured profile. The runs take the
fastest few, an even spread over the rest of the ranking (so that rank correlation means
something), and the DDP and FSDP baselines.

Profile the candidates, not the space: timing every layer under data parallelism on every
layout, ZeRO stage and micro-batch was most of a profile that took over 20 minutes for an
8-layer GPT, and prices plans never run. So the first profile times the layers (every TP
degree and micro-batch) and the collectives, all plans are ranked with data parallelism
priced from the collective fits, and then only the data-parallel points the plans to run
read are timed in situ; those plans are priced again from them, and the fastest of those
prices is the chosen plan. A plan's price rests on its own points alone
(LayerProfile.data_parallel_s), so it does not move with the other plans picked.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from autoplan.cost_model import CostModel, data_parallel_key
from autoplan.errors import AutoplanError
from autoplan.feasibility import plan_refusal
from autoplan.graph import LayerGraph
from autoplan.io import atomic_write_text
from autoplan.plan import Plan, uniform_plan
from autoplan.profile import Profile, load_profile
from autoplan.search import divisors
from autoplan.workload import load_graph, load_workload

if TYPE_CHECKING:
    from autoplan.app.profile import ProfileOptions

__all__ = ["ValidateOptions", "PlanOutcome", "Validation", "candidate_plans", "validate",
           "spearman", "write_outputs"]

Progress = Callable[[str, str, int | None, int | None], None]
"""(stage, text, done, planned), as autoplan.app.profile.Progress: the stages are the
profile's (comm, layers), then "data parallel" (in-situ points of the plans to run) and
"runs" (training steps of all plans)."""
_PER_RANK = (1, 2, 4)
"""Samples per rank in a micro-batch: of the plans run, and of the profile's points."""


@dataclass(frozen=True)
class ValidateOptions:
    model: str
    nproc: int = 4
    global_batch: int = 16
    top_k: int = 10
    steps: int = 8
    warmup: int = 3
    profile: str | None = None
    output: str | None = None
    repeats: int = 12
    """Timed passes per in-situ point at most: 3 samples of 4 (profiler/in_situ.max_sweeps)."""
    timeout_s: float = 300.0
    cache: bool = True
    """Whether a spec's graph may come from, and go to, the graph cache (--no-cache: no)."""

    def __post_init__(self) -> None:
        if self.nproc < 2:
            raise AutoplanError(f"--nproc must be at least 2, got {self.nproc}")
        if self.global_batch < 1 or self.top_k < 2:
            raise AutoplanError("--global-batch must be >= 1 and --top-k >= 2")
        if self.steps <= self.warmup or self.warmup < 0:
            raise AutoplanError(f"--steps ({self.steps}) must exceed the warm-up steps "
                                f"({self.warmup})")


@dataclass(frozen=True)
class PlanOutcome:
    plan: str
    """The shorthand it ran under."""
    role: str
    """chosen, runner-up, spread, ddp or fsdp."""
    predicted_s: float
    measured_s: float
    predicted_state_bytes: float
    """Weights + gradients + optimizer state of the fullest rank, predicted."""
    measured_state_bytes: float

    @property
    def time_error(self) -> float:
        return self.predicted_s / self.measured_s - 1

    @property
    def memory_error(self) -> float:
        return self.predicted_state_bytes / self.measured_state_bytes - 1


@dataclass(frozen=True)
class Validation:
    plans: list[PlanOutcome]
    mape: float
    spearman: float
    regret: float
    memory_error: float
    """Mean absolute relative error of the per-rank state bytes."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"plans": [asdict(p) | {"time_error": p.time_error,
                                       "memory_error": p.memory_error} for p in self.plans],
                "mape": self.mape, "spearman": self.spearman, "regret": self.regret,
                "memory_error": self.memory_error, "notes": self.notes}


def candidate_plans(graph: LayerGraph, nproc: int, global_batch: int) -> list[str]:
    """Every uniform plan the executor runs on `nproc` processes (autoplan.feasibility), as
    shorthand."""
    blocks = sum(node.kind == "block" for node in graph.nodes)
    out = []
    for tp in divisors(nproc):
        for pp in divisors(nproc // tp):
            dp = nproc // (tp * pp)
            if pp > max(blocks, 1):
                continue
            for per_rank in _PER_RANK:
                micro = per_rank * dp
                if global_batch % micro or (pp > 1 and global_batch // micro < pp):
                    continue
                for zero in (0, 2, 3) if dp > 1 else (0,):
                    for ckpt in ("none", "full"):
                        schedules = ("1f1b", "gpipe") if pp > 1 else ("1f1b",)
                        out += [f"dp={dp},tp={tp},pp={pp},micro_batch={per_rank},zero={zero},"
                                f"ckpt={ckpt},schedule={s}" for s in schedules]
    return [text for text in out
            if plan_refusal(uniform_plan(text, graph, nproc, global_batch), graph) is None]


def _profile(options: ValidateOptions, on_progress: Progress | None) -> Profile:
    """Measure layers and collectives as the runs will use them: fp32, one thread per rank,
    layers timed in nproc ranks at once with TP as DTensors (profiler/in_situ.py); not yet
    under data parallelism, which _with_plans_points times for the plans that will run."""
    if options.profile:
        return load_profile(options.profile)
    from autoplan.app.profile import run_profile

    return run_profile(_profile_options(options), on_progress)


def _profile_options(options: ValidateOptions) -> ProfileOptions:
    """The in-situ profile of both rounds: the layers first, their data parallelism after."""
    from autoplan.app.profile import ProfileOptions

    return ProfileOptions(
        model=options.model, nproc=options.nproc, micro_batches=_PER_RANK,
        tps=tuple(tp for tp in (1, 2, 4, 8) if options.nproc % tp == 0),
        repeats=options.repeats, threads=1, dtype="fp32", in_situ=True, data_parallel=False)


def _with_plans_points(profile: Profile, plans: list[Plan], graph: LayerGraph,
                       options: ValidateOptions,
                       on_progress: Progress | None) -> tuple[Profile, list[str]]:
    """The profile with the data-parallel points that pricing `plans` reads
    (cost_model.data_parallel_key) timed in situ, and a note of how many those are."""
    from autoplan.app.profile import counted, measure_settings
    from autoplan.profiler import ZERO_STAGES, data_parallel_layouts, time_layers_in_situ

    nodes = {node.name: node for node in graph.nodes}
    wanted: dict[str, set[tuple[int, int, int, int]]] = {}
    for plan in plans:
        for layer in plan.layers:
            node = nodes[layer.name]
            key = data_parallel_key(node, plan.micro_batch_size // layer.dp, layer.dp,
                                    layer.tp, layer.zero)
            if key is not None and node.params:
                wanted.setdefault(key[0], set()).add(key[1:])
    settings = _profile_options(options)
    space = (len(data_parallel_layouts(settings.tps, options.nproc)) * len(ZERO_STAGES)
             * len(settings.micro_batches)
             * sum(1 for layer in profile.layers if layer.memory.params))
    count = sum(len(points) for points in wanted.values())
    note = (f"data parallelism: {count} points timed in situ for the plans run (a full "
            f"in-situ profile times up to {space}); the plans not run priced it from the "
            "collective fits")
    if not wanted:
        return profile, [note]
    timings = time_layers_in_situ(options.model, settings.dtype, measure_settings(settings),
                                  options.nproc, options.timeout_s,
                                  counted("data parallel", on_progress),
                                  layers=False,
                                  data_parallel={sig: sorted(points)
                                                 for sig, points in wanted.items()})
    layers = [layer.model_copy(update={"data_parallel": timings[layer.signature][2]})
              if layer.signature in timings else layer for layer in profile.layers]
    return profile.model_copy(update={"layers": layers}), [note]


def _select(ranked: list[tuple[float, str]], top_k: int) -> list[tuple[str, str]]:
    """(shorthand, role): the fastest few and an even spread over the rest of the ranking."""
    head = max(2, top_k // 2)
    chosen = [(ranked[0][1], "chosen")] + [(p, "runner-up") for _, p in ranked[1:head]]
    rest = ranked[head:]
    want = top_k - len(chosen)
    if rest and want > 0:
        step = max(1, len(rest) // want)
        chosen += [(p, "spread") for _, p in rest[step - 1::step][:want]]
    return chosen


def _runs(ranked: list[tuple[float, str]], graph: LayerGraph,
          options: ValidateOptions) -> dict[str, tuple[Plan, str]]:
    """shorthand -> (plan, role) of the plans to run: _select's and the DDP and FSDP
    baselines, each plan once (a baseline already in the ranking runs in its place)."""
    runs = _select(ranked, options.top_k)
    per_rank = options.global_batch // options.nproc
    runs += [(f"dp={options.nproc},zero={zero},micro_batch={per_rank}", name)
             for name, zero in (("ddp", 0), ("fsdp", 3)) if per_rank >= 1
             and options.global_batch % options.nproc == 0]
    out, seen = {}, set()
    for shorthand, role in runs:
        plan = uniform_plan(shorthand, graph, options.nproc, options.global_batch)
        key = plan.model_dump_json(exclude={"provenance"})
        if key not in seen:
            seen.add(key)
            out[shorthand] = (plan, role)
    return out


def _chosen_by(predicted: dict[str, float],
               runs: dict[str, tuple[Plan, str]]) -> dict[str, tuple[Plan, str]]:
    """The roles again once the runs are priced with their own points: the fastest predicted
    is the chosen plan (the one chosen from the first prices becomes a runner-up)."""
    fastest = min(predicted, key=predicted.get)
    roles = {shorthand: (plan, "chosen" if shorthand == fastest else
                         "runner-up" if role == "chosen" else role)
             for shorthand, (plan, role) in runs.items()}
    return {fastest: roles[fastest]} | roles  # the chosen plan first


def validate(options: ValidateOptions, on_progress: Progress | None = None) -> Validation:
    """Profile (or load), price every runnable plan, time in situ what the plans to run need,
    price those again, run them, compare.

    Raises:
        AutoplanError: on bad input.
        WorkerFailed: a profiling worker died or stalled; RunFailed (one) when a run's worker
            did, naming the plan, the rank and how. Every worker is stopped first.
    """
    from autoplan.app.profile import counted
    from autoplan.app.run import RunOptions, run_plans

    graph = load_graph(options.model, dtype="fp32", cache=options.cache)
    profile = _profile(options, on_progress)
    cheap = _cost_model(graph, options, profile)
    ranked = sorted((estimate.step_time_s, shorthand)
                    for shorthand in candidate_plans(graph, options.nproc, options.global_batch)
                    if (estimate := cheap.estimate(uniform_plan(
                        shorthand, graph, options.nproc, options.global_batch))).fits)
    if len(ranked) < 2:
        raise AutoplanError(f"fewer than two runnable plans for {options.nproc} processes and "
                            f"global batch {options.global_batch}")
    runs = _runs(ranked, graph, options)
    notes = []
    if not options.profile:
        profile, notes = _with_plans_points(profile, [plan for plan, _ in runs.values()],
                                            graph, options, on_progress)
        if options.output:
            from autoplan.profiler import write_profile

            write_profile(profile, Path(options.output) / "profile")
    model = _cost_model(graph, options, profile)
    estimates = {shorthand: model.estimate(plan) for shorthand, (plan, _) in runs.items()}
    runs = _chosen_by({s: e.step_time_s for s, e in estimates.items()}, runs)
    run_options = [RunOptions(model=options.model, plan=shorthand, nproc=options.nproc,
                              steps=options.steps, warmup=options.warmup,
                              global_batch=options.global_batch, timeout_s=options.timeout_s,
                              device="cpu", cache=options.cache) for shorthand in runs]
    reports = run_plans([(o, plan) for o, (plan, _) in zip(run_options, runs.values(),
                                                           strict=True)],
                        options.nproc, counted("runs", on_progress))
    outcomes = [_outcome(shorthand, role, estimates[shorthand], report)
                for (shorthand, (_, role)), report in zip(runs.items(), reports, strict=True)]
    return _summary(outcomes, len(ranked), notes)


def _cost_model(graph: LayerGraph, options: ValidateOptions, profile: Profile) -> CostModel:
    return CostModel.of(load_workload(graph, f"local-cpu:procs={options.nproc}", profile,
                                      takes_dtype=False))


def _outcome(shorthand: str, role: str, estimate, report) -> PlanOutcome:  # noqa: ANN001
    def state(memory) -> float:  # noqa: ANN001
        return memory.params + memory.grads + memory.optimizer

    predicted = max(state(s.memory) for s in estimate.stages)
    measured = max(r["params"] + r["grads"] + r["optimizer"] for r in report.ranks)
    return PlanOutcome(shorthand, role, estimate.step_time_s, report.step_time_s, predicted,
                       measured)


def _summary(outcomes: list[PlanOutcome], priced: int, notes: list[str]) -> Validation:
    mape = statistics.fmean(abs(o.time_error) for o in outcomes)
    rho = spearman([o.predicted_s for o in outcomes], [o.measured_s for o in outcomes])
    chosen = next(o for o in outcomes if o.role == "chosen")
    regret = chosen.measured_s / min(o.measured_s for o in outcomes)
    memory = statistics.fmean(abs(o.memory_error) for o in outcomes)
    notes = [f"{priced} runnable plans priced, {len(outcomes)} run", *notes,
             "memory compares weights + gradients + optimizer state of the fullest rank"]
    return Validation(outcomes, mape, rho, regret, memory, notes)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation: Pearson's of the ranks (ties share their mean rank)."""
    import pandas as pd

    return float(pd.Series(xs).rank().corr(pd.Series(ys).rank()))


def write_outputs(result: Validation, folder: str | Path) -> list[Path]:
    """plans.csv and a predicted-vs-measured scatter plot, written atomically."""
    folder = Path(folder)
    rows = result.to_dict()["plans"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "plans.csv", text.getvalue())
    return [folder / "plans.csv", _scatter(result, folder / "scatter.png")]


def _scatter(result: Validation, path: Path) -> Path:
    from matplotlib.figure import Figure

    from autoplan.app.plotting import save_png

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    for role, marker in (("chosen", "*"), ("runner-up", "o"), ("spread", "s"), ("ddp", "^"),
                         ("fsdp", "v")):
        mine = [p for p in result.plans if p.role == role]
        if mine:
            ax.scatter([p.predicted_s * 1e3 for p in mine], [p.measured_s * 1e3 for p in mine],
                       marker=marker, s=90 if role == "chosen" else 40, label=role)
    top = max(max(p.predicted_s, p.measured_s) for p in result.plans) * 1e3 * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="measured = predicted")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title(f"MAPE {result.mape:.1%}, Spearman {result.spearman:.2f}, "
                 f"regret {result.regret:.2f}")
    ax.legend(fontsize=8)
    save_png(fig, path)
    return path
