"""Pipeline schedules: how long a step takes given each stage's time per micro-batch, and how
many micro-batches of activations a stage holds at its peak."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Literal

__all__ = ["pipeline_time_s", "pipeline_time_bound_s", "bubble_fraction",
           "micro_batches_in_flight", "chunks_in_flight", "most_held", "undominated", "op_order",
           "OpKind"]

OpKind = Literal["forward", "backward"]


def pipeline_time_s(stage_times_s: list[float], micro_batches: int, virtual: int = 1) -> float:
    """Step time of a pipeline whose stage s takes stage_times_s[s] (forward + backward) per
    micro-batch: max(m T_max + (sum_s T_s - T_max) / v, sum_s T_s + (m - 1) T_max / v).

    The first term: the slowest stage sets the pace of the m micro-batches; filling and
    draining the pipe crosses the other stages once, v times faster with v interleaved
    chunks per stage. With equal stages this is (m + (p - 1) / v) T: GPipe and 1F1B (Huang
    et al. 2019; Narayanan et al. 2021, sec. 2.2.1), interleaved 1F1B (Narayanan et al. 2021,
    sec. 2.2.2, which takes m >= p). The second: one micro-batch crosses every chunk of every
    stage in turn, and the others follow a chunk of the slowest stage apart; it is the larger
    when m < p with v > 1 (equal to the first when v = 1), and both match the op-by-op
    simulation (schedule.simulate_schedule; tests/cost_model/test_schedule.py).
    """
    slowest, total = max(stage_times_s), sum(stage_times_s)
    return max(micro_batches * slowest + (total - slowest) / virtual,
               total + (micro_batches - 1) * slowest / virtual)


def pipeline_time_bound_s(slowest_s: float, total_s: float, micro_batches: int, pp: int,
                          virtual: int = 1) -> float:
    """No pipeline whose slowest stage takes at least `slowest_s` per micro-batch and whose
    stages take at least `total_s` together is faster: both terms of pipeline_time_s rise
    in T_max and in the sum (m >= 1 >= 1/v), and T_max is at least the mean, total_s / pp:
    stages of that slowest one and the rest shared equally (none slower) reach the bound."""
    slowest = max(slowest_s, total_s / pp)
    rest = max(total_s - slowest, 0.0) / (pp - 1) if pp > 1 else 0.0
    return pipeline_time_s([slowest, *[rest] * (pp - 1)], micro_batches, virtual)


def bubble_fraction(pp: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle share of a balanced pipeline's step (pipeline_time_s with equal stages):
    ((p - 1) / v) / (m + (p - 1) / v) when m >= p."""
    step = pipeline_time_s([1.0] * pp, micro_batches, virtual)
    return (step - micro_batches) / step


def micro_batches_in_flight(schedule: str, pp: int, stage: int, micro_batches: int,
                            virtual: int = 1) -> float:
    """Micro-batches whose activations stage `stage` (0-based) holds at its peak, counted in
    whole passes through all of the stage's chunks.

    GPipe runs every forward before any backward: all m. 1F1B keeps at most p - s
    (Narayanan et al. 2021, sec. 2.2.1). Interleaved 1F1B as torch runs it: W = (v - 1) r +
    2 (p - 1 - s) chunk forwards of warm-up (r micro-batches per round: p when m is a
    multiple of p), then one more before each backward, so W + 1 chunk passes, (W + 1) / v
    stage passes (torch.distributed.pipelining.schedules._get_warmup_ops); on the first
    stage that is Korthikanti et al. 2022's p (1 + (p - 1) / (p v)) (sec. 4.2.3), on the
    last (v - 1) r / v + 1 / v: measured with `autoplan run --dry-run` on the demo's
    llama3-70b plan (pp 2, v 9), whose last stage holds 1.9 passes, not p - s = 1.
    """
    if schedule == "gpipe":
        return float(micro_batches)
    if schedule != "interleaved_1f1b" or virtual == 1:
        return float(min(micro_batches, pp - stage))
    per_round = micro_batches // max(1, micro_batches // pp)
    warmup = min((virtual - 1) * per_round + 2 * (pp - 1 - stage), micro_batches * virtual)
    return min(float(micro_batches), (warmup + 1) / virtual)


@cache
def chunks_in_flight(schedule: str, pp: int, stage: int, micro_batches: int,
                     virtual: int = 1) -> tuple[tuple[int, ...], ...]:
    """The micro-batches stage `stage` holds in each of its chunks (local order) at the
    points where its activations may peak, as vectors: the counts after each forward of its
    op order that a backward follows (op_order; a backward only frees, a forward only adds),
    but those another holds at least as many of in every chunk, or a blend of the two
    beside it (with bytes per chunk >= 0, the most bytes held is at one of the rest).
    Chunks are not held alike: torch's interleaved 1F1B holds (4, 4, 4, 4, 3, 0, 0, 0, 0)
    at one point on rank 0 of pp 2, v 9, 16 micro-batches (sum 19 = micro_batches_in_flight
    x v), so a chunk with the embedding or the logits weighs by its own counts. One vector
    (micro_batches_in_flight,) without interleaving."""
    if schedule != "interleaved_1f1b" or virtual == 1:
        return ((round(micro_batches_in_flight(schedule, pp, stage, micro_batches)),),)
    if micro_batches % pp == 0 and micro_batches > 2 * pp:
        # rounds of pp micro-batches after a warm-up that does not depend on their number:
        # the points of 2 pp recur, no others (tests/cost_model/test_schedule.py walks all)
        return chunks_in_flight(schedule, pp, stage, 2 * pp, virtual)
    held, points = [0] * virtual, {}  # dict: the points in the order first reached
    ops = op_order(schedule, pp, stage, micro_batches, virtual)
    for at, (kind, chunk, _) in enumerate(ops):
        held[chunk] += 1 if kind == "forward" else -1
        if kind == "forward" and (at + 1 == len(ops) or ops[at + 1][0] == "backward"):
            points.setdefault(tuple(held))  # a forward's next holds more
    kept = undominated(points)  # in the order first reached
    # the schedule moves between its points along straight lines: drop a point on the one
    # between its neighbours (a blend of the two covers it), looking back after each drop
    line: list[tuple[int, ...]] = []
    for point in kept:
        line.append(point)
        while len(line) >= 3 and _blend_covers(line[-3], line[-1], line[-2]):
            del line[-2]
    return tuple(line)


def undominated(points: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The distinct `points` (micro-batches held per chunk) no other holds at least as many
    of in every chunk, in the order given: a beater holds more in sum, so only those that
    do are checked."""
    points = list(dict.fromkeys(points))
    kept: list[tuple[int, ...]] = []
    larger = 0  # kept[:larger] hold more in sum than the point checked: only they can beat it
    for p in sorted(points, key=sum, reverse=True):
        while larger < len(kept) and sum(kept[larger]) > sum(p):
            larger += 1
        if not any(all(map(operator.ge, q, p)) for q in kept[:larger]):
            kept.append(p)
    beaten = set(points) - set(kept)
    return [p for p in points if p not in beaten]


def most_held(in_flight: Sequence[tuple[int, ...]],
              per_chunk: Sequence[float]) -> tuple[int, ...]:
    """The vector of `in_flight` (chunks_in_flight) at which a stage holds the most, each
    micro-batch in chunk c weighing per_chunk[c] bytes."""
    if len(in_flight) == 1:
        return in_flight[0]
    return max(in_flight, key=lambda held: sum(map(operator.mul, held, per_chunk)))


def _blend_covers(a: tuple[int, ...], b: tuple[int, ...], point: tuple[int, ...]) -> bool:
    """Whether t a + (1 - t) b >= point in every component for some t in [0, 1]: t at
    least low and at most high, fractions (numerator, denominator > 0) compared crosswise."""
    low, high = (0, 1), (1, 1)
    for x, y, p in zip(a, b, point, strict=True):
        if x == y:
            if y < p:
                return False
        elif x > y and (p - y) * low[1] > low[0] * (x - y):
            low = (p - y, x - y)
        elif x < y and (y - p) * high[1] < high[0] * (y - x):
            high = (y - p, y - x)
    return low[0] * high[1] <= high[0] * low[1]


def op_order(schedule: str, pp: int, rank: int, micro_batches: int,
             virtual: int = 1) -> list[tuple[OpKind, int, int]]:
    """The ops rank `rank` runs, in order, as (kind, local chunk, micro-batch).

    Raises:
        ValueError: on an unknown schedule or virtual > 1 without interleaving.
    """
    m = micro_batches
    if virtual > 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"virtual stages {virtual} need schedule interleaved_1f1b, "
                         f"not {schedule}")
    match schedule:
        case "gpipe":
            return ([("forward", 0, i) for i in range(m)]
                    + [("backward", 0, i) for i in range(m)])
        case "1f1b":
            forwards = [(0, i) for i in range(m)]
            return _one_forward_one_backward(forwards, forwards, min(pp - rank - 1, m))
        case "interleaved_1f1b":
            group = -(-m // max(1, m // pp))  # micro-batches per round, as torch's
            forwards = _interleaved_sequence(group, m, range(virtual))
            backwards = _interleaved_sequence(group, m, range(virtual - 1, -1, -1))
            warmup = min(2 * (pp - rank - 1) + (virtual - 1) * group, m * virtual)
            return _one_forward_one_backward(forwards, backwards, warmup)
        case _:
            raise ValueError(f"schedule '{schedule}' is not one of gpipe, 1f1b, "
                             "interleaved_1f1b")


def _interleaved_sequence(size: int, m: int, chunks: range) -> list[tuple[int, int]]:
    """(local chunk, micro-batch): groups of `size` micro-batches pass through each chunk."""
    order = []
    for first in range(0, m, size):
        group = range(first, min(first + size, m))
        order += [(chunk, i) for chunk in chunks for i in group]
    return order


def _one_forward_one_backward(forwards: list[tuple[int, int]], backwards: list[tuple[int, int]],
                              warmup: int) -> list[tuple[OpKind, int, int]]:
    """`warmup` forwards, then a forward and a backward in turn, then the backwards left."""
    order: list[tuple[OpKind, int, int]] = [("forward", *f) for f in forwards[:warmup]]
    for k, backward in enumerate(backwards):
        if warmup + k < len(forwards):
            order.append(("forward", *forwards[warmup + k]))
        order.append(("backward", *backward))
    return order
