"""Trace a stack of identical blocks by running the first and replaying its shapes.

Tracing runs every op of a model on meta tensors; for Llama 3 405B that is 126 identical
blocks, most of the time of `autoplan inspect`. A block whose structure and settings equal an
earlier block's (same classes, parameter shapes and every plain attribute of every
sub-module, such as a layer index or a sliding window) and that receives inputs of the same
shapes computes the same costs: such a block is swapped, for the trace only, for a stand-in
that returns outputs of the recorded shapes and passes zero gradients back, and the first
block's costs are copied to it. Any difference at run time (other input shapes, a block that
runs before its model) raises ReplayMismatch, and the caller traces everything instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from autoplan.units import structure_hash

__all__ = ["ReplayMismatch", "replay_plan", "swap_in_replays"]

_PLAIN = (int, float, bool, str, type(None))


class ReplayMismatch(Exception):
    """A replayed block saw something its model block did not: trace it for real."""


def _settings(module: nn.Module) -> str:
    """The plain attributes of a module and its sub-modules (what structure leaves out)."""
    items = []
    for name, sub in module.named_modules():
        plain = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training"
                 and (isinstance(v, _PLAIN) or (isinstance(v, tuple)
                                                and all(isinstance(x, _PLAIN) for x in v)))}
        items.append((name, sorted(plain.items(), key=lambda kv: kv[0])))
    return repr(items)


def replay_plan(root: nn.Module, blocks: list[str]) -> dict[str, str]:
    """block name -> the earlier block it replays (blocks equal in structure and settings)."""
    memo: dict[int, str] = {}
    first: dict[str, str] = {}
    plan = {}
    for name in blocks:
        module = root.get_submodule(name)
        key = hashlib.sha1((structure_hash(module, memo) + _settings(module)).encode()).hexdigest()
        if key in first:
            plan[name] = first[key]
        else:
            first[key] = name
    return plan


@dataclass
class _Recording:
    """What the model block received and returned, as shapes."""

    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    out_spec: Any = None


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _shape_of(leaf: Any) -> Any:
    return _TensorMeta(tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf


class _Connect(torch.autograd.Function):
    """Outputs of recorded shapes that hang off the inputs in autograd (zero gradients)."""

    @staticmethod
    def forward(ctx, shapes: tuple, template: torch.Tensor,  # noqa: ANN001
                *anchors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # new_empty off an input, so that the tracer sees the outputs derive from it
        ctx.anchor_shapes = [(a.shape, a.dtype) for a in anchors]
        outs = tuple(template.new_empty(shape, dtype=dtype) for shape, dtype in shapes)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:  # noqa: ANN001
        zeros = (torch.zeros(shape, dtype=dtype, device="meta")
                 for shape, dtype in ctx.anchor_shapes)
        return (None, None, *zeros)


class _ReplayBlock(nn.Module):
    """Stands in for a block during a trace; see the module docstring."""

    def __init__(self, recording: _Recording) -> None:
        super().__init__()
        self.recording = recording

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        if [_shape_of(x) for x in leaves] != self.recording.inputs:
            raise ReplayMismatch("a block received inputs of other shapes than its model")
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        anchors = [x for x in tensors if x.requires_grad]
        metas = [x for x in self.recording.outputs if isinstance(x, _TensorMeta)]
        if not tensors:
            raise ReplayMismatch("a block received no tensor")
        shapes = tuple((m.shape, m.dtype) for m in metas)
        made = iter(_Connect.apply(shapes, (anchors or tensors)[0], *anchors))
        outs = [next(made) if isinstance(x, _TensorMeta) else x for x in self.recording.outputs]
        return tree_unflatten(outs, self.recording.out_spec)


def swap_in_replays(root: nn.Module, plan: dict[str, str]) -> tuple[list, list]:
    """Replace each replayed block by a stand-in; returns (hook handles, restore list of
    (parent, attribute, original module)). The caller restores and removes them."""
    recordings = {model: _Recording() for model in set(plan.values())}
    handles = []
    for model, recording in recordings.items():
        module = root.get_submodule(model)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, r=recording: _record_inputs(r, a, k), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, o, r=recording: _record_outputs(r, o)))
    restore = []
    for name, model in plan.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        restore.append((parent, leaf, getattr(parent, leaf)))
        setattr(parent, leaf, _ReplayBlock(recordings[model]))
    return handles, restore


def _record_inputs(recording: _Recording, args: tuple, kwargs: dict) -> None:
    if recording.inputs is None:
        recording.inputs = [_shape_of(x) for x in tree_flatten((args, kwargs))[0]]


def _record_outputs(recording: _Recording, output: Any) -> None:
    if recording.outputs is None:
        leaves, recording.out_spec = tree_flatten(output)
        recording.outputs = [_shape_of(x) for x in leaves]
