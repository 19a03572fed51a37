"""The problem one pipeline stage poses, abstracted from models: a chain of runs of identical
layers, each run picking one layout (dp, tp) and, per layer, an option of that layout, with a
cost on the edge between runs whose layouts differ and one memory budget, which the stage's
memory must keep at each of its peaks (an interleaved stage's chunks hold unequal numbers of
micro-batches at different points of its schedule: cost_model chunks_in_flight).

Every solver (ilp.py, dp.py, and brute_force here for tests) answers the same question:
minimise the sum of option times and edge costs subject to the sum of option memory at each
peak <= budget.
Layers that must share a layout (tied weights, possibly on several stages) are solved by
fixing their layout (StageProblem.restricted) for each layout they may take and keeping the
best: brute_force(problem, ties) is that question asked directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Option", "Run", "StageProblem", "StageSolution", "brute_force", "INFEASIBLE"]

Layout = tuple[int, int]
INFEASIBLE = "infeasible"


@dataclass(frozen=True)
class Option:
    """One strategy of a layer: its layout, time and memory (already weighted by the caller:
    seconds per step, bytes at the stage's peak)."""

    index: int
    """Which strategy of the caller's list this is."""
    layout: Layout
    time: float
    memory: tuple[float, ...]
    """Bytes at each of the stage's peaks, one entry per peak, alike in every option of a
    problem (a float is taken as one peak)."""

    def __post_init__(self) -> None:
        if not isinstance(self.memory, tuple):
            object.__setattr__(self, "memory", (float(self.memory),))


@dataclass(frozen=True)
class Run:
    """`count` consecutive identical layers: they share a layout; each picks an option."""

    count: int
    options: tuple[Option, ...]

    def layouts(self) -> list[Layout]:
        return sorted({o.layout for o in self.options})


@dataclass(frozen=True)
class StageProblem:
    runs: tuple[Run, ...]
    edges: tuple[dict[tuple[Layout, Layout], float], ...]
    """edges[r]: cost between run r and run r + 1 by their layouts (missing: 0; infinity:
    the change is forbidden)."""
    budget: float

    @property
    def peaks(self) -> int:
        """How many peaks the stage's memory has (Option.memory: alike in every option)."""
        return next((len(o.memory) for run in self.runs for o in run.options), 1)

    def edge(self, r: int, before: Layout, after: Layout) -> float:
        return self.edges[r].get((before, after), 0.0) if r < len(self.edges) else 0.0

    def restricted(self, layouts: dict[int, Layout]) -> StageProblem:
        """The problem with run r allowed only options of layout layouts[r]: how a layout
        fixed from outside (a tied layer's, shared with a layer of another stage) enters.
        Option indices stay those of this problem."""
        runs = tuple(Run(run.count, tuple(o for o in run.options if o.layout == layouts[r]))
                     if r in layouts else run for r, run in enumerate(self.runs))
        return StageProblem(runs, self.edges, self.budget)


@dataclass(frozen=True)
class StageSolution:
    objective: float
    picks: tuple[tuple[int, ...], ...] = ()
    """Per run, the option index of each of its layers (in order)."""
    status: str = "optimal"
    """optimal | infeasible | time_limit (then gap says how far from proven)."""
    gap: float = 0.0
    memory: float = 0.0
    """Bytes at the solution's largest peak."""
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.status != INFEASIBLE


def _run_choices(run: Run) -> Iterator[tuple[Layout, tuple[Option, ...]]]:
    """Every way a run can be set: a layout and a multiset of its options, one per layer."""
    for layout in run.layouts():
        mine = [o for o in run.options if o.layout == layout]
        for combo in itertools.combinations_with_replacement(mine, run.count):
            yield layout, combo


def brute_force(problem: StageProblem,
                ties: tuple[tuple[int, ...], ...] = ()) -> StageSolution:
    """Try every setting of every run: exact and exponential, for tests of the solvers.
    `ties`: groups of runs that must take one layout (settings that split one are skipped)."""
    best: StageSolution = StageSolution(float("inf"), status=INFEASIBLE)
    for setting in itertools.product(*(list(_run_choices(run)) for run in problem.runs)):
        if any(len({setting[r][0] for r in group}) > 1 for group in ties):
            continue
        memory = max(map(sum, zip(*(o.memory for _, combo in setting for o in combo),
                                  strict=True)), default=0.0)
        if memory > problem.budget:
            continue
        time = sum(o.time for _, combo in setting for o in combo)
        time += sum(problem.edge(r, setting[r][0], setting[r + 1][0])
                    for r in range(len(setting) - 1))
        if time < best.objective:
            best = StageSolution(time, tuple(tuple(o.index for o in combo)
                                             for _, combo in setting), memory=memory)
    return best
