"""What the trainers users already run can express of a plan, one rule set per trainer.

`autoplan export` refuses a plan that breaks its target's rules, and `autoplan search --for`
searches only the plans that keep them: both read them here, so what the search returns the
export takes. The releases the rules were read from (and the suite parses exports with):

- torchtitan 0.3.0: `ParallelismConfig`, `TrainingConfig` (torchtitan/config/configs.py) and
  the activation-checkpointing subcommands (torchtitan/distributed/activation_checkpoint.py).
- Megatron-Core 0.16.1, the newest release installable on Python 3.11 (0.17 and later need
  3.12): `ModelParallelConfig`, `TransformerConfig`, `DistributedDataParallelConfig`, from
  whose fields Megatron-LM builds its command-line arguments (ArgumentGroupFactory).
- DeepSpeed 0.19.8: `DeepSpeedConfig` (deepspeed/runtime/config.py).

A trainer takes one setting of each knob for the whole model where a plan may choose per
layer. Checkpointing and sequence parallelism are the blocks' own (the trainers wrap blocks
and shard their norms): they are compared over the repeated blocks, the layers named
`<prefix>.<index>` with the most common prefix, as a ModuleList names its children.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from autoplan.errors import AutoplanError
from autoplan.plan import CHECKPOINT_MODES, SCHEDULES, LayerStrategy, Plan

__all__ = ["Trainer", "TRAINERS", "Uniform", "block_indices", "trainer", "refusal",
           "uniform_settings", "searchable", "blocks_per_chunk"]

_BLOCK_NAME = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")
_BLOCK_KNOBS = ("sequence_parallel", "checkpoint")
"""Knobs the trainers apply to the blocks (checkpoint wrappers, the norms SP shards), so
compared over the blocks: the plan's other layers may differ (the shorthand itself drops SP
on a last layer whose output it would leave in slices)."""


@dataclass(frozen=True)
class Trainer:
    name: str
    title: str
    """The release the rules and the export are for, as users name it."""
    zero: tuple[int, ...]
    """ZeRO stages the trainer runs as the cost model prices them (search --for)."""
    checkpoint: tuple[str, ...]
    """Checkpointing modes of blocks it runs as priced (search --for)."""
    schedules: tuple[str, ...]
    """Pipeline schedules it runs as priced; empty: it has no pipeline in its config."""
    sequence_parallel: tuple[bool, ...]
    dtypes: tuple[str, ...]
    even_split: bool = False
    """Whether its pipeline chunks must hold equal numbers of blocks."""
    limits: dict[str, str] = field(default_factory=dict, hash=False)
    """What else it refuses, each with the reason its refusal gives: "pipeline", "sequence
    parallelism", "zero 2", "zero 3 with pp", "zero 3 with tp" (refusal)."""


TRAINERS = {
    # zero 1 has no FSDP2 form (export maps it to zero 2 with a note); its selective AC is
    # per-op (saves matmul outputs), not the attention-core recompute the cost model prices
    "torchtitan": Trainer("torchtitan", "torchtitan 0.3.0", zero=(0, 2, 3),
                          checkpoint=("none", "full"), schedules=SCHEDULES,
                          sequence_parallel=(False, True), dtypes=("bf16", "fp32")),
    # no GPipe (export maps it to 1F1B with a note)
    "megatron": Trainer(
        "megatron", "Megatron-Core 0.16.1", zero=(0, 1, 3), checkpoint=CHECKPOINT_MODES,
        schedules=("1f1b", "interleaved_1f1b"), sequence_parallel=(False, True),
        dtypes=("bf16", "fp16", "fp32"), even_split=True,
        limits={"zero 2": "its distributed optimizer shards optimizer state only, ZeRO 1; "
                          "FSDP is ZeRO 3",
                "zero 3 with pp": "--use-torch-fsdp2 does not work with pipeline "
                                  "parallelism, says its help"}),
    # checkpointing is the model's code: any mode
    "deepspeed": Trainer(
        "deepspeed", "DeepSpeed 0.19.8", zero=(0, 1, 2, 3), checkpoint=CHECKPOINT_MODES,
        schedules=(), sequence_parallel=(False,), dtypes=("bf16", "fp16", "fp32"),
        limits={"pipeline": "DeepSpeed sets pipeline stages in code, "
                            "PipelineModule(num_stages=...), not in its JSON config",
                "sequence parallelism": "DeepSpeed's AutoTP has none",
                "zero 3 with tp": "AutoTP training combines with ZeRO 0-2"}),
}


def trainer(name: str) -> Trainer:
    if name not in TRAINERS:
        raise AutoplanError(f"trainer '{name}' is not one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


@dataclass(frozen=True)
class Uniform:
    """The settings a plan holds for every layer (checkpoint: for every block)."""

    dp: int
    tp: int
    sequence_parallel: bool
    zero: int
    checkpoint: str
    per_rank_micro_batch: int
    blocks: list[int]
    """Indices of the repeated blocks in plan.layers."""


def block_indices(names: Sequence[str]) -> list[int]:
    """Indices of the layers named <prefix>.<index> with the most common prefix (all layers
    when no name looks like that)."""
    prefixes = Counter(m["prefix"] for n in names if (m := _BLOCK_NAME.match(n)))
    if not prefixes:
        return list(range(len(names)))
    prefix = prefixes.most_common(1)[0][0]
    return [i for i, n in enumerate(names)
            if (m := _BLOCK_NAME.match(n)) and m["prefix"] == prefix]


def searchable(t: Trainer, pp: int, schedule: str, strategy: LayerStrategy) -> bool:
    """Whether `t` runs a uniform plan of `strategy` at pipeline degree `pp` with `schedule`
    as the cost model prices it (the space of search --for; stage cuts are checked on the
    plan, by refusal)."""
    if (pp > 1 and schedule not in t.schedules) or _broken_limit(t, pp, strategy):
        return False
    return (strategy.zero in t.zero and strategy.checkpoint in t.checkpoint
            and strategy.sequence_parallel in t.sequence_parallel)


_LIMIT_NAMES = {"pipeline": "pp {pp}", "zero 3 with pp": "zero 3 with pp {pp}",
                "zero 3 with tp": "tp {tp} with zero 3"}
"""How refusal names a broken limit, where not by the limit's own name."""


def _broken_limit(t: Trainer, pp: int, strategy: LayerStrategy) -> str | None:
    """The first of `t`'s limits (Trainer.limits) that `strategy` at pipeline degree `pp`
    breaks; None when it breaks none."""
    broken = {"pipeline": pp > 1, "sequence parallelism": strategy.sequence_parallel,
              "zero 2": strategy.zero == 2, "zero 3 with pp": strategy.zero == 3 and pp > 1,
              "zero 3 with tp": strategy.zero == 3 and strategy.tp > 1}
    return next((limit for limit in t.limits if broken[limit]), None)


def refusal(plan: Plan, t: Trainer, dtype: str = "bf16") -> str | None:
    """Why `t` cannot express `plan`, in one line naming the layers and the setting; None
    when it can (perhaps a little differently: export's notes say how)."""
    blocks = block_indices([layer.name for layer in plan.layers])
    every = range(len(plan.layers))
    for what in ("dp", "tp", "sequence_parallel", "zero", "checkpoint"):
        why = _differs(plan, what, blocks if what in _BLOCK_KNOBS else every, t)
        if why:
            return why
    middle = plan.layers[blocks[0]]
    head = f"{t.title} cannot express this plan:"
    if dtype not in t.dtypes:
        return f"{head} it trains in {' or '.join(t.dtypes)}, not {dtype}"
    broken = _broken_limit(t, plan.pp, middle)
    if broken:
        name = _LIMIT_NAMES.get(broken, broken).format(pp=plan.pp, tp=middle.tp)
        return f"{head} {name} ({t.limits[broken]})"
    if plan.pp > 1 and t.even_split:
        return _uneven(plan, blocks, head)
    return None


def uniform_settings(plan: Plan, t: Trainer, dtype: str = "bf16") -> Uniform:
    """The one value of each knob `plan` holds, for a plan `t` can express.

    Raises:
        AutoplanError: with refusal's line, and how to find a plan `t` can express.
    """
    why = refusal(plan, t, dtype)
    if why:
        raise AutoplanError(f"{why}; `autoplan search --for {t.name}` finds the fastest plan "
                            f"{t.title} can run")
    blocks = block_indices([layer.name for layer in plan.layers])
    first = plan.layers[blocks[0]]
    return Uniform(dp=first.dp, tp=first.tp, sequence_parallel=first.sequence_parallel,
                   zero=first.zero, checkpoint=first.checkpoint,
                   per_rank_micro_batch=plan.micro_batch_size // first.dp, blocks=blocks)


def blocks_per_chunk(plan: Plan, blocks: list[int]) -> list[int]:
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    return [sum(bounds[c] <= i < bounds[c + 1] for i in blocks) for c in range(len(bounds) - 1)]


def _differs(plan: Plan, what: str, indices: Sequence[int], t: Trainer) -> str | None:
    """Refusal naming the layers at `indices` whose `what` is not the most common one."""
    counts = Counter(getattr(plan.layers[i], what) for i in indices)
    common, _ = counts.most_common(1)[0]
    odd = [plan.layers[i].name for i in indices if getattr(plan.layers[i], what) != common]
    if not odd:
        return None
    shown = ", ".join(odd[:4]) + (f" (+{len(odd) - 4} more)" if len(odd) > 4 else "")
    others = {getattr(plan.layers[i], what) for i in indices} - {common}
    return (f"{t.title} cannot express this plan: layers {shown} have {what} "
            f"{'/'.join(str(v) for v in sorted(others, key=str))} where the other "
            f"{len(indices) - len(odd)} layers have {common}; {t.title} takes one {what} "
            "setting for the whole model")


def _uneven(plan: Plan, blocks: list[int], head: str) -> str | None:
    """Refusal unless every chunk holds as many blocks and the other layers sit before the
    first block (chunk 0) or after the last (last chunk), as an even split puts them."""
    counts = blocks_per_chunk(plan, blocks)
    first, last = blocks[0], blocks[-1]
    bounds = plan.stage_boundaries
    stray = [b for b in bounds[1:] if not first <= b <= last]
    if len(set(counts)) > 1 or stray:
        return (f"{head} its {len(counts)} pipeline chunks hold {', '.join(map(str, counts))} "
                f"blocks (chunks start at {', '.join(plan.layers[b].name for b in bounds)}); "
                "it splits the blocks evenly over the chunks")
    return None
