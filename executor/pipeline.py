"""Pipeline parallelism with torch.distributed.pipelining, for any module made of units.

Splitting (STYLE.md item 3): the units (autoplan.units.find_units) are cut into chunks at the
plan's stage boundaries; each chunk is a deep copy of the whole model in which the units it
does not own are replaced by parameter-free stubs, so every FQN survives. A chunk runs the
model's own forward, unchanged:
- the first unit it owns takes the activation received from the previous chunk in place of
  its first positional input, and the stubs before it return that activation (detached), so
  that the glue code between units (adds, dropout, position ids) runs on tensors of the
  right shape and type without reaching the parameters it does not hold;
- just before the first unit of the next chunk runs, the forward stops and the chunk returns
  that unit's first positional input: the one tensor sent to the next stage.
The model's inputs reach every chunk as keyword arguments, so that glue which reads them
(a sequence length, a mask) works on every stage. Limits: one tensor crosses a boundary
(the first positional input of the next unit); other inputs of a unit must come from the
model's inputs or buffers (Llama's rotary tables do), not from earlier units' outputs.

Chunk c runs on pipeline rank c % pp (the looped order of Interleaved1F1B).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule

from autoplan.errors import AutoplanError

__all__ = ["INPUT_KEY", "chunk_units", "chunk_ranks", "build_chunk", "build_schedule",
           "input_kwargs"]

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


class _ChunkState:
    """The activation received for the micro-batch being run."""

    recv: torch.Tensor | None = None


class _Stub(nn.Module):
    """Stands for a unit another chunk owns: returns the received activation, detached."""

    def __init__(self, state: _ChunkState, name: str) -> None:
        super().__init__()
        self._state, self._name = state, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._state.recv is None:
            raise RuntimeError(f"pipeline stub {self._name} ran without a received activation")
        return self._state.recv.detach()

    def extra_repr(self) -> str:
        return f"stands for {self._name}"


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    model.get_submodule(parent_name)._modules[child] = new


def build_chunk(model: nn.Module, units: Sequence[str], owned: Sequence[str]) -> nn.Module:
    """A copy of `model` that runs only the units in `owned` (one contiguous run of `units`).

    Args:
        model: the whole model (not modified).
        units: every unit FQN, in execution order.
        owned: the chunk's units.

    Returns:
        The chunk: called as chunk(received_activation, **input_kwargs(inputs)), or
        chunk(**input_kwargs(inputs)) for the first chunk.

    Raises:
        AutoplanError: when the model holds parameters outside its units.
    """
    outside = [n for n, _ in model.named_parameters(recurse=False)]
    if outside:
        raise AutoplanError(f"the model's own parameters {outside} belong to no layer; a "
                            "pipeline cannot place them: move them into a sub-module")
    chunk, state = copy.deepcopy(model), _ChunkState()
    first, last = units.index(owned[0]), units.index(owned[-1])
    for index, name in enumerate(units):
        if index < first or index > last:
            _replace(chunk, name, _Stub(state, name))
    if first > 0:
        chunk.get_submodule(owned[0]).register_forward_pre_hook(
            lambda _m, args: (state.recv, *args[1:]), prepend=True)
    if last + 1 < len(units):
        def stop(_m: nn.Module, args: tuple[Any, ...]) -> None:
            raise _StageExit(args[0])

        chunk.get_submodule(units[last + 1]).register_forward_pre_hook(stop)
    chunk.forward = _chunk_forward(chunk.forward, state)
    return chunk


def _chunk_forward(model_forward: Callable[..., Any], state: _ChunkState) -> Callable[..., Any]:
    def forward(*received: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        keys = sorted((k for k in kwargs if k.startswith(INPUT_KEY)),
                      key=lambda k: int(k.removeprefix(INPUT_KEY)))
        inputs = [kwargs.pop(k) for k in keys]
        state.recv = received[0] if received else None
        try:
            return model_forward(*inputs, **kwargs)
        except _StageExit as stop:
            return stop.value
        finally:
            state.recv = None

    return forward


def input_kwargs(inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's positional inputs as the keyword arguments every chunk takes."""
    return {f"{INPUT_KEY}{i}": t for i, t in enumerate(inputs)}


_SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def build_schedule(chunks: dict[int, nn.Module], n_chunks: int, schedule: str,
                   n_microbatches: int, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                   group: torch.distributed.ProcessGroup,
                   device: torch.device) -> _PipelineSchedule:
    """PipelineStages for this rank's chunks and the schedule that runs them.

    Args:
        chunks: chunk index -> parallelized chunk module, for this rank.
        n_chunks: chunks in the whole pipeline (pp x virtual stages).
        schedule: "gpipe" | "1f1b" | "interleaved_1f1b".
        n_microbatches: micro-batches per step.
        loss_fn: (output, targets) -> scalar mean over the micro-batch.
        group: the pipeline process group.
        device: where activations live.

    Raises:
        AutoplanError: on an unknown schedule or one rank running several chunks
            without an interleaved schedule.
    """
    if schedule not in _SCHEDULES:
        raise AutoplanError(f"schedule '{schedule}' is not one of {', '.join(_SCHEDULES)}")
    stages = [PipelineStage(module, index, n_chunks, device, group=group)
              for index, module in sorted(chunks.items())]
    cls = _SCHEDULES[schedule]
    if schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise AutoplanError(f"schedule {schedule} runs one chunk per rank; this rank has "
                            f"{len(stages)}: use interleaved_1f1b")
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
