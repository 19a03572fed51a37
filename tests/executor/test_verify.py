"""verify.compare's parameter criterion, without processes: an entry whose step-1 gradient is
at rounding level may move as far as AdamW can (rounding picks its direction in both runs);
every other entry keeps the tight bound, so a wrong update is still caught."""

from __future__ import annotations

import torch

from autoplan.executor import verify

STEPS, LR = 3, 1e-3


def _traces(shift: float, where: int) -> tuple[verify.Trace, verify.Trace]:
    """A reference whose parameter's entry 0 had a zero step-1 gradient (a k bias) and a
    run whose entry `where` is off by `shift`."""
    grads = {"bias": torch.tensor([0.0, 0.5, -0.25])}
    expected = torch.tensor([0.1, 0.2, 0.3])
    got = expected.clone()
    got[where] += shift
    ref = verify.Trace([1.0] * STEPS, {"bias": expected}, grads)
    run = verify.Trace([1.0] * STEPS, {"bias": got}, {k: v.clone() for k, v in grads.items()})
    return run, ref


def test_an_entry_with_a_rounding_level_gradient_may_move_as_adamw_can() -> None:
    run, ref = _traces(0.9 * STEPS * LR, where=0)
    assert verify.compare(run, ref, LR).problems == []


def test_an_entry_with_a_real_gradient_keeps_the_tight_bound() -> None:
    run, ref = _traces(0.9 * STEPS * LR, where=1)
    assert verify.compare(run, ref, LR).problems == ["bias after 3 steps: max diff 2.70e-03"]


def test_no_entry_moves_further_than_adamw_can() -> None:
    run, ref = _traces(2 * STEPS * LR, where=0)
    assert len(verify.compare(run, ref, LR).problems) == 1
