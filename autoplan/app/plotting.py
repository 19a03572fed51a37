"""`autoplan plot`: a plan's pipeline schedule as a Gantt chart and its memory per stage.

The schedule is cost_model/schedule.py's simulation of the plan with the cost model's times;
the memory is the Estimate's per-stage breakdown against the device's limit. Drawing only:
no formula lives here.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from autoplan import fmt
from autoplan.errors import AutoplanError
from autoplan.workload import WorkloadOptions

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from autoplan.cost_model import Estimate, Timeline
    from autoplan.plan import Plan

__all__ = ["PlotOptions", "run_plot", "plan_figure", "save_png"]

_COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "recompute": "#8172B3",
           "comm": "#C44E52", "dp_comm": "#C44E52", "optimizer": "#55A868", "bubble": "#E6E6E6"}
_MEMORY_COLORS = {"params": "#4C72B0", "grads": "#DD8452", "optimizer": "#55A868",
                  "activations": "#C44E52", "transient + buffers": "#8172B3",
                  "overhead": "#937860"}
_EDGED_BLOCKS = 200
"""Up to this many blocks in a row, blocks get a thin white edge; beyond, edges would hide them."""
_FEW_MICRO_BATCHES = 32
"""Up to this many micro-batches the whole step is drawn; beyond, its start and its end."""


@dataclass(frozen=True, kw_only=True)
class PlotOptions(WorkloadOptions):
    plan: str
    """A plan.json; its model and cluster specs are used unless model/cluster are given."""
    output: str
    model: str | None = None
    cluster: str | None = None
    optimizer: str = "adamw"


def run_plot(options: PlotOptions) -> tuple[Plan, Estimate, Timeline]:
    """Rebuild the plan's model and cluster, estimate the plan, simulate its schedule and
    write the picture to options.output (PNG, or what its suffix names).

    Raises:
        AutoplanError: on a plan that is not a file, a missing cluster, or any bad input.
    """
    from autoplan.cost_model import CostModel, plan_timeline
    from autoplan.plan import check_plan, load_plan

    if not Path(options.plan).is_file():
        raise AutoplanError(f"plan file '{options.plan}' does not exist (plot reads a "
                            "plan.json, e.g. from `autoplan search -o`)")
    plan = load_plan(options.plan)
    cluster_spec = options.cluster or plan.cluster
    if not cluster_spec:
        raise AutoplanError(f"plan '{options.plan}' records no cluster; give --cluster")
    work = replace(options, model=options.model or plan.model, cluster=cluster_spec).load()
    check_plan(plan, work.graph, world_size=work.cluster.gpus)
    model = CostModel.of(work, options.optimizer)
    estimate = model.estimate(plan)
    timeline = plan_timeline(model, plan, estimate)
    save_png(plan_figure(plan, estimate, timeline), options.output)
    return plan, estimate, timeline


def save_png(figure: Figure, path: str | Path) -> None:
    """Write the figure beside `path` first, then rename it over `path` (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plan_figure(plan: Plan, estimate: Estimate, timeline: Timeline) -> Figure:
    """The picture: the schedule above, memory per stage below, the plan in the title."""
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no backend is switched,
    # so a notebook's inline figures keep working and nothing is left open

    gantt_h = 0.45 * plan.pp + 1.6
    figure = MplFigure(figsize=(13, gantt_h + 3.6), layout="constrained")
    above, below = figure.subfigures(2, 1, height_ratios=[gantt_h, 3.6])
    # The schedule's caption goes with the title: an axes title wider than half the figure
    # would collapse the layout of the two-window schedule.
    figure.suptitle(f"{_title(plan, estimate)}\n{_schedule_caption(plan, timeline, estimate)}",
                    fontsize=10, x=0.01, ha="left")
    windows = _windows(plan, estimate, timeline)
    axes = above.subplots(1, len(windows), sharey=True, squeeze=False)[0]
    for k, (ax, window) in enumerate(zip(axes, windows, strict=True)):
        _draw_schedule(ax, plan, estimate, timeline, window, legend=k == len(windows) - 1)
    _draw_memory(below.subplots(), estimate)
    return figure


def _title(plan: Plan, e: Estimate) -> str:
    layouts = sorted({(lp.dp, lp.tp, lp.zero, lp.checkpoint) for lp in plan.layers})
    shown = "; ".join(f"dp{dp} tp{tp} zero{z} ckpt {c}" for dp, tp, z, c in layouts[:3])
    shown += f"; +{len(layouts) - 3} more layouts" if len(layouts) > 3 else ""
    virtual = f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    return (f"{plan.model} on {plan.cluster or f'{plan.world_size} devices'}\n"
            f"pp{plan.pp} {plan.schedule}{virtual} x ({shown}); {plan.num_micro_batches} "
            f"micro-batches of {plan.micro_batch_size}; predicted step "
            f"{fmt.seconds(e.step_time_s)}, {e.tokens_per_s:,.0f} tokens/s")


# --------------------------------------------------------------------------- schedule


def _time_unit(seconds: float) -> tuple[float, str]:
    return (1e3, "ms") if seconds < 1 else (1.0, "s")


def _windows(plan: Plan, e: Estimate, timeline: Timeline) -> list[tuple[float, float]]:
    """Spans of time (s) to draw: the whole step, or with more than _FEW_MICRO_BATCHES its
    first and last stretch of about 2 pp + 6 micro-batches of the slowest stage."""
    whole = 1.01 * max(timeline.makespan_s + _tail_s(e), e.step_time_s)
    if plan.num_micro_batches <= _FEW_MICRO_BATCHES:
        return [(0.0, whole)]
    slowest = max(s.micro_batch_s for s in e.stages)
    width = min(whole / 2, (2 * plan.pp + 6) * slowest)
    return [(0.0, width), (whole - width, whole)]


def _draw_schedule(ax: Axes, plan: Plan, e: Estimate, timeline: Timeline,
                   window: tuple[float, float], legend: bool = True) -> None:
    scale, unit = _time_unit(e.step_time_s)
    end = timeline.makespan_s
    edged = len(timeline.ops) / plan.pp * (window[1] - window[0]) / end <= _EDGED_BLOCKS
    edge = {"edgecolor": "white", "linewidth": 0.4} if edged else {"linewidth": 0}
    ax.set_xlim(window[0] * scale, window[1] * scale)
    width_pt = ax.get_position().width * ax.figure.figure.get_figwidth() * 72
    pt_per_s = width_pt / (window[1] - window[0])
    for rank in range(plan.pp):
        ax.broken_barh([(0, end * scale)], (rank - 0.4, 0.8), facecolor=_COLORS["bubble"],
                       hatch="///", edgecolor="#C8C8C8", linewidth=0)
    blocks: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    for op in timeline.ops:  # one collection per row, part and chunk: fast to draw
        at, local = op.start_s, op.chunk // plan.pp
        for part, seconds in op.parts:
            if seconds > 0:
                blocks.setdefault((op.rank, part, local), []).append((at * scale,
                                                                      seconds * scale))
            at += seconds
        roomy = (op.end_s - op.start_s) * pt_per_s >= 7 * len(str(op.micro_batch)) + 3
        if roomy and window[0] <= op.start_s and op.end_s <= window[1]:
            ax.text((op.start_s + op.end_s) / 2 * scale, op.rank, str(op.micro_batch),
                    ha="center", va="center", fontsize=7, color="black" if local else "white",
                    clip_on=True)
    for (rank, part, local), spans in blocks.items():
        light = 0.5 * local / max(1, plan.virtual_stages - 1)
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolor=_lighter(_COLORS[part], light),
                       **edge)
    _draw_tails(ax, plan, e, end, scale, edge)
    ax.axvline(e.step_time_s * scale, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(plan.pp), [f"stage {s}" for s in range(plan.pp)])
    ax.set_ylim(plan.pp - 0.5, -0.5)
    ax.set_xlabel(f"time ({unit})")
    if legend:
        _schedule_legend(ax, plan)


def _lighter(color: str, amount: float) -> tuple[float, float, float]:
    """`color` mixed with white (opaque, so the bubble's hatching does not show through)."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * amount for c in to_rgb(color))  # type: ignore[return-value]


def _tail_s(e: Estimate) -> float:
    return max(sum(s.tail_s.values()) for s in e.stages)


def _draw_tails(ax: Axes, plan: Plan, e: Estimate, end: float, scale: float,
                edge: dict) -> None:
    """After its last op each stage syncs gradients (what the backward did not hide) and
    steps the optimizer; drawn from the end of the pipeline, as the cost model adds them."""
    for stage in e.stages:
        at = end
        for part in ("dp_comm", "optimizer"):
            seconds = stage.tail_s.get(part, 0.0)
            if seconds > 0:
                ax.broken_barh([(at * scale, seconds * scale)], (stage.stage - 0.4, 0.8),
                               facecolor=_COLORS[part], hatch="..." if part == "dp_comm" else
                               None, **edge)
            at += seconds


def _schedule_caption(plan: Plan, timeline: Timeline, e: Estimate) -> str:
    text = (f"above: pipeline schedule, simulated: {fmt.seconds(timeline.makespan_s)} for "
            f"{plan.num_micro_batches} micro-batches, bubble "
            f"{timeline.bubble_fraction():.0%} of stage time; dashed line: the cost model's "
            f"step {fmt.seconds(e.step_time_s)} (closed form + gradient sync + optimizer)")
    if plan.num_micro_batches > _FEW_MICRO_BATCHES:
        text += (f"\n{plan.num_micro_batches} micro-batches: the first and the last stretch "
                 "of the step are shown; between them the steady state repeats")
    elif plan.virtual_stages > 1:
        text += "\nlater model chunks of a stage are drawn lighter"
    return text


def _schedule_legend(ax: Axes, plan: Plan) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_COLORS[k], label=k) for k in
               ("forward", "backward", "recompute", "comm", "optimizer")]
    handles[3] = Patch(facecolor=_COLORS["comm"], label="communication (TP/FSDP/PP; "
                       "dotted: gradient sync)")
    handles.append(Patch(facecolor=_COLORS["bubble"], hatch="///", edgecolor="#C8C8C8",
                         label="bubble (idle)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
              frameon=False)


# --------------------------------------------------------------------------- memory


def _memory_unit(nbytes: float) -> tuple[float, str]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return size, unit
    return 1, "B"


def _draw_memory(ax: Axes, e: Estimate) -> None:
    peak = max(e.peak_memory_bytes) + e.overhead_bytes
    size, unit = _memory_unit(max(peak, 1))
    stages = [s.stage for s in e.stages]
    bottom = [0.0] * len(stages)
    for name, color in _MEMORY_COLORS.items():
        values = [_component(s.memory, name, e.overhead_bytes) / size for s in e.stages]
        ax.bar(stages, values, bottom=bottom, color=color, label=name, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for stage, total in zip(stages, bottom, strict=True):
        ax.text(stage, total, f"{total:.3g}", ha="center", va="bottom", fontsize=8)
    _draw_limit(ax, e.memory_limit_bytes / size, max(bottom), unit)
    ax.set_xticks(stages, [f"stage {s}" for s in stages])
    pad = max(0.0, (4 - len(stages)) / 2)  # few stages: keep the bars slim
    ax.set_xlim(-0.5 - pad, len(stages) - 0.5 + pad)
    ax.set_ylabel(f"per rank ({unit})")
    ax.set_title("memory per rank at its peak, by pipeline stage", fontsize=9, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _component(memory, name: str, overhead: float) -> float:  # noqa: ANN001
    if name == "transient + buffers":
        return memory.transient + memory.buffers
    if name == "overhead":
        return overhead
    return getattr(memory, name)


def _draw_limit(ax: Axes, limit: float, tallest: float, unit: str) -> None:
    """The device limit as a line, or, when it is far above the bars, as a note at the top."""
    label = f"device limit {limit:.3g} {unit}"
    if limit <= 10 * tallest:
        ax.axhline(limit, color="red", linestyle="--", linewidth=1.2)
        ax.text(0.005, limit, label, color="red", ha="left", va="bottom", fontsize=8,
                transform=ax.get_yaxis_transform())
        ax.set_ylim(0, 1.12 * max(limit, tallest))
    else:
        ax.set_ylim(0, 1.25 * tallest)
        ax.text(0.99, 0.97, f"{label} (off the scale above)", color="red", ha="right",
                va="top", fontsize=8, transform=ax.transAxes)
