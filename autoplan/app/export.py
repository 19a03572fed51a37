"""`autoplan export`: a plan's uniform part as the config other trainers take.

- torchtitan: the TOML `[parallelism]`, `[training]` and `[activation_checkpoint]` sections
  (option names as in torchtitan/config/job_config.py at pytorch/torchtitan@000204a4:
  `Parallelism`, `Training`, `ActivationCheckpoint`).
- Megatron-LM: command-line arguments (megatron/training/arguments.py at
  NVIDIA/Megatron-LM@000c4ac2), as a bash array like its example scripts use.
- DeepSpeed: the JSON config (train_batch_size, train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, zero_optimization, bf16/fp16, and tensor_parallel.autotp_size
  from its AutoTP training tutorial).

These trainers take one setting for the whole model where a plan may choose per layer: a plan
whose layers differ where the target has one knob is refused, naming the layers and the knob.
Checkpointing is compared over the repeated blocks only (the trainers checkpoint blocks); the
blocks are the layers named `<prefix>.<index>` with the most common prefix, as a ModuleList
names its children.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from autoplan.errors import AutoplanError
from autoplan.plan import Plan

__all__ = ["EXPORT_TARGETS", "Export", "export_plan"]

EXPORT_TARGETS = ("torchtitan", "megatron", "deepspeed")
_TORCHTITAN_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}
_BLOCK_NAME = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)$")


@dataclass(frozen=True)
class Export:
    target: str
    text: str
    notes: list[str] = field(default_factory=list)
    """Where the target runs the plan a little differently, or what it needs besides."""


@dataclass(frozen=True)
class _Uniform:
    """The settings a plan holds for every layer (checkpoint: for every block)."""

    dp: int
    tp: int
    sequence_parallel: bool
    zero: int
    checkpoint: str
    per_rank_micro_batch: int
    blocks: list[int]
    """Indices of the repeated blocks in plan.layers."""


def export_plan(plan: Plan, target: str, dtype: str = "bf16") -> Export:
    """The config `target` takes for `plan`.

    Args:
        plan: the plan to export.
        target: "torchtitan", "megatron" or "deepspeed".
        dtype: the training dtype, "bf16", "fp16" or "fp32" (a plan does not record it).

    Returns:
        The config text and notes on what the target does differently.

    Raises:
        AutoplanError: when the target cannot express the plan, naming the layers and why;
            on an unknown target or dtype.
    """
    if dtype not in ("bf16", "fp16", "fp32"):
        raise AutoplanError(f"dtype '{dtype}' is not one of bf16, fp16, fp32")
    match target:
        case "torchtitan":
            return _torchtitan(plan, _uniform(plan, "torchtitan"), dtype)
        case "megatron":
            return _megatron(plan, _uniform(plan, "Megatron-LM"), dtype)
        case "deepspeed":
            return _deepspeed(plan, _uniform(plan, "DeepSpeed"), dtype)
        case _:
            raise AutoplanError(f"export target '{target}' is not one of "
                                f"{', '.join(EXPORT_TARGETS)}")


# --------------------------------------------------------------------------- uniformity


def _block_indices(names: list[str]) -> list[int]:
    """Indices of the layers named <prefix>.<index> with the most common prefix (all layers
    when no name looks like that)."""
    prefixes = Counter(m["prefix"] for n in names if (m := _BLOCK_NAME.match(n)))
    if not prefixes:
        return list(range(len(names)))
    prefix = prefixes.most_common(1)[0][0]
    return [i for i, n in enumerate(names)
            if (m := _BLOCK_NAME.match(n)) and m["prefix"] == prefix]


def _uniform(plan: Plan, framework: str) -> _Uniform:
    blocks = _block_indices([layer.name for layer in plan.layers])
    every = range(len(plan.layers))
    values = {what: _one_value(plan, what, every if what != "checkpoint" else blocks, framework)
              for what in ("dp", "tp", "sequence_parallel", "zero", "checkpoint")}
    return _Uniform(**values, per_rank_micro_batch=plan.micro_batch_size // values["dp"],
                    blocks=blocks)


def _one_value(plan: Plan, what: str, indices, framework: str):  # noqa: ANN001, ANN202
    """The value of `what` on the layers at `indices`, or a refusal naming those that differ."""
    counts = Counter(getattr(plan.layers[i], what) for i in indices)
    common, _ = counts.most_common(1)[0]
    odd = [plan.layers[i].name for i in indices if getattr(plan.layers[i], what) != common]
    if odd:
        shown = ", ".join(odd[:4]) + (f" (+{len(odd) - 4} more)" if len(odd) > 4 else "")
        others = {getattr(plan.layers[i], what) for i in indices} - {common}
        raise AutoplanError(
            f"{framework} cannot express this plan: layers {shown} have {what} "
            f"{'/'.join(str(v) for v in sorted(others, key=str))} where the other "
            f"{len(indices) - len(odd)} layers have {common}; {framework} takes one {what} setting "
            "for the whole model")
    return common


def _blocks_per_chunk(plan: Plan, blocks: list[int]) -> list[int]:
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    return [sum(bounds[c] <= i < bounds[c + 1] for i in blocks) for c in range(len(bounds) - 1)]


def _check_even_split(plan: Plan, uniform: _Uniform, framework: str) -> int:
    """Blocks per chunk, when every chunk holds as many and the other layers sit before the
    first block (chunk 0) or after the last (last chunk), as an even split puts them."""
    counts = _blocks_per_chunk(plan, uniform.blocks)
    first, last = uniform.blocks[0], uniform.blocks[-1]
    bounds = plan.stage_boundaries
    stray = [plan.layers[b].name for b in bounds[1:] if not first <= b <= last]
    if len(set(counts)) > 1 or stray:
        raise AutoplanError(
            f"{framework} cannot express this plan: its {len(counts)} pipeline chunks hold "
            f"{', '.join(map(str, counts))} blocks (chunks start at "
            f"{', '.join(plan.layers[b].name for b in bounds)}); {framework} splits the "
            "blocks evenly over the chunks")
    return counts[0]


def _header(plan: Plan, u: _Uniform, comment: str, what: str) -> list[str]:
    virtual = f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    return [f"{comment} autoplan export for {what}: {plan.model} on "
            f"{plan.cluster or f'{plan.world_size} devices'}",
            f"{comment} dp {u.dp} x tp {u.tp} x pp {plan.pp} ({plan.schedule}{virtual}), zero "
            f"{u.zero}, checkpoint {u.checkpoint}; global batch {plan.global_batch} = "
            f"{plan.num_micro_batches} micro-batches of {u.per_rank_micro_batch} per dp rank"]


# --------------------------------------------------------------------------- torchtitan


def _torchtitan(plan: Plan, u: _Uniform, dtype: str) -> Export:
    if dtype == "fp16":
        raise AutoplanError("torchtitan cannot express this plan: its "
                            "training.mixed_precision_param takes bfloat16 or float32, not fp16")
    notes = []
    sharded = u.zero >= 1 and u.dp > 1
    parallelism = {
        "data_parallel_replicate_degree": 1 if sharded else u.dp,
        "data_parallel_shard_degree": u.dp if sharded else 1,
        "tensor_parallel_degree": u.tp,
        "pipeline_parallel_degree": plan.pp,
        "enable_async_tensor_parallel": False,
    }
    if sharded:
        # FSDP2 keeps the gathered weights from forward to backward when not resharding.
        parallelism["fsdp_reshard_after_forward"] = "always" if u.zero == 3 else "never"
        if u.zero == 1:
            notes.append("zero 1 runs as FSDP2 without resharding after forward, which also "
                         "shards gradients (ZeRO 2): less memory than planned")
    if u.tp > 1 and not u.sequence_parallel:
        notes.append("torchtitan's tensor parallelism always shards norms by sequence "
                     "(sequence parallel): less activation memory than planned")
    if plan.pp > 1:
        parallelism |= {
            "pipeline_parallel_schedule": _TORCHTITAN_SCHEDULES[plan.schedule],
            "pipeline_parallel_microbatch_size": u.per_rank_micro_batch,
            "pipeline_parallel_split_points": [plan.layers[b].name
                                               for b in plan.stage_boundaries[1:]],
        }
    # With pp the local batch holds all micro-batches; without, torchtitan accumulates
    # gradients over global / (local x dp) steps.
    local = plan.global_batch // u.dp if plan.pp > 1 else u.per_rank_micro_batch
    training = {"local_batch_size": local, "global_batch_size": plan.global_batch,
                "mixed_precision_param": "bfloat16" if dtype == "bf16" else "float32"}
    checkpoint: dict[str, object] = {"mode": u.checkpoint}
    if u.checkpoint == "selective":
        checkpoint["selective_ac_option"] = "op"
        notes.append("selective checkpointing maps to torchtitan's per-op selective AC "
                     "(selective_ac_option = \"op\"), which saves matmul and attention outputs")
    lines = _header(plan, u, "#", "torchtitan (job config TOML)")
    if plan.pp > 1:
        lines.append("# split points are the plan's layer names: the model's module FQNs")
    for name, section in (("parallelism", parallelism), ("training", training),
                          ("activation_checkpoint", checkpoint)):
        lines += ["", f"[{name}]", *(f"{key} = {_toml(value)}" for key, value in section.items())]
    return Export("torchtitan", "\n".join(lines) + "\n", notes)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # ints as they are, strings quoted and escaped


# --------------------------------------------------------------------------- Megatron-LM


def _megatron(plan: Plan, u: _Uniform, dtype: str) -> Export:
    framework, notes = "Megatron-LM", []
    if u.zero == 2:
        raise AutoplanError(f"{framework} cannot express this plan: zero 2 (its distributed "
                            "optimizer shards optimizer state only, ZeRO 1; FSDP is ZeRO 3)")
    if u.zero == 3 and plan.pp > 1:
        raise AutoplanError(f"{framework} cannot express this plan: zero 3 with pp "
                            f"{plan.pp} (--use-torch-fsdp2 does not work with pipeline "
                            "parallelism, says its help)")
    args: list[tuple[str, object]] = [("--tensor-model-parallel-size", u.tp),
                                      ("--pipeline-model-parallel-size", plan.pp)]
    if plan.pp > 1:
        per_chunk = _check_even_split(plan, u, framework)
        if plan.virtual_stages > 1:
            args.append(("--num-layers-per-virtual-pipeline-stage", per_chunk))
        if plan.schedule == "gpipe":
            notes.append("Megatron-LM has no GPipe schedule; it runs 1F1B, as fast and "
                         "holding fewer micro-batches of activations")
    if u.sequence_parallel:
        args.append(("--sequence-parallel", None))
    args += [("--micro-batch-size", u.per_rank_micro_batch),
             ("--global-batch-size", plan.global_batch)]
    args += _megatron_recompute(u.checkpoint)
    if u.zero == 1:
        args.append(("--use-distributed-optimizer", None))
    elif u.zero == 3:
        args.append(("--use-torch-fsdp2", None))
    if dtype != "fp32":
        args.append((f"--{dtype}", None))
    lines = _header(plan, u, "#", "Megatron-LM (pretrain_gpt.py arguments)")
    lines += ["# dp is what remains of the world: world size / (tp x pp)",
              '# usage: torchrun ... pretrain_gpt.py "${AUTOPLAN_PARALLEL_ARGS[@]}" ...',
              "AUTOPLAN_PARALLEL_ARGS=("]
    lines += [f"    {flag}" + ("" if value is None else f" {value}") for flag, value in args]
    return Export("megatron", "\n".join([*lines, ")"]) + "\n", notes)


def _megatron_recompute(checkpoint: str) -> list[tuple[str, object]]:
    match checkpoint:
        case "full":  # every layer's input kept, the layer recomputed: uniform over 1 layer
            return [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                    ("--recompute-num-layers", 1)]
        case "selective":
            return [("--recompute-granularity", "selective")]
        case _:
            return []


# --------------------------------------------------------------------------- DeepSpeed


def _deepspeed(plan: Plan, u: _Uniform, dtype: str) -> Export:
    framework, notes = "DeepSpeed", []
    if plan.pp > 1:
        raise AutoplanError(f"{framework} cannot express this plan: pp {plan.pp} (DeepSpeed "
                            "sets pipeline stages in code, PipelineModule(num_stages=...), not "
                            "in its JSON config, and runs no ZeRO 2/3 with them)")
    if u.sequence_parallel:
        raise AutoplanError(f"{framework} cannot express this plan: sequence parallelism "
                            "(DeepSpeed's AutoTP has none)")
    if u.tp > 1 and u.zero == 3:
        raise AutoplanError(f"{framework} cannot express this plan: tp {u.tp} with zero 3 "
                            "(AutoTP training combines with ZeRO 0, 1 or 2)")
    config: dict[str, object] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": u.per_rank_micro_batch,
        "gradient_accumulation_steps": plan.num_micro_batches,
        "zero_optimization": {"stage": u.zero},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }
    if u.tp > 1:
        config["tensor_parallel"] = {"autotp_size": u.tp}
    if u.checkpoint != "none":
        notes.append(f"checkpoint {u.checkpoint}: DeepSpeed's JSON does not turn activation "
                     "checkpointing on; wrap each block with deepspeed.checkpointing.checkpoint "
                     "(or torch.utils.checkpoint) in the model")
    return Export("deepspeed", json.dumps(config, indent=2) + "\n", notes)
