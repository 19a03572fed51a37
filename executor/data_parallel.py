"""Data parallelism per layer: FSDP2 for ZeRO 1/2/3, FSDP2-style replicate() for ZeRO 0.

Each unit (or group of units that share a parameter, such as a tied embedding and output
head) becomes one FSDP group, then the root takes what is left. ZeRO maps to FSDP2 as:
- 3: fully_shard(reshard_after_forward=True): parameters, gradients and optimizer state
  sharded; parameters gathered again in backward.
- 1 and 2: fully_shard(reshard_after_forward=False): the gathered parameters stay until
  the step's last backward; optimizer state is sharded.
- 0: torch.distributed._composable.replicate_with_fsdp.replicate: whole parameters on every
  rank and an all-reduce of gradients (DDP's algorithm on FSDP2's machinery, so that it
  composes with DTensor tensor parallelism and with pipelining; the classic DDP wrapper does
  not take DTensor parameters).
Layers of different (dp, tp) layouts shard on their own layout's dp mesh (FSDP2 takes a mesh
per module); the root comes last and ignores the parameters of layers with dp 1. ZeRO 0
groups may sit beside ZeRO >= 1 groups: fully_shard does not take in a replicate()d module,
so under an FSDP root they stay replicated with their own gradient all-reduce.

Over the micro-batches of a step (gradient_sync): ZeRO 0 and 1 keep whole gradients and
reduce them once, after the last; ZeRO 2 and 3 reduce-scatter after every micro-batch, so
no rank holds more than a layer's whole gradients at a time (Rajbhandari et al. 2020, sec.
5.2), and ZeRO 3 also frees its gathered weights after every backward.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

__all__ = ["DPGroup", "apply_fsdp", "apply_replicate", "gradient_sync", "tied_groups"]

log = logging.getLogger(__name__)

DPGroup = tuple[tuple[str, ...], int]
"""(unit FQNs that form one group, ZeRO stage)."""

_ZERO: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""The ZeRO stage of each module apply_fsdp or apply_replicate made data-parallel."""


def gradient_sync(module: nn.Module, last: bool) -> None:
    """Before a micro-batch's backward: whether each data-parallel group in `module`
    reduces its gradients after it (ZeRO 2 and 3, or the last micro-batch) and frees its
    gathered weights (ZeRO 3, or the last); the others accumulate whole gradients and keep
    their weights gathered (the module docstring)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            zero = _ZERO.get(sub, 0)
            sub.set_requires_gradient_sync(last or zero >= 2, recurse=False)
            sub.set_reshard_after_backward(last or zero >= 3, recurse=False)


def _register(modules: nn.Module | list[nn.Module], zero: int) -> None:
    for module in modules if isinstance(modules, list) else [modules]:
        _ZERO[module] = zero


def tied_groups(model: nn.Module, units: Sequence[str]) -> list[tuple[str, ...]]:
    """Units joined into groups where they share a parameter, in order of first unit.

    Example: GPT's wte and lm_head share the embedding weight: [("wte", "lm_head"), ("wpe",),
    ("h.0",), ...].
    """
    owner: dict[int, int] = {}
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for index, name in enumerate(units):
        for param in model.get_submodule(name).parameters():
            if id(param) in owner:
                parent[find(index)] = find(owner[id(param)])
            else:
                owner[id(param)] = index
    groups: dict[int, list[str]] = {}
    for index, name in enumerate(units):
        groups.setdefault(find(index), []).append(name)
    return [tuple(g) for g in groups.values()]


def _modules(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [m for m in (model.get_submodule(n) for n in names) if any(True for _ in m.parameters())]


def apply_fsdp(model: nn.Module, groups: Sequence[DPGroup], dp_mesh: DeviceMesh,
               mp_policy: MixedPrecisionPolicy | None = None, *, root: bool = True,
               ignored_params: set[nn.Parameter] | None = None) -> None:
    """fully_shard each group (reshard after forward only for ZeRO 3), then the root.

    Args:
        model: the module (or pipeline chunk) to shard; it becomes the FSDP root.
        groups: (unit FQNs, ZeRO stage >= 1) per group; units without parameters are skipped.
        dp_mesh: the data-parallel mesh (1-D) of the groups and the root.
        mp_policy: mixed precision (default: compute in the parameters' dtype).
        root: also shard the root; False leaves it to a later call (layers of several
            layouts: each layout's groups on its own mesh first, the root once, last).
        ignored_params: parameters the root leaves alone (layers without data parallelism).
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for names, zero in groups:
        modules = _modules(model, names)
        if modules:
            fully_shard(modules if len(modules) > 1 else modules[0], mesh=dp_mesh,
                        reshard_after_forward=zero == 3, mp_policy=mp_policy)
            _register(modules, zero)
    if root:  # the root's own parameters are few; its forward ends the step: keep them
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy,
                    ignored_params=ignored_params)
        _register(model, 1)
    if groups:
        log.info("FSDP over %d ranks on %d groups", dp_mesh.size(), len(groups))


def apply_replicate(model: nn.Module, groups: Sequence[DPGroup], dp_mesh: DeviceMesh,
                    mp_policy: MixedPrecisionPolicy | None = None, *, root: bool = True,
                    ignored_params: set[nn.Parameter] | None = None) -> None:
    """Replicate each group (ZeRO 0: gradient all-reduce per group), then the root.

    Args:
        model: the module (or pipeline chunk); it becomes the root.
        groups: (unit FQNs, 0) per group; units without parameters are skipped.
        dp_mesh: the data-parallel mesh (1-D) of the groups and the root.
        mp_policy: mixed precision (default: compute in the parameters' dtype).
        root: also replicate the root (see apply_fsdp).
        ignored_params: parameters the root leaves alone (layers without data parallelism).
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for names, _ in groups:
        modules = _modules(model, names)
        if modules:
            replicate(modules if len(modules) > 1 else modules[0], mesh=dp_mesh,
                      mp_policy=mp_policy)
            _register(modules, 0)
    if root:
        replicate(model, mesh=dp_mesh, mp_policy=mp_policy, ignored_params=ignored_params)
        _register(model, 0)
    if groups:
        log.info("replicated over %d ranks with %d gradient groups", dp_mesh.size(), len(groups))
