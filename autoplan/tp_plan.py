"""Which Linear layers of a unit tensor parallelism splits, as data (STYLE.md, item 4).

The rule follows the data, not the module tree (Megatron, Shoeybi et al. 2019, section 3):
one forward of the unit on meta tensors records the order in which its Linear layers are
called and which earlier Linear outputs each one's input derives from. A Linear whose input
derives from no split output is column-wise; a Linear whose input derives only from
column-wise outputs is row-wise for them, and its output (all-reduced) is whole again. So
BERT pairs q, k, v with attention.output.dense although they sit in sibling modules, and
Llama pairs q, k, v | o and gate, up | down. What the rule cannot split stays whole (listed
in `replicated`, with the reason in `notes`):
- a column-wise output that is split, chunked or narrowed along its width in forward (a fused
  q/k/v or gate/up projection: splitting by columns would cut across its parts);
- a column-wise output that leaves the unit, or meets whole data before a row-wise layer;
- a Linear called twice in roles that disagree.
Then the split is checked on meta tensors: the unit runs again with each rank's shard
shapes, and no op outside a row-wise Linear may contract or normalise over a split dimension
(a reshape by a stored head count with -1 as head width would). Pairs that break are left
whole; if the unit still breaks, tp > 1 is refused with the reason (`refusal`).

`sizes` holds every size a tp degree must divide (split widths, head and kv-head counts),
for plan-time checks without processes. A unit that is itself an Embedding is split by
vocabulary rows, one that is itself a Linear (an output head) by columns; a user override
replaces the rule. When the unit's inputs are not given and no guess of them runs, the plan
falls back to pairing the Linear children of each parent (the last one row-wise).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from autoplan.errors import first_line
from autoplan.feasibility import tp_split_refusal
from autoplan.meta_state import as_compiling

__all__ = ["COLWISE", "ROWWISE", "TPPlan", "infer_tp_plan", "infer_tp_plans", "saved_shares",
           "HEAD_ATTRIBUTES"]

log = logging.getLogger(__name__)

COLWISE = "colwise"
ROWWISE = "rowwise"
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads",
                   "num_key_value_heads", "num_kv_heads", "n_kv_heads")
"""Head counts found on attention modules (or their .config): tp must divide them."""
_GUESS_SEQ = 4
"""Sequence length of a guessed input (any small length runs the same Linear layers)."""
_SPLITS = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
           torch.ops.aten.slice.Tensor, torch.ops.aten.narrow.default,
           torch.ops.aten.unbind.int, torch.ops.aten.tensor_split.indices,
           torch.ops.aten.tensor_split.sections}
_WHOLE = -1
"""The source of the unit's inputs: data that derives from it is whole (not split)."""
_CACHE: dict[tuple[str, str], TPPlan] = {}
_BY_STRUCTURE: dict[str, tuple[str, TPPlan]] = {}


@dataclass(frozen=True)
class TPPlan:
    """Sub-module FQN (relative to the unit, "" for the unit itself) -> colwise/rowwise."""

    styles: dict[str, str] = field(default_factory=dict)
    replicated: tuple[str, ...] = ()
    """Linear or Embedding sub-modules the rule left whole."""
    sizes: tuple[int, ...] = ()
    """Every size a tp degree must divide: split widths, head and kv-head counts."""
    refusal: str = ""
    """Why tp > 1 cannot split this unit correctly ("" when it can, or it stays whole)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Sub-module FQN -> why the rule left it whole (where a reason is known)."""

    @property
    def shardable(self) -> bool:
        return bool(self.styles)

    def max_degree_divides(self, tp: int) -> bool:
        """True when tp splits the unit (autoplan.feasibility.tp_split_refusal finds nothing)."""
        return tp_split_refusal("", self.sizes, self.refusal, tp) is None


def infer_tp_plan(unit: nn.Module, override: dict[str, str] | None = None,
                  inputs: tuple[tuple, dict] | None = None) -> TPPlan:
    """The TP plan of one unit (see the module docstring for the rule).

    Args:
        unit: the module of one LayerGraph node, on any device (its weights are never read).
        override: sub-module FQN -> "colwise" | "rowwise", used instead of the rule.
        inputs: (args, kwargs) of one call of the unit (any device, any batch); without
            them the plan of an equal unit seen before is reused, else a (1, S, width)
            input is guessed.

    Raises:
        ValueError: when an override names a style other than colwise or rowwise.
    """
    if override is not None:
        bad = {k: v for k, v in override.items() if v not in (COLWISE, ROWWISE)}
        if bad:
            raise ValueError(f"tp override styles must be colwise or rowwise, got {bad}")
        return TPPlan(dict(override), sizes=_sizes(unit, override))
    if isinstance(unit, nn.Embedding):
        return _embedding_plan(unit, inputs)
    if isinstance(unit, nn.Linear):
        return TPPlan({"": COLWISE}, sizes=(unit.out_features,))
    structure = _structure(unit)
    if inputs is None and structure in _BY_STRUCTURE:
        return _BY_STRUCTURE[structure][1]
    call = _meta_call(inputs) if inputs is not None else None
    meta = _meta_unit(unit, _float_dtype(call))
    call = call if call is not None else _guess_call(meta)
    key = (structure, _signature(call))
    if key not in _CACHE:
        _CACHE[key] = _flow_plan(meta, call) if call is not None else _parent_plan(unit)
    if inputs is not None or structure not in _BY_STRUCTURE:
        _BY_STRUCTURE[structure] = key[1], _CACHE[key]
    return _CACHE[key]


def saved_shares(unit: nn.Module, styles: dict[str, str],
                 inputs: tuple[tuple, dict]) -> tuple[int, int, int]:
    """(whole, gathered, output): the bytes one call of `unit` on `inputs` saves for
    backward that its TP plan (`styles`) leaves whole on every TP rank, those of them that
    are inputs of column-wise Linears (torch's sequence parallelism saves them gathered,
    whole), and the bytes of the call's output (to take them per sample). Only what derives
    from the activation (its first floating input) counts: tables such as rotary
    frequencies are not per sample.

    A tensor is split from a column-wise output until a row-wise output (all-reduced) is
    whole again; whatever derives from a split tensor is split. Korthikanti et al. 2022
    count five whole hidden states per block (eq. 2, in two-byte units); a block's own ops
    decide here: a Llama block's RMSNorm also saves x * rsqrt(mean(x^2)), six in all.
    """
    call = _meta_call(inputs)
    meta = _meta_unit(unit, _float_dtype(call)).train()
    params = {p.untyped_storage()._cdata for p in meta.parameters()}
    split, gathered = _SplitFlow(params), set()
    hooks = []
    for name, style in styles.items():
        sub = meta.get_submodule(name)
        if style == COLWISE:
            hooks.append(sub.register_forward_pre_hook(
                lambda _m, args: gathered.update(_keys(args))))
            hooks.append(sub.register_forward_hook(lambda _m, _a, out: split.keys.update(
                _keys(out))))
        else:
            hooks.append(sub.register_forward_hook(
                lambda _m, _a, out: split.keys.difference_update(_keys(out))))
    saved: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved and key in split.batched:
            kind = "split" if key in split.keys else "gathered" if key in gathered else "whole"
            saved[key] = t.untyped_storage().nbytes(), kind
        return t

    args, kwargs = _fresh(call)
    first = next((t for t in _tensors(args) if t.is_floating_point()), None)
    if first is not None:  # the activation, as a layer before it makes it
        first.requires_grad_()
        split.batched.add(first.untyped_storage()._cdata)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), split, as_compiling():
            out = meta(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    output = sum(t.numel() * t.element_size() for t in _tensors(out))
    return (sum(size for size, kind in saved.values() if kind != "split"),
            sum(size for size, kind in saved.values() if kind == "gathered"), output)


class _SplitFlow(TorchDispatchMode):
    """Marks split whatever an op makes from a split tensor (storages in `keys`), and per
    sample whatever it makes from the activation (`batched`)."""

    def __init__(self, params: set[int]) -> None:
        super().__init__()
        self.keys: set[int] = set()
        self.batched: set[int] = set()
        self.params = params

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        ins = {k for k in _keys((args, kwargs)) if k not in self.params}
        outs = _keys(out) - ins  # an in-place op or a view keeps its input's mark
        for marked in (self.keys, self.batched):
            if ins & marked:
                marked.update(outs)
            else:
                marked.difference_update(outs)  # a storage made again
        return out


def _keys(tree: Any) -> set[int]:
    return {t.untyped_storage()._cdata for t in _tensors(tree)}


# ------------------------------------------------------------------------------ helpers


def _embedding_plan(unit: nn.Embedding, inputs: tuple[tuple, dict] | None) -> TPPlan:
    """An Embedding unit split by vocabulary rows, which hands the lookup the indices the
    unit is given; one whose forward looks up indices of its own (BART's learned positions,
    made from the input's shape or from position ids) stays whole. A subclass is checked
    on its inputs (or as an equal unit checked before); nn.Embedding itself needs none."""
    rows = TPPlan({"": ROWWISE}, sizes=(unit.num_embeddings,))
    if type(unit) is nn.Embedding:
        return rows
    structure = _structure(unit)
    if inputs is None:
        return _BY_STRUCTURE[structure][1] if structure in _BY_STRUCTURE else rows
    call = _meta_call(inputs)
    plan = rows if _looks_up_its_input(_meta_unit(unit, _float_dtype(call)), call) else \
        TPPlan(replicated=("",), notes={"": "its forward looks up indices of its own, not "
                                            "the input it is given"})
    _BY_STRUCTURE[structure] = _signature(call), plan
    return plan


class _Lookups(TorchDispatchMode):
    """Records the storages of the indices every embedding lookup reads."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten.embedding.default:
            self.indices.add(args[1].untyped_storage()._cdata)
        return func(*args, **(kwargs or {}))


def _looks_up_its_input(meta: nn.Module, call: tuple[tuple, dict]) -> bool:
    """Whether the unit's lookup reads its first positional input (or a view of it); True
    when the forward does not run on meta (row splitting as before)."""
    args, kwargs = _fresh(call)
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    mode = _Lookups()
    try:
        with mode, torch.no_grad(), as_compiling():
            meta(*args, **kwargs)
    except Exception:  # noqa: BLE001 (a forward that fails here fails in the trace too)
        return True
    return args[0].untyped_storage()._cdata in mode.indices


def _structure(unit: nn.Module) -> str:
    """Equal for units of the same classes, parameter shapes and head counts (dtype and
    device aside): a 2-head and a 4-head attention of width 64 hold the same Linears but
    split differently. Not every setting: hf layers store their index, which would make
    each block of a model a structure of its own."""
    text = repr([(name, type(m).__qualname__,
                  [(n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)],
                  _heads(m))
                 for name, m in unit.named_modules()])
    return hashlib.sha1(text.encode()).hexdigest()


def _meta_unit(unit: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A meta copy of the unit, floating tensors in `dtype` (default: kept), shared
    sub-modules still shared."""
    def like(t: torch.Tensor) -> torch.Tensor:
        to = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=to, device="meta")

    memo: dict[int, Any] = {}
    for p in unit.parameters():
        memo[id(p)] = nn.Parameter(like(p), requires_grad=p.requires_grad)
    for b in unit.buffers():
        memo[id(b)] = like(b)
    return copy.deepcopy(unit, memo).eval()


def _float_dtype(tree: Any) -> torch.dtype | None:
    return next((t.dtype for t in _tensors(tree) if t.is_floating_point()), None)


def _to_meta(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.empty(tree.shape, dtype=tree.dtype, device="meta")
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_meta(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _to_meta(v) for k, v in tree.items()}
    return tree


def _meta_call(inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """Meta copies of the inputs; a key/value cache (transformers' *Cache objects, which
    the unit's own call may already have filled) is left out: training keeps none."""
    args, kwargs = inputs
    kwargs = {k: None if type(v).__name__.endswith("Cache") else v for k, v in kwargs.items()}
    return tuple(_to_meta(tuple(args))), _to_meta(kwargs)


def _signature(call: tuple[tuple, dict] | None) -> str:
    return repr(_shapes(call)) if call is not None else "guess failed"


def _shapes(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tuple(tree.shape[1:]), str(tree.dtype)
    if isinstance(tree, (tuple, list)):
        return tuple(_shapes(t) for t in tree)
    if isinstance(tree, dict):
        return tuple(sorted((k, _shapes(v)) for k, v in tree.items()))
    return type(tree).__name__


def _fresh(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A copy of the call for one run: a cache object among the inputs (transformers'
    DynamicCache) would otherwise grow with every run."""
    try:
        return copy.deepcopy(call)
    except Exception:  # noqa: BLE001 - an input that cannot be copied is passed as it is
        return call


def _run(unit: nn.Module, call: tuple[tuple, dict]) -> Any:
    args, kwargs = _fresh(call)
    with torch.no_grad(), as_compiling():
        return unit(*args, **kwargs)


def _guess_call(meta: nn.Module) -> tuple[tuple, dict] | None:
    """One (1, S, width) activation as the only argument, for the first width that runs (a
    norm's width, then each Linear's input width), else (1, S) token ids; None when none
    runs."""
    widths: list[int] = []
    for module in meta.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
            widths.append(module.normalized_shape[-1])
        elif isinstance(module, nn.Linear):
            widths.append(module.in_features)
    dtype = next((p.dtype for p in meta.parameters() if p.is_floating_point()), None)
    guesses = [torch.empty(1, _GUESS_SEQ, width, device="meta", dtype=dtype)
               for width in dict.fromkeys(widths)]
    guesses.append(torch.zeros(1, _GUESS_SEQ, dtype=torch.long, device="meta"))  # token ids
    for guess in guesses:
        call = ((guess,), {})
        try:
            _run(meta, call)
        except Exception:  # noqa: BLE001 - any failure means "not this guess"
            continue
        return call
    return None


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)
    elif hasattr(tree, "__dataclass_fields__") or hasattr(tree, "to_tuple"):
        yield from _tensors(tree.to_tuple() if hasattr(tree, "to_tuple") else vars(tree))


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _linears(unit: nn.Module) -> dict[int, tuple[str, nn.Linear]]:
    """id -> (first FQN, module) of every Linear in the unit (a shared one once)."""
    return {id(m): (name, m) for name, m in unit.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------ data flow


@dataclass
class _Flow:
    """What one forward showed: each Linear call's module and the calls its input derives
    from; Linears whose output is split along its width; calls whose output leaves."""

    calls: list[tuple[str, frozenset[int], frozenset[int]]] = field(default_factory=list)
    """(Linear, the calls its input derives from, those it derives from at full shape:
    not through a broadcast operand, such as an attention mask or rotary table)."""
    fused: set[str] = field(default_factory=set)
    escaping: set[str] = field(default_factory=set)


class _FlowMode(TorchDispatchMode):
    """Follows, per storage, the Linear calls whose outputs it derives from (one hop: a
    Linear's output derives from that call only) and spots splits of a Linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[int, frozenset[int]] = {}
        self.strong: dict[int, frozenset[int]] = {}
        self.outputs: dict[int, tuple[int, str, int]] = {}  # storage -> (call, name, width)
        self.flow = _Flow()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = list(_tensors((args, kwargs)))
        if func in _SPLITS and ins:
            self._check_split(func, args, kwargs, out)
        outs = list(_tensors(out))
        keys = {_key(t) for t in ins}
        full = [t for t in ins if not _broadcast_operand(t, ins, outs)]
        derived = frozenset().union(*(self.sources.get(k, frozenset()) for k in keys))
        strong = frozenset().union(*(self.strong.get(_key(t), frozenset()) for t in full))
        for t in outs:
            k = _key(t)
            if k in keys:  # a view or an in-place op: the storage gains sources
                self.sources[k] = derived | self.sources.get(k, frozenset())
                self.strong[k] = strong | self.strong.get(k, frozenset())
            else:  # a new storage (its key may be a freed one's)
                self.sources[k], self.strong[k] = derived, strong
                self.outputs.pop(k, None)
        return out

    def _check_split(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        t = args[0]
        made = self.outputs.get(_key(t))
        if made is None or t.dim() == 0:
            return
        dim = _split_dim(func, args, kwargs)
        cut = any(p.dim() == t.dim() and p.shape[-1] < made[2] for p in _tensors(out))
        if dim is not None and dim % t.dim() == t.dim() - 1 and t.shape[-1] == made[2] \
                and cut:
            self.flow.fused.add(made[1])

    def linear_called(self, name: str, args: tuple) -> None:
        keys = [_key(t) for t in _tensors(args)]
        self.flow.calls.append((
            name, frozenset().union(*(self.sources.get(k, frozenset()) for k in keys)),
            frozenset().union(*(self.strong.get(k, frozenset()) for k in keys))))

    def linear_done(self, name: str, width: int, output: torch.Tensor) -> None:
        call = len(self.flow.calls) - 1
        self.sources[_key(output)] = self.strong[_key(output)] = frozenset((call,))
        self.outputs[_key(output)] = (call, name, width)


def _broadcast_operand(t: torch.Tensor, ins: list[torch.Tensor],
                       outs: list[torch.Tensor]) -> bool:
    """Whether t is broadcast into an elementwise op's larger output (a mask or a table)."""
    if len(ins) < 2 or len(outs) != 1 or tuple(t.shape) == tuple(outs[0].shape):
        return False
    try:
        return torch.broadcast_shapes(*(x.shape for x in ins)) == outs[0].shape
    except RuntimeError:
        return False


def _split_dim(func: Any, args: tuple, kwargs: dict) -> int | None:
    """The dimension a split-like op cuts (from its schema: the argument called dim)."""
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == "dim":
            if argument.name in kwargs:
                return kwargs["dim"]
            return args[index] if index < len(args) else argument.default_value
    return None


def _trace_flow(meta: nn.Module, call: tuple[tuple, dict]) -> _Flow:
    mode = _FlowMode()
    call = _fresh(call)
    for t in _tensors(call):
        mode.sources[_key(t)] = mode.strong[_key(t)] = frozenset((_WHOLE,))
    handles = []
    for name, module in _linears(meta).values():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, n=name: mode.linear_called(n, a)))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name: mode.linear_done(n, m.out_features, o)))
    try:
        with mode, torch.no_grad(), as_compiling():
            output = meta(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    calls = frozenset().union(*(mode.sources.get(_key(t), frozenset())
                                for t in _tensors(output)))
    mode.flow.escaping = {mode.flow.calls[c][0] for c in calls if c != _WHOLE}
    return mode.flow


def _roles(flow: _Flow, whole: set[str]) -> tuple[dict[str, str], set[str]]:
    """Roles in call order given the Linears kept whole, and the first Linears found that
    must be kept whole for the roles to be right (empty when they are right)."""
    roles: dict[str, str] = {}
    for name, derived, strong in flow.calls:
        sources = {flow.calls[c][0] if c != _WHOLE else "" for c in derived}
        split = {s for s in sources if roles.get(s) == COLWISE}
        mixed = {flow.calls[c][0] if c != _WHOLE else "" for c in strong} - split
        if split and (mixed or name in whole):  # split data meets whole data
            return roles, split
        want = ROWWISE if split else COLWISE
        if name not in whole and roles.setdefault(name, want) != want:
            return roles, split | {name}  # called twice in two roles
    consumed = {flow.calls[c][0] for name, derived, _ in flow.calls
                if roles.get(name) == ROWWISE for c in derived if c != _WHOLE}
    return roles, {n for n, r in roles.items() if r == COLWISE
                   and (n in flow.escaping or n not in consumed)}


def _pairing(flow: _Flow) -> tuple[dict[str, str], dict[str, str]]:
    """Stable roles (only colwise and rowwise kept) and why the others stay whole."""
    notes = {name: "its output is split along its width in forward (a fused projection): "
             "tensor parallelism would cut across its parts" for name in flow.fused}
    whole = set(flow.fused)
    while True:
        roles, conflicts = _roles(flow, whole)
        if not conflicts:
            return {n: r for n, r in roles.items() if n not in whole}, notes
        whole |= conflicts


# ------------------------------------------------------------------ meta shard check


_CONTRACTS: dict[Any, Callable[[tuple], list[tuple[int, int]]]] = {
    torch.ops.aten.mm.default: lambda a: [(0, -1)],
    torch.ops.aten.bmm.default: lambda a: [(0, -1)],
    torch.ops.aten.addmm.default: lambda a: [(1, -1)],
    torch.ops.aten.baddbmm.default: lambda a: [(1, -1)],
    torch.ops.aten._softmax.default: lambda a: [(0, a[1])],
    torch.ops.aten._safe_softmax.default: lambda a: [(0, a[1])],
    torch.ops.aten._log_softmax.default: lambda a: [(0, a[1])],
    torch.ops.aten.native_layer_norm.default: lambda a: [(0, -1 - i) for i in range(len(a[1]))],
    torch.ops.aten.sum.dim_IntList: lambda a: [(0, d) for d in (a[1] or ())],
    torch.ops.aten.mean.dim: lambda a: [(0, d) for d in (a[1] or ())],
}
"""op -> (argument index, dimension) pairs it contracts or normalises over."""


_LAYOUT_OPS = frozenset({torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
                         torch.ops.aten._reshape_alias.default, torch.ops.aten.clone.default})
"""Ops that move or relabel values without computing: `reshape` runs `view` where the
strides allow it and `clone` + `_unsafe_view` where they do not, so one head per rank (a
transpose that stays viewable) changes them and nothing else."""


class _ShapeMode(TorchDispatchMode):
    """Records every op but layout ones (_LAYOUT_OPS) with its tensor arguments' shapes, and
    whether a row-wise Linear (which contracts its split input on purpose) is running."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, bool]] = []
        self.in_row = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func not in _LAYOUT_OPS:
            shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            self.ops.append((func, shapes, self.in_row > 0))
        return func(*args, **(kwargs or {}))


def _record(unit: nn.Module, call: tuple[tuple, dict], rows: set[int]) -> tuple[list, Any]:
    mode = _ShapeMode()
    handles = []
    for module in unit.modules():
        if id(module) in rows:
            handles.append(module.register_forward_pre_hook(
                lambda m, a: setattr(mode, "in_row", mode.in_row + 1)))
            handles.append(module.register_forward_hook(
                lambda m, a, o: setattr(mode, "in_row", mode.in_row - 1)))
    try:
        with mode:
            output = _run(unit, call)
    finally:
        for handle in handles:
            handle.remove()
    return mode.ops, [tuple(t.shape) for t in _tensors(output)]


def _shard(meta: nn.Module, styles: dict[str, str], tp: int) -> tuple[nn.Module, set[int]]:
    """A copy with one rank's local Linear shapes (a shared Linear swapped wherever it is
    held), and the ids of its row-wise Linears."""
    copied = copy.deepcopy(meta)
    swap: dict[int, nn.Module] = {}
    rows: set[int] = set()
    for name, style in styles.items():
        old = copied.get_submodule(name)
        col = style == COLWISE
        with torch.device("meta"):
            new = nn.Linear(old.in_features if col else old.in_features // tp,
                            old.out_features // tp if col else old.out_features,
                            bias=old.bias is not None, dtype=old.weight.dtype)
        swap[id(old)] = new
        if not col:
            rows.add(id(new))
    for module in list(copied.modules()):
        for child, sub in list(module._modules.items()):
            if sub is not None and id(sub) in swap:
                module._modules[child] = swap[id(sub)]
    return copied, rows


def _shard_problem(meta: nn.Module, call: tuple[tuple, dict], styles: dict[str, str],
                   tp: int, whole: tuple[list, Any]) -> str | None:
    """Why the unit split by `styles` at degree tp is wrong on meta tensors, or None."""
    shard, rows = _shard(meta, styles, tp)
    try:
        ops, output = _record(shard, call, rows)
    except Exception as err:  # noqa: BLE001 - any failure is the reason
        return f"its forward fails with split Linear layers ({first_line(err)})"
    full_ops, full_output = whole
    if output != full_output:
        return f"its output shapes change when split ({full_output} -> {output})"
    if [op for op, _, _ in ops] != [op for op, _, _ in full_ops]:
        return "its forward runs other ops when split"
    for (op, shapes, in_row), (_, full_shapes, _) in zip(ops, full_ops, strict=True):
        if in_row or op not in _CONTRACTS:
            continue
        for index, dim in _CONTRACTS[op](full_shapes):
            if shapes[index][dim] != full_shapes[index][dim]:
                return (f"{op.__name__} would reduce over a split dimension (size "
                        f"{full_shapes[index][dim]} -> {shapes[index][dim]}), as a reshape "
                        "by a stored head count does")
    return None


def _groups(flow: _Flow, styles: dict[str, str]) -> list[set[str]]:
    """Row-wise Linears with their column-wise producers, joined where they share one."""
    groups: list[set[str]] = []
    for name, derived, _ in flow.calls:
        if styles.get(name) != ROWWISE:
            continue
        group = {name} | {flow.calls[c][0] for c in derived if c != _WHOLE}
        for other in [g for g in groups if g & group]:
            groups.remove(other)
            group |= other
        groups.append(group)
    return groups


def _checked(meta: nn.Module, call: tuple[tuple, dict], flow: _Flow, styles: dict[str, str],
             notes: dict[str, str]) -> tuple[dict[str, str], str]:
    """The styles that pass the meta shard check, and the refusal if even those fail."""
    tp = _check_degree(_sizes(meta, styles))
    if not styles or tp is None:
        return styles, ""
    whole = _record(meta, call, set())
    problem = _shard_problem(meta, call, styles, tp, whole)
    if problem is None:
        return styles, ""
    kept: dict[str, str] = {}
    for group in _groups(flow, styles):
        part = {n: styles[n] for n in group}
        why = _shard_problem(meta, call, part, tp, whole)
        if why is None:
            kept |= part
        else:
            notes.update(dict.fromkeys(group, why))
    problem = _shard_problem(meta, call, kept, tp, whole) if kept else None
    return (kept, "") if problem is None else ({}, problem)


def _check_degree(sizes: tuple[int, ...]) -> int | None:
    """The smallest tp > 1 that divides every size (None when none up to the least)."""
    return next((tp for tp in range(2, min(sizes, default=2) + 1)
                 if all(s % tp == 0 for s in sizes)), None)


# ------------------------------------------------------------------------------ sizes


def _sizes(unit: nn.Module, styles: dict[str, str]) -> tuple[int, ...]:
    """Split widths of the styled modules, and the head counts of every module holding one."""
    sizes: set[int] = set()
    for name, style in styles.items():
        module = unit.get_submodule(name)
        if isinstance(module, nn.Embedding):
            sizes.add(module.num_embeddings)
        elif isinstance(module, nn.Linear):
            sizes.add(module.out_features if style == COLWISE else module.in_features)
    for name, module in unit.named_modules():
        if any(s == name or s.startswith(f"{name}.") or not name for s in styles):
            sizes |= set(_heads(module))
    return tuple(sorted(sizes))


def _heads(module: nn.Module) -> list[int]:
    found = []
    for holder in (module, getattr(module, "config", None)):
        for attribute in HEAD_ATTRIBUTES:
            value = getattr(holder, attribute, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.append(value)
    return found


# ------------------------------------------------------------------------------ plans


def _flow_plan(meta: nn.Module, call: tuple[tuple, dict]) -> TPPlan:
    try:
        flow = _trace_flow(meta, call)
    except Exception as err:  # noqa: BLE001 - the guess ran; the given inputs may not
        log.info("tp plan: the unit does not run on meta inputs (%s); pairing by parent",
                 first_line(err))
        return _parent_plan(meta)
    styles, notes = _pairing(flow)
    styles, refusal = _checked(meta, call, flow, styles, notes)
    if refusal:
        return TPPlan({}, _leftover(meta, {}), (), refusal, notes)
    order = [name for name, _ in meta.named_modules()]  # the same on every rank
    styles = {name: styles[name] for name in order if name in styles}
    return TPPlan(styles, _leftover(meta, styles), _sizes(meta, styles), "",
                  {n: notes[n] for n in order if n in notes and n not in styles})


def _leftover(unit: nn.Module, styles: dict[str, str]) -> tuple[str, ...]:
    return tuple(n for n, m in unit.named_modules()
                 if isinstance(m, (nn.Linear, nn.Embedding)) and n not in styles)


def _parent_plan(unit: nn.Module) -> TPPlan:
    """The fallback: inside each parent with two or more Linear children whose widths pair
    up, the last (in definition order) is row-wise and the ones before it column-wise."""
    styles: dict[str, str] = {}
    for parent_name, parent in unit.named_modules():
        linears = [(n, m) for n, m in parent.named_children() if isinstance(m, nn.Linear)]
        if len(linears) >= 2 and _pairs(linears):
            for index, (name, _) in enumerate(linears):
                fqn = f"{parent_name}.{name}" if parent_name else name
                styles[fqn] = ROWWISE if index == len(linears) - 1 else COLWISE
    return TPPlan(styles, _leftover(unit, styles), _sizes(unit, styles))


def _pairs(linears: list[tuple[str, nn.Linear]]) -> bool:
    *cols, (_, row) = linears
    return all(col.in_features == row.out_features for _, col in cols)


def infer_tp_plans(model: nn.Module, example_inputs: Any,
                   units: list[str]) -> dict[str, TPPlan]:
    """Each unit's plan from the inputs it takes in one forward of a meta copy of `model`,
    so that a process that did not trace the model splits each unit as tracing planned it
    (later infer_tp_plan(unit) calls on equal units reuse these plans). A unit the forward
    does not reach, or every unit when the model does not run on meta, is planned from a
    guessed input.

    Args:
        model: the whole model, on any device (its weights are never read).
        example_inputs: a tuple of tensors, or a function batch -> tuple (as layer_graph).
        units: the units' FQNs (autoplan.units.find_units).
    """
    from autoplan.tracing import meta_inputs  # tracing imports this module

    dtype = torch.bfloat16  # as tracing runs (some meta kernels, grouped_mm, take only bf16)
    meta = _meta_unit(model, dtype)
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [meta.get_submodule(unit).register_forward_pre_hook(
        lambda m, a, k, u=unit: calls.setdefault(u, _fresh((a, k))), with_kwargs=True)
        for unit in units]
    try:
        _run(meta, (tuple(meta_inputs(example_inputs, dtype)(1)), {}))
    except Exception as err:  # noqa: BLE001 - then each unit's input is guessed
        log.info("tp plans: the model does not run on meta inputs (%s)", first_line(err))
    finally:
        for handle in handles:
            handle.remove()
    return {unit: infer_tp_plan(model.get_submodule(unit), inputs=calls.get(unit))
            for unit in units}
