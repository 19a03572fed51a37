"""Activation checkpointing per layer, as the plan says, keeping every parameter's FQN.

The unit's forward is wrapped in torch.utils.checkpoint (non-reentrant) as an instance
attribute, so module hooks (tensor parallelism, FSDP) stay outside the recomputed region and
no `_checkpoint_wrapped_module` enters the names. NOTES-torch.md: the composable
`checkpoint()` API fails with TP+SP input hooks; wrapping the forward works everywhere.

- "full": keep only the unit's inputs; recompute the whole unit in backward.
- "selective": op-level selective checkpointing (torch.utils.checkpoint
  create_selective_checkpoint_contexts): the outputs of matrix multiplies are saved, every
  other op (attention scores, softmax, activations, norms) is recomputed, in the spirit of
  Korthikanti et al. 2022 section 4.3 (keep the large GEMM outputs, recompute attention).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from autoplan.errors import AutoplanError

__all__ = ["SAVED_OPS", "apply_ac"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten
SAVED_OPS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
                       _aten.linear.default})
"""Ops whose outputs selective checkpointing keeps (the rest are recomputed)."""


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed(forward: Callable[..., Any], mode: str) -> Callable[..., Any]:
    extra = {"context_fn": _selective_context} if mode == "selective" else {}

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_ac(model: nn.Module, modes: Sequence[tuple[str, str]],
             present: set[str] | None = None) -> list[str]:
    """Wrap the forward of each unit whose mode is "full" or "selective" (in place).

    Args:
        model: the module holding the units.
        modes: (unit FQN, "none" | "selective" | "full") for every unit.
        present: the unit names this module really holds (default: all).

    Returns:
        The names of the units wrapped.

    Raises:
        AutoplanError: on an unknown mode.
    """
    wrapped = []
    for name, mode in modes:
        if present is not None and name not in present:
            continue
        match mode:
            case "none":
                continue
            case "full" | "selective":
                unit = model.get_submodule(name)
                unit.forward = _checkpointed(unit.forward, mode)
                wrapped.append(name)
            case _:
                raise AutoplanError(f"layer {name}: checkpoint '{mode}' is not one of none, "
                                    "selective, full")
    if wrapped:
        log.info("activation checkpointing on %d layers", len(wrapped))
    return wrapped
