"""Collective measurement: real gloo ranks, nccl-tests bus factors, alpha-beta fits, faults."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from autoplan.errors import AutoplanError, WorkerFailed
from autoplan.launch import _describe_exit
from autoplan.profile import (
    COLLECTIVES,
    CommPoint,
    bus_factor,
)
from autoplan.profiler.comm import (
    FAULT_ENV,
    _measure_local,
    _plan_groups,
    _Request,
    measure_collectives,
    repeats_for,
    sweep_repeats,
)
from tests.processes import TAG_ENV, processes_with

pytestmark = pytest.mark.usefixtures("time_limited")  # each test ends at its limit



def _processes_with(tag: str) -> list[int]:
    return processes_with(TAG_ENV, tag)


def _check_points(points: list[CommPoint], expected: set[tuple[str, int, str]],
                  sizes: int) -> None:
    """Every (collective, group size, scope) present once per size, with consistent figures."""
    seen = [(p.collective, p.group_size, p.scope) for p in points]
    assert set(seen) == expected
    assert all(seen.count(key) == sizes for key in expected)
    for p in points:
        assert p.time_s > 0 and p.spread_s >= 0
        assert p.algbw == pytest.approx(p.nbytes / p.time_s, rel=1e-12)
        assert p.busbw == pytest.approx(p.algbw * bus_factor(p.collective, p.group_size),
                                        rel=1e-12)


# ---- pure logic ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_bus_factors_follow_nccl_tests(n: int) -> None:
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for collective in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bus_factor(collective, n) == pytest.approx((n - 1) / n)
    assert bus_factor("send_recv", n) == 1.0
    assert bus_factor("all_reduce", 2) == 1.0 and bus_factor("all_gather", 4) == 0.75


def test_unknown_collective_and_bad_arguments_are_errors() -> None:
    with pytest.raises(AutoplanError, match="unknown collective 'broadcast'; choose from"):
        bus_factor("broadcast", 2)
    with pytest.raises(AutoplanError, match="unknown collective 'gather'"):
        measure_collectives(2, [1024], collectives=["all_reduce", "gather"])
    with pytest.raises(AutoplanError, match="nproc 1 must be >= 2"):
        measure_collectives(1, [1024])
    with pytest.raises(AutoplanError, match="sizes"):
        measure_collectives(2, [])


# The alpha-beta fit and CommFit are tested in test_comm_fit.py (no processes).


@pytest.mark.parametrize(("repeats", "nbytes", "expected"), [
    (21, 64 * 2**20, [7, 7, 7]), (5, 64 * 2**20, [2, 2, 1]), (2, 32 * 2**20, [1, 1]),
    (1, 16 * 2**20, [1]), (1, 8 * 2**20, [1, 1]), (21, 1024, [70, 70, 70]),
    (2, 2**20, [7, 7, 6])])
def test_sweeps_share_every_repeat_evenly(repeats: int, nbytes: int, expected: list[int]) -> None:
    shares = sweep_repeats(repeats, nbytes)
    assert shares == expected and sum(shares) == repeats_for(repeats, nbytes)


def test_groups_split_intra_and_inter_node() -> None:
    one_node = _plan_groups([0, 0, 0, 0])  # no group of 3: no degree of 4 ranks is 3
    assert [(g.ranks, g.scope) for g in one_node] == [((0, 1), "intra"), ((0, 1, 2, 3), "intra")]
    assert [len(g.ranks) for g in _plan_groups([0] * 6)] == [2, 3, 6]
    assert [len(g.ranks) for g in _plan_groups([0] * 3)] == [2, 3]  # the pair sends
    two_nodes = _plan_groups([0, 0, 1, 1])
    assert [(g.ranks, g.scope) for g in two_nodes] == [
        ((0, 1), "intra"), ((0, 2), "inter"), ((0, 1, 2, 3), "inter")]
    one_rank_per_node = _plan_groups([0, 1, 2])
    assert [(g.ranks, g.scope) for g in one_rank_per_node] == [
        ((0, 1), "inter"), ((0, 1, 2), "inter")]


def test_exit_descriptions_name_signals() -> None:
    assert _describe_exit(3) == "exited with code 3"
    assert _describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


# ---- real gloo ranks ----------------------------------------------------------------------

def test_two_ranks_measure_every_collective(tag: str) -> None:
    lines: list[str] = []
    sizes = [1024, 65536]
    points = measure_collectives(2, sizes, repeats=2, warmup=1, timeout_s=60,
                                 on_progress=lines.append)
    _check_points(points, {(c, 2, "intra") for c in COLLECTIVES}, len(sizes))
    assert sorted({p.nbytes for p in points}) == sizes  # divisible by 4n: no rounding
    assert len(lines) == len(COLLECTIVES) and "busbw up to" in lines[0]
    assert _processes_with(tag) == []


def test_three_ranks_measure_the_pair_and_the_whole(tag: str) -> None:
    points = measure_collectives(3, [4096], repeats=1, warmup=0, timeout_s=60)
    expected = {(c, n, "intra") for c in COLLECTIVES if c != "send_recv" for n in (2, 3)}
    _check_points(points, expected | {("send_recv", 2, "intra")}, 1)
    by_key = {(p.collective, p.group_size): p.nbytes for p in points}
    assert by_key[("all_gather", 3)] == 341 * 3 * 4  # rounded down to whole float32 per rank
    assert by_key[("all_reduce", 3)] == 4096
    assert _processes_with(tag) == []


def test_two_fake_nodes_give_inter_node_groups(tag: str) -> None:
    request = _Request([4096], ["all_reduce", "send_recv"], repeats=1, warmup=0, timeout_s=60)
    points = _measure_local(4, request, None, ranks_per_node=2)
    _check_points(points, {("all_reduce", 2, "intra"), ("send_recv", 2, "intra"),
                           ("all_reduce", 2, "inter"), ("send_recv", 2, "inter"),
                           ("all_reduce", 4, "inter")}, 1)
    assert _processes_with(tag) == []


# ---- faults -------------------------------------------------------------------------------

def test_dead_worker_raises_naming_its_rank(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "exit:1:3")
    start_s = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"comm worker rank 1 exited with code 3"):
        measure_collectives(2, [1024], repeats=1, warmup=0, timeout_s=30)
    assert time.monotonic() - start_s < 30
    assert _processes_with(tag) == []


def test_profile_with_a_killed_worker_exits_naming_its_rank(
        tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 9: `autoplan profile` whose comm worker rank 1 is SIGKILLed (once its worker
    has started) ends with status 1 (a runtime fault, not bad input) within 60 s, names the
    rank and the signal, and leaves no process behind."""
    from autoplan.app.cli import main

    monkeypatch.setenv(FAULT_ENV, "kill:1")
    start_s = time.monotonic()
    status = main(["profile", "--model", "gpt-tiny", "--nproc", "2", "--comm-sizes", "1024",
                   "--micro-batches", "1", "--tp", "1", "--repeats", "1", "--warmup", "0",
                   "-o", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and time.monotonic() - start_s < 60
    assert len(err) == 1 and "comm worker rank 1 was killed by SIGKILL" in err[0], err
    assert not (tmp_path / "profile.json").exists()
    assert _processes_with(tag) == []


def test_hung_worker_is_killed_at_the_limit(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang:1")
    start_s = time.monotonic()
    expected = r"made no progress for 5 s \(the limit\); ranks still running: 0, 1"
    with pytest.raises(WorkerFailed, match=expected):
        measure_collectives(2, [1024], repeats=1, warmup=0, timeout_s=5)
    assert 5 <= time.monotonic() - start_s < 10
    assert _processes_with(tag) == []


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_ends_every_worker(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang:1")
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            measure_collectives(2, [1024], repeats=1, warmup=0, timeout_s=30)
    finally:
        timer.cancel()
    assert _processes_with(tag) == []
