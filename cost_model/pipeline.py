"""Pipeline schedules: how long a step takes given each stage's time per micro-batch, and how
many micro-batches of activations a stage holds at its peak."""

from __future__ import annotations

__all__ = ["pipeline_time_s", "bubble_fraction", "micro_batches_in_flight"]


def pipeline_time_s(stage_times_s: list[float], micro_batches: int, virtual: int = 1) -> float:
    """Step time of a pipeline whose stage s takes stage_times_s[s] (forward + backward) per
    micro-batch: m T_max + (sum_s T_s - T_max) / v.

    The slowest stage sets the pace of the m micro-batches; filling and draining the pipe
    crosses the other stages once, v times faster with v interleaved chunks per stage. With
    equal stages this is (m + (p - 1) / v) T: GPipe and 1F1B (Huang et al. 2019; Narayanan
    et al. 2021, sec. 2.2.1), interleaved 1F1B (Narayanan et al. 2021, sec. 2.2.2).
    """
    slowest = max(stage_times_s)
    return micro_batches * slowest + (sum(stage_times_s) - slowest) / virtual


def bubble_fraction(pp: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle share of a balanced pipeline's step: ((p - 1) / v) / (m + (p - 1) / v)."""
    idle = (pp - 1) / virtual
    return idle / (micro_batches + idle)


def micro_batches_in_flight(schedule: str, pp: int, stage: int, micro_batches: int,
                            virtual: int = 1) -> float:
    """Micro-batches whose activations stage `stage` (0-based) holds at its peak.

    GPipe runs every forward before any backward: all m. 1F1B keeps at most p - s
    (Narayanan et al. 2021, sec. 2.2.1). Interleaving multiplies that by 1 + (p - 1) / (p v)
    (Korthikanti et al. 2022, sec. 4.2.3, for the first stage; we apply it to each).
    """
    if schedule == "gpipe":
        return float(micro_batches)
    held = float(min(micro_batches, pp - stage))
    if schedule == "interleaved_1f1b":
        held *= 1 + (pp - 1) / (pp * virtual)
    return held
