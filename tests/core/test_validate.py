"""The parts of `autoplan validate` that need no processes: the plans it may run, how it
picks them, and its statistics (the end-to-end run is benchmarks/validate.py)."""

from __future__ import annotations

import pytest

from autoplan.app.validate import (
    PlanOutcome,
    ValidateOptions,
    _chosen_by,
    _select,
    _summary,
    candidate_plans,
    spearman,
)
from autoplan.errors import AutoplanError
from autoplan.feasibility import plan_refusal
from autoplan.plan import uniform_plan
from autoplan.workload import load_graph


def test_candidates_are_uniform_plans_of_the_world() -> None:
    graph = load_graph("gpt-tiny", dtype="fp32")
    plans = candidate_plans(graph, 4, 16)
    assert len(plans) == len(set(plans)) > 20
    for text in plans:
        plan = uniform_plan(text, graph, 4, 16)
        assert plan.world_size == 4 and len({(lp.dp, lp.tp, lp.zero) for lp in plan.layers}) == 1
        assert plan_refusal(plan, graph) is None


def test_selection_takes_the_best_and_a_spread() -> None:
    ranked = [(float(i), f"plan{i}") for i in range(40)]
    picked = _select(ranked, 10)
    assert picked[0] == ("plan0", "chosen") and len(picked) == 10
    # the five fastest, then every seventh of the other 35 down to the slowest
    assert [name for name, _ in picked] == [f"plan{i}" for i in (0, 1, 2, 3, 4, 11, 18, 25,
                                                                 32, 39)]


def test_statistics() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    outcomes = [PlanOutcome("a", "chosen", 1.0, 1.25, 100, 100),
                PlanOutcome("b", "spread", 2.0, 1.0, 90, 100)]
    result = _summary(outcomes, 7, [])
    assert result.mape == pytest.approx((0.2 + 1.0) / 2)
    assert result.regret == pytest.approx(1.25)
    assert result.memory_error == pytest.approx(0.05)
    assert result.spearman == pytest.approx(-1.0)


def test_bad_options_are_refused() -> None:
    with pytest.raises(AutoplanError, match="--nproc"):
        ValidateOptions(model="gpt-tiny", nproc=1)
    with pytest.raises(AutoplanError, match="warm-up"):
        ValidateOptions(model="gpt-tiny", steps=2, warmup=3)


def test_the_chosen_plan_is_the_fastest_once_priced_again() -> None:
    """The runs are picked on the first prices; priced again from their own in-situ points,
    the fastest is chosen and listed first, and the first pick becomes a runner-up."""
    runs = {"a": (None, "chosen"), "b": (None, "runner-up"), "c": (None, "spread"),
            "d": (None, "ddp")}
    again = _chosen_by({"a": 3.0, "b": 2.0, "c": 1.5, "d": 4.0}, runs)
    assert list(again.items()) == [("c", (None, "chosen")), ("a", (None, "runner-up")),
                                   ("b", (None, "runner-up")), ("d", (None, "ddp"))]
    assert _chosen_by({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, runs) == runs
