"""Measured forward and backward time of each distinct layer, at several micro-batch sizes
and at the shard shapes each tensor-parallel degree gives, on this machine's device.

Each distinct LayerGraph signature is timed once, in isolation: its first layer is copied
off the meta model, given real (random) weights and inputs of the shapes it receives in the
model, and run forward then backward with a gradient for each output. Backward is timed,
not assumed to be 2x forward; a checkpointed layer's recompute is its forward time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.meta_state import as_compiling, fill_buffers, without_caches
from autoplan.models.build import BuiltModel
from autoplan.tp_plan import COLWISE, infer_tp_plan
from autoplan.tracing import trace_batch

__all__ = ["MeasureSettings", "UnitCall", "capture_unit_calls", "materialize", "shard_copy",
           "runs_on_meta", "make_inputs", "time_unit", "timed_pass", "output_grads", "LossUnit",
           "unit_module"]

LOSS = "loss"  # the LayerGraph's name for the loss node


@dataclass(frozen=True)
class MeasureSettings:
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    tps: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 10
    warmup: int = 3
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int | None = None
    """torch threads while timing: match the run being predicted (NOTES-torch.md)."""


@dataclass(frozen=True)
class UnitCall:
    """The arguments one unit receives, as meta tensors at batch 1 and batch 2 (2 and 4 for
    a model with a BatchNorm in training: tracing.trace_batch); the dimension that differs
    between the two is the batch dimension."""

    name: str
    one: tuple[list[Any], Any]
    two: tuple[list[Any], Any]


class LossUnit(nn.Module):
    """The model's loss as a module, so that it is timed and sized like a layer: its
    inputs are the model's output and the model's inputs (targets derive from them)."""

    def __init__(self, loss_fn: Callable[[Any, tuple], torch.Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, output: Any, *inputs: Any) -> torch.Tensor:
        return self.loss_fn(output, inputs)


def unit_module(built: BuiltModel, node: LayerNode) -> nn.Module:
    """The module of a LayerGraph node ("loss" is the model's loss function)."""
    if node.kind == "loss":
        return LossUnit(built.loss_fn)
    return built.module.get_submodule(node.name)


def capture_unit_calls(built: BuiltModel, graph: LayerGraph) -> dict[str, UnitCall]:
    """signature -> the call of its first layer, captured by meta forward passes at batch
    1 and 2, or 2 and 4 (see UnitCall; hooks keep the first call of each unit in each pass,
    without a transformers KV cache: meta_state.without_caches)."""
    names = {sig: nodes[0].name for sig, nodes in graph.by_signature().items()}
    calls: dict[str, list[Any]] = {name: [] for name in names.values()}
    pass_index = 0

    def keep(name: str, args: tuple, kwargs: dict) -> None:
        if len(calls[name]) == pass_index:
            calls[name].append(tree_flatten(without_caches((args, kwargs))))

    handles = [built.module.get_submodule(name).register_forward_pre_hook(
        lambda _m, a, k, name=name: keep(name, a, k), with_kwargs=True)
        for name in calls if name != LOSS]
    try:  # meta tensors answer no value-dependent checks, as in the trace
        with torch.no_grad(), as_compiling():
            first = trace_batch(built.module)  # 2 where BatchNorm refuses 1
            for pass_index, batch in enumerate((first, 2 * first)):  # noqa: B007 - keep()
                inputs = built.example_inputs(batch)
                output = built.module(*inputs)
                if LOSS in calls:
                    keep(LOSS, (output, *inputs), {})
    finally:
        for h in handles:
            h.remove()
    return {sig: UnitCall(name, *calls[name]) for sig, name in names.items()}


def make_inputs(call: UnitCall, batch: int, device: str, dtype: torch.dtype) -> tuple:
    """Real (args, kwargs) for the unit at `batch`: random floats, zero integers."""
    (leaves_one, spec), (leaves_two, _) = call.one, call.two
    real = [_real_like(a, b, batch, device, dtype) for a, b in zip(leaves_one, leaves_two,
                                                                     strict=True)]
    return tree_unflatten(real, spec)


def _real_like(one: Any, two: Any, batch: int, device: str, dtype: torch.dtype) -> Any:
    if not isinstance(one, torch.Tensor):
        return one
    shape = [batch if a != b else a for a, b in zip(one.shape, two.shape, strict=True)]
    if one.is_floating_point():
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    return torch.zeros(shape, device=device, dtype=one.dtype)


def shard_copy(unit: nn.Module, tp: int) -> nn.Module | None:
    """A meta copy of `unit` with one TP rank's shard shapes, or None when the unit has no
    TP plan or a split dimension does not divide by tp."""
    if tp == 1:
        return unit
    plan = infer_tp_plan(unit)
    if not plan.shardable or not plan.max_degree_divides(tp):
        return None
    copied = copy.deepcopy(unit)
    for name, style in plan.styles.items():
        old = copied.get_submodule(name)
        new = _sharded(old, style, tp)
        if name:
            parent, _, leaf = name.rpartition(".")
            setattr(copied.get_submodule(parent), leaf, new)
        else:
            copied = new
    return copied


def runs_on_meta(unit: nn.Module, call: UnitCall) -> bool:
    """Whether `unit` accepts the captured inputs: a shard whose split leaves, say, less than
    one attention head fails here (shapes only, no compute)."""
    args, kwargs = tree_unflatten(*call.one)
    try:
        with torch.no_grad(), as_compiling():
            unit(*args, **kwargs)
    except RuntimeError:
        return False
    return True


def _sharded(module: nn.Module, style: str, tp: int) -> nn.Module:
    with torch.device("meta"):
        if isinstance(module, nn.Embedding):
            return nn.Embedding(module.num_embeddings // tp, module.embedding_dim)
        bias = module.bias is not None
        if style == COLWISE:
            return nn.Linear(module.in_features, module.out_features // tp, bias=bias)
        return nn.Linear(module.in_features // tp, module.out_features, bias=bias)


def materialize(unit: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """A real copy of a meta unit: weights normal(0, 0.02), 1-d weights one, biases zero,
    buffers the values their meta buffers stand for (autoplan.meta_state)."""
    real = copy.deepcopy(unit).to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in real.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    fill_buffers(real, unit)
    return real


def output_grads(out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors of a module's output that backward runs from, and a gradient of ones for
    each: `torch.autograd.backward(*output_grads(out))` runs the layer's backward.

    Raises:
        AutoplanError: when no output needs a gradient.
    """
    leaves, _ = tree_flatten(out)
    outs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outs:
        raise AutoplanError(f"a layer returns no tensor needing grad ({type(out).__name__})")
    return outs, [torch.ones_like(t) for t in outs]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def timed_pass(module: nn.Module, inputs: tuple, device: str) -> tuple[float, float]:
    """(forward, backward) seconds of one pass, after which the module's and the inputs'
    gradients are cleared (they would accumulate otherwise)."""
    args, kwargs = inputs
    out, fwd_s = _timed(lambda: module(*args, **kwargs), device)
    outs, grads = output_grads(out)
    _, bwd_s = _timed(partial(torch.autograd.backward, outs, grads), device)
    module.zero_grad(set_to_none=True)
    for leaf in tree_flatten(inputs)[0]:
        if isinstance(leaf, torch.Tensor):
            leaf.grad = None
    return fwd_s, bwd_s


def time_unit(module: nn.Module, inputs: tuple, settings: MeasureSettings) -> dict[str, float]:
    """Median and spread of forward and backward seconds over `settings.repeats` runs."""
    fwd, bwd = [], []
    for index in range(settings.warmup + settings.repeats):
        fwd_s, bwd_s = timed_pass(module, inputs, settings.device)
        if index >= settings.warmup:
            fwd.append(fwd_s)
            bwd.append(bwd_s)
    return {"fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd),
            "fwd_spread_s": max(fwd) - min(fwd), "bwd_spread_s": max(bwd) - min(bwd)}
