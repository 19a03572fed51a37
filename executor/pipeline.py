"""Pipeline parallelism with torch.distributed.pipelining, for any module made of units.

Splitting (STYLE.md item 3): the units (autoplan.units.find_units) are cut into chunks at the
plan's stage boundaries; each chunk is a deep copy of the whole model in which the units it
does not own are shells (stubs that keep the unit's class, attributes and sub-modules, with
every tensor on the meta device and no parameter: a forward may read
`self.embeddings.patch_embeddings.projection.weight.dtype` on any stage), so every FQN
survives. A chunk runs the model's own forward, unchanged:
- the first unit it owns takes the activation received from the previous chunk in place of
  its first input (positional, or the keyword of its forward's first parameter), and the
  stubs before it return zeros shaped as their unit's output (computed once per input shape
  on the meta device), so that the glue code between units (adds, dropout, position ids,
  a CLS-token slice, an encoder's ModelOutput) runs as in the whole model without reaching
  the parameters it does not hold;
- just before the first unit of the next chunk runs, the forward stops and the chunk returns
  that unit's first input: the one tensor sent to the next stage;
- the last chunk returns the tensors of the model's output as a tuple (torch pipelining
  sends and checks only tensors) and the loss gets the output rebuilt as the model returned
  it (wrap_loss: a ModelOutput with .logits, nanoGPT's (logits, None)).
The model's inputs reach every chunk as keyword arguments (positional ones under INPUT_KEY
names, keyword ones under their own), so that glue which reads them (a sequence length, an
attention mask, position ids) works on every stage.

The rule the executor keeps, checked in the first forward in training: one tensor crosses
a boundary, the next unit's first input, and it must be computed by the chunk's units (not
the position ids of a position embedding); no unit of a chunk may take a tensor computed
from a stub's output (a decoder block taking an encoder's output held by another stage, a
head taking an embedding's output); other inputs come from the model's inputs or buffers
(Llama's rotary tables do). A cut that breaks it fails with one AutoplanError line naming the
layers; autoplan's tracer refuses such cuts at plan time (LayerNode.cut_refusal).

Chunk c runs on pipeline rank c % pp (the looped order of Interleaved1F1B).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from autoplan.errors import AutoplanError, first_line
from autoplan.executor.data_parallel import gradient_sync
from autoplan.units import first_input, first_param

__all__ = ["INPUT_KEY", "StageShapes", "build_chunk", "build_schedule", "chunk_ranks",
           "chunk_units", "input_kwargs", "stage_shapes", "wrap_loss"]

log = logging.getLogger(__name__)

INPUT_KEY = "autoplan_input"
"""Keyword under which the model's i-th input reaches a chunk: f"{INPUT_KEY}{i}"."""


def chunk_units(units: Sequence[str], boundaries: Sequence[int]) -> list[list[str]]:
    """The unit FQNs of each chunk, cut at `boundaries` (first unit index of each chunk).

    Example: chunk_units(["wte", "h.0", "h.1", "lm_head"], [0, 2]) ->
        [["wte", "h.0"], ["h.1", "lm_head"]]
    """
    ends = [*boundaries[1:], len(units)]
    return [list(units[start:end]) for start, end in zip(boundaries, ends, strict=True)]


def chunk_ranks(n_chunks: int, pp: int, pp_rank: int) -> list[int]:
    """The chunk indices pipeline rank `pp_rank` runs (looped: c % pp == pp_rank)."""
    return list(range(pp_rank, n_chunks, pp))


class _StageExit(Exception):  # noqa: N818 (control flow, not an error)
    """Raised just before the next chunk's first unit, carrying its first input."""

    def __init__(self, value: Any) -> None:
        super().__init__("pipeline stage boundary")
        self.value = value


@dataclass
class _ChunkState:
    """What one chunk's forward passes between its parts: the activation received for the
    micro-batch being run, and (last chunk) how to rebuild the model's output from the
    tensors the stage returns."""

    recv: torch.Tensor | None = None
    spec: TreeSpec | None = None
    """The structure of the model's output (last chunk), from its latest forward."""
    constants: list[Any] = field(default_factory=list)
    """The output's leaves, _TENSOR where a tensor goes (others: None, a cache object)."""
    checked: bool = False
    """Whether a forward in training has checked where the chunk's units' inputs come from."""
    stub_outputs: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)
    """During that check: id -> (unit, tensor) of what the stubs returned."""
    reaches: dict[Any, str | None] = field(default_factory=dict)
    """During that check: autograd node -> the stub it derives from (None: none)."""

    @property
    def checking(self) -> bool:
        return not self.checked and torch.is_grad_enabled()

    def stub_output(self, name: str, like: Any) -> Any:
        """What a stub returns: zeros shaped as `like` (the unit's output on the meta
        device, None when unknown: then the received activation, detached). While
        checking, its floating tensors are leaves that require grad, so that what derives
        from them can be traced back to the stub."""
        if self.recv is None:
            raise AutoplanError(f"pipeline stub {name} ran without a received activation: "
                                "the model's forward calls it after the chunk's first layer")
        device = self.recv.device

        def make(meta: Any) -> Any:
            if not isinstance(meta, torch.Tensor):
                return meta
            out = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
            if self.checking and out.is_floating_point():
                out.requires_grad_(True)
                self.stub_outputs[id(out)] = (name, out)
                out = out.clone()  # not a leaf: the glue may change it in place
            return out

        if like is None:
            return make(self.recv.detach()).copy_(self.recv.detach())
        return tree_map(make, like)

    def source_stub(self, tensor: torch.Tensor) -> str | None:
        """The stub `tensor` was computed from (differentiably), if any."""
        if id(tensor) in self.stub_outputs:
            return self.stub_outputs[id(tensor)][0]
        stack = [(tensor.grad_fn, False)]
        while stack:  # depth first, each autograd node once per check (a DAG: no cycles)
            node, expanded = stack.pop()
            if node is None or node in self.reaches:
                continue
            leaf = getattr(node, "variable", None)
            if leaf is not None:
                self.reaches[node] = self.stub_outputs.get(id(leaf), (None,))[0]
            elif expanded:  # its inputs are done
                found = (self.reaches.get(n) for n, _ in node.next_functions)
                self.reaches[node] = next((f for f in found if f is not None), None)
            else:
                stack.append((node, True))
                stack.extend((n, False) for n, _ in node.next_functions)
        return self.reaches.get(tensor.grad_fn)


_TENSOR = object()
"""Marks where the last stage's tensors go back among the leaves of the model's output."""


def _receive_hook(state: _ChunkState, keyword: str | None) -> Callable[..., Any]:
    """A forward pre-hook that gives the chunk's first unit the received activation as its
    first input (positional or keyword, as the model passes it)."""
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args or keyword is None or keyword not in kwargs:
            return (state.recv, *args[1:]), kwargs
        return args, {**kwargs, keyword: state.recv}

    return hook


def _check_hook(state: _ChunkState, name: str, first: str) -> Callable[..., Any]:
    """A forward pre-hook that refuses a unit's input computed from what a stub returned:
    the output of a layer another stage runs (an encoder's output in the blocks of a
    decoder), which a stub cannot give. It acts in the first forward in training only."""
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not state.checking:
            return
        for tensor in tree_leaves((args, kwargs)):
            source = state.source_stub(tensor) if isinstance(tensor, torch.Tensor) else None
            if source is not None:
                raise AutoplanError(
                    f"layer {name} takes an input computed by layer {source}, which another "
                    f"pipeline stage runs: a stage cannot start at {first} (one tensor "
                    "crosses a stage boundary); move the stage boundary")

    return hook


def _stop_hook(keyword: str | None) -> Callable[..., Any]:
    """A forward pre-hook that ends the chunk's forward with the next unit's first input."""
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _StageExit(first_input(keyword, args, kwargs))

    return hook


def _make_shell(unit: nn.Module, state: _ChunkState, name: str, shared: set[int]) -> None:
    """Turn `unit` (of a chunk that does not own it) into a stub, in place.

    Why a shell and not an empty module: the model's forward may read a sub-module or the
    dtype of a parameter of a unit another chunk owns (transformers' ViT reads
    embeddings.patch_embeddings.projection.weight.dtype). The shell keeps the unit's class,
    attributes and sub-modules; its parameters and buffers become plain tensor attributes
    on the meta device (no memory), invisible to parameters(), state_dict(), FSDP and the
    optimizer; sub-modules that are also parts of the chunk's own units (`shared`: their
    ids) stay as they are. Called, it returns zeros shaped as the unit's output (its own
    forward run on the meta device, once per input shape), so that the glue code between
    units (a slice of the CLS token, an encoder's ModelOutput) runs as in the whole model;
    what it computes from them reaches no unit of the chunk (the check hook refuses that),
    and the chunk's first unit takes the received activation instead."""
    for module in unit.modules():
        if id(module) in shared:
            continue  # also a part of a unit this chunk owns (one Linear in several blocks)
        for key in ("_parameters", "_buffers"):
            tensors = getattr(module, key)
            for attr, tensor in list(tensors.items()):
                del tensors[attr]
                module.__dict__[attr] = None if tensor is None else \
                    torch.empty_like(tensor.detach(), device="meta")
        module._non_persistent_buffers_set.clear()
    original, outputs = unit.forward, {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return state.stub_output(name, _meta_output(original, args, kwargs, outputs))

    unit.forward = forward
    unit.autoplan_stub_of = name


def _meta_output(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 known: dict[Any, Any]) -> Any:
    """A unit's output for these inputs, computed on the meta device (its shell's tensors
    are meta) and kept per input shapes; None when its forward cannot run on meta."""
    leaves = tree_leaves((args, kwargs))
    key = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor)
                else x if isinstance(x, (int, float, bool, str, type(None)))
                else type(x).__name__ for x in leaves)
    if key not in known:
        meta = tree_map(lambda x: torch.empty_like(x, device="meta")
                        if isinstance(x, torch.Tensor) else x, (args, kwargs))
        try:
            with torch.no_grad():
                known[key] = forward(*meta[0], **meta[1])
        except Exception as err:  # noqa: BLE001 (any failure: fall back to the activation)
            log.debug("pipeline stub: %s cannot run on meta (%s)", forward, err)
            known[key] = None
    return known[key]


def _meta_memo(model: nn.Module, units: Sequence[str], owned: Sequence[str]
               ) -> dict[int, Any]:
    """A deepcopy memo that copies the parameters only the other chunks' units hold as meta
    tensors, so that building a chunk never copies the whole model's weights."""
    keep = {id(p) for name in owned for p in model.get_submodule(name).parameters()}
    memo: dict[int, Any] = {}
    for name in units:
        if name in owned:
            continue
        for param in model.get_submodule(name).parameters():
            if id(param) not in keep:
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                               requires_grad=param.requires_grad)
    return memo


def build_chunk(model: nn.Module, units: Sequence[str], owned: Sequence[str]) -> nn.Module:
    """A copy of `model` that runs only the units in `owned` (one contiguous run of `units`).

    Parameters outside every unit (autoplan.units.loose_parameters: a class token on the
    model itself) are copied into every chunk: each chunk's glue code may use them, and the
    Runner sums their gradients over the chunks as it does for tied parameters (a use counts
    on the one chunk where its result reaches the chunk's output).

    Args:
        model: the whole model (not modified).
        units: every unit FQN, in execution order.
        owned: the chunk's units.

    Returns:
        The chunk: called as chunk(received_activation, **input_kwargs(inputs)), or
        chunk(**input_kwargs(inputs)) for the first chunk. A middle chunk returns the one
        tensor sent on; the last returns the tensors of the model's output as a tuple
        (one tensor: that tensor), which wrap_loss turns back into the model's output.
    """
    chunk = copy.deepcopy(model, _meta_memo(model, units, owned))
    state = _ChunkState()
    first, last = units.index(owned[0]), units.index(owned[-1])
    next_unit = units[last + 1] if last + 1 < len(units) else None
    if first > 0:
        unit = chunk.get_submodule(owned[0])
        unit.register_forward_pre_hook(_receive_hook(state, first_param(unit)),
                                       prepend=True, with_kwargs=True)
        for name in owned:
            chunk.get_submodule(name).register_forward_pre_hook(
                _check_hook(state, name, owned[0]), with_kwargs=True)
    if next_unit is not None:
        unit = chunk.get_submodule(next_unit)
        unit.register_forward_pre_hook(_stop_hook(first_param(unit)), with_kwargs=True)
    shared = {id(m) for name in owned for m in chunk.get_submodule(name).modules()}
    for index, name in enumerate(units):
        if index < first or index > last:
            _make_shell(chunk.get_submodule(name), state, name, shared)
    trainable = any(param.requires_grad for param in chunk.parameters())
    chunk.forward = _chunk_forward(chunk.forward, state, (owned[0], owned[-1], next_unit),
                                   trainable)
    chunk.autoplan_chunk_state = state
    return chunk


def _chunk_forward(model_forward: Callable[..., Any], state: _ChunkState,
                   ends: tuple[str, str, str | None], trainable: bool) -> Callable[..., Any]:
    """The chunk's forward: the model's, on the received activation and the model's inputs,
    stopped at the next chunk's first unit (`ends`: the chunk's first and last units and
    that one)."""
    first, last, next_unit = ends

    def forward(*received: torch.Tensor, **kwargs: Any) -> Any:
        keys = sorted((k for k in kwargs if k.startswith(INPUT_KEY)),
                      key=lambda k: int(k.removeprefix(INPUT_KEY)))
        inputs = [kwargs.pop(k) for k in keys]
        state.recv = received[0] if received else None
        checking = state.checking
        try:
            output = model_forward(*inputs, **kwargs)
        except _StageExit as stop:
            return _boundary_tensor(stop.value, next_unit, trainable)
        except AutoplanError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as err:
            if checking and received:  # the whole model runs: suspect the cut, say where
                raise AutoplanError(f"the model's forward fails on the pipeline stage that "
                                    f"starts at layer {first} ({type(err).__name__}: "
                                    f"{first_line(err)}): the glue code before it needs "
                                    "what layers of another stage return; move the stage "
                                    "boundary") from err
            raise
        finally:
            state.recv = None
            if checking:
                state.checked = True
                state.stub_outputs.clear()
                state.reaches.clear()
        if next_unit is not None:
            raise AutoplanError(f"the model's forward returned without calling layer "
                                f"{next_unit} after {last}: a pipeline cannot start a "
                                f"stage at {next_unit}")
        return _flat_output(output, state)

    return forward


def _boundary_tensor(value: Any, unit: str | None, trainable: bool) -> torch.Tensor:
    """The one tensor a middle chunk sends on: the next chunk's first unit's first input.

    Raises:
        AutoplanError: when it is not a tensor, or (in training, `trainable`: the chunk has
            parameters to train) not computed from the chunk's layers (it comes from the
            model's inputs, like the position ids of a position embedding): the next chunk
            would take it for the activation.
    """
    if not isinstance(value, torch.Tensor):
        raise AutoplanError(f"layer {unit} takes {type(value).__name__} as its first input, "
                            "not a tensor: a pipeline stage cannot start there")
    if trainable and torch.is_grad_enabled() and not value.requires_grad:
        raise AutoplanError(f"layer {unit}'s first input is not computed by the layers "
                            "before it (it comes from the model's inputs): a pipeline stage "
                            "cannot start there; move the stage boundary")
    return value


def _flat_output(output: Any, state: _ChunkState) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The model's output as the stage returns it (torch pipelining takes only tensors):
    its tensor leaves; the structure and the other leaves wait in `state` for the loss."""
    if isinstance(output, torch.Tensor):
        state.spec = None
        return output
    leaves, state.spec = tree_flatten(output)
    tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
    if not tensors:
        raise AutoplanError(f"the model returned no tensor ({type(output).__name__}): "
                            "nothing for the loss")
    state.constants = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    return tensors


def _rebuilt_output(flat: Any, state: _ChunkState) -> Any:
    """The model's output again, from the tensors the last stage returned."""
    if state.spec is None:
        return flat
    tensors = iter((flat,) if isinstance(flat, torch.Tensor) else flat)
    leaves = [next(tensors) if leaf is _TENSOR else leaf for leaf in state.constants]
    return tree_unflatten(leaves, state.spec)


def wrap_loss(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], chunk: nn.Module
              ) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """loss_fn given the model's output as the model returned it (a ModelOutput, a tuple
    with None in it, a dict), rebuilt from the tensors the last chunk's stage returned.

    Args:
        loss_fn: (model output, targets) -> scalar.
        chunk: the last chunk (built by build_chunk).
    """
    state: _ChunkState = chunk.autoplan_chunk_state

    def loss(flat: Any, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(_rebuilt_output(flat, state), targets)

    return loss


def input_kwargs(inputs: Sequence[torch.Tensor] | Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs as the keyword arguments every chunk takes: positional inputs
    under INPUT_KEY names, keyword inputs under their own names.

    Raises:
        AutoplanError: when a keyword input's name starts with INPUT_KEY.
    """
    if isinstance(inputs, Mapping):
        clash = [k for k in inputs if k.startswith(INPUT_KEY)]
        if clash:
            raise AutoplanError(f"keyword inputs {clash} start with '{INPUT_KEY}', which "
                                "pipelining reserves: rename them")
        return dict(inputs)
    return {f"{INPUT_KEY}{i}": t for i, t in enumerate(inputs)}


StageShapes = dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
"""chunk index -> (the tensors it receives, the tensors it returns), on the meta device."""


def stage_shapes(model: nn.Module, units: Sequence[str], chunk_lists: Sequence[Sequence[str]],
                 micro_inputs: Sequence[torch.Tensor], sequence_slices: Mapping[str, int],
                 dps: Mapping[str, int] | None = None) -> StageShapes:
    """What each chunk receives and returns for one micro-batch, from a forward of unsplit
    chunks (built as build_chunk builds them) on the meta device, one after the other.

    A real pipeline learns these shapes from its neighbours at the first step; a fake
    process group (autoplan's dry run) exchanges nothing, so its stages are given them.

    Args:
        model: the whole model, before parallelization (meta or not: copies run on meta).
        units: every unit FQN, in execution order.
        chunk_lists: the unit FQNs of every chunk of the pipeline.
        micro_inputs: the model's positional inputs for one micro-batch.
        sequence_slices: unit -> the tp degree of the sequence slices it takes and gives
            (sequence parallelism, tensor_parallel.sequence_splits): a chunk whose last
            unit is one sends its rank's slice of dimension 1, which a unit after it that
            takes the whole sequence gathers (tensor_parallel.apply_tp, hops.py); else the
            whole activation crosses, and a unit after it that takes slices cuts its own.
        dps: unit -> its data-parallel degree (default: 1 for all): a chunk sends the
            samples its last unit's rank holds (a layout hop moves them at the unit whose
            layout changes, hops.py), micro_inputs being the first unit's share.
    """
    dps = dps or {}
    whole = micro_inputs[0].shape[0] * dps.get(units[0], 1) if micro_inputs else 0
    on_meta = all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    meta = model if on_meta else copy.deepcopy(model).to("meta")  # build_chunk copies it
    kwargs = input_kwargs([torch.empty((whole, *t.shape[1:]), dtype=t.dtype, device="meta")
                           for t in micro_inputs])  # the whole micro-batch
    shapes: StageShapes = {}
    received: tuple[torch.Tensor, ...] = ()  # whole: the chunks here are not split
    crossed: tuple[torch.Tensor, ...] = ()  # as a rank of the split chunks gets it
    for index, owned in enumerate(chunk_lists):
        out = build_chunk(meta, units, owned)(*received, **kwargs)
        returned = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        sent = tuple(t.narrow(0, 0, whole // dps.get(owned[-1], 1)) for t in returned)
        if index + 1 < len(chunk_lists) and owned[-1] in sequence_slices:
            sent = _sliced(sent, sequence_slices[owned[-1]])
        shapes[index] = (_metas(crossed), _metas(sent))
        received, crossed = returned, sent
    return shapes


def _sliced(tensors: tuple[torch.Tensor, ...], tp: int) -> tuple[torch.Tensor, ...]:
    """One rank's sequence slice (dimension 1) of each tensor, of `tp`."""
    if tp == 1:
        return tensors
    return tuple(t.narrow(1, 0, t.shape[1] // tp) for t in tensors)


def _metas(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Detached copies that keep requires_grad: a stage derives which gradients it
    exchanges from it."""
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)


def _static(stages: list[PipelineStage]) -> Callable[..., None]:
    """A schedule's P2P warm-up for stages given their shapes: the vote it replaces would
    read a tensor the neighbours sent, which a fake process group never fills."""

    from torch.distributed.pipelining._utils import InferenceMode  # torch 2.13, private

    def warmup(*_: Any) -> None:
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC  # noqa: SLF001

    return warmup


class ZeroStage(PipelineStage):
    """A PipelineStage whose micro-batches keep each data-parallel group's ZeRO stage
    (data_parallel.gradient_sync). torch's own turns gradient reduction and resharding off
    for every backward of an FSDP chunk (stage.py, backward_maybe_with_nosync) and reduces
    once at the end of the step, so a ZeRO 3 chunk would hold every layer's whole weights
    and gradients until then: measured with `autoplan run --dry-run`, 33 GiB of whole
    gradients on a rank of the demo's llama3-70b plan (pp2 v9, ZeRO 3). Each backward also
    ends as the last of a step (FSDP2's is_last_backward), as it does without pipelining:
    torch's marks none so, and FSDP2 then keeps each chunk's last reduce-scatter input (a
    layer's whole gradients) until the step's end: 6.4 GiB on that rank, one block's per
    chunk."""

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict,
                                   last_backward: bool = False) -> Any:
        if not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        gradient_sync(self.submod, last=False)  # the step's end reduces the rest
        self.submod.set_is_last_backward(True)  # its final callback frees what FSDP2 holds
        ignore = {"set_requires_gradient_sync": _ignore, "set_reshard_after_backward": _ignore,
                  "set_is_last_backward": _ignore}
        self.submod.__dict__.update(ignore)  # torch's blanket settings, for this call only
        try:
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        finally:
            for name in ignore:
                del self.submod.__dict__[name]


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


_SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def build_schedule(chunks: dict[int, nn.Module], n_chunks: int, schedule: str,
                   n_microbatches: int, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                   group: torch.distributed.ProcessGroup,
                   device: torch.device, shapes: StageShapes | None = None) -> _PipelineSchedule:
    """PipelineStages for this rank's chunks and the schedule that runs them.

    Args:
        chunks: chunk index -> parallelized chunk module, for this rank.
        n_chunks: chunks in the whole pipeline (pp x virtual stages).
        schedule: "gpipe" | "1f1b" | "interleaved_1f1b".
        n_microbatches: micro-batches per step.
        loss_fn: (output, targets) -> scalar mean over the micro-batch.
        group: the pipeline process group.
        device: where activations live.
        shapes: each chunk's inputs and outputs for one micro-batch (stage_shapes); None:
            the stages exchange them at the first step.

    Raises:
        AutoplanError: on an unknown schedule or one rank running several chunks
            without an interleaved schedule.
    """
    if schedule not in _SCHEDULES:
        raise AutoplanError(f"schedule '{schedule}' is not one of {', '.join(_SCHEDULES)}")
    if n_chunks - 1 in chunks:  # the loss sees the model's output as the model returned it
        loss_fn = wrap_loss(loss_fn, chunks[n_chunks - 1])
    stages = [ZeroStage(module, index, n_chunks, device, group=group,
                            input_args=shapes[index][0] if shapes else None,
                            output_args=shapes[index][1] if shapes else None)
              for index, module in sorted(chunks.items())]
    cls = _SCHEDULES[schedule]
    if schedule != "interleaved_1f1b" and len(stages) != 1:
        raise AutoplanError(f"schedule {schedule} runs one chunk per rank; this rank has "
                            f"{len(stages)}: use interleaved_1f1b")
    built = cls(stages if schedule == "interleaved_1f1b" else stages[0],
                n_microbatches=n_microbatches, loss_fn=loss_fn)
    if shapes is not None:
        built._warmup_p2p = _static(stages)  # noqa: SLF001 (see _static)
    return built
