"""The stage problem by dynamic programming over the layer chain, exactly: no memory buckets.

State after layer i: the layout of its run and a Pareto front of (memory, time) pairs, each
the cheapest time known for that much memory or less (memory at each of the stage's peaks:
a point beats another with no more at any peak). A layer extends every point by each
option of the run's layout (or, at a run's first layer, of any layout, paying the edge);
dominated points and points over budget are dropped. The answer is the front's fastest point.
Exact because the objective and the memory are sums and both only grow (Galvatron's DP, but
with the front in place of its coarse memory buckets).
"""

from __future__ import annotations

import math
import operator

from autoplan.search.problem import INFEASIBLE, Layout, StageProblem, StageSolution

__all__ = ["solve_dp"]

# A point: (memory at each peak, time, picks so far as a tuple of option indices per layer).
_Point = tuple[tuple[float, ...], float, tuple[int, ...]]


def solve_dp(problem: StageProblem) -> StageSolution:
    fronts: dict[Layout, list[_Point]] = {}
    for r, run in enumerate(problem.runs):
        for i in range(run.count):
            fronts = _extend(problem, r, i == 0, fronts)
    points = [p for front in fronts.values() for p in front]
    if not points:
        return StageSolution(float("inf"), status=INFEASIBLE)
    memory, time, flat = min(points, key=lambda p: (p[1], p[0], p[2]))
    picks, at = [], 0
    for run in problem.runs:
        picks.append(flat[at:at + run.count])
        at += run.count
    return StageSolution(time, tuple(picks), memory=max(memory))


def _extend(problem: StageProblem, r: int, first: bool,
            fronts: dict[Layout, list[_Point]]) -> dict[Layout, list[_Point]]:
    run = problem.runs[r]
    grown: dict[Layout, list[_Point]] = {}
    starts_at: dict[Layout, list[_Point]] = {}
    for option in run.options:
        if not first:
            starts = fronts.get(option.layout, [])
        elif option.layout in starts_at:
            starts = starts_at[option.layout]
        else:  # the points of every layout before, with the edge to this one: one front
            starts = starts_at[option.layout] = _pareto(
                [(m, t + edge, picks) for layout, edge in _sources(problem, r, fronts,
                                                                   option.layout)
                 for m, t, picks in fronts[layout]]) if r else \
                [((0.0,) * len(option.memory), 0.0, ())]
        for m, t, picks in starts:
            memory = tuple(map(operator.add, m, option.memory))
            if max(memory) <= problem.budget:
                grown.setdefault(option.layout, []).append(
                    (memory, t + option.time, (*picks, option.index)))
    return {layout: _pareto(points) for layout, points in grown.items()}


def _sources(problem: StageProblem, r: int, fronts: dict[Layout, list[_Point]],
             layout: Layout) -> list[tuple[Layout, float]]:
    """The layouts run r - 1 may end on before run r starts on `layout`, with the edge."""
    edges = [(before, problem.edge(r - 1, before, layout)) for before in fronts]
    return [(before, edge) for before, edge in edges if edge != math.inf]


def _pareto(points: list[_Point]) -> list[_Point]:
    """The points no other beats on both memory and time (ties: the smaller picks tuple,
    so the answer does not depend on the order points arrive in). With several peaks, a
    point is beaten by one no slower and with no more memory at any peak, which comes
    before it by time."""
    front: list[_Point] = []
    if points and len(points[0][0]) > 1:
        for point in sorted(points, key=lambda p: (p[1], p[0], p[2])):
            if not any(all(map(operator.le, q[0], point[0])) for q in front):
                front.append(point)
        return front
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    return front
