"""What a meta copy of a model lacks to be timed layer by layer: its buffers' values.

A meta tensor has a shape and no values. Parameters need none (layers timed off the meta
model get random weights), but buffers do: position ids and token type ids index tables,
RoPE's inv_freq sets the rotation, BatchNorm's running statistics are read in eval mode. A
layer copied off the meta model for timing with uninitialised integer buffers indexes out
of bounds (or worse, silently reads the wrong rows). So every meta buffer carries the real
values it stands for (as the attribute below, which deep copies keep), taken from the real
model when there is one (autoplan.auto) or from a rebuild of the model's spec with its
parameters on meta (`autoplan profile`), and `fill_buffers` writes them into a real copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

__all__ = ["as_compiling", "fill_buffers", "keep_buffer_values", "params_on_meta",
           "prepare_for_timing", "rebuild_buffer_values", "without_caches"]

log = logging.getLogger(__name__)

_VALUES = "_autoplan_real_values"
"""The attribute of a meta buffer that holds its real values (a tensor of its shape)."""


def keep_buffer_values(meta: nn.Module, source: nn.Module) -> int:
    """Attach to each buffer of `meta` the values of the same-named buffer of `source` (a
    real module of the same structure); returns how many buffers got values."""
    real = dict(source.named_buffers(remove_duplicate=False))
    kept = 0
    for name, buffer in meta.named_buffers(remove_duplicate=False):
        value = real.get(name)
        if value is not None and value.is_meta:  # a meta copy of a meta copy
            value = getattr(value, _VALUES, None)
        if value is None or tuple(value.shape) != tuple(buffer.shape):
            continue
        setattr(buffer, _VALUES, value.detach())
        kept += 1
    return kept


def _missing(meta: nn.Module) -> list[str]:
    return [name for name, b in meta.named_buffers(remove_duplicate=False)
            if b.is_meta and getattr(b, _VALUES, None) is None]


def fill_buffers(real: nn.Module, meta: nn.Module) -> None:
    """Write into `real` (a materialized copy of `meta`, same buffer names) the values its
    meta buffers stand for. A buffer without known values is zeroed (never left
    uninitialised) and named in the log, since a zero index or statistic may be wrong."""
    values = {name: getattr(b, _VALUES, None) if b.is_meta else b
              for name, b in meta.named_buffers(remove_duplicate=False)}
    unknown = []
    with torch.no_grad():
        for name, buffer in real.named_buffers(remove_duplicate=False):
            value = values.get(name)
            if value is not None and tuple(value.shape) == tuple(buffer.shape):
                buffer.copy_(value)
            else:
                buffer.zero_()
                unknown.append(name)
    if unknown:
        log.info("buffers without known values, zeroed: %s", ", ".join(unknown))


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on meta as they are registered (so that
    initialising them costs nothing) and their buffers where they are built, with values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.detach().to("meta"),
                                                   requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def rebuild_buffer_values(module: nn.Module, spec: Any) -> None:
    """Give the meta buffers of `module` (built from `spec` on meta) their real values by
    building the spec once more on the CPU with its parameters on meta (buffers only cost
    memory). Nothing happens when every buffer already has values or none is meta."""
    if not _missing(module):
        return
    from autoplan.errors import AutoplanError
    from autoplan.models.build import build_model

    try:
        with params_on_meta():
            source = build_model(spec, device="cpu").module
    except (AutoplanError, RuntimeError, TypeError, ValueError) as err:
        log.info("buffers of %s not rebuilt (%s); they are zeroed when timed", spec.text, err)
        return
    keep_buffer_values(module, source)


def without_caches(tree: Any) -> Any:
    """`tree` (a unit's captured arguments) with None for each transformers KV cache: the
    cache a captured call holds carries meta tensors and grows with every call, and a
    training step reads none of it (its append is left out of the layer's time). Containers
    without a cache are returned as they are (a model output keeps its type)."""
    if _is_cache(tree):
        return None
    if isinstance(tree, dict):
        if not any(_holds_cache(value) for value in tree.values()):
            return tree
        copied = copy.copy(tree)
        for key, value in tree.items():
            copied[key] = without_caches(value)
        return copied
    if isinstance(tree, (tuple, list)) and _holds_cache(tree):
        items = [without_caches(value) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def _holds_cache(tree: Any) -> bool:
    if isinstance(tree, dict):
        return any(_holds_cache(value) for value in tree.values())
    if isinstance(tree, (tuple, list)):
        return any(_holds_cache(value) for value in tree)
    return _is_cache(tree)


def _is_cache(value: Any) -> bool:
    kind = type(value)
    return kind.__module__.startswith("transformers") and kind.__name__.endswith("Cache")


def prepare_for_timing(module: nn.Module, spec: Any) -> None:
    """Before layers of a meta model built from `spec` are timed: real values for its
    buffers."""
    rebuild_buffer_values(module, spec)


@contextlib.contextmanager
def as_compiling() -> Iterator[None]:
    """Tell the model it is being compiled while it runs on meta tensors: meta tensors hold
    no values, as a compiler's do not, and libraries skip value-dependent checks then
    (transformers 5 reads position ids with .item() to find packed sequences unless it is
    compiling, which a meta tensor cannot answer)."""
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        yield
