"""The strategy space: which (dp, tp, sp, zero, checkpoint) a layer may take inside a stage,
and which outer settings (pp, micro-batch, schedule) a plan may take, with the user's limits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from autoplan.errors import AutoplanError
from autoplan.feasibility import (
    feasible,
    gives_whole_output,
    last_layer,
    schedule_refusal,
    tie_groups,
)
from autoplan.graph import LayerNode
from autoplan.plan import CHECKPOINT_MODES, SCHEDULES, LayerStrategy, Plan
from autoplan.specs import parse_bool, parse_int, parse_kv

__all__ = ["SPACE_LIMITS", "FIXABLE", "BLOCKS", "SearchSpace", "Outer", "divisors", "parse_fix",
           "layer_strategies",
           "checkpoint_modes", "outer_settings", "tp_fits", "layouts", "uniform_strategies",
           "respects_fix", "plan_respects_fix", "plan_keeps_ties", "count_kinds", "count_runs"]

SPACE_LIMITS = ("every pp, micro-batch size, schedule and virtual stages torch runs; "
                "interleaved chunks cut evenly (split_stages), 1F1B stages anywhere at blocks; "
                "tp tiles nodes, at most --max-tp")
"""What the search's plan space leaves out of the plans estimate accepts (said in its output
and the README): uneven interleaved chunks other than split_stages' cut, stages starting
elsewhere than at a block, and tp groups that straddle nodes or exceed --max-tp."""

FIXABLE = ("pp", "dp", "tp", "sequence_parallel", "zero", "ckpt", "schedule", "virtual_stages",
           "micro_batch_size")
BLOCKS = "blocks"
"""A fix's key, set by search --for, not --fix: the names of the layers a fixed
checkpointing binds (the trainers checkpoint their blocks only)."""


def divisors(n: int) -> list[int]:
    """The divisors of n in rising order (trial division up to sqrt(n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def parse_fix(text: str | None) -> dict[str, Any]:
    """`--fix pp=8,zero=1,ckpt=full` as typed values.

    Raises:
        AutoplanError: on an unknown key or value, listing the valid ones.
    """
    values: dict[str, Any] = {}
    for key, value in parse_kv(text or "", "--fix", FIXABLE).items():
        if key == "sequence_parallel":
            values[key] = parse_bool(value, f"--fix {key}")
        elif key == "ckpt":
            if value not in CHECKPOINT_MODES:
                raise AutoplanError(f"--fix ckpt '{value}' is not one of "
                                    f"{', '.join(CHECKPOINT_MODES)}")
            values[key] = value
        elif key == "schedule":
            if value not in SCHEDULES:
                raise AutoplanError(f"--fix schedule '{value}' is not one of "
                                    f"{', '.join(SCHEDULES)}")
            values[key] = value
        else:
            values[key] = parse_int(value, f"--fix {key}", 0 if key == "zero" else 1)
    if values.get("zero", 0) > 3:
        raise AutoplanError(f"--fix zero must be 0 to 3, got {values['zero']}")
    return values


@dataclass(frozen=True)
class SearchSpace:
    max_tp: int
    gpus_per_node: int
    fix: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class Outer:
    """The settings around the layers: the search enumerates these."""

    pp: int
    micro_batch_size: int
    schedule: str
    virtual_stages: int = 1


def _allowed(space: SearchSpace, key: str, value: Any) -> bool:
    return key not in space.fix or space.fix[key] == value


def layouts(stage_gpus: int, micro_batch_size: int, space: SearchSpace) -> list[tuple[int, int]]:
    """Every (dp, tp) filling a stage of `stage_gpus` devices where dp divides the
    micro-batch and tp tiles nodes within max_tp (tp_fits); which of them a layer can take
    (tp dividing its head counts and widths) is feasibility's to say."""
    out = []
    for tp in divisors(stage_gpus):
        dp = stage_gpus // tp
        if tp_fits(tp, space) and micro_batch_size % dp == 0:
            out.append((dp, tp))
    return out


def layer_strategies(node: LayerNode, stage_gpus: int, micro_batch_size: int,
                     space: SearchSpace, last: bool = False) -> list[LayerStrategy]:
    """Every strategy `node` may take on a stage of `stage_gpus` devices: its layouts, and
    the executor runs it (autoplan.feasibility); ZeRO needs dp > 1, SP needs tp > 1 (and on
    the model's `last` layer a whole output); checkpointing applies to layers that save more
    than their input, selective to those with S x S tensors."""
    out = []
    sp_possible = not last or gives_whole_output(node)
    fix = _layer_fix(space.fix, sp_possible)
    for dp, tp in layouts(stage_gpus, micro_batch_size, space):
        if not (_allowed(space, "tp", tp) and _allowed(space, "dp", dp)):
            continue
        if not feasible(node, LayerStrategy(dp=dp, tp=tp), micro_batch_size):
            continue
        sp_ok = tp > 1 and sp_possible
        for strategy in _strategies(dp, tp, sp_ok, tuple(checkpoint_modes(node))):
            if respects_fix(node, strategy, fix):
                out.append(strategy)
    return out


def uniform_strategies(stage_gpus: int, micro_batch_size: int,
                       space: SearchSpace) -> list[LayerStrategy]:
    """Every strategy a uniform plan (the shorthand's: one on every layer) may write on a
    stage of `stage_gpus` devices: its layouts, SP with tp > 1, ZeRO with dp > 1 (without
    it ZeRO shards nothing) and every checkpointing mode."""
    return [strategy for dp, tp in layouts(stage_gpus, micro_batch_size, space)
            for strategy in _strategies(dp, tp, tp > 1, tuple(CHECKPOINT_MODES))]


@functools.cache
def _strategies(dp: int, tp: int, sp_ok: bool,
                checkpoints: tuple[str, ...]) -> tuple[LayerStrategy, ...]:
    """Cached: the search asks for each (dp, tp) at every micro-batch size and layer kind,
    and validating a LayerStrategy is slow (they are frozen: sharing them is safe)."""
    return tuple(LayerStrategy(dp=dp, tp=tp, sequence_parallel=sp, zero=zero, checkpoint=ckpt)
                 for sp in ((False, True) if sp_ok else (False,))
                 for zero in ((0, 1, 2, 3) if dp > 1 else (0,))
                 for ckpt in checkpoints)


def respects_fix(node: LayerNode, strategy: LayerStrategy, fix: dict[str, Any]) -> bool:
    """Whether a layer's strategy keeps the user's fixed fields. A fixed ZeRO stage, SP or
    checkpointing binds only the layers it can apply to (dp > 1, tp > 1, a layer with that
    checkpointing and, where the fix names BLOCKS, one of them); the others keep the
    neutral value."""
    if not fix:
        return True
    values = {"dp": strategy.dp, "tp": strategy.tp, "sequence_parallel":
              strategy.sequence_parallel, "zero": strategy.zero, "ckpt": strategy.checkpoint}
    applies = {"sequence_parallel": strategy.tp > 1, "zero": strategy.dp > 1,
               "ckpt": fix.get("ckpt") in checkpoint_modes(node)
               and node.name in fix.get(BLOCKS, (node.name,))}
    neutral = {"sequence_parallel": False, "zero": 0, "ckpt": "none"}
    for key, value in values.items():
        if key not in fix:
            continue
        wanted = fix[key] if applies.get(key, True) else neutral[key]
        if value != wanted:
            return False
    return True


def plan_respects_fix(nodes: list[LayerNode], plan: Plan, fix: dict[str, Any]) -> bool:
    """Whether a whole plan keeps the user's fixed fields (baselines may not)."""
    outer = {"pp": plan.pp, "schedule": plan.schedule, "virtual_stages": plan.virtual_stages,
             "micro_batch_size": plan.micro_batch_size}
    if any(key in fix and fix[key] != value for key, value in outer.items()):
        return False
    last = last_layer(nodes)
    return all(respects_fix(node, layer, _layer_fix(fix, i != last or gives_whole_output(node)))
               for i, (node, layer) in enumerate(zip(nodes, plan.layers, strict=True)))


def _layer_fix(fix: dict[str, Any], sp_possible: bool) -> dict[str, Any]:
    """The fix as it binds a layer: a fixed SP only where the layer can take it (not the
    model's last layer when SP would leave its output in slices), as the shorthand's
    expansion applies it."""
    if sp_possible or "sequence_parallel" not in fix:
        return fix
    return {k: v for k, v in fix.items() if k != "sequence_parallel"}


def plan_keeps_ties(nodes: list[LayerNode] | tuple[LayerNode, ...], plan: Plan) -> bool:
    """Whether every group of tied layers shares one (dp, tp) layout in `plan`."""
    return all(len({(plan.layers[i].dp, plan.layers[i].tp) for i in group}) == 1
               for group in tie_groups(nodes))


def tp_fits(tp: int, space: SearchSpace) -> bool:
    """TP groups tile nodes (tp divides a node, or whole nodes make one group) and stay
    within max_tp."""
    node = space.gpus_per_node
    return tp <= space.max_tp and (node % tp == 0 or tp % node == 0)


def count_kinds(layers: Iterable[int], kind: Callable[[int], Hashable]) -> list[tuple[int, int]]:
    """(first layer, how many) of each kind among `layers`, kinds in order of first
    appearance: layers of one kind cost alike, so sums over them take each kind once."""
    found: dict[Hashable, list[int]] = {}
    for i in layers:
        entry = found.setdefault(kind(i), [i, 0])
        entry[1] += 1
    return [(first, count) for first, count in found.values()]


def count_runs(layers: Iterable[int], kind: Callable[[int], Hashable]) -> list[tuple[int, int]]:
    """(first layer, how many) of each run of consecutive `layers` of one kind, in order:
    count_kinds where the order of layers matters."""
    runs: list[list] = []
    for i in layers:
        if runs and runs[-1][2] == kind(i) and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, kind(i)])
    return [(first, count) for first, count, _ in runs]


def checkpoint_modes(node: LayerNode) -> list[str]:
    modes = ["none"]
    if node.kind != "loss" and node.act_bytes > node.input_bytes:
        modes.append("full")
    if node.attn_act_bytes > 0:
        modes.append("selective")
    return modes


def outer_settings(gpus: int, global_batch: int, max_chunks: int,
                   space: SearchSpace) -> list[Outer]:
    """The plan space around the layers, as estimate and the executor accept it: every
    pipeline degree dividing the GPUs (at most `max_chunks` chunks: plan.pipeline_units),
    every micro-batch size dividing the global batch, and each schedule torch runs for that
    many micro-batches (feasibility.schedule_refusal): 1F1B, and interleaved 1F1B with every
    v from 2 to max_chunks / pp chunks per rank, cut as plan.split_stages cuts them (unevenly
    where the units do not divide). GPipe and interleaving with v = 1 are kept only where
    1F1B is refused: elsewhere they price as 1F1B does with at least its micro-batches in
    flight (cost_model.pipeline), so they cannot beat it."""
    out = []
    for pp in divisors(gpus):
        if pp > max(max_chunks, 1) or not _allowed(space, "pp", pp):
            continue
        for size in divisors(global_batch):
            if not _allowed(space, "micro_batch_size", size):
                continue
            for schedule, virtual in _schedules(pp, global_batch // size, max_chunks):
                if _allowed(space, "schedule", schedule) and _allowed(
                        space, "virtual_stages", virtual):
                    out.append(Outer(pp, size, schedule, virtual))
    return out


def _schedules(pp: int, micro_batches: int, max_chunks: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    runs = [(s, 1) for s in ("gpipe", "1f1b", "interleaved_1f1b")
            if schedule_refusal(s, pp, micro_batches) is None]
    if ("1f1b", 1) in runs:
        runs = [("1f1b", 1)]
    if schedule_refusal("interleaved_1f1b", pp, micro_batches) is None:
        runs += [("interleaved_1f1b", v) for v in range(2, max_chunks // pp + 1)]
    return runs
