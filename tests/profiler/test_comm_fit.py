"""The piecewise alpha-beta fit (profiler.comm.fit_alpha_beta) and CommFit: pure logic, no
processes. Synthetic series use the sizes `autoplan profile` measures by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from autoplan.app.profile import DEFAULT_COMM_SIZES
from autoplan.errors import AutoplanError
from autoplan.profile import (
    PROFILE_FORMAT_VERSION,
    CommFit,
    CommPoint,
    bus_factor,
    load_profile,
)
from autoplan.profiler.comm import fit_alpha_beta

SIZES = list(DEFAULT_COMM_SIZES)  # every power of 2 from 1 KiB
KIB, MIB = 2**10, 2**20


def _points(collective: str, n: int, sizes: list[int], times: list[float]) -> list[CommPoint]:
    return [CommPoint(collective=collective, group_size=n, nbytes=b, time_s=t, algbw=b / t,
                      busbw=b / t * bus_factor(collective, n))
            for b, t in zip(sizes, times, strict=True)]


def _line(alpha_s: float, bandwidth: float, sizes: list[int] = SIZES) -> list[float]:
    return [alpha_s + b / bandwidth for b in sizes]


def _piecewise_s(nbytes: float) -> float:
    """Three regimes, as gloo shows (comm_fit_notes.md): latency-bound up to 64 KiB, a
    faster path from there, and half the bandwidth from 32 MiB (fresh mmap'd pages)."""
    if nbytes < 64 * KIB:
        return 500e-6 + nbytes / 0.2e9
    if nbytes < 32 * MIB:
        return 300e-6 + nbytes / 1e9
    return 2e-3 + nbytes / 0.5e9


def test_defaults_span_the_knee_with_three_sizes_past_it() -> None:
    """A regime needs 3 sizes: the default sizes reach 128 MiB so that 32, 64 and 128 MiB
    can form one past gloo's knee at 32 MiB."""
    assert SIZES[0] == KIB and SIZES[-1] >= 128 * MIB
    assert all(b == 2 * a for a, b in zip(SIZES, SIZES[1:], strict=False))


def test_one_line_is_recovered_exactly() -> None:
    points = (_points("all_reduce", 4, SIZES, _line(250e-6, 1.2e9))
              + _points("all_gather", 2, SIZES, _line(0.0, 3.0e9))
              + _points("send_recv", 2, SIZES, _line(5e-6, 25e9)))
    fits = {(f.collective, f.group_size): f for f in fit_alpha_beta(points)}
    for (collective, n, alpha_s, bandwidth) in [("all_reduce", 4, 250e-6, 1.2e9),
                                                ("all_gather", 2, 0.0, 3.0e9),
                                                ("send_recv", 2, 5e-6, 25e9)]:
        fit = fits[(collective, n)]
        assert len(fit.regimes) == 1
        assert fit.alpha_s == pytest.approx(alpha_s, rel=1e-9, abs=1e-15)
        assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-9)
        assert fit.busbw == max(p.busbw for p in points
                                if (p.collective, p.group_size) == (collective, n))


def test_piecewise_data_is_recovered_exactly() -> None:
    """Exact three-regime data: the breakpoints, each regime's line and every time."""
    (fit,) = fit_alpha_beta(_points("all_gather", 2, SIZES, [_piecewise_s(b) for b in SIZES]))
    assert [r.from_bytes for r in fit.regimes] == [0, 64 * KIB, 32 * MIB]
    for regime, (alpha_s, bandwidth) in zip(fit.regimes, [(500e-6, 0.2e9), (300e-6, 1e9),
                                                          (2e-3, 0.5e9)], strict=True):
        assert regime.alpha_s == pytest.approx(alpha_s, rel=1e-6)
        assert regime.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    for nbytes in SIZES + [96 * KIB, 24 * MIB, 48 * MIB, 96 * MIB]:
        assert fit.time_s(nbytes) == pytest.approx(_piecewise_s(nbytes), rel=1e-6)
    (line,) = fit_alpha_beta(_points("all_gather", 2, SIZES, [_piecewise_s(b) for b in SIZES]),
                             max_regimes=1)
    assert len(line.regimes) == 1 and abs(line.time_s(48 * MIB) / _piecewise_s(48 * MIB) - 1) > 0.1


def test_max_regimes_caps_the_count() -> None:
    times = [_piecewise_s(b) for b in SIZES]
    for most in (1, 2):
        (fit,) = fit_alpha_beta(_points("all_gather", 2, SIZES, times), max_regimes=most)
        assert len(fit.regimes) <= most
    with pytest.raises(AutoplanError, match="max_regimes 0 must be >= 1"):
        fit_alpha_beta(_points("all_gather", 2, SIZES, times), max_regimes=0)


@pytest.mark.parametrize("sigma", [0.05, 0.15])
def test_noisy_line_stays_one_regime(sigma: float) -> None:
    """A line times lognormal noise (a fresh draw per series, fixed seeds) keeps one regime
    in at least 38 of 40 series: the criterion does not carve regimes out of noise."""
    split = 0
    for seed in range(40):
        noise = np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(SIZES)))
        times = [t * float(f) for t, f in zip(_line(300e-6, 2e9), noise, strict=True)]
        (fit,) = fit_alpha_beta(_points("all_reduce", 2, SIZES, times))
        split += len(fit.regimes) > 1
    assert split <= 2


def test_alternating_noise_stays_one_regime() -> None:
    """+-8% alternating noise, which no line over 3 sizes can follow: one regime, and the
    line's figures within 10%."""
    noisy = [t * (1.08 if i % 2 else 0.92) for i, t in enumerate(_line(300e-6, 2e9))]
    (fit,) = fit_alpha_beta(_points("all_reduce", 2, SIZES, noisy))
    assert len(fit.regimes) == 1
    assert fit.alpha_s == pytest.approx(300e-6, rel=0.1)
    assert fit.bandwidth == pytest.approx(2e9, rel=0.1)


def test_alpha_stays_non_negative() -> None:
    """Times below a line through the origin would need a negative latency: alpha is 0."""
    sizes = [1024 * 4**i for i in range(6)]
    times = [nbytes / 1e9 * (0.5 if i == 0 else 1.0) for i, nbytes in enumerate(sizes)]
    (fit,) = fit_alpha_beta(_points("all_to_all", 2, sizes, times))
    assert fit.alpha_s == 0.0
    assert 0.9e9 < fit.bandwidth < 1.3e9


def test_a_regime_keeps_three_sizes() -> None:
    """A jump at the last two sizes cannot make a regime of its own."""
    times = [200e-6 + b / 1e9 * (3.0 if i >= len(SIZES) - 2 else 1.0)
             for i, b in enumerate(SIZES)]
    (fit,) = fit_alpha_beta(_points("reduce_scatter", 2, SIZES, times))
    assert all(r.from_bytes <= SIZES[-3] for r in fit.regimes)


def test_two_sizes_give_one_line() -> None:
    (fit,) = fit_alpha_beta(_points("all_reduce", 2, [KIB, MIB], _line(1e-4, 1e9, [KIB, MIB])))
    assert len(fit.regimes) == 1 and fit.bandwidth == pytest.approx(1e9, rel=1e-9)


# ---- CommFit -------------------------------------------------------------------------------

BASE = {"collective": "all_gather", "group_size": 2, "busbw": 5e8}


def test_time_s_takes_the_regime_that_starts_at_or_below_the_size() -> None:
    fit = CommFit(**BASE, regimes=[{"from_bytes": 0, "alpha_s": 1e-4, "bandwidth": 1e9},
                                   {"from_bytes": MIB, "alpha_s": -1e-4, "bandwidth": 0.5e9},
                                   {"from_bytes": 4 * MIB, "alpha_s": 0.0, "bandwidth": 0.25e9}])
    assert fit.time_s(MIB - 1) == pytest.approx(1e-4 + (MIB - 1) / 1e9)
    assert fit.time_s(MIB) == pytest.approx(-1e-4 + MIB / 0.5e9)
    assert fit.time_s(4 * MIB) == pytest.approx(4 * MIB / 0.25e9)
    assert (fit.alpha_s, fit.bandwidth) == (1e-4, 1e9)


@pytest.mark.parametrize("regimes, message", [
    ([], "at least 1"),
    ([{"from_bytes": 8, "alpha_s": 1e-4, "bandwidth": 1e9}], "must start at 0 B"),
    ([{"from_bytes": 0, "alpha_s": -1e-4, "bandwidth": 1e9}], "latency >= 0"),
    ([{"from_bytes": 0, "alpha_s": 1e-4, "bandwidth": 1e9},
      {"from_bytes": 0, "alpha_s": 1e-4, "bandwidth": 1e9}], "must rise"),
    ([{"from_bytes": 0, "alpha_s": 1e-4, "bandwidth": 1e9},
      {"from_bytes": MIB, "alpha_s": -1.0, "bandwidth": 1e9}], "not positive"),
])
def test_bad_regimes_are_refused(regimes: list[dict[str, float]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CommFit(**BASE, regimes=regimes)


def test_one_line_form_and_version_1_fields_become_regimes() -> None:
    line = CommFit(**BASE, alpha_s=1e-4, bandwidth=1e9)
    assert [r.model_dump() for r in line.regimes] == [
        {"from_bytes": 0, "alpha_s": 1e-4, "bandwidth": 1e9}]
    two = CommFit(**BASE, alpha_s=1e-4, bandwidth=1e9, large_from_bytes=MIB,
                  large_alpha_s=-1e-4, large_bandwidth=0.5e9)
    assert [r.from_bytes for r in two.regimes] == [0, MIB]
    assert two.time_s(MIB) == pytest.approx(-1e-4 + MIB / 0.5e9)
    with pytest.raises(ValidationError, match="set together"):
        CommFit(**BASE, alpha_s=1e-4, bandwidth=1e9, large_from_bytes=MIB)
    with pytest.raises(ValidationError, match="not positive"):
        CommFit(**BASE, alpha_s=1e-4, bandwidth=1e9, large_from_bytes=MIB,
                large_alpha_s=-1.0, large_bandwidth=1e9)


def _profile_doc(version: int, comm: list[dict[str, object]]) -> dict[str, object]:
    return {"version": version, "mode": "measure", "model": "gpt", "model_hash": "abc",
            "dtype": "float32", "cluster": {"name": "local-cpu"}, "layers": [],
            "comm_points": [], "comm": comm, "content_hash": "0123456789abcdef"}


def test_version_1_profiles_load(tmp_path: Path) -> None:
    """Version-1 files, with one line or the two-regime fields, load as the current
    version and keep their times."""
    old_line = {"collective": "all_reduce", "group_size": 2, "scope": "intra",
                "alpha_s": 0.0009, "bandwidth": 1e9, "busbw": 9.7e8}
    old_two = {"collective": "all_gather", "group_size": 2, "scope": "intra",
               "alpha_s": 0.0004, "bandwidth": 1e9, "busbw": 5e8,
               "large_from_bytes": 16 * MIB, "large_alpha_s": -0.05, "large_bandwidth": 0.25e9}
    (tmp_path / "profile.json").write_text(json.dumps(_profile_doc(1, [old_line, old_two])))
    assert PROFILE_FORMAT_VERSION == 3
    profile = load_profile(tmp_path)
    assert profile.version == PROFILE_FORMAT_VERSION
    line, two = profile.comm_fit("all_reduce", 2), profile.comm_fit("all_gather", 2)
    assert len(line.regimes) == 1 and line.time_s(1e6) == pytest.approx(0.0009 + 1e6 / 1e9)
    assert len(two.regimes) == 2
    assert two.time_s(16 * MIB - 1) == pytest.approx(0.0004 + (16 * MIB - 1) / 1e9)
    assert two.time_s(32 * MIB) == pytest.approx(-0.05 + 32 * MIB / 0.25e9)


def test_version_2_profiles_load_without_data_parallel_points(tmp_path: Path) -> None:
    (fit,) = fit_alpha_beta(_points("all_gather", 2, SIZES, [_piecewise_s(b) for b in SIZES]))
    (tmp_path / "profile.json").write_text(json.dumps(_profile_doc(2, [fit.model_dump()])))
    profile = load_profile(tmp_path)
    assert profile.version == PROFILE_FORMAT_VERSION and profile.comm == [fit]


def test_piecewise_fit_round_trips_through_json(tmp_path: Path) -> None:
    (fit,) = fit_alpha_beta(_points("all_gather", 2, SIZES, [_piecewise_s(b) for b in SIZES]))
    doc = _profile_doc(PROFILE_FORMAT_VERSION, [fit.model_dump()])
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    loaded = load_profile(tmp_path)
    assert loaded.comm == [fit]
    loaded.save(tmp_path / "again.json")
    assert load_profile(tmp_path / "again.json") == loaded
