"""The stage problem as an integer linear program: HiGHS through highspy, given the program
exactly as pulp.HiGHS would build it (without pulp's objects, which cost more than most
solves); CBC through pulp when HiGHS is missing.

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
from dataclasses import dataclass, field
from typing import Any

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
    if solver not in ILP_SOLVERS:
        raise AutoplanError(f"unknown ILP solver '{solver}'; choose from {', '.join(ILP_SOLVERS)}")
    program = _program(problem)
    if solver == "highs" and _highs_available():
        status, gap, values = _solve_highs(program, time_limit_s)
    else:
        status, gap, values = _solve_cbc(program, time_limit_s)
    if status == INFEASIBLE:
        return StageSolution(float("inf"), status=INFEASIBLE)
    picks = []
    for r, run in enumerate(problem.runs):
        counts = [(o.index, round(values[f"n_{r}_{k}"] or 0)) for k, o in enumerate(run.options)]
        picks.append(tuple(index for index, count in counts for _ in range(count)))
    memory = max((sum(o.memory[peak] * round(values[f"n_{r}_{k}"] or 0)
                      for r, run in enumerate(problem.runs) for k, o in enumerate(run.options))
                  for peak in range(problem.peaks)), default=0.0)
    objective = 0.0  # as pulp.value(objective) adds it up, term by term
    for name, coefficient in program.objective.items():
        objective += values[name] * coefficient
    return StageSolution(objective or 0.0, tuple(picks), status, gap, memory)


@dataclass
class _Program:
    """The program as pulp hands it to a solver, without pulp's expression objects (the
    search builds tens of them): columns by name, objective terms and rows in the order
    the expressions below would have made them, with their arithmetic."""

    columns: dict[str, tuple[float, float | None, bool]] = field(default_factory=dict)
    """name -> (lower bound, upper bound or None, integer)."""
    objective: dict[str, float] = field(default_factory=dict)
    rows: list[tuple[list[tuple[str, float]], float | None, float | None]] = field(
        default_factory=list)
    """(terms, lower bound or None, upper bound or None)."""

    def column(self, name: str, upper: float | None, integer: bool) -> str:
        self.columns[name] = (0, upper, integer)
        return name


def _program(problem: StageProblem) -> _Program:
    """Per run: sum z[r, L] == 1, sum n[r, o] == count, n[r, o] <= count z[r, L(o)]; per
    edge cost: z[r, L] + z[r + 1, L'] <= 1 (a change the executor refuses) or y >= z[r, L]
    + z[r + 1, L'] - 1 in the objective; the memory budget in GiB at each peak."""
    lp = _Program()
    z = {(r, layout): lp.column(f"z_{r}_{layout[0]}_{layout[1]}", 1, True)
         for r, run in enumerate(problem.runs) for layout in run.layouts()}
    n = {(r, k): lp.column(f"n_{r}_{k}", run.count, True)
         for r, run in enumerate(problem.runs) for k in range(len(run.options))}
    for r, run in enumerate(problem.runs):  # pulp leaves zero terms out of a product
        lp.objective.update((n[r, k], o.time) for k, o in enumerate(run.options) if o.time)
    for r, run in enumerate(problem.runs):
        lp.rows.append(([(z[r, layout], 1) for layout in run.layouts()], 1, 1))
        lp.rows.append(([(n[r, k], 1) for k in range(len(run.options))], run.count, run.count))
        for k, o in enumerate(run.options):
            lp.rows.append(([(n[r, k], 1), (z[r, o.layout], -run.count)], None, 0))
        if r + 1 < len(problem.runs):
            for (before, after), cost in sorted(problem.edges[r].items()):
                if cost == math.inf and (r, before) in z and (r + 1, after) in z:
                    lp.rows.append(([(z[r, before], 1), (z[r + 1, after], 1)], None, 1))
                elif cost > 0 and (r, before) in z and (r + 1, after) in z:
                    y = lp.column(f"y_{r}_{before[0]}_{before[1]}_{after[0]}_{after[1]}", None,
                                  False)
                    lp.rows.append(([(y, 1), (z[r, before], -1), (z[r + 1, after], -1)], -1,
                                    None))
                    lp.objective[y] = cost
    for peak in range(problem.peaks):
        memory = [(n[r, k], o.memory[peak] / _GIB) for r, run in enumerate(problem.runs)
                  for k, o in enumerate(run.options) if o.memory[peak] / _GIB]
        lp.rows.append((memory, None, problem.budget / _GIB))
    if not lp.objective:  # pulp's stand-in for an objective without variables
        lp.objective[lp.column("__dummy", 0, False)] = 1
    return lp


def _solve_highs(lp: _Program, time_limit_s: float) -> tuple[str, float, dict[str, float]]:
    """HiGHS given the program as pulp.HiGHS builds it (columns sorted by name, rows in
    order, zero coefficients left out), read by its own status: its model status and MIP
    gap decide (pulp's LpStatus can say Optimal after a timeout)."""
    import highspy

    names = sorted(lp.columns)
    with _quiet_stdout():  # highspy prints its banner on stdout, into --json output
        model = highspy.Highs()
        for option, value in {"output_flag": False, "mip_rel_gap": 0.0, "mip_abs_gap": 1e-9,
                              "threads": 1, "time_limit": float(time_limit_s),
                              **_HIGHS_TOLERANCES}.items():
            model.setOptionValue(option, value)
        model.passModel(_highs_lp(lp, names))
        model.run()
    values = dict(zip(names, list(model.getSolution().col_value), strict=True))
    status = model.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return "optimal", 0.0, values
    if status == highspy.HighsModelStatus.kInfeasible:
        return INFEASIBLE, 0.0, values
    if status == highspy.HighsModelStatus.kTimeLimit and model.getInfo(
            ).primal_solution_status == 2:  # a feasible point: report how far from proven
        return "time_limit", float(model.getInfo().mip_gap), values
    why = model.modelStatusToString(status)
    raise AutoplanError(f"HiGHS ended without a plan: {why}")


def _highs_lp(lp: _Program, names: list[str]) -> Any:
    """The program as one highspy.HighsLp, columns in `names`' order: the very model that
    adding its columns and then its rows one by one builds (rows kept row-wise, each row's
    terms in order, zero coefficients left out), so HiGHS solves it alike; passed at once,
    it skips thousands of calls into highspy."""
    import highspy

    inf = highspy.kHighsInf
    index = {name: i for i, name in enumerate(names)}
    out = highspy.HighsLp()
    out.num_col_, out.num_row_ = len(names), len(lp.rows)
    columns = [lp.columns[name] for name in names]
    out.col_cost_ = [lp.objective.get(name, 0.0) for name in names]
    out.col_lower_ = [lower for lower, _, _ in columns]
    out.col_upper_ = [inf if upper is None else upper for _, upper, _ in columns]
    out.integrality_ = [highspy.HighsVarType.kInteger if integer
                        else highspy.HighsVarType.kContinuous for _, _, integer in columns]
    out.row_lower_ = [-inf if lower is None else lower for _, lower, _ in lp.rows]
    out.row_upper_ = [inf if upper is None else upper for _, _, upper in lp.rows]
    starts, indices, values = [0], [], []
    for terms, _, _ in lp.rows:
        for name, c in terms:
            if c != 0:
                indices.append(index[name])
                values.append(c)
        starts.append(len(indices))
    out.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    out.a_matrix_.num_col_, out.a_matrix_.num_row_ = len(names), len(lp.rows)
    out.a_matrix_.start_, out.a_matrix_.index_, out.a_matrix_.value_ = starts, indices, values
    return out


def _highs_available() -> bool:
    """Whether highspy imports (what pulp.HiGHS().available() asks, without importing pulp,
    which costs a tenth of a second that a HiGHS search never needs)."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _solve_cbc(lp: _Program, time_limit_s: float) -> tuple[str, float, dict[str, float]]:
    """CBC through pulp, read by its solution status."""
    import pulp

    problem = pulp.LpProblem("stage", pulp.LpMinimize)
    columns = {name: problem.add_variable(name, lower, upper,
                                          cat="Integer" if integer else "Continuous")
               for name, (lower, upper, integer) in lp.columns.items()}
    problem += pulp.LpAffineExpression([(columns[name], c) for name, c in lp.objective.items()])
    for terms, lower, upper in lp.rows:
        expression = pulp.LpAffineExpression([(columns[name], c) for name, c in terms])
        if lower is not None:
            problem += pulp.LpConstraint(expression, pulp.LpConstraintEQ if upper is not None
                                         else pulp.LpConstraintGE, rhs=lower)
        else:
            problem += pulp.LpConstraint(expression, pulp.LpConstraintLE, rhs=upper)
    problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))
    values = {name: column.value() for name, column in columns.items()}
    if problem.sol_status == pulp.LpSolutionOptimal:
        return "optimal", 0.0, values
    if problem.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit", float("nan"), values  # CBC through pulp does not report its gap
    if problem.sol_status in (pulp.LpSolutionInfeasible, pulp.LpSolutionNoSolutionFound):
        return INFEASIBLE, 0.0, values
    raise AutoplanError(f"CBC ended without a plan: {pulp.LpStatus[problem.status]}")


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
