"""`autoplan export`: a plan as the configuration the trainers users already run take.

- torchtitan 0.3.0: command-line overrides of `torchtitan.train --module M --config C`
  (`--parallelism.*` and `--training.*` fields of its config dataclasses, and the
  `activation_checkpoint:` subcommand), parsed by its ConfigManager.
- Megatron-Core 0.16.1 / Megatron-LM: the arguments of pretrain_gpt.py, as a bash array like
  its example scripts use (the core config fields' flags as ArgumentGroupFactory names them,
  and the training loop's batch and FSDP flags).
- DeepSpeed 0.19.8: the JSON config (train_batch_size, train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, zero_optimization, bf16/fp16, and tensor_parallel.autotp_size
  from its AutoTP training tutorial).

What a trainer can express is autoplan.trainers' to say: a plan that breaks its rules is
refused there, naming the layers and the setting; `autoplan search --for` finds the fastest
plan that keeps them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from autoplan.errors import AutoplanError
from autoplan.plan import Plan
from autoplan.trainers import TRAINERS, Uniform, blocks_per_chunk, trainer, uniform_settings

__all__ = ["EXPORT_TARGETS", "Export", "export_plan"]

EXPORT_TARGETS = tuple(TRAINERS)
_TORCHTITAN_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}
_LOSS = "loss"
"""The loss's layer name (graph.LayerNode.name): no module, so no FQN a trainer takes."""


@dataclass(frozen=True)
class Export:
    target: str
    text: str
    notes: list[str] = field(default_factory=list)
    """Where the target runs the plan a little differently, or what it needs besides."""


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
    t = trainer(target)
    u = uniform_settings(plan, t, dtype)
    notes = _outside_blocks(plan, u)
    match target:
        case "torchtitan":
            out = _torchtitan(plan, u, dtype)
        case "megatron":
            out = _megatron(plan, u, dtype)
        case _:
            out = _deepspeed(plan, u, dtype)
    return Export(out.target, out.text, [*out.notes, *notes])


def _outside_blocks(plan: Plan, u: Uniform) -> list[str]:
    """A note on layers outside the blocks that the plan checkpoints (the trainers do not)."""
    blocks = set(u.blocks)
    named = [lp.name for i, lp in enumerate(plan.layers)
             if i not in blocks and lp.checkpoint != "none"]
    if not named:
        return []
    return [f"the plan checkpoints {', '.join(named)} besides the blocks; the trainer "
            "checkpoints blocks only: a little more memory and less recomputation than planned"]


def _header(plan: Plan, u: Uniform, what: str) -> list[str]:
    virtual = f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    return [f"# autoplan export for {what}: {plan.model} on "
            f"{plan.cluster or f'{plan.world_size} devices'}",
            f"# dp {u.dp} x tp {u.tp} x pp {plan.pp} ({plan.schedule}{virtual}), zero "
            f"{u.zero}, checkpoint {u.checkpoint}; global batch {plan.global_batch} = "
            f"{plan.num_micro_batches} micro-batches of {u.per_rank_micro_batch} per dp rank"]


def _bash_array(name: str, args: list[tuple[str, object]]) -> list[str]:
    lines = [f"{name}=("]
    lines += [f"    {flag}" + ("" if value is None else f" {value}") for flag, value in args]
    return [*lines, ")"]


# --------------------------------------------------------------------------- torchtitan


def _torchtitan(plan: Plan, u: Uniform, dtype: str) -> Export:
    notes = []
    sharded = u.zero >= 1 and u.dp > 1
    args: list[tuple[str, object]] = [
        ("--parallelism.data_parallel_replicate_degree", 1 if sharded else u.dp),
        ("--parallelism.data_parallel_shard_degree", u.dp if sharded else 1),
        ("--parallelism.tensor_parallel_degree", u.tp),
        ("--parallelism.enable_sequence_parallel" if u.sequence_parallel
         else "--parallelism.no-enable-sequence-parallel", None),
        ("--parallelism.pipeline_parallel_degree", plan.pp)]
    if sharded:
        # FSDP2 keeps the gathered weights from forward to backward when not resharding.
        args.append(("--parallelism.fsdp_reshard_after_forward",
                     "always" if u.zero == 3 else "never"))
        if u.zero == 1:
            notes.append("zero 1 runs as FSDP2 without resharding after forward, which also "
                         "shards gradients (ZeRO 2): less memory than planned")
    if plan.pp > 1:
        chunks = [",".join(name for name in names if name != _LOSS)
                  for names in _chunk_names(plan)]
        args += [("--parallelism.pipeline_parallel_schedule",
                  _TORCHTITAN_SCHEDULES[plan.schedule]),
                 ("--parallelism.pipeline_parallel_microbatch_size", u.per_rank_micro_batch),
                 ("--parallelism.module_fqns_per_model_part",
                  " ".join(shlex.quote(c) for c in chunks)),
                 # its CUDA graphs do not support pipelining (its config's own check)
                 ("--training.disable_cuda_graphs", None)]
    # With pp the local batch holds all micro-batches; without, torchtitan accumulates
    # gradients over global / (local x dp) steps.
    local = plan.global_batch // u.dp if plan.pp > 1 else u.per_rank_micro_batch
    args += [("--training.local_batch_size", local),
             ("--training.global_batch_size", plan.global_batch),
             ("--training.mixed_precision_param", "bfloat16" if dtype == "bf16" else "float32")]
    if u.checkpoint == "selective":
        notes.append("selective checkpointing maps to torchtitan's per-op selective AC, which "
                     "saves matmul outputs and recomputes the rest: not the attention-core "
                     "recompute the cost model priced")
    # the checkpointing policy is a subcommand: after every other override
    args.append((f"activation_checkpoint:{u.checkpoint}", None))
    lines = _header(plan, u, f"{TRAINERS['torchtitan'].title} (command-line overrides)")
    lines += ["# usage: torchrun ... -m torchtitan.train --module <model> --config <config> "
              '"${AUTOPLAN_TORCHTITAN_ARGS[@]}"']
    if plan.pp > 1:
        lines.append("# module_fqns_per_model_part lists the plan's layer names: the model's "
                     "module FQNs")
    lines += _bash_array("AUTOPLAN_TORCHTITAN_ARGS", args)
    return Export("torchtitan", "\n".join(lines) + "\n", notes)


def _chunk_names(plan: Plan) -> list[list[str]]:
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    return [[lp.name for lp in plan.layers[a:b]] for a, b in zip(bounds, bounds[1:],
                                                                 strict=False)]


# --------------------------------------------------------------------------- Megatron


def _megatron(plan: Plan, u: Uniform, dtype: str) -> Export:
    notes = []
    args: list[tuple[str, object]] = [("--tensor-model-parallel-size", u.tp),
                                      ("--pipeline-model-parallel-size", plan.pp)]
    if plan.pp > 1:
        per_chunk = blocks_per_chunk(plan, u.blocks)[0]
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
    lines = _header(plan, u, f"Megatron-LM on {TRAINERS['megatron'].title} "
                             "(pretrain_gpt.py arguments)")
    lines += ["# dp is what remains of the world: world size / (tp x pp)",
              '# usage: torchrun ... pretrain_gpt.py "${AUTOPLAN_PARALLEL_ARGS[@]}" ...']
    lines += _bash_array("AUTOPLAN_PARALLEL_ARGS", args)
    return Export("megatron", "\n".join(lines) + "\n", notes)


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


def _deepspeed(plan: Plan, u: Uniform, dtype: str) -> Export:
    notes = []
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
