"""LiveBytes counts the bytes of live tensor storage op by op (profiler/live_bytes.py)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from autoplan.profiler import LiveBytes

MIB = 2**20


def _steps(counter: LiveBytes) -> list[int]:
    """Allocate 1 and 2 MiB, free the first, allocate 3 MiB, take a view: (now, peak) after
    each."""
    seen = []
    with counter:
        a = torch.zeros(MIB // 4)
        b = torch.zeros(MIB // 2)
        seen.append(counter.now)
        del a
        seen.append(counter.now)
        c = torch.ones(3 * MIB // 4)
        view = c[1:].view(-1)
        seen += [counter.now, counter.peak]
        del b, c, view
    return seen


def test_allocations_frees_and_views_are_counted_once() -> None:
    assert _steps(LiveBytes()) == [3 * MIB, 2 * MIB, 5 * MIB, 5 * MIB]


def test_fake_tensors_count_as_real_ones() -> None:
    with FakeTensorMode():
        assert _steps(LiveBytes()) == [3 * MIB, 2 * MIB, 5 * MIB, 5 * MIB]


def test_held_tensors_count_from_the_start_and_a_resize_counts_its_new_size() -> None:
    held, resize = torch.zeros(MIB // 4), torch.UntypedStorage.resize_
    counter = LiveBytes([held])
    assert counter.now == MIB
    with counter:
        other = torch.zeros(MIB // 4)
        other.untyped_storage().resize_(0)  # how FSDP2 frees an unsharded parameter
        assert counter.now == MIB and counter.peak == 2 * MIB
        counter.reset_peak()
        assert counter.peak == MIB
    assert torch.UntypedStorage.resize_ is resize  # put back on exit


def test_the_peak_is_told_by_what_made_each_tensor() -> None:
    """at_peak: the bytes alive at the highest point, by the label of the op that made them
    (here the op's name); a tensor made before the mode by the first op that reads it."""
    before = torch.zeros(MIB // 4)
    counter = LiveBytes(label=lambda func: func.__name__)
    with counter:
        a = torch.zeros(MIB // 4)
        b = torch.ones(MIB // 2)
        del a  # the peak so far (3 MiB) passes: a later, higher one replaces it
        c = before * 2
        d = b + 1
        del b, c, d
        torch.ones(MIB // 4)
    assert counter.peak == 6 * MIB
    assert counter.at_peak == {"ones.default": 2 * MIB, "add.Tensor": 2 * MIB,
                               "input to mul.Tensor": MIB, "mul.Tensor": MIB}
    assert list(counter.at_peak)[-1] == "mul.Tensor"  # largest first, then as made
    assert LiveBytes().at_peak == {}  # no labels asked for
