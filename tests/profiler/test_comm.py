"""Collective measurement: real gloo ranks, nccl-tests bus factors, alpha-beta fits, faults."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from autoplan.errors import AutoplanError
from autoplan.profiler.comm import (
    FAULT_ENV,
    _measure_local,
    _plan_groups,
    _Request,
    fit_alpha_beta,
    measure_collectives,
)
from autoplan.profiler.launch import _describe_exit
from autoplan.profiler.profile import (
    COLLECTIVES,
    PROFILE_FORMAT_VERSION,
    CommFit,
    CommPoint,
    bus_factor,
    load_profile,
)
from tests.processes import processes_with

TEST_LIMIT_S = 90  # no test here may run longer; SIGALRM ends it (pytest-timeout is not used)
TAG_ENV = "AUTOPLAN_COMM_TEST_TAG"  # inherited by workers, so leftovers can be found


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail any test that runs past TEST_LIMIT_S instead of hanging the suite."""
    def _expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran past {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def tag(monkeypatch: pytest.MonkeyPatch) -> str:
    """A unique value in the environment of every worker this test starts."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, value)
    return value


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


def _synthetic(collective: str, n: int, alpha_s: float, bandwidth: float) -> list[CommPoint]:
    points = []
    for nbytes in [1024 * 4**i for i in range(9)]:
        time_s = alpha_s + nbytes / bandwidth
        algbw = nbytes / time_s
        points.append(CommPoint(collective=collective, group_size=n, nbytes=nbytes,
                                time_s=time_s, algbw=algbw,
                                busbw=algbw * bus_factor(collective, n)))
    return points


def test_fit_recovers_alpha_and_bandwidth_exactly() -> None:
    points = (_synthetic("all_reduce", 4, 250e-6, 1.2e9)
              + _synthetic("all_gather", 2, 0.0, 3.0e9)
              + _synthetic("send_recv", 2, 5e-6, 25e9))
    fits = {(f.collective, f.group_size): f for f in fit_alpha_beta(points)}
    assert set(fits) == {("all_reduce", 4), ("all_gather", 2), ("send_recv", 2)}
    for (collective, n, alpha_s, bandwidth) in [("all_reduce", 4, 250e-6, 1.2e9),
                                                ("all_gather", 2, 0.0, 3.0e9),
                                                ("send_recv", 2, 5e-6, 25e9)]:
        fit = fits[(collective, n)]
        assert fit.alpha_s == pytest.approx(alpha_s, rel=1e-9, abs=1e-15)
        assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-9)
        assert fit.busbw == max(p.busbw for p in points
                                if (p.collective, p.group_size) == (collective, n))


def test_fit_keeps_alpha_non_negative() -> None:
    """Times below a line through the origin would need a negative latency: alpha is 0."""
    sizes = [1024 * 4**i for i in range(6)]
    times = [nbytes / 1e9 * (0.5 if i == 0 else 1.0) for i, nbytes in enumerate(sizes)]
    points = [CommPoint(collective="all_to_all", group_size=2, nbytes=b, time_s=t,
                        algbw=b / t, busbw=b / t / 2) for b, t in zip(sizes, times, strict=True)]
    (fit,) = fit_alpha_beta(points)
    assert fit.alpha_s == 0.0
    assert 0.9e9 < fit.bandwidth < 1.3e9


def _points(collective: str, n: int, sizes: list[int], times: list[float]) -> list[CommPoint]:
    return [CommPoint(collective=collective, group_size=n, nbytes=b, time_s=t, algbw=b / t,
                      busbw=b / t * bus_factor(collective, n))
            for b, t in zip(sizes, times, strict=True)]


def test_two_regime_series_recovers_its_breakpoint() -> None:
    """A bandwidth that halves from 16 MiB up (as gloo's all_gather does when glibc maps its
    temporary fresh): the fit splits there and recovers both lines exactly."""
    sizes = [1024 * 2**i for i in range(17)]  # 1 KiB .. 64 MiB
    knee = 16 * 2**20

    def true_s(nbytes: int) -> float:
        return 500e-6 + nbytes / 1e9 if nbytes < knee else 2e-3 + nbytes / 0.5e9

    (fit,) = fit_alpha_beta(_points("all_gather", 2, sizes, [true_s(b) for b in sizes]))
    assert fit.regimes == 2 and fit.large_from_bytes == knee
    assert fit.alpha_s == pytest.approx(500e-6, rel=1e-6)
    assert fit.bandwidth == pytest.approx(1e9, rel=1e-6)
    assert fit.large_alpha_s == pytest.approx(2e-3, rel=1e-6)
    assert fit.large_bandwidth == pytest.approx(0.5e9, rel=1e-6)
    for nbytes in sizes + [knee - 1, 24 * 2**20]:
        assert fit.time_s(nbytes) == pytest.approx(true_s(nbytes), rel=1e-6)
    (line,) = fit_alpha_beta(_points("all_gather", 2, sizes, [true_s(b) for b in sizes]),
                             max_regimes=1)
    assert line.regimes == 1 and abs(line.time_s(32 * 2**20) / true_s(32 * 2**20) - 1) > 0.1


def test_one_line_series_stays_one_regime() -> None:
    """An exact line, and a line with +-8% alternating noise (which a second line cannot
    follow), keep one regime; so does every series with max_regimes=1."""
    sizes = [1024 * 2**i for i in range(17)]
    exact = [300e-6 + b / 2e9 for b in sizes]
    noisy = [t * (1.08 if i % 2 else 0.92) for i, t in enumerate(exact)]
    for times in (exact, noisy):
        (fit,) = fit_alpha_beta(_points("all_reduce", 2, sizes, times))
        assert fit.regimes == 1 and fit.large_from_bytes is None
        assert fit.large_alpha_s is None and fit.large_bandwidth is None
    (fit,) = fit_alpha_beta(_points("all_reduce", 2, sizes, noisy))
    assert fit.alpha_s == pytest.approx(300e-6, rel=0.1)
    assert fit.bandwidth == pytest.approx(2e9, rel=0.1)
    with pytest.raises(AutoplanError, match="max_regimes 3 must be 1 or 2"):
        fit_alpha_beta(_points("all_reduce", 2, sizes, exact), max_regimes=3)


def test_a_regime_keeps_three_sizes() -> None:
    """A jump at the last two sizes cannot make a regime of its own: one line stays."""
    sizes = [1024 * 4**i for i in range(9)]
    times = [200e-6 + b / 1e9 * (3.0 if i >= 7 else 1.0) for i, b in enumerate(sizes)]
    (fit,) = fit_alpha_beta(_points("reduce_scatter", 2, sizes, times))
    assert fit.large_from_bytes is None or fit.large_from_bytes <= sizes[6]


def test_comm_fit_regime_fields_go_together() -> None:
    base = {"collective": "all_gather", "group_size": 2, "alpha_s": 1e-4, "bandwidth": 1e9,
            "busbw": 5e8}
    with pytest.raises(ValidationError, match="set together"):
        CommFit(**base, large_from_bytes=2**20)
    with pytest.raises(ValidationError, match="not positive"):
        CommFit(**base, large_from_bytes=2**20, large_alpha_s=-1.0, large_bandwidth=1e9)
    fit = CommFit(**base, large_from_bytes=2**20, large_alpha_s=-1e-4, large_bandwidth=0.5e9)
    assert fit.time_s(2**20 - 1) == pytest.approx(1e-4 + (2**20 - 1) / 1e9)
    assert fit.time_s(2**20) == pytest.approx(-1e-4 + 2**20 / 0.5e9)


def test_v1_profile_without_regime_fields_loads(tmp_path: Path) -> None:
    """A version-1 profile.json written before the two-regime fields existed loads as is."""
    old_fit = {"collective": "all_reduce", "group_size": 2, "scope": "intra",
               "alpha_s": 0.0009, "bandwidth": 1e9, "busbw": 9.7e8}
    data = {"version": 1, "mode": "measure", "model": "gpt", "model_hash": "abc",
            "dtype": "float32", "cluster": {"name": "local-cpu"}, "layers": [],
            "comm_points": [], "comm": [old_fit], "content_hash": "0123456789abcdef"}
    (tmp_path / "profile.json").write_text(json.dumps(data))
    assert PROFILE_FORMAT_VERSION == 1
    profile = load_profile(tmp_path)
    fit = profile.comm_fit("all_reduce", 2)
    assert fit.regimes == 1 and fit.large_from_bytes is None
    assert fit.time_s(1e6) == pytest.approx(0.0009 + 1e6 / 1e9)


def test_groups_split_intra_and_inter_node() -> None:
    one_node = _plan_groups([0, 0, 0, 0])
    assert [(g.ranks, g.scope) for g in one_node] == [
        ((0, 1), "intra"), ((0, 1, 2), "intra"), ((0, 1, 2, 3), "intra")]
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


def test_four_ranks_measure_every_group_size(tag: str) -> None:
    points = measure_collectives(4, [4096], repeats=1, warmup=0, timeout_s=60)
    expected = {(c, n, "intra") for c in COLLECTIVES if c != "send_recv" for n in (2, 3, 4)}
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
    with pytest.raises(AutoplanError, match=r"comm worker rank 1 exited with code 3"):
        measure_collectives(2, [1024], repeats=1, warmup=0, timeout_s=30)
    assert time.monotonic() - start_s < 30
    assert _processes_with(tag) == []


def test_profile_with_a_killed_worker_exits_naming_its_rank(
        tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Issue 9: `autoplan profile` whose comm worker rank 1 is SIGKILLed (once its worker
    has started) ends non-zero within 60 s, names the rank and the signal, and leaves no
    process behind."""
    from autoplan.cli import main

    monkeypatch.setenv(FAULT_ENV, "kill:1")
    start_s = time.monotonic()
    status = main(["profile", "--model", "gpt-tiny", "--nproc", "2", "--comm-sizes", "1024",
                   "--micro-batches", "1", "--tp", "1", "--repeats", "1", "--warmup", "0",
                   "-o", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and time.monotonic() - start_s < 60
    assert len(err) == 1 and "comm worker rank 1 was killed by SIGKILL" in err[0], err
    assert not (tmp_path / "profile.json").exists()
    assert _processes_with(tag) == []


def test_hung_worker_is_killed_at_the_limit(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang:1")
    start_s = time.monotonic()
    expected = r"made no progress for 5 s \(the limit\); ranks still running: 0, 1"
    with pytest.raises(AutoplanError, match=expected):
        measure_collectives(2, [1024], repeats=1, warmup=0, timeout_s=5)
    assert 5 <= time.monotonic() - start_s < 10
    assert _processes_with(tag) == []


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
