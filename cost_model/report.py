"""Tables of an Estimate for people: the step's breakdown and each stage's memory."""

from __future__ import annotations

from rich.table import Table

from autoplan import fmt
from autoplan.cost_model.estimate import STEP_PARTS, Estimate
from autoplan.plan import Plan

__all__ = ["estimate_tables"]

_MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "transient", "buffers")


def estimate_tables(plan: Plan, estimate: Estimate) -> list[Table]:
    return [_summary(plan, estimate), _time(estimate), _memory(estimate)]


def _summary(plan: Plan, e: Estimate) -> Table:
    layouts = sorted({(lp.dp, lp.tp, lp.zero, lp.checkpoint, lp.sequence_parallel)
                      for lp in plan.layers})
    shown = "; ".join(f"dp{dp} tp{tp}{' sp' if sp else ''} zero{z} ckpt {c}"
                      for dp, tp, z, c, sp in layouts)
    where = plan.cluster or f"{plan.world_size} devices"
    table = Table(title=f"{plan.model} on {where}",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("plan", f"pp{plan.pp} x ({shown}); {plan.schedule}"
                 + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "")),
        ("batch", f"{plan.global_batch} = {plan.num_micro_batches} micro-batches of "
                  f"{plan.micro_batch_size}"),
        ("step time", fmt.seconds(e.step_time_s)),
        ("tokens/s", f"{e.tokens_per_s:,.0f}"),
        ("TFLOP/s per GPU", f"{e.model_tflops_per_gpu:.1f} model, "
                            f"{e.hardware_tflops_per_gpu:.1f} with recompute"),
        ("MFU", f"{e.mfu:.1%}" if e.mfu else "- (no peak figure)"),
        ("fits", ("yes" if e.fits else "[red]NO[/red]")
         + f": peak {fmt.nbytes(max(e.peak_memory_bytes))} + overhead "
           f"{fmt.nbytes(e.overhead_bytes)} of {fmt.nbytes(e.memory_limit_bytes)}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _time(e: Estimate) -> Table:
    table = Table(title="step time on the critical path")
    for name in ("part", "seconds", "share"):
        table.add_column(name, justify="left" if name == "part" else "right")
    for part in STEP_PARTS:
        seconds = e.breakdown.get(part, 0.0)
        if seconds > 0:
            table.add_row(part.replace("_", " "), fmt.seconds(seconds),
                          f"{seconds / e.step_time_s:.1%}")
    table.add_row("total", fmt.seconds(e.step_time_s), "100%", style="bold")
    return table


def _memory(e: Estimate) -> Table:
    table = Table(title="memory per rank, by pipeline stage")
    table.add_column("stage")
    table.add_column("layers")
    for part in (*_MEMORY_PARTS, "peak"):
        table.add_column(part, justify="right")
    for stage in e.stages:
        memory = stage.memory.as_dict()
        over = memory["peak"] + e.overhead_bytes > e.memory_limit_bytes
        peak = fmt.nbytes(memory["peak"])
        table.add_row(str(stage.stage), f"{stage.layers[0]} .. {stage.layers[-1]}",
                      *(fmt.nbytes(memory[p]) for p in _MEMORY_PARTS),
                      f"[red]{peak}[/red]" if over else peak)
    return table
