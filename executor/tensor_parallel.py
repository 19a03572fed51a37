"""Tensor and sequence parallelism of each layer: decisions as data first, then parallelize_module.

The plan of a unit comes from autoplan.tp_plan.infer_tp_plan (Megatron's pairing by data flow:
column-wise Linear layers whose outputs reach one row-wise Linear). A unit whose plan refuses
tp > 1 is refused here with the same reason; a Linear shared by several units (or called
twice in one) is split once, by the first unit that holds it.

With sequence parallelism (Korthikanti et al. 2022) the activations between units are split
by sequence (dim 1) as local tensors: norms run on the local slice (SequenceParallel), each
parent of a column-wise Linear gathers the sequence before it runs, and each row-wise Linear
reduce-scatters back to a slice.
Where a sequence-split unit meets a unit that needs the whole sequence, a hook gathers or
splits the first positional input (DTensor redistribute, so gradients follow).

Embedding units (split by vocabulary rows) and head units (a Linear split by columns) always
produce whole, replicated outputs. Units with nothing to split stay replicated and are
reported.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.modules.batchnorm import _BatchNorm

from autoplan.errors import AutoplanError
from autoplan.feasibility import tp_split_refusal
from autoplan.tp_plan import COLWISE, TPPlan, infer_tp_plan

__all__ = ["SEQUENCE_DIM", "TPLayer", "tp_styles", "sequence_splits", "apply_tp",
           "gather_sequence_input"]

log = logging.getLogger(__name__)

SEQUENCE_DIM = 1
"""Activations are (batch, sequence, ...): sequence parallelism splits dim 1."""
_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    """A per-token norm: torch's, or one whose class says so (LlamaRMSNorm, T5LayerNorm);
    not a batch norm (its statistics span the batch and sequence)."""
    return isinstance(module, _NORMS) or ("norm" in type(module).__name__.lower()
                                          and not isinstance(module, _BatchNorm))


@dataclass(frozen=True)
class TPLayer:
    """One unit's tensor-parallel decision."""

    name: str
    sequence_parallel: bool = False
    override: dict[str, str] | None = None
    """sub-module FQN -> "colwise" | "rowwise", replacing the inferred plan."""


class _RedistributeInput(ParallelStyle):
    """Moves a module's first positional input (or, called with keywords only, its first
    tensor keyword: transformers calls attention as self_attn(hidden_states=...)) between a
    sequence slice and the whole tensor."""

    def __init__(self, gather: bool) -> None:
        super().__init__()
        self.gather = gather

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        src, dst = (Shard(SEQUENCE_DIM), Replicate()) if self.gather else \
            (Replicate(), Shard(SEQUENCE_DIM))

        def move(t: torch.Tensor) -> torch.Tensor:
            moved = DTensor.from_local(t, device_mesh, (src,), run_check=False)
            return moved.redistribute(device_mesh, (dst,)).to_local()

        def hook(_: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                if isinstance(args[0], torch.Tensor):
                    args = (move(args[0]), *args[1:])
                return args, kwargs
            key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            return args, kwargs if key is None else {**kwargs, key: move(kwargs[key])}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return f"_RedistributeInput(gather={self.gather})"


def _splits_sequence(unit: nn.Module, sequence_parallel: bool,
                     override: dict[str, str] | None = None) -> bool:
    """True when the unit takes and gives sequence slices: not a head (a Linear), nor a unit
    holding an Embedding (its input is token ids, whose positions a slice would lose, as
    BERT's embeddings unit derives position ids from the input's length), and only a unit
    whose split Linear layers gather and scatter the sequence around all it does besides
    per-token norms (_split_with_norms)."""
    return sequence_parallel and not isinstance(unit, nn.Linear) \
        and not any(isinstance(m, nn.Embedding) for m in unit.modules()) \
        and _split_with_norms(unit, override)


def _split_with_norms(unit: nn.Module, override: dict[str, str] | None) -> bool:
    """Whether the plan splits Linear layers of the unit and every other module holding
    parameters is a norm. A module left whole (a fused attention, GPT-2's Conv1D) would mix
    the tokens of a sequence slice alone, and a unit of norms alone may be followed by glue
    that reshapes the whole sequence (GPT-2's view after ln_f): such units take the whole
    sequence instead."""
    styles = infer_tp_plan(unit, override).styles
    return bool(styles) and all(name in styles or _is_norm(module)
               for name, module in unit.named_modules()
               if any(True for _ in module.parameters(recurse=False)))


def tp_styles(unit: nn.Module, sequence_parallel: bool,
              override: dict[str, str] | None = None) -> dict[str, ParallelStyle]:
    """The parallelize_module plan of one unit ({} when nothing in it can be split).

    Args:
        unit: the unit's module.
        sequence_parallel: split norms and the activations between sub-layers by sequence.
        override: sub-module FQN -> "colwise" | "rowwise", used instead of the inferred pairs.

    Example: a GPT block with sequence parallelism gives
        {"attn": gather, "attn.q": ColwiseParallel(), ..., "attn.proj":
         RowwiseParallel(output_layouts=Shard(1)), "ln_1": SequenceParallel(...), ...}
    """
    plan = infer_tp_plan(unit, override)
    sequence_parallel = _splits_sequence(unit, sequence_parallel, override)
    if not plan.shardable:
        styles: dict[str, ParallelStyle] = {}
    elif isinstance(unit, nn.Embedding):
        return {"": RowwiseParallel(input_layouts=Replicate())}
    elif isinstance(unit, nn.Linear):
        return {"": ColwiseParallel(output_layouts=Replicate())}
    else:
        styles = {name: _linear_style(style, sequence_parallel)
                  for name, style in plan.styles.items()}
    if not sequence_parallel:
        return styles
    for name, module in unit.named_modules():
        if _is_norm(module) and any(True for _ in module.parameters(recurse=False)):
            styles[name] = SequenceParallel(use_local_output=True)
    for parent in sorted({name.rpartition(".")[0] for name, style in plan.styles.items()
                          if style == COLWISE}):  # one order on every rank
        styles[parent] = _RedistributeInput(gather=True)
    return styles


def _linear_style(style: str, sequence_parallel: bool) -> ParallelStyle:
    if style == COLWISE:
        return ColwiseParallel()
    return RowwiseParallel(output_layouts=Shard(SEQUENCE_DIM)) if sequence_parallel \
        else RowwiseParallel()


def sequence_splits(model: nn.Module, layers: Sequence[TPLayer]) -> list[bool]:
    """For each layer of the whole (unsplit) model: does it take and give sequence slices?"""
    return [_splits_sequence(model.get_submodule(lay.name), lay.sequence_parallel, lay.override)
            for lay in layers]


def gather_sequence_input(unit: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Gather the sequence slices of the unit's first positional input over `tp_mesh` before
    the unit (and any hook registered after this one) runs."""
    _RedistributeInput(gather=True)._apply(unit, tp_mesh)


def _check_degree(name: str, plan: TPPlan, tp: int) -> None:
    """Raises AutoplanError when the unit's plan refuses tp (feasibility's rule)."""
    why = tp_split_refusal(name, plan.sizes, plan.refusal, tp)
    if why:
        raise AutoplanError(why)


def _not_yet_split(unit: nn.Module, styles: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The styles without those whose module a unit before already split (a shared Linear:
    parallelize_module refuses a module twice, and its hooks already serve every call)."""
    def split(name: str) -> bool:
        module = unit.get_submodule(name)
        return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))

    return {name: style for name, style in styles.items()
            if isinstance(style, _RedistributeInput) or not split(name)}


def apply_tp(model: nn.Module, layers: Sequence[TPLayer], splits: Sequence[bool],
             tp_mesh: DeviceMesh, present: set[str] | None = None,
             whole_inputs: Collection[str] = ()) -> list[str]:
    """Shard each unit of `layers` over `tp_mesh` (in place), and join sequence-split units to
    whole-sequence ones with a gather or split of the input.

    Args:
        model: the module holding the units (a pipeline chunk holds some of them).
        layers: every unit of the model, in execution order.
        splits: sequence_splits() of the whole model.
        tp_mesh: the 1-D tensor-parallel mesh.
        present: the unit names this module really holds (default: all).
        whole_inputs: units whose input arrives with the whole sequence whatever the unit
            before gives (a layout hop gathered it, executor/hops.py).

    Returns:
        The names of units with parameters that stay replicated (nothing to split).

    Raises:
        AutoplanError: when a unit's plan refuses tp (autoplan.tp_plan: TPPlan.refusal), a
            split size does not divide by the tp degree, or the last layer would give
            sequence slices as the model's output.
    """
    if splits and splits[-1]:
        raise AutoplanError(f"the last layer {layers[-1].name} would give sequence slices; "
                            "turn sequence_parallel off there so that the output is whole")
    replicated: list[str] = []
    for index, layer in enumerate(layers):
        if present is not None and layer.name not in present:
            continue
        unit = model.get_submodule(layer.name)
        inferred = infer_tp_plan(unit, layer.override)
        _check_degree(layer.name, inferred, tp_mesh.size())
        previous = splits[index - 1] if index and layer.name not in whole_inputs else False
        if previous != splits[index]:  # registered first: runs before the styles' hooks
            _RedistributeInput(gather=previous)._apply(unit, tp_mesh)
        styles = _not_yet_split(unit, tp_styles(unit, layer.sequence_parallel, layer.override))
        if "" in styles:  # the unit's own style (parallelize_module takes no "" key)
            parallelize_module(unit, tp_mesh, styles.pop(""))
        if styles:
            parallelize_module(unit, tp_mesh, styles)
        if not inferred.shardable and any(True for _ in unit.parameters()):
            replicated.append(layer.name)
    if replicated:
        log.info("tensor parallelism left these layers replicated: %s", ", ".join(replicated))
    return replicated
