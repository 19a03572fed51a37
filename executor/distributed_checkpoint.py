"""Save and load a parallelized model and its optimizer with torch.distributed.checkpoint (DCP).

The state dicts come from torch.distributed.checkpoint.state_dict (get/set_model_state_dict,
get/set_optimizer_state_dict), keyed by the original model's FQNs whatever the plan: a
pipeline chunk keeps its units' names, tensor-parallel and FSDP shards are DTensors that DCP
writes as pieces of one global tensor. So a checkpoint written under one plan (TP x DP) loads
under another (PP x DP): each rank reads the pieces of the tensors it now holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from autoplan.errors import AutoplanError

__all__ = ["load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

_MODEL_KEY = "model"
_OPTIMIZER_KEY = "optimizer"


def _only_chunk(chunks: list[nn.Module]) -> nn.Module:
    if len(chunks) != 1:
        raise AutoplanError(f"this rank runs {len(chunks)} pipeline chunks (virtual_stages > 1); "
                            "distributed checkpoints support one chunk per rank so far")
    return chunks[0]


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimizer state keyed per parameter FQN ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"),
so that a rank holding other parameters under another plan finds its own (torchtitan does
the same for resharding)."""


def _alias_groups(module: nn.Module) -> list[list[str]]:
    """FQNs that name one parameter (tied weights)."""
    by_param: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _add_tied_aliases(module: nn.Module, flat: dict) -> dict:
    """Tied parameters have their optimizer state under one of their FQNs; a pipeline chunk
    that holds only the other copy (the head without the embedding) looks for its own name,
    so the state is written under every name of the parameter."""
    for names in _alias_groups(module):
        for prefix in ("state.", "param_groups."):
            present = next((n for n in names if any(k.startswith(f"{prefix}{n}.") for k in flat)),
                           None)
            if present is None:
                continue
            head = f"{prefix}{present}."
            for key in [k for k in flat if k.startswith(head)]:
                for other in names:
                    flat.setdefault(f"{prefix}{other}.{key[len(head):]}", flat[key])
    return flat


def _state(module: nn.Module, optimizer: torch.optim.Optimizer | None,
           for_save: bool = False) -> dict:
    state = {_MODEL_KEY: get_model_state_dict(module, options=_OPTIONS)}
    if optimizer is not None:
        flat = get_optimizer_state_dict(module, optimizer, options=_OPTIONS)
        state[_OPTIMIZER_KEY] = _add_tied_aliases(module, flat) if for_save else flat
    return state


def save_checkpoint(chunks: list[nn.Module], path: str | Path,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write this rank's share of the model (and optimizer) state to the folder `path`.

    Call on every rank of the world at the same point (a collective).

    Args:
        chunks: the modules this rank holds (Runner.chunks' values).
        path: the checkpoint folder (shared by the ranks; created when missing).
        optimizer: also saved when given.

    Raises:
        AutoplanError: when a rank holds several pipeline chunks.
    """
    module = _only_chunk(chunks)
    dcp.save(_state(module, optimizer, for_save=True), checkpoint_id=str(path))
    log.info("saved a distributed checkpoint to %s", path)


def load_checkpoint(chunks: list[nn.Module], path: str | Path,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read the model (and optimizer) state this rank holds from the folder `path`, written by
    save_checkpoint under any plan of the same model.

    Call on every rank, after parallelize and after creating the optimizer.

    Raises:
        AutoplanError: when the folder holds no checkpoint, lacks the optimizer state asked
            for, or a rank holds several pipeline chunks.
    """
    module = _only_chunk(chunks)
    if not (Path(path) / ".metadata").is_file():
        raise AutoplanError(f"'{path}' holds no distributed checkpoint (no .metadata file)")
    state = _state(module, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (RuntimeError, ValueError) as err:  # DCP wraps per-rank failures
        raise AutoplanError(f"checkpoint '{path}' does not load into this model: "
                            f"{str(err).splitlines()[0]}") from None
    set_model_state_dict(module, state[_MODEL_KEY], options=_OPTIONS)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state[_OPTIMIZER_KEY], options=_OPTIONS)
    log.info("loaded a distributed checkpoint from %s", path)
