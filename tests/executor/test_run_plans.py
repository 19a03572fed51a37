"""`autoplan validate` trains its plans one after another in one launch of workers
(app/run.run_plans): each plan must train as it does alone, with nothing left over from the
plan before it."""

from __future__ import annotations

import pytest

from autoplan.app.run import RunOptions, RunReport, load_run_plan, run_plans
from tests.processes import TAG_ENV, processes_with

pytestmark = pytest.mark.usefixtures("time_limited")


def _runs(*plans: str) -> list[tuple[RunOptions, object]]:
    runs = []
    for text in plans:
        options = RunOptions(model="gpt-tiny", plan=text, nproc=2, steps=2, warmup=1,
                             global_batch=4, verify=True, device="cpu", timeout_s=60)
        runs.append((options, load_run_plan(options, 2)[0]))
    return runs


def test_plans_trained_in_one_launch_each_match_one_process(tag: str) -> None:
    lines: list[str] = []
    reports = run_plans(_runs("pp=2", "dp=2,zero=3"), 2, lines.append)
    assert [type(r) for r in reports] == [RunReport] * 2
    for report in reports:  # losses, step-1 gradients and parameters as one process has them
        assert report.comparison is not None and report.comparison.ok, report.comparison
        assert len(report.step_times_s) == 2 and report.prediction is None
    assert [(r.plan.pp, r.plan.layers[1].zero) for r in reports] == [(2, 0), (1, 3)]
    assert lines[0].startswith("0/4 plan 1/2: pp=2 starting")
    assert any(line.startswith("2/4 plan 2/2: dp=2,zero=3 starting") for line in lines)
    assert processes_with(TAG_ENV, tag) == []

