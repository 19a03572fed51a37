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
from collections.abc import Iterable
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
    """

    def __init__(self, held: Iterable[Any] = ()) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes]
        self._refs: set[weakref.ref] = set()  # alive while their storage is
        self.now = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_
        for tensor in tree_leaves(list(held)):
            self.count(tensor)

    def count(self, tensor: Any) -> None:
        """Count the storages of `tensor` (a DTensor's local one), once each."""
        if not isinstance(tensor, torch.Tensor):
            return
        for storage in get_untyped_storages(tensor):
            if storage in self._sizes:
                continue
            cell = [storage.nbytes()]  # its bytes now; a resize changes them
            self._sizes[storage] = cell
            self._add(cell[0])
            self._refs.add(weakref.ref(storage, lambda ref, cell=cell: self._freed(ref, cell)))

    def _freed(self, ref: weakref.ref, cell: list[int]) -> None:
        self._add(-cell[0])
        self._refs.discard(ref)

    def reset_peak(self) -> None:
        self.peak = self.now

    def _add(self, size: int) -> None:
        self.now += size
        self.peak = max(self.peak, self.now)

    def __enter__(self) -> LiveBytes:
        resize, sizes, add = self._resize, self._sizes, self._add

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:  # how FSDP2 frees
            out = resize(storage, size)
            cell = sizes.get(storage)
            if cell is not None:
                add(storage.nbytes() - cell[0])
                cell[0] = storage.nbytes()
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        for tensor in tree_leaves((args, kwargs)):
            self.count(tensor)
        out = func(*args, **(kwargs or {}))
        if func is _WAIT and isinstance(out, torch.Tensor):
            self._alias(args[0], out)
        for tensor in tree_leaves(out):
            self.count(tensor)
        return out

    def _alias(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """`out` is `source` in eager mode (a collective's result, waited for), but a fake
        tensor's wait gives a new storage: its bytes move to `out`'s, counted once."""
        cell = self._sizes.get(source.untyped_storage())
        if cell is not None and out.untyped_storage() is not source.untyped_storage():
            self._add(-cell[0])
            cell[0] = 0


_WAIT = torch.ops._c10d_functional.wait_tensor.default
"""Returns its input in eager mode; under FakeTensorMode, a tensor of a storage of its own."""
