"""Pipeline schedules: how long a step takes given each stage's time per micro-batch, and how
many micro-batches of activations a stage holds at its peak."""

from __future__ import annotations

__all__ = ["pipeline_time_s", "pipeline_time_bound_s", "bubble_fraction",
           "micro_batches_in_flight"]


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
