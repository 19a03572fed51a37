"""Bytes of tensor storage alive in this process, and their peak, counted op by op.

The dry run (autoplan/app/dry_run.py) plays one rank of a large world on a CPU, mostly with
fake tensors that allocate nothing, so neither an allocator's statistics nor the process's
RSS can say what the rank would hold. Counting storages can: every op's outputs are seen by
a dispatch mode (DTensor and FSDP2 ops arrive here as the local ops they run), each storage
counts its bytes from its first appearance until it is freed, and a storage FSDP2 resizes
(to free an unsharded parameter) counts its new size. torch's own MemTracker does this too,
but refuses a module called more than once per step, as every micro-batch calls it.

Counted bytes are what tensors hold, without the allocator's rounding (CUDA rounds each
block up to 512 bytes) or fragmentation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """A dispatch mode that counts live storage bytes: `now`, and `peak` since entry or
    the last reset_peak().

    Tensors that exist before the mode is entered (parameters, gradients, optimizer state)
    are counted when given as `held`, or when an op first reads or writes them.

    `label(func)` names what an op's outputs are (e.g. the module running and the op), to
    say what the peak is made of (`at_peak`): where a prediction and a count differ, the
    labels show which tensors the prediction missed. Tensors seen first as an op's input are
    labelled `INPUT`; `held` ones `HELD`.
    """

    def __init__(self, held: Iterable[Any] = (),
                 label: Callable[[Any], str] | None = None) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes, label]
        self._refs: set[weakref.ref] = set()  # alive while their storage is
        self._label = label
        self._live: dict[str, int] = {}  # label -> bytes alive
        self._rising = False  # the peak rose since at_peak was taken
        self._at_peak: dict[str, int] = {}
        self.now = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_
        for tensor in tree_leaves(list(held)):
            self.count(tensor, HELD)

    @property
    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak by label, largest first (empty without `label`)."""
        if self._rising:
            self._snapshot()
        return dict(sorted(self._at_peak.items(), key=lambda item: -item[1]))

    def count(self, tensor: Any, label: str = "") -> None:
        """Count the storages of `tensor` (a DTensor's local one), once each."""
        if not isinstance(tensor, torch.Tensor):
            return
        for storage in get_untyped_storages(tensor):
            if storage in self._sizes:
                continue
            cell = [storage.nbytes(), label]  # its bytes now (a resize changes them)
            self._sizes[storage] = cell
            self._add(cell, cell[0])
            self._refs.add(weakref.ref(storage, lambda ref, cell=cell: self._freed(ref, cell)))

    def _freed(self, ref: weakref.ref, cell: list) -> None:
        self._add(cell, -cell[0])
        self._refs.discard(ref)

    def reset_peak(self) -> None:
        self.peak = self.now
        self._at_peak, self._rising = dict(self._live), False

    def _add(self, cell: list, size: int) -> None:
        if size < 0 and self._rising:
            self._snapshot()  # the peak ends at the first free after it rose
        self.now += size
        if self._label is not None:
            self._live[cell[1]] = self._live.get(cell[1], 0) + size
        if self.now > self.peak:
            self.peak, self._rising = self.now, self._label is not None

    def _snapshot(self) -> None:
        self._at_peak = {name: size for name, size in self._live.items() if size}
        self._rising = False

    def __enter__(self) -> LiveBytes:
        resize, sizes, add = self._resize, self._sizes, self._add

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:  # how FSDP2 frees
            out = resize(storage, size)
            cell = sizes.get(storage)
            if cell is not None:
                add(cell, storage.nbytes() - cell[0])
                cell[0] = storage.nbytes()
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        label = "" if self._label is None else self._label(func)
        for tensor in tree_leaves((args, kwargs)):
            self.count(tensor, f"{INPUT} {label}")
        out = func(*args, **(kwargs or {}))
        if func is _WAIT and isinstance(out, torch.Tensor):
            self._alias(args[0], out)
        for tensor in tree_leaves(out):
            self.count(tensor, label)
        return out

    def _alias(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """`out` is `source` in eager mode (a collective's result, waited for), but a fake
        tensor's wait gives a new storage: its bytes move to `out`'s, counted once."""
        cell = self._sizes.get(source.untyped_storage())
        if cell is not None and out.untyped_storage() is not source.untyped_storage():
            self._add(cell, -cell[0])
            cell[0] = 0


HELD = "held"
INPUT = "input to"

_WAIT = torch.ops._c10d_functional.wait_tensor.default
"""Returns its input in eager mode; under FakeTensorMode, a tensor of a storage of its own."""
