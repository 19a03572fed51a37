"""Lower bounds that let the search skip a setting without solving it, and only when no plan
in it can beat the best found.

A stage's layers each pick one option of (memory, time); the stage must fit its memory. The
least total time is at least that of the linear relaxation, where a layer may take a blend
of two options: the relaxation of a multiple-choice knapsack, solved greedily (Sinha and
Zoltners 1979): every layer starts at its least-memory option and buys time along the lower
convex hull of its options, steepest saving per byte first, until the memory runs out.
"""

from __future__ import annotations

import math

__all__ = ["Item", "knapsack_floor"]

Item = tuple[int, list[tuple[float, float]]]
"""`count` equal layers and the (memory, time) of each option one of them may take."""


def knapsack_floor(items: list[Item], budget: float) -> float:
    """No choice of one option per layer with total memory <= budget takes less total time;
    inf when even the least memory of every layer exceeds the budget."""
    time = memory = 0.0
    steps: list[tuple[float, float, int]] = []  # (time saved per byte, bytes, layers)
    for count, options in items:
        if count == 0:
            continue
        if not options:
            return math.inf
        hull = _lower_hull(options)
        memory += count * hull[0][0]
        time += count * hull[0][1]
        for (m0, t0), (m1, t1) in zip(hull, hull[1:], strict=False):
            steps.append(((t0 - t1) / (m1 - m0), m1 - m0, count))
    if memory > budget:
        return math.inf
    left = budget - memory
    for saving, nbytes, count in sorted(steps, key=lambda s: -s[0]):
        take = min(count * nbytes, left)
        time -= saving * take
        left -= take
        if left <= 0:
            break
    return time


def _lower_hull(options: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The options on the lower-left convex hull, by rising memory and falling time: the
    only ones a relaxed optimum blends (savings per byte fall along it)."""
    front: list[tuple[float, float]] = []
    for memory, time in sorted(options):
        if front and time >= front[-1][1]:
            continue  # no faster than a cheaper option
        while len(front) >= 2 and _not_convex(front[-2], front[-1], (memory, time)):
            front.pop()
        front.append((memory, time))
    return front


def _not_convex(a: tuple[float, float], b: tuple[float, float],
                c: tuple[float, float]) -> bool:
    """Whether b lies on or above the segment from a to c (then blends of a and c beat it)."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])
