"""Tables of a search for people: the plan by stage and layer range, the runners-up, and
the baselines with the found plan's speed-up over each; with --for, the trainer's plan and
what keeping to the trainer costs."""

from __future__ import annotations

from itertools import groupby

from rich.table import Table

from autoplan import fmt
from autoplan.search.search import Candidate, SearchResult
from autoplan.search.space import SPACE_LIMITS
from autoplan.trainers import TRAINERS, Trainer

__all__ = ["search_tables", "describe", "result_json"]


def describe(candidate: Candidate) -> str:
    """A plan in one line: pp, micro-batching, schedule and the strategies it uses."""
    plan = candidate.plan
    kinds = sorted({(lp.dp, lp.tp, lp.sequence_parallel, lp.zero, lp.checkpoint)
                    for lp in plan.layers})
    parts = "; ".join(f"dp{dp} tp{tp}{' sp' if sp else ''} z{z} {c}" for dp, tp, sp, z, c in kinds)
    virtual = f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    return (f"pp{plan.pp} {plan.schedule}{virtual}, {plan.num_micro_batches} x "
            f"{plan.micro_batch_size} samples; {parts}")


def search_tables(result: SearchResult, check: str | None = None) -> list[Table]:
    """The plan, the prediction (with `check`, a dry run's finding beside its peak memory),
    the ranking, and with --for the trainer's plan."""
    best = result.best
    assert best is not None
    tables = [_plan_table(best), _summary(result, check), _ranking(result)]
    if result.trainer is not None:
        tables += [_plan_table(result.trainer, f"{_title(result.trainer)} plan"),
                   _trainer_table(result)]
    return tables


def _title(candidate: Candidate) -> str:
    """The trainer a --for candidate is for (its origin), as users name the release."""
    return TRAINERS[candidate.origin].title


def restriction_cost(result: SearchResult) -> float:
    """How much slower the trainer's plan is than the found plan (1.0: as fast)."""
    return result.trainer.estimate.step_time_s / result.best.estimate.step_time_s


def _plan_table(best: Candidate, what: str = "plan") -> Table:
    plan, estimate = best.plan, best.estimate
    table = Table(title=f"{what} for {plan.model} on {plan.cluster}: "
                  f"{fmt.seconds(estimate.step_time_s)} per step")
    for name in ("stage", "layers", "dp", "tp", "sp", "zero", "checkpoint", "peak memory"):
        table.add_column(name)
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    for chunk, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        stage = chunk % plan.pp
        rows = groupby(plan.layers[a:b], key=lambda lp: (lp.dp, lp.tp, lp.sequence_parallel,
                                                          lp.zero, lp.checkpoint))
        for (dp, tp, sp, zero, ckpt), group in rows:
            group = list(group)
            names = group[0].name + (f" .. {group[-1].name}" if len(group) > 1 else "")
            table.add_row(str(stage), f"{names} ({len(group)})", str(dp), str(tp),
                          "yes" if sp else "", str(zero), ckpt,
                          fmt.nbytes(estimate.peak_memory_bytes[stage]))
    return table


def _summary(result: SearchResult, check: str | None = None) -> Table:
    e = result.best.estimate
    table = Table(title="prediction", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("step time", fmt.seconds(e.step_time_s)),
        ("tokens/s", f"{e.tokens_per_s:,.0f}"),
        ("TFLOP/s per GPU", f"{e.model_tflops_per_gpu:.1f} model, "
                            f"{e.hardware_tflops_per_gpu:.1f} with recompute"),
        ("MFU", f"{e.mfu:.1%}" if e.mfu else "-"),
        ("peak memory", ", ".join(fmt.nbytes(p) for p in e.peak_memory_bytes[:8])
         + (" ..." if len(e.peak_memory_bytes) > 8 else "")
         + f" (+ {fmt.nbytes(e.overhead_bytes)} overhead, limit "
           f"{fmt.nbytes(e.memory_limit_bytes)})"),
        *([("checked by a dry run", check)] if check else []),
        ("search", f"{result.search_time_s:.2f} s: {result.outer_solved} of "
                   f"{result.outer_settings} outer settings solved, {result.stage_problems} "
                   "stage problems, "
                   + ("all proven optimal" if not result.unproven else
                      f"{result.unproven} stopped at the time limit (gap up to "
                      f"{result.worst_gap:.2%})")),
        ("found by", {"search": "the search"}.get(
            result.best.origin, f"the {result.best.origin} baseline (uniform plan)")),
        ("plan space", SPACE_LIMITS),
    ):
        table.add_row(key, value)
    return table


def _ranking(result: SearchResult) -> Table:
    table = Table(title="runners-up and baselines")
    for name in ("", "plan", "step time", "speed-up of the found plan", "fits"):
        table.add_column(name)
    best = result.best.estimate.step_time_s
    rows = [(f"#{i}", c) for i, c in enumerate(result.runners_up, 2)]
    rows += [(name, c) for name, c in result.baselines.items()]
    for label, c in rows:
        if c is None:
            table.add_row(label, "no such plan for this batch and cluster", "", "", "")
            continue
        t = c.estimate.step_time_s
        table.add_row(label, describe(c), fmt.seconds(t), f"{t / best:.2f}x",
                      "yes" if c.estimate.fits else
                      f"no ({fmt.nbytes(max(c.estimate.peak_memory_bytes))})")
    return table


def _trainer_table(result: SearchResult) -> Table:
    c, title = result.trainer, _title(result.trainer)
    table = Table(title=f"what keeping to {title} costs", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    e = c.estimate
    for key, value in (
        ("plan", describe(c)),
        ("step time", f"{fmt.seconds(e.step_time_s)}: {restriction_cost(result):.2f}x the "
                      f"found plan's {fmt.seconds(result.best.estimate.step_time_s)}"),
        ("fits", "yes" if e.fits else f"no ({fmt.nbytes(max(e.peak_memory_bytes))})"),
        ("space", f"uniform plans of what {title} runs (autoplan.trainers), checkpointing "
                  "the blocks only, " + _cuts(TRAINERS[c.origin])),
        ("export", f"autoplan export PLAN --to {c.origin} (with search -o PLAN --for "
                   f"{c.origin})"),
    ):
        table.add_row(key, value)
    return table


def _cuts(t: Trainer) -> str:
    """How the trainer's plans cut stages, as search --for searches them."""
    if not t.schedules:
        return "one stage (no pipeline)"
    if t.even_split:
        return "stages cut evenly (plan.split_stages)"
    return "stages cut anywhere at blocks, interleaved chunks evenly"


def _brief(c: Candidate | None, best: float) -> dict | None:
    if c is None:
        return None
    return {"plan": describe(c), "step_time_s": c.estimate.step_time_s, "fits": c.estimate.fits,
            "peak_memory_bytes": c.estimate.peak_memory_bytes,
            "speedup": c.estimate.step_time_s / best}


def result_json(result: SearchResult) -> dict:
    """The plan object plus search_time_s, baselines and runners_up (--json)."""
    import json

    best = result.best
    return json.loads(best.plan.to_json()) | {
        "search_time_s": result.search_time_s,
        "unproven_stage_problems": result.unproven, "worst_gap": result.worst_gap,
        "estimate": best.estimate.to_dict(),
        "baselines": {name: _brief(c, best.estimate.step_time_s)
                      for name, c in result.baselines.items()},
        "runners_up": [_brief(c, best.estimate.step_time_s) for c in result.runners_up]} | (
        {"for": {"trainer": result.trainer.origin, "release": _title(result.trainer),
                 "plan": json.loads(result.trainer.plan.to_json()),
                 "estimate": result.trainer.estimate.to_dict(),
                 "slowdown": restriction_cost(result)}} if result.trainer else {})
