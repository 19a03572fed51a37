"""The strategy space: which (dp, tp, sp, zero, checkpoint) a layer may take inside a stage,
and which outer settings (pp, micro-batch, schedule) a plan may take, with the user's limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from autoplan.errors import AutoplanError
from autoplan.feasibility import feasible, gives_whole_output, tie_groups
from autoplan.graph import LayerNode
from autoplan.plan import CHECKPOINT_MODES, SCHEDULES, LayerStrategy, Plan
from autoplan.specs import parse_bool, parse_int, parse_kv

__all__ = ["FIXABLE", "SearchSpace", "Outer", "divisors", "parse_fix", "layer_strategies",
           "checkpoint_modes", "outer_settings", "tp_fits", "respects_fix",
           "plan_respects_fix", "plan_keeps_ties"]

FIXABLE = ("pp", "dp", "tp", "sequence_parallel", "zero", "ckpt", "schedule", "virtual_stages",
           "micro_batch_size")
MAX_SAMPLES_PER_RANK = 16
"""Bound: a micro-batch larger than this per rank is not tried (it only grows memory once
the matmuls are large; the profile's fits stop at 8)."""
VIRTUAL_STAGES = (2, 3, 4)


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
    heads: int | None = None
    kv_heads: int | None = None


@dataclass(frozen=True, order=True)
class Outer:
    """The settings around the layers: the search enumerates these."""

    pp: int
    micro_batch_size: int
    schedule: str
    virtual_stages: int = 1


def _allowed(space: SearchSpace, key: str, value: Any) -> bool:
    return key not in space.fix or space.fix[key] == value


def layer_strategies(node: LayerNode, stage_gpus: int, micro_batch_size: int,
                     space: SearchSpace, last: bool = False) -> list[LayerStrategy]:
    """Every strategy `node` may take on a stage of `stage_gpus` devices: dp x tp fills the
    stage, dp divides the micro-batch, tp divides the heads of a block and stays within
    max_tp, and the executor runs it (autoplan.feasibility); ZeRO needs dp > 1, SP needs
    tp > 1 (and on the model's `last` layer a whole output); checkpointing applies to layers
    that save more than their input, selective to those with S x S tensors."""
    out = []
    for tp in divisors(stage_gpus):
        dp = stage_gpus // tp
        heads_ok = node.kind != "block" or all(not h or h % tp == 0
                                               for h in (space.heads, space.kv_heads))
        if not tp_fits(tp, space) or micro_batch_size % dp or not heads_ok:
            continue
        if not (_allowed(space, "tp", tp) and _allowed(space, "dp", dp)):
            continue
        if not feasible(node, LayerStrategy(dp=dp, tp=tp), micro_batch_size):
            continue
        sp_ok = tp > 1 and (not last or gives_whole_output(node))
        for sp in (False, True) if sp_ok else (False,):
            for zero in (0, 1, 2, 3) if dp > 1 else (0,):
                for ckpt in checkpoint_modes(node):
                    strategy = LayerStrategy(dp=dp, tp=tp, sequence_parallel=sp, zero=zero,
                                             checkpoint=ckpt)
                    if respects_fix(node, strategy, space.fix):
                        out.append(strategy)
    return out


def respects_fix(node: LayerNode, strategy: LayerStrategy, fix: dict[str, Any]) -> bool:
    """Whether a layer's strategy keeps the user's fixed fields. A fixed ZeRO stage, SP or
    checkpointing binds only the layers it can apply to (dp > 1, tp > 1, a layer with that
    checkpointing); the others keep the neutral value."""
    values = {"dp": strategy.dp, "tp": strategy.tp, "sequence_parallel":
              strategy.sequence_parallel, "zero": strategy.zero, "ckpt": strategy.checkpoint}
    applies = {"sequence_parallel": strategy.tp > 1, "zero": strategy.dp > 1,
               "ckpt": fix.get("ckpt") in checkpoint_modes(node)}
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
    return all(respects_fix(node, layer, fix) for node, layer in zip(nodes, plan.layers,
                                                                       strict=True))


def plan_keeps_ties(nodes: list[LayerNode] | tuple[LayerNode, ...], plan: Plan) -> bool:
    """Whether every group of tied layers shares one (dp, tp) layout in `plan`."""
    return all(len({(plan.layers[i].dp, plan.layers[i].tp) for i in group}) == 1
               for group in tie_groups(nodes))


def tp_fits(tp: int, space: SearchSpace) -> bool:
    """TP groups tile nodes (tp divides a node, or whole nodes make one group) and stay
    within max_tp."""
    node = space.gpus_per_node
    return tp <= space.max_tp and (node % tp == 0 or tp % node == 0)


def checkpoint_modes(node: LayerNode) -> list[str]:
    modes = ["none"]
    if node.kind != "loss" and node.act_bytes > node.input_bytes:
        modes.append("full")
    if node.attn_act_bytes > 0:
        modes.append("selective")
    return modes


def outer_settings(gpus: int, global_batch: int, blocks: int, space: SearchSpace) -> list[Outer]:
    """Pipeline degrees (every divisor of the GPUs up to the blocks), micro-batch sizes (every
    divisor of the global batch up to MAX_SAMPLES_PER_RANK per rank of the widest dp; with a
    pipeline, at least pp micro-batches: fewer leave most of it idle) and schedules
    (interleaving when the blocks split evenly into pp x v chunks)."""
    out = []
    for pp in divisors(gpus):
        if pp > max(blocks, 1) or not _allowed(space, "pp", pp):
            continue
        stage_gpus = gpus // pp
        for size in divisors(global_batch):
            if size > MAX_SAMPLES_PER_RANK * stage_gpus or not _allowed(
                    space, "micro_batch_size", size):
                continue
            if pp > 1 and global_batch // size < pp:
                continue
            for schedule, virtual in _schedules(pp, blocks):
                if _allowed(space, "schedule", schedule) and _allowed(
                        space, "virtual_stages", virtual):
                    out.append(Outer(pp, size, schedule, virtual))
    return out


def _schedules(pp: int, blocks: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("gpipe", 1), ("1f1b", 1)]
    out += [("interleaved_1f1b", v) for v in VIRTUAL_STAGES if blocks % (pp * v) == 0]
    return out
