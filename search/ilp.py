"""The stage problem as an integer linear program (pulp; HiGHS through highspy, CBC when
HiGHS is missing).

Per run r: a one-hot layout z[r, L]; integer counts n[r, o] of its layers on each option o,
allowed only on the chosen layout. Per pair of adjacent runs: y[r, L, L'] >= z[r, L] +
z[r+1, L'] - 1 linearises the edge cost of the two layouts. Identical layers share one run, so
a 126-block stage is no larger a program than a 2-block one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import pulp

from autoplan.errors import AutoplanError
from autoplan.search.problem import INFEASIBLE, StageProblem, StageSolution

__all__ = ["solve_ilp", "ILP_SOLVERS"]

ILP_SOLVERS = ("highs", "cbc")
_GIB = 2**30  # memory in GiB keeps the program's coefficients within a few decades
# HiGHS's default feasibility tolerance (1e-6) let a plan exceed its budget by 1e-6 GiB and so
# beat the true optimum (found by tests/search/test_solvers.py); 1e-10 GiB is a tenth of a byte.
_HIGHS_TOLERANCES = {"mip_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10}


def solve_ilp(problem: StageProblem, time_limit_s: float = 30.0,
              solver: str = "highs") -> StageSolution:
    """Solve `problem` exactly, or to the time limit (status "time_limit" with the gap).

    Raises:
        AutoplanError: on an unknown solver, or when the solver fails without an answer.
    """
    lp, z, n = _program(problem)
    status, gap = _solve(lp, time_limit_s, solver)
    if status == INFEASIBLE:
        return StageSolution(float("inf"), status=INFEASIBLE)
    picks = []
    for r, run in enumerate(problem.runs):
        counts = [(o.index, round(n[r, k].value() or 0)) for k, o in enumerate(run.options)]
        picks.append(tuple(index for index, count in counts for _ in range(count)))
    memory = sum(o.memory * round(n[r, k].value() or 0)
                 for r, run in enumerate(problem.runs) for k, o in enumerate(run.options))
    return StageSolution(pulp.value(lp.objective) or 0.0, tuple(picks), status, gap, memory)


def _program(problem: StageProblem) -> tuple[pulp.LpProblem, dict, dict]:
    lp = pulp.LpProblem("stage", pulp.LpMinimize)
    z = {(r, layout): lp.add_variable(f"z_{r}_{layout[0]}_{layout[1]}", cat="Binary")
         for r, run in enumerate(problem.runs) for layout in run.layouts()}
    n = {(r, k): lp.add_variable(f"n_{r}_{k}", 0, run.count, cat="Integer")
         for r, run in enumerate(problem.runs) for k in range(len(run.options))}
    objective = [o.time * n[r, k] for r, run in enumerate(problem.runs)
                 for k, o in enumerate(run.options)]
    for r, run in enumerate(problem.runs):
        lp += pulp.lpSum(z[r, layout] for layout in run.layouts()) == 1
        lp += pulp.lpSum(n[r, k] for k in range(len(run.options))) == run.count
        for k, o in enumerate(run.options):
            lp += n[r, k] <= run.count * z[r, o.layout]
        if r + 1 < len(problem.runs):
            for (before, after), cost in sorted(problem.edges[r].items()):
                if cost == math.inf and (r, before) in z and (r + 1, after) in z:
                    lp += z[r, before] + z[r + 1, after] <= 1  # a change the executor refuses
                elif cost > 0 and (r, before) in z and (r + 1, after) in z:
                    y = lp.add_variable(f"y_{r}_{before[0]}_{before[1]}_{after[0]}_{after[1]}", 0)
                    lp += y >= z[r, before] + z[r + 1, after] - 1
                    objective.append(cost * y)
    lp += pulp.lpSum(objective)
    lp += pulp.lpSum(o.memory / _GIB * n[r, k] for r, run in enumerate(problem.runs)
                     for k, o in enumerate(run.options)) <= problem.budget / _GIB
    return lp, z, n


def _solve(lp: pulp.LpProblem, time_limit_s: float, solver: str) -> tuple[str, float]:
    """Run the solver and read its own status: pulp's LpStatus can say Optimal after a
    timeout, so HiGHS's model status and MIP gap (or CBC's solution status) decide."""
    if solver not in ILP_SOLVERS:
        raise AutoplanError(f"unknown ILP solver '{solver}'; choose from {', '.join(ILP_SOLVERS)}")
    if solver == "highs" and pulp.HiGHS().available():
        with _quiet_stdout():  # highspy prints its banner on stdout, into --json output
            lp.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=1, gapRel=0.0,
                                gapAbs=1e-9, **_HIGHS_TOLERANCES))
        import highspy

        status = lp.solverModel.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            return "optimal", 0.0
        if status == highspy.HighsModelStatus.kInfeasible:
            return INFEASIBLE, 0.0
        if status == highspy.HighsModelStatus.kTimeLimit and lp.solverModel.getInfo(
                ).primal_solution_status == 2:  # a feasible point: report how far from proven
            return "time_limit", float(lp.solverModel.getInfo().mip_gap)
        why = lp.solverModel.modelStatusToString(status)
        raise AutoplanError(f"HiGHS ended without a plan: {why}")
    lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    if lp.sol_status == pulp.LpSolutionOptimal:
        return "optimal", 0.0
    if lp.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit", float("nan")  # CBC through pulp does not report its gap
    if lp.sol_status in (pulp.LpSolutionInfeasible, pulp.LpSolutionNoSolutionFound):
        return INFEASIBLE, 0.0
    raise AutoplanError(f"CBC ended without a plan: {pulp.LpStatus[lp.status]}")


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: the solver writes there from C++, past Python."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
