"""Extract a LayerGraph from any nn.Module by tracing one training step on the meta device.

How: the units are found in the module tree (the children of the largest container of
repeated blocks, plus the modules with parameters around it); then one forward, loss and
backward run on meta tensors of batch 1 under a dispatch mode that attributes every op to
the unit running it. The mode also follows which tensors derive from the model's inputs:
those scale with the batch (per-sample figures), the rest (position tables, RNG state) are
kept apart as fixed. Ops that run between units ("glue", such as a residual add in the
parent's forward) count towards the unit that ran last.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from autoplan.errors import AutoplanError
from autoplan.graph import LayerEdge, LayerGraph, LayerNode
from autoplan.meta_state import as_compiling, keep_buffer_values
from autoplan.models.build import DTYPES, BuiltModel, build_model, sum_loss
from autoplan.models.spec import parse_model_spec
from autoplan.replay import ReplayMismatch, replay_plan, swap_in_replays
from autoplan.tp_plan import infer_tp_plan, saved_shares
from autoplan.units import (
    find_units,
    first_input,
    first_param,
    loose_parameters,
    structure_hash,
)

__all__ = ["layer_graph", "layer_graph_of_built", "trace_spec", "meta_copy", "meta_inputs",
           "trace_batch"]

log = logging.getLogger(__name__)

_PRE = "<before first unit>"
_LOSS = "loss"
ATTENTION_MODES = ("flash", "math")


def layer_graph(model: nn.Module, example_inputs: Any,
                loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None, *,
                name: str = "module", dtype: torch.dtype = torch.bfloat16,
                attention: str = "flash", tokens_per_sample: int | None = None,
                replay: bool = True) -> LayerGraph:
    """The LayerGraph of any module, traced on a meta copy (the module itself is untouched).

    Args:
        model: the module, on any device; its weights are never read.
        example_inputs: a tuple of tensors with the batch in dim 0 (any batch size), or a
            function batch_size -> tuple of tensors.
        loss_fn: (output, inputs) -> scalar; default: sum of the first output tensor.
        name: what the graph records as its model.
        dtype: parameter and activation dtype of the trace (bf16: how large models train).
        attention: "flash" traces scaled_dot_product_attention as the fused kernel GPUs
            run (no S x S scores kept); "math" as the unfused reference.
        tokens_per_sample: tokens in one sample, for per-token figures.
        replay: run only the first of identical blocks and replay its shapes for the rest
            (autoplan/replay.py); False runs every block (the same graph, slower).

    Returns:
        The graph, its nodes in execution order and a final "loss" node.

    Raises:
        AutoplanError: when the module cannot run on meta tensors or attention is unknown.
    """
    if attention not in ATTENTION_MODES:
        raise AutoplanError(f"attention must be one of {', '.join(ATTENTION_MODES)}, "
                            f"got '{attention}'")
    meta = meta_copy(model, dtype) if _needs_copy(model, dtype) else model
    inputs_fn = meta_inputs(example_inputs, dtype)
    units = find_units(meta)
    loss_fn = loss_fn or sum_loss
    replays = replay_plan(meta, [u for u, is_block in units if is_block]) if replay else {}
    batch = trace_batch(meta)
    trace = partial(_trace_or_full, meta, units, inputs_fn, loss_fn, attention, replays,
                    tokens_per_sample)
    tracer = trace(batch)
    if batch > 1:
        _per_sample(tracer.records, trace(2 * batch).records, batch)
    nodes, edges = _assemble(meta, units, tracer.records)
    loose = tuple(loose_parameters(meta, [n.name for n in nodes[:-1]]))
    return LayerGraph(name, str(dtype).removeprefix("torch."), attention, tokens_per_sample,
                      tuple(nodes), tuple(edges), loose)


def layer_graph_of_built(built: BuiltModel, dtype: torch.dtype = torch.bfloat16,
                         attention: str = "flash") -> LayerGraph:
    """The LayerGraph of a model built from a spec (see autoplan.models.build_model)."""
    return layer_graph(built.module, built.example_inputs, built.loss_fn, name=built.spec.text,
                       dtype=dtype, attention=attention,
                       tokens_per_sample=built.tokens_per_sample)


def trace_spec(spec_text: str, dtype: str = "bf16", attention: str = "flash") -> LayerGraph:
    """Build a model spec on meta tensors and trace it into its LayerGraph (every time:
    autoplan.workload.load_graph is the cached way in).

    Raises:
        AutoplanError: on a bad spec or dtype.
    """
    if dtype not in DTYPES:
        raise AutoplanError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    built = build_model(parse_model_spec(spec_text), dtype=DTYPES[dtype])
    return layer_graph_of_built(built, DTYPES[dtype], attention)


# ---------------------------------------------------------------------------- tracing


def meta_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors of `dtype`; each
    buffer keeps the real values of the model's (meta_state.fill_buffers writes them into
    a real copy, so that a layer timed off the copy reads the buffers it would in the run)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        to = dtype if t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=to, device="meta")

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(convert(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = convert(b)
    meta = copy.deepcopy(model, memo)
    keep_buffer_values(meta, model)
    return meta


def trace_batch(model: nn.Module) -> int:
    """The batch a trace runs at: 1, or 2 when the model has a BatchNorm in training mode,
    which refuses one value per channel (a (1, C) input, or 1 x 1 feature maps); figures
    traced at 2 are divided back to one sample (_per_sample)."""
    norms = (m for m in model.modules() if m.training and (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or "batchnorm" in type(m).__name__.lower()))
    return 2 if next(norms, None) is not None else 1


def _trace_or_full(meta: nn.Module, units: list[tuple[str, bool]], inputs_fn: Callable,
                   loss_fn: Callable, attention: str, replays: dict[str, str],
                   tokens_per_sample: int | None, batch: int) -> _Tracer:
    """A trace at `batch` samples, replaying equal blocks where their shapes allow."""
    try:
        return _trace(meta, units, inputs_fn(batch), loss_fn, attention, replays,
                      tokens_per_sample)
    except ReplayMismatch as why:
        log.info("tracing every block (%s)", why)
        return _trace(meta, units, inputs_fn(batch), loss_fn, attention, {},
                      tokens_per_sample)


def _per_sample(records: dict[str, _Record], twice: dict[str, _Record], batch: int) -> None:
    """Per-sample figures from traces at `batch` and 2 x `batch` samples: what one more
    sample adds. Tensors that derive from the inputs but do not grow with the batch (a
    BatchNorm's per-channel statistics) move from the saved bytes to the fixed ones."""
    per_sample = [c for c in _COSTS if c != "act_bytes_fixed"] + ["input_bytes", "output_bytes"]
    for unit, rec in records.items():
        more = twice[unit]
        for cost in per_sample:
            step = getattr(more, cost) - getattr(rec, cost)
            setattr(rec, cost, step / batch if isinstance(step, float) else step // batch)
        rec.act_bytes_fixed += max(more.act_bytes - 2 * batch * rec.act_bytes, 0)
        rec.inputs_from = Counter({src: (more.inputs_from[src] - n) // batch
                                   for src, n in rec.inputs_from.items()})
        shape = rec.output_shape
        if shape and shape[0] % batch == 0:
            rec.output_shape = (shape[0] // batch, *shape[1:])


def _needs_copy(model: nn.Module, dtype: torch.dtype) -> bool:
    return any(not t.is_meta or (t.is_floating_point() and t.dtype != dtype)
               for t in [*model.parameters(), *model.buffers()])


def meta_inputs(example: Any, dtype: torch.dtype) -> Callable[[int], tuple]:
    """batch size -> meta inputs; floating inputs take the trace dtype, as under autocast."""
    def like(t: Any, batch: int | None) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = t.shape if batch is None else (batch, *t.shape[1:])
        return torch.empty(shape, dtype=dtype if t.is_floating_point() else t.dtype,
                           device="meta")

    if callable(example):
        return lambda batch: tuple(like(t, None) for t in example(batch))
    example = example if isinstance(example, tuple) else (example,)
    return lambda batch: tuple(like(t, batch) for t in example)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (a fast path for op arguments)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)
    elif tree is not None and not isinstance(tree, (int, float, bool, str, torch.dtype)):
        yield from (t for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


_BATCH_NORMS = {torch.ops.aten.native_batch_norm.default,
                torch.ops.aten._native_batch_norm_legit.default,
                torch.ops.aten._native_batch_norm_legit_functional.default}
"""(input, weight, bias, running mean, running var, training, ...): what F.batch_norm runs."""

_COSTS = ("fwd_flops", "bwd_flops", "act_bytes", "act_bytes_fixed", "fwd_io_bytes",
          "bwd_io_bytes", "attn_act_bytes", "attn_fwd_flops", "attn_fwd_io_bytes")
"""The _Record fields a replayed block copies and the first unit absorbs from glue."""


@dataclass
class _Record:
    """What one unit did at batch 1; bytes split into per-sample and fixed."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    act_bytes: int = 0
    act_bytes_fixed: int = 0
    fwd_io_bytes: int = 0
    bwd_io_bytes: int = 0
    attn_act_bytes: int = 0
    attn_fwd_flops: float = 0.0
    attn_fwd_io_bytes: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    output_shape: tuple[int, ...] = ()
    calls: int = 0
    order: int = -1
    inputs_from: Counter = field(default_factory=Counter)
    first_input: str = ""
    """What its first positional input is when that is not an activation ("" when it is)."""
    cut_input: str = ""
    """What its first input, positional or by keyword, is when not an activation."""
    first_from: frozenset = frozenset()
    """The units whose outputs that first input derives from (through glue)."""
    others_from: frozenset = frozenset()
    """The same for every other tensor it takes (positional or keyword)."""
    output: str = ""
    """What it returns when that is not one activation tensor ("" when it is)."""
    min_samples: int = 1
    """Samples per rank and micro-batch its batch norms need (_Tracer._note_batch_norm)."""
    call: tuple[tuple, dict] | None = None
    """The (args, kwargs) of its first call (meta tensors: the tp plan is inferred on them)."""


class _Tracer(TorchDispatchMode):
    """Attributes FLOPs, saved bytes and data flow of every op to the unit that runs it.

    Units do not nest, so one "current unit" is enough in forward; in backward a unit
    becomes current when the gradient of its output arrives (a hook on that output).
    `producers` maps a storage to the units it came from; `batched` holds the storages
    derived from the model's inputs.
    """

    def __init__(self, root: nn.Module, units: list[str], inputs: tuple,
                 seq: int | None = None) -> None:
        super().__init__()
        self.seq = seq  # tokens per sample: S x S tensors belong to attention's core
        self.param_shapes = {tuple(p.shape) for p in root.parameters()}
        self.records = {u: _Record() for u in [*units, _PRE, _LOSS]}
        self.state = {_key(t) for t in [*root.parameters(), *root.buffers()]}
        self.batched = {_key(t) for t in _tensors(inputs)}
        self.saved: set[int] = set()
        self.producers: dict[int, frozenset[str]] = {}
        self.origins: dict[int, frozenset[str]] = {}  # as producers, for the executor's facts
        self.unit: str | None = None  # the unit whose forward is running
        self.last_fwd, self.bwd_unit = _PRE, _LOSS
        self.in_loss = False
        self.calls = 0
        self.hooks: list[Any] = []

    def owner(self, backward: bool) -> str:
        if backward:
            return self.bwd_unit
        return self.unit or (_LOSS if self.in_loss else self.last_fwd)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        backward = _in_backward()
        owner = self.owner(backward)
        rec = self.records[owner]
        ins, outs = list(_tensors((args, kwargs))), list(_tensors(out))
        if not backward:  # first, so that outputs count as per-sample below
            self._note_batch_norm(rec, func, args)
            if owner == _LOSS:  # what the loss function reads of the model's output
                rec.first_from |= self._sources(ins)
            self._follow(ins, outs)
            if not func.is_view:  # a view is its input's storage, made by whoever made that
                self._originate(ins, outs)
        count = flop_registry.get(func._overloadpacket) or _GROUPED_FLOPS.get(str(func))
        quadratic = self._quadratic(ins + outs)
        if count is not None:
            flops = count(*args, **kwargs, out_val=out)
            if backward:
                rec.bwd_flops += flops
            else:
                rec.fwd_flops += flops
                rec.attn_fwd_flops += flops if quadratic else 0
        elif not func.is_view and not self._aliases(ins, outs):
            self._count_traffic(rec, ins + outs, backward, quadratic)
        return out

    def _count_traffic(self, rec: _Record, tensors: list[torch.Tensor], backward: bool,
                       quadratic: bool) -> None:
        """Bytes a memory-bound op reads and writes: per-sample tensors in forward; in
        backward every tensor not shaped like a parameter (those are weight gradients)."""
        if backward:
            rec.bwd_io_bytes += sum(t.numel() * t.element_size() for t in tensors
                                    if tuple(t.shape) not in self.param_shapes)
            return
        nbytes = sum(self._sample_bytes(t) for t in tensors)
        rec.fwd_io_bytes += nbytes
        rec.attn_fwd_io_bytes += nbytes if quadratic else 0

    def _quadratic(self, tensors: list[torch.Tensor]) -> bool:
        """Whether an op touches an S x S tensor (S = tokens per sample): scores of some
        heads (or batch x heads) by S x S. Not a hidden state whose width is S (llama3-70b
        at sequence 8192): (1, S, S) at the traced batch of 1, or (S, S) viewed for a
        Linear, whose ops are not attention's."""
        return self.seq is not None and self.seq > 1 and any(
            t.dim() >= 3 and t.shape[-3] > 1 and t.shape[-1] == t.shape[-2] == self.seq
            for t in tensors)

    @staticmethod
    def _aliases(ins: list[torch.Tensor], outs: list[torch.Tensor]) -> bool:
        """Outputs that share an input's storage moved no bytes (views, in-place ops count
        once through their inputs)."""
        keys = {_key(t) for t in ins}
        return bool(outs) and all(_key(t) in keys for t in outs)

    def _follow(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        batched = any(_key(t) in self.batched for t in ins)
        sources = frozenset((self.unit,)) if self.unit else frozenset().union(
            *(self.producers.get(_key(t), frozenset()) for t in ins))
        for t in outs:  # a storage's key can be reused once freed: always overwrite
            self.producers[_key(t)] = sources
            if batched:
                self.batched.add(_key(t))
            else:
                self.batched.discard(_key(t))

    @staticmethod
    def _note_batch_norm(rec: _Record, func: Any, args: tuple) -> None:
        """A batch norm in training over one value per channel and sample (a (N, C) input or
        1 x 1 maps) needs 2 samples on every rank: with one it refuses to run."""
        if func in _BATCH_NORMS and args[5] and math.prod(args[0].shape[2:]) == 1:
            rec.min_samples = 2

    def _originate(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """As _follow for `origins`, which views leave alone: a unit that views a buffer or
        its input (rope tables, a reshape) does not become what the storage derives from."""
        sources = frozenset((self.unit,)) if self.unit else frozenset().union(
            *(self.origins.get(_key(t), frozenset()) for t in ins))
        for t in outs:
            self.origins[_key(t)] = sources

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key not in self.state and key not in self.saved:
            self.saved.add(key)
            rec = self.records[self.owner(_in_backward())]
            if key in self.batched:
                rec.act_bytes += t.untyped_storage().nbytes()
                if self._quadratic([t]):
                    rec.attn_act_bytes += t.untyped_storage().nbytes()
            else:
                rec.act_bytes_fixed += t.untyped_storage().nbytes()
        return t

    def enter(self, unit: str, args: Any, kwargs: Any, keyword: str | None = None) -> None:
        rec = self.records[unit]
        rec.calls += 1
        if rec.order < 0:
            rec.order, self.calls = self.calls, self.calls + 1
        self._receive(rec, (args, kwargs), unit)
        self._note_inputs(rec, args, kwargs, keyword)
        before = self.last_fwd
        grads = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        if grads:  # once the input's gradient is out, backward glue is the predecessor's,
            # as forward glue is (so every block of a stack sees the same backward)
            self.hooks.append(register_multi_grad_hook(
                grads, lambda _: setattr(self, "bwd_unit", before), mode="any"))
        self.unit = unit

    def leave(self, unit: str, output: Any) -> None:
        rec = self.records[unit]
        outs = list(_tensors(output))
        rec.output_bytes += sum(self._sample_bytes(t) for t in outs)
        rec.output_shape = rec.output_shape or (tuple(outs[0].shape) if outs else ())
        rec.output = rec.output or _not_activation(output)
        self.unit, self.last_fwd = None, unit
        grads = [t for t in outs if t.requires_grad]
        if grads:
            self.hooks.append(register_multi_grad_hook(
                grads, lambda _: setattr(self, "bwd_unit", unit), mode="any"))

    def model_done(self, output: Any) -> None:
        self.in_loss = True
        loss = self.records[_LOSS]
        loss.order = self.calls
        self._receive(loss, output, _LOSS)
        loss.first_input = _not_activation(output)

    def _sources(self, tree: Any) -> frozenset:
        """The units whose outputs the tensors of `tree` derive from."""
        return frozenset().union(*(self.origins.get(_key(t), frozenset())
                                   for t in _tensors(tree)))

    def _note_inputs(self, rec: _Record, args: tuple, kwargs: dict, keyword: str | None) -> None:
        """What the executor needs to know of a unit's inputs: whether its first positional
        input is the activation (a layout hop moves it), whether its first input (the
        keyword of its forward's first parameter when none is positional) is (a pipeline
        stage receives it), and which units every input comes from (over all calls)."""
        rec.call = rec.call or (args, kwargs)
        rec.first_input = rec.first_input or _not_activation(
            args[0] if args else None, "" if args else "no positional input")
        first = first_input(keyword, args, kwargs)
        rec.cut_input = rec.cut_input or _not_activation(
            first, "" if first is not None else "no input it could receive")
        rec.first_from |= self._sources(first)
        rest = [t for t in _tensors((args, kwargs)) if t is not first]
        rec.others_from |= self._sources(rest)

    def _receive(self, rec: _Record, tree: Any, unit: str) -> None:
        for t in _tensors(tree):
            nbytes = self._sample_bytes(t)
            rec.input_bytes += nbytes
            for src in self.producers.get(_key(t), ()):
                if src != unit and nbytes:
                    rec.inputs_from[src] += nbytes

    def _sample_bytes(self, t: torch.Tensor) -> int:
        """Bytes of t at batch 1 if it derives from the inputs, else 0 (not per sample)."""
        return t.numel() * t.element_size() if _key(t) in self.batched else 0


def _not_activation(value: Any, what: str = "") -> str:
    """'' when `value` is an activation as the executor moves one between layouts and stages
    (a batch-first floating tensor that requires grad), else what it is instead."""
    if what:
        return what
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if value.dim() == 0:
        return "a scalar tensor"
    if not value.is_floating_point():
        return f"a {str(value.dtype).removeprefix('torch.')} tensor (indices, not an activation)"
    if not value.requires_grad:
        return "a tensor that does not require grad (a model input or made from one)"
    return ""


def _grouped_mm_flops(mat_a: torch.Tensor, mat_b: torch.Tensor, *args: Any,
                      out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of a grouped matmul (mixture-of-experts layers): the experts' rows or columns
    are split by `offs` along one dim, so the work is one matmul's over the ungrouped
    shapes; 3-d operands are the experts' stacked weights."""
    if mat_a.dim() == 2 and mat_b.dim() == 3:  # (tokens, k) x (experts, k, n)
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[2]
    if mat_a.dim() == 3 and mat_b.dim() == 2:  # (experts, m, k) x (k, tokens)
        return 2 * mat_a.shape[1] * mat_a.shape[2] * mat_b.shape[1]
    if mat_a.dim() == 2:  # (m, tokens) x (tokens, n): a weight gradient per expert
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[1]
    return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_a.shape[2] * mat_b.shape[2]


def _grouped_mm_backward_flops(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor,
                               grad: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """The input and the weight gradient of a grouped matmul: twice its forward."""
    return 2 * _grouped_mm_flops(mat_a, mat_b)


_GROUPED_FLOPS: dict[str, Callable[..., int]] = {
    "aten._grouped_mm.default": _grouped_mm_flops,
    "transformers.grouped_mm_fallback.default": _grouped_mm_flops,
    "transformers.grouped_mm_fallback_backward.default": _grouped_mm_backward_flops,
}
"""Ops the FLOP counter lacks: grouped matmuls, which transformers 5's mixture-of-experts
layers (Mixtral, Qwen2-MoE) run all routed experts in (top_k rows per token), as aten's
kernel or as transformers' fallback (a custom op, also its backward)."""


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _FlashAttention(TorchFunctionMode):
    """Runs scaled_dot_product_attention as the fused flash kernel, which on meta tensors
    otherwise takes the math path and keeps the S x S probabilities (NOTES-torch.md)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _flash_sdpa(func, *args, **kwargs)
        return func(*args, **kwargs)


def _flash_sdpa(sdpa: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    if attn_mask is not None:  # flash takes no mask: keep the math path
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        return _GroupedFlash.apply(query, key, value, dropout_p, is_causal, scale)
    return torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout_p, is_causal, scale=scale)[0]


class _GroupedFlash(torch.autograd.Function):
    """Flash attention over fewer key/value heads than query heads (grouped-query), as
    torch's kernels run it (CPU flash, FlashAttention 2): the key and value heads repeated
    only inside, so what backward keeps is the grouped key and value, not copies repeated
    to every query head (which the dry run never found: a llama3-70b block keeps 448 MiB a
    sample less at sequence 8192 in fp32). The FLOPs are the repeated op's."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                dropout_p: float, is_causal: bool, scale: float | None) -> torch.Tensor:
        repeat = query.shape[-3] // key.shape[-3]
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3),
            dropout_p, is_causal, scale=scale)
        ctx.save_for_backward(query, key, value, out[0], out[1], out[2], out[3], out[6],
                              out[7])
        ctx.rest = (out[4], out[5], dropout_p, is_causal, scale, repeat)
        return out[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        query, key, value, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
        max_q, max_k, dropout_p, is_causal, scale, repeat = ctx.rest
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, query, key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3),
            out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset,
            scale=scale)
        fold = (*key.shape[:-3], key.shape[-3], repeat, *key.shape[-2:])  # sum each group
        return dq, dk.view(fold).sum(-3), dv.view(fold).sum(-3), None, None, None


def _trace(root: nn.Module, units: list[tuple[str, bool]], inputs: tuple,
           loss_fn: Callable, attention: str, replays: dict[str, str],
           seq: int | None = None) -> _Tracer:
    """One forward, loss and backward under the tracer; blocks in `replays` are stood in
    for by replays of an equal earlier block (autoplan/replay.py), whose costs they copy."""
    names = [u for u, _ in units]
    tracer = _Tracer(root, names, inputs, seq)
    fresh = [p for p in root.parameters() if p.grad is None]  # backward must leave no grad
    # each unit's first parameter, read before replays stand in for equal blocks
    keywords = {unit: first_param(root.get_submodule(unit)) for unit in names}
    handles, restore = swap_in_replays(root, replays)
    for unit in names:
        module = root.get_submodule(unit)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, u=unit: tracer.enter(u, a, k, keywords[u]), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda m, a, o, u=unit: tracer.leave(u, o)))
    handles.append(root.register_forward_hook(lambda m, a, o: tracer.model_done(o)))
    attention_mode = _FlashAttention() if attention == "flash" else contextlib.nullcontext()
    backward = False
    try:
        with attention_mode, as_compiling(), tracer, \
                torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            loss = loss_fn(root(*inputs), inputs)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise AutoplanError(f"the loss must be a scalar tensor, got {type(loss).__name__}")
            backward = True
            loss.backward()
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise AutoplanError(_trace_failure(err, tracer, inputs, backward)) from err
    finally:
        for h in handles + tracer.hooks:
            h.remove()
        for parent, attribute, module in restore:
            setattr(parent, attribute, module)
        for p in fresh:
            p.grad = None
    if any(not tracer.records[name].calls for name in replays):
        raise ReplayMismatch("a replayed block was never called through its parent")
    for name, model in replays.items():
        _copy_costs(tracer.records[model], tracer.records[name])
    return tracer


def _trace_failure(err: Exception, tracer: _Tracer, inputs: tuple, backward: bool) -> str:
    """One line on why a trace failed: the error's own message, where it was raised, and
    whether the meta tensors were the cause (a model that reads tensor values)."""
    batch = next((t.shape[0] for t in _tensors(inputs) if t.dim()), None)
    if backward:
        where = f"in the backward of {tracer.bwd_unit}"
    elif tracer.unit or tracer.in_loss:
        where = f"in {tracer.unit or 'the loss'}"
    else:
        where = ("before the first layer" if tracer.last_fwd == _PRE
                 else f"after {tracer.last_fwd}")
    message = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "meta" in message.lower():  # torch's own words: the first sentence says it all
        return (f"the model reads tensor values {where} (value-dependent code such as a "
                f"data-dependent router: nonzero, where, item), which a trace on meta "
                f"tensors does not have: {type(err).__name__}: {message.split('. ')[0]}")
    return (f"the model failed while traced at batch {batch}, {where}: "
            f"{type(err).__name__}: {message}")


def _copy_costs(source: _Record, target: _Record) -> None:
    for cost in _COSTS:
        setattr(target, cost, getattr(source, cost))


# ---------------------------------------------------------------------------- assembly


def _assemble(root: nn.Module, units: list[tuple[str, bool]],
              records: dict[str, _Record]) -> tuple[list[LayerNode], list[LayerEdge]]:
    _merge_pre(records)
    ran = sorted((u for u, _ in units if records[u].calls), key=lambda u: records[u].order)
    skipped = [u for u, _ in units if not records[u].calls]
    if skipped:
        log.warning("units never called in forward, left out: %s", ", ".join(skipped))
    params, shared = _param_owners(root, ran)
    blocks = {u for u, is_block in units if is_block}
    memo: dict[int, str] = {}
    last_param_unit = next((u for u in reversed(ran) if params[u] or shared[u]), None)
    facts = _facts(root, ran, records)
    nodes = []
    for unit in [*ran, _LOSS]:
        module = root.get_submodule(unit) if unit != _LOSS else None
        kind = _kind(module, unit in blocks, unit == last_param_unit)
        nodes.append(_node(unit, kind, module, records[unit], params.get(unit, 0),
                           shared.get(unit, 0), memo, facts[unit]))
    # sources in execution order: a glue op's producers are a set, whose iteration order
    # follows string hashing and so changes from one process to the next
    edges = [LayerEdge(src, dst, nbytes) for dst in [*ran, _LOSS]
             for src, nbytes in sorted(records[dst].inputs_from.items(),
                                       key=lambda item: records[item[0]].order)
             if src in params]
    return _signed_apart(nodes), edges


def _signed_apart(nodes: list[LayerNode]) -> list[LayerNode]:
    """Equal units that own different parameters signed apart by what they own: a signature
    promises equal cost (the cost model and the search take one unit's cost for all of its
    signature), and weights, gradients and optimizer state follow ownership. Blocks calling
    one shared Linear are such units: the first owns it, the others share it. Signatures
    that need no telling apart stay as they were, so saved profiles keep matching."""
    owned: dict[str, set[tuple[int, int]]] = {}
    for node in nodes:
        owned.setdefault(node.signature, set()).add((node.params, node.shared_params))
    return [replace(node, signature=hashlib.sha1(repr(
                (node.signature, node.params, node.shared_params)).encode()).hexdigest()[:12])
            if len(owned[node.signature]) > 1 else node for node in nodes]


def _merge_pre(records: dict[str, _Record]) -> None:
    """Glue before the first unit (e.g. position ids) counts towards the first unit."""
    pre = records.pop(_PRE)
    first = min((r for r in records.values() if r.calls), key=lambda r: r.order, default=None)
    if first is not None:
        for cost in _COSTS:
            setattr(first, cost, getattr(first, cost) + getattr(pre, cost))


def _param_owners(root: nn.Module, units: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters per unit; a tied weight belongs to its first unit and is "shared" later.
    Parameters held directly by a parent of the units count towards the first unit."""
    owned: set[int] = set()
    params = dict.fromkeys(units, 0)
    shared = dict.fromkeys(units, 0)
    for unit in units:
        for p in root.get_submodule(unit).parameters():
            if id(p) in owned:
                shared[unit] += p.numel()
            else:
                owned.add(id(p))
                params[unit] += p.numel()
    loose = sum(p.numel() for p in root.parameters() if id(p) not in owned)
    if units:
        params[units[0]] += loose
    return params, shared


def _tie_owners(root: nn.Module, units: list[str]) -> dict[str, str]:
    """unit -> the first unit of its tie group (units joined where they share a parameter),
    for units in a group of two or more."""
    first_user: dict[int, str] = {}
    parent = {u: u for u in units}

    def find(u: str) -> str:
        while parent[u] != u:
            u = parent[u]
        return u

    for unit in units:
        for p in root.get_submodule(unit).parameters():
            owner = first_user.setdefault(id(p), unit)
            a, b = find(owner), find(unit)
            if a != b:  # the earlier root stays the owner
                parent[b] = a
    roots = Counter(find(u) for u in units)
    return {u: find(u) for u in units if roots[find(u)] > 1}


def _tp_facts(module: nn.Module, rec: _Record) -> dict[str, Any]:
    """What the unit's tensor-parallel plan (on the inputs it was traced with) means for
    the LayerNode: sizes every tp degree must divide, why tp cannot split it, how many
    parameters the split leaves whole and how many it splits but gets whole gradients of
    (tp_whole_grad_params), and the bytes per sample it saves whole (tp_whole_act_bytes)."""
    plan = infer_tp_plan(module, inputs=rec.call)
    facts: dict[str, Any] = {"tp_divides": tuple(plan.sizes), "tp_refusal": plan.refusal}
    if not plan.styles:
        return facts
    splits = _splits(module, plan.styles)
    vocab = {id(p) for m in module.modules() if isinstance(m, nn.Embedding)
             for p in m.parameters(recurse=False) if splits.get(id(p)) == "rows"}
    facts["tp_whole_params"] = sum(p.numel() for p in module.parameters()
                                   if splits.get(id(p)) == "whole")
    facts["tp_whole_grad_params"] = sum(p.numel() for p in module.parameters()
                                        if id(p) in vocab)
    if rec.call is not None and rec.output_bytes:
        whole, gathered, output = saved_shares(module, plan.styles, rec.call)
        if output:  # the call's samples: its output over the output per sample
            facts["tp_whole_act_bytes"] = whole * rec.output_bytes / output
            facts["tp_gathered_act_bytes"] = gathered * rec.output_bytes / output
    return facts


def _tp_splits(module: nn.Module, call: tuple[tuple, dict] | None) -> dict[int, str]:
    """id(parameter) -> how the unit's tensor-parallel plan splits it ("rows", "columns",
    or "whole"): an Embedding split by vocabulary and a column-wise Linear shard dim 0 of
    their weight, a row-wise Linear dim 1."""
    return _splits(module, infer_tp_plan(module, inputs=call).styles)


def _splits(module: nn.Module, styles: dict[str, str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, sub in module.named_modules():
        style = styles.get(name)
        for attr, p in sub.named_parameters(recurse=False):
            if style is None or (style == "rowwise" and attr == "bias"):
                out.setdefault(id(p), "whole")
            elif isinstance(sub, nn.Embedding):
                out[id(p)] = "rows" if style == "rowwise" else "columns"
            else:
                out[id(p)] = "rows" if style == "colwise" or attr == "bias" else "columns"
    return out


_SPLIT_WORDS = {"rows": "by rows", "columns": "by columns", "whole": "not at all"}


def _tie_refusals(root: nn.Module, ties: dict[str, str],
                  records: dict[str, _Record]) -> dict[str, str]:
    """Why tp cannot split the units of a tie group: their plans split the shared
    parameter differently (T5's embedding, whole inside its encoder, by rows in its head),
    and the executor holds one parameter."""
    splits = {u: _tp_splits(root.get_submodule(u), records[u].call) for u in ties}
    out: dict[str, str] = {}
    for unit, owner in ties.items():
        for other, other_owner in ties.items():
            if other_owner != owner or other == unit:
                continue
            for key in splits[unit].keys() & splits[other].keys():
                if splits[unit][key] != splits[other][key]:
                    out[unit] = (f"it shares a parameter with {other}, which tensor "
                                 f"parallelism would split {_SPLIT_WORDS[splits[other][key]]} "
                                 f"there and {_SPLIT_WORDS[splits[unit][key]]} here")
    return out


def _cut_refusals(ran: list[str], records: dict[str, _Record]) -> dict[str, str]:
    """Why a pipeline stage cannot start at each unit: one tensor crosses a boundary, the
    unit's first positional input, so that must be the activation, and its other inputs and
    those of every later unit (and the loss) must come from no earlier unit."""
    position = {u: i for i, u in enumerate(ran)}
    reasons: dict[str, str] = {}
    # (position of the earliest unit that a later unit or the loss takes, that user, the unit)
    later = _earliest(records[_LOSS].first_from, "loss", position, None)
    for k in range(len(ran) - 1, -1, -1):
        unit, rec = ran[k], records[ran[k]]
        own = _earliest(rec.others_from, unit, position, None)
        if rec.cut_input:
            reasons[unit] = f"its first input is {rec.cut_input}"
        elif not rec.first_from:
            reasons[unit] = "its first input comes from no layer before it"
        elif later is not None and later[0] < k:
            reasons[unit] = (f"layer {later[1]} also takes the output of {later[2]}, which "
                             "would be on an earlier stage")
        elif own is not None and own[0] < k:
            reasons[unit] = (f"besides its first input it takes the output of {own[2]}, "
                             "which would be on an earlier stage")
        later = _earliest(rec.first_from | rec.others_from, unit, position, later)
    return reasons


def _earliest(sources: frozenset, user: str, position: dict[str, int],
              known: tuple[int, str, str] | None) -> tuple[int, str, str] | None:
    """The earlier of `known` and the earliest unit in `sources` (as position, user, unit)."""
    found = [(position[s], user, s) for s in sources if s in position]
    return min([*found, *([known] if known else [])], default=None)


def _layout_refusal(unit: str, module: nn.Module | None, previous: str | None,
                    records: dict[str, _Record]) -> str:
    """Why a layout hop into `unit` cannot run (executor/hops.py): it moves the first
    positional input, or for an embedding (which takes indices) the output of the unit
    before it; the loss's hop moves the model's output."""
    if module is not None and isinstance(module, nn.Embedding) and previous is not None:
        what = records[previous].output
        return f"the output of {previous} before it is {what}" if what else ""
    what = records[unit].first_input
    if not what:
        return ""
    return f"the model's output is {what}" if unit == _LOSS else \
        f"its first positional input is {what}"


def _facts(root: nn.Module, ran: list[str], records: dict[str, _Record]) -> dict[str, dict]:
    """What running each unit needs (LayerNode's tie_group ... cut_refusal fields)."""
    ties, cuts = _tie_owners(root, ran), _cut_refusals(ran, records)
    tie_refusals = _tie_refusals(root, ties, records)
    out: dict[str, dict] = {}
    for index, unit in enumerate([*ran, _LOSS]):
        module = root.get_submodule(unit) if unit != _LOSS else None
        tp = _tp_facts(module, records[unit]) if module is not None else {}
        if unit in ties:  # see LayerNode.tp_whole_grad_params
            tp.pop("tp_whole_grad_params", None)
        refusal = tp.pop("tp_refusal", "")
        previous = ran[index - 1] if index else None
        out[unit] = dict(
            tie_group=ties.get(unit, ""), **tp, tp_refusal=refusal or tie_refusals.get(unit, ""),
            min_samples=records[unit].min_samples,
            layout_refusal=_layout_refusal(unit, module, previous, records) if index else "",
            cut_refusal=cuts.get(unit, "") if unit != _LOSS else "")
    return out


def _kind(module: nn.Module | None, is_block: bool, is_last: bool) -> str:
    if module is None:
        return "loss"
    if is_block:
        return "block"
    leaves = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if leaves and all(isinstance(m, nn.Embedding) for m in leaves):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    if is_last and isinstance(module, nn.Linear):
        return "head"
    return "other"


def _node(unit: str, kind: str, module: nn.Module | None, rec: _Record, params: int,
          shared: int, memo: dict[int, str], facts: dict) -> LayerNode:
    structure = structure_hash(module, memo) if module is not None else "loss"
    costs = (rec.fwd_flops, rec.bwd_flops, rec.act_bytes, rec.output_shape)
    signature = hashlib.sha1(repr((structure, costs)).encode()).hexdigest()[:12]
    element = next(module.parameters()).element_size() if module and params + shared else 0
    return LayerNode(
        name=unit, kind=kind, module_type=type(module).__name__ if module else "loss",
        signature=signature, params=params, shared_params=shared, param_bytes=params * element,
        fwd_flops=float(rec.fwd_flops), bwd_flops=float(rec.bwd_flops),
        act_bytes=rec.act_bytes, act_bytes_fixed=rec.act_bytes_fixed,
        fwd_io_bytes=rec.fwd_io_bytes, bwd_io_bytes=rec.bwd_io_bytes,
        attn_act_bytes=rec.attn_act_bytes, attn_fwd_flops=float(rec.attn_fwd_flops),
        attn_fwd_io_bytes=rec.attn_fwd_io_bytes,
        input_bytes=rec.input_bytes, output_bytes=rec.output_bytes,
        output_shape=rec.output_shape, calls=rec.calls or 1, **facts)
