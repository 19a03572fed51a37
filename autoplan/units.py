"""Which modules of a model are the units that parallel strategies apply to.

The blocks are the children of the largest ModuleList/Sequential whose children repeat;
around them, every module with parameters is a unit too (embeddings, final norm, head), and
a sibling that holds a repeated stack of its own is split the same way (an encoder beside a
decoder).
"""

from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["find_units", "join_name", "structure_hash", "first_param", "first_input",
           "loose_parameters"]


def structure_hash(module: nn.Module, memo: dict[int, str]) -> str:
    """A text that is equal for modules of identical class, parameter shapes and children."""
    if id(module) not in memo:
        own = [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters(recurse=False)]
        own += [(n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers(recurse=False)]
        kids = [(n, structure_hash(c, memo)) for n, c in module.named_children()]
        text = repr((type(module).__qualname__, own, kids))
        memo[id(module)] = hashlib.sha1(text.encode()).hexdigest()
    return memo[id(module)]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _block_container(module: nn.Module, memo: dict[int, str]) -> str | None:
    """FQN (relative to module) of the ModuleList/Sequential with the most parameters
    among those holding at least two children of identical structure."""
    best, best_size = None, -1
    for fqn, sub in module.named_modules():
        if not isinstance(sub, (nn.ModuleList, nn.Sequential)) or len(sub) < 2:
            continue
        counts = Counter(structure_hash(child, memo) for child in sub)
        if max(counts.values()) >= 2 and _numel(sub) > best_size:
            best, best_size = fqn, _numel(sub)
    return best


def _units_below(module: nn.Module, prefix: str, memo: dict[int, str],
                 top: bool) -> list[tuple[str, bool]]:
    """(fqn, is_block) pairs that partition `module`'s parametrised subtrees into units."""
    container = _block_container(module, memo)
    if container is None:  # a ModuleList/ModuleDict has no forward: its children run
        opened = top or isinstance(module, (nn.ModuleList, nn.ModuleDict))
        kids = [(n, c) for n, c in module.named_children() if _numel(c)] if opened else []
        if not kids:
            return [(prefix, False)]
        return [u for n, c in kids for u in _units_below(c, join_name(prefix, n), memo, False)]
    units: list[tuple[str, bool]] = []
    path = container.split(".") if container else []
    node = module
    for depth, step in enumerate(path + [None]):
        here = join_name(prefix, ".".join(path[:depth]))
        for name, child in node.named_children():
            if name == step:
                continue
            if step is None:  # the container's own children: every one is a unit
                units.append((join_name(here, name), True))
            elif _numel(child):
                units += _units_below(child, join_name(here, name), memo, False)
        node = node.get_submodule(step) if step is not None else node
    return units


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def find_units(model: nn.Module) -> list[tuple[str, bool]]:
    """The units of a module: (fqn, is_block) in module-tree order.

    Example: a GPT gives wte, wpe, h.0 ... h.N (blocks), ln_f, lm_head.
    """
    memo: dict[int, str] = {}
    units = _units_below(model, "", memo, top=True)
    counts = Counter(structure_hash(model.get_submodule(f), memo) for f, _ in units)
    # A container child is a "block" only when its structure repeats.
    return [(f, b and counts[structure_hash(model.get_submodule(f), memo)] > 1) for f, b in units]


def first_param(module: nn.Module) -> str | None:
    """The name of the first parameter of a unit's forward: its keyword, when the model
    passes the activation by name."""
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     inspect.Parameter.KEYWORD_ONLY):
        return params[0].name
    return None


def first_input(keyword: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A unit's first input in one call: its first positional argument, else the keyword of
    its forward's first parameter (None when the call has neither). A pipeline stage
    receives this one tensor (executor/pipeline.py)."""
    if args:
        return args[0]
    return kwargs.get(keyword) if keyword is not None else None


def loose_parameters(model: nn.Module, units: Sequence[str]) -> list[str]:
    """The FQNs of the model's parameters that no unit holds (tracing records them; every
    pipeline chunk holds a copy).

    Example: a ViT with cls_token and pos_embed on the model itself -> ["cls_token",
    "pos_embed"].
    """
    held = {id(p) for u in units for p in model.get_submodule(u).parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in held]
