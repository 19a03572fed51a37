"""How well alpha-beta fits of measured collectives predict message sizes they never saw.

For each local world size (gloo on CPU here), every collective is timed at the fit sizes,
every power of 2 from --min-bytes to --max-bytes (what `autoplan profile` measures by
default), and at held-out sizes 1.5 x 2^k between them, which no fit ever sees. Both kinds
are measured together, interleaved by size, in the profiler's passes over the sizes, so they
share the machine's load. The fits are profiler.comm.fit_alpha_beta's piecewise ones;
error = predicted / measured - 1 per held-out point.

    .venv/bin/python benchmarks/comm_fit.py [--nproc 2 4] [--repeats 21] [-o benchmarks/results]
                                            [--compare EARLIER/comm_fit.csv]

Writes comm_fit.csv (every point: its role, prediction and error, the error of a single line
fitted to the same points and that of a log-log interpolation between them; with --compare,
how far each point moved since the earlier run), comm_fit_fits.csv (every fit: its regimes
and its held-out errors; "small" = held-out sizes <= 1 MiB, "large" = above) and comm_fit.md
(the command, the machine, held-out accuracy by collective and size range, the table of
fits).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from autoplan.profile import CommFit, CommPoint
from autoplan.profiler.comm import (
    SWEEPS,
    fit_alpha_beta,
    measure_collectives,
    repeats_for,
)

TARGET_ERROR = 0.25  # the held-out accuracy this benchmark checks against
KEY = ["nproc", "collective", "group_size", "scope"]


# Held-out sizes by range, for the report: latency-bound, middle, bandwidth-bound, and the
# largest, where gloo's all_gather and reduce_scatter change regime (comm_fit_notes.md).
SIZE_RANGES = [(0, 64 * 2**10, "< 64 KiB"), (64 * 2**10, 2**20, "64 KiB - 1 MiB"),
               (2**20, 16 * 2**20, "1 - 16 MiB"), (16 * 2**20, 2**62, ">= 16 MiB")]


def _sizes(min_bytes: int, max_bytes: int) -> tuple[list[int], list[int]]:
    """(fit sizes, held-out sizes): the powers of 2 times min_bytes up to max_bytes, and
    1.5 x each one but the last, which fall between two fit sizes and are never fitted."""
    fit = [min_bytes]
    while fit[-1] * 2 <= max_bytes:
        fit.append(fit[-1] * 2)
    return fit, [size * 3 // 2 for size in fit[:-1]]


def _fit_rows(nproc: int, points: list[CommPoint], fit_sizes: list[int],
              all_sizes: list[int]) -> pd.DataFrame:
    """Each point with its role (fit / heldout), the prediction of the fit and the error;
    error_one_line is the error of a single line (max_regimes=1) on the same fit points, and
    error_interpolated that of no model at all: a log-log interpolation between the series'
    two neighbouring fit points, which shows how far the measurements themselves follow a
    smooth curve."""
    train = [p for p in points if _requested(p.nbytes, all_sizes) in fit_sizes]
    fits = {(f.collective, f.group_size, f.scope): f for f in fit_alpha_beta(train)}
    lines = {(f.collective, f.group_size, f.scope): f
             for f in fit_alpha_beta(train, max_regimes=1)}
    curves = _log_curves(train)
    rows = []
    for p in points:
        key = (p.collective, p.group_size, p.scope)
        fit: CommFit = fits[key]
        predicted_s = fit.time_s(p.nbytes)
        role = "fit" if _requested(p.nbytes, all_sizes) in fit_sizes else "heldout"
        rows.append(p.model_dump() | {
            "nproc": nproc, "role": role, "predicted_s": predicted_s,
            "error": predicted_s / p.time_s - 1,
            "error_one_line": lines[key].time_s(p.nbytes) / p.time_s - 1,
            "error_interpolated": _interpolated_s(curves[key], p.nbytes) / p.time_s - 1,
            "fit_regimes": _regimes_text(fit)})
    return pd.DataFrame(rows)


def _log_curves(train: list[CommPoint]) -> dict[tuple[str, int, str], tuple[np.ndarray, ...]]:
    """Per series, its fit points' (log sizes, log times), by rising size."""
    series: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for p in train:
        series.setdefault((p.collective, p.group_size, p.scope), []).append((p.nbytes, p.time_s))
    return {key: tuple(np.log(np.array(sorted(pairs)).T)) for key, pairs in series.items()}


def _interpolated_s(curve: tuple[np.ndarray, ...], nbytes: int) -> float:
    """The time at nbytes by straight lines between a series' fit points in log-log."""
    sizes, times = curve
    return float(np.exp(np.interp(np.log(nbytes), sizes, times)))


def _with_earlier_run(points: pd.DataFrame, earlier_csv: str) -> pd.DataFrame:
    """The points with rerun_change, each measured time over the same point's in an earlier
    comm_fit.csv - 1 (how far a measurement reproduces, which no fit beats), and
    earlier_error, the earlier run's own error there (NaN where that run lacks the point)."""
    columns = ["nproc", "collective", "group_size", "scope", "nbytes"]
    earlier = pd.read_csv(earlier_csv)[columns + ["time_s", "error"]].rename(
        columns={"time_s": "earlier_s", "error": "earlier_error"})
    merged = points.merge(earlier, on=columns, how="left")
    return merged.assign(rerun_change=merged.time_s / merged.earlier_s - 1).drop(
        columns="earlier_s")


def _regimes_text(fit: CommFit) -> str:
    """The regimes as 'from_bytes:alpha_s:bandwidth' joined by ';' (one CSV cell)."""
    return ";".join(f"{r.from_bytes}:{r.alpha_s:.6g}:{r.bandwidth:.6g}" for r in fit.regimes)


def _read_points(path: str) -> dict[int, list[CommPoint]]:
    """The measured points of an earlier comm_fit.csv, by world size."""
    table = pd.read_csv(path)
    columns = list(CommPoint.model_fields)
    return {int(nproc): [CommPoint(**row) for row in group[columns].to_dict("records")]
            for nproc, group in table.groupby("nproc", sort=False)}


def _requested(nbytes: int, sizes: list[int]) -> int:
    """The requested size a point came from (nbytes is rounded down to whole elements per rank)."""
    return min(sizes, key=lambda s: abs(s - nbytes))


def _summary(points: pd.DataFrame) -> pd.DataFrame:
    """One row per fit: alpha, bandwidth, peak busbw and its held-out errors."""
    rows = []
    for key, group in points.groupby(KEY, sort=False):
        held = group[group.role == "heldout"].error.abs()
        held_one_line = group[group.role == "heldout"].error_one_line.abs()
        regimes = _regime_columns(group.iloc[0].fit_regimes)
        rows.append(dict(zip(KEY, key, strict=True)) | regimes | {
            "busbw_peak_GBps": group.busbw.max() / 1e9,
            "heldout_n": len(held), "heldout_within_25pct": int((held <= TARGET_ERROR).sum()),
            "one_line_within_25pct": int((held_one_line <= TARGET_ERROR).sum()),
            "heldout_err_median_pct": held.median() * 100, "heldout_err_max_pct": held.max() * 100,
            "heldout_err_max_small_pct": group[(group.role == "heldout")
                                                 & (group.nbytes <= 2**20)].error.abs().max() * 100,
            "heldout_err_max_large_pct": group[(group.role == "heldout")
                                                 & (group.nbytes > 2**20)].error.abs().max() * 100,
        })
    return pd.DataFrame(rows)


def _regime_columns(text: str) -> dict[str, object]:
    """Regime count, starts (KiB), latencies (us) and bandwidths (GB/s), '/'-separated."""
    regimes = [[float(v) for v in part.split(":")] for part in text.split(";")]
    return {"regimes": len(regimes),
            "from_KiB": "/".join(f"{r[0] / 2**10:g}" for r in regimes),
            "alpha_us": "/".join(f"{r[1] * 1e6:.3g}" for r in regimes),
            "bandwidth_GBps": "/".join(f"{r[2] / 1e9:.3g}" for r in regimes)}


def _by_range(points: pd.DataFrame) -> pd.DataFrame:
    """Held-out points within the target, 'k/n', by collective (rows) and size range."""
    held = points[points.role == "heldout"]
    rows = []
    for collective, group in [*held.groupby("collective", sort=False), ("all", held)]:
        row = {"collective": collective}
        for low, high, label in SIZE_RANGES:
            errors = group[(group.nbytes >= low) & (group.nbytes < high)].error.abs()
            row[label] = f"{int((errors <= TARGET_ERROR).sum())}/{len(errors)}"
        errors = group.error.abs()
        row["all sizes"] = f"{int((errors <= TARGET_ERROR).sum())}/{len(errors)}"
        row["median abs error %"] = errors.median() * 100  # no "|": it would split a md cell
        rows.append(row)
    return pd.DataFrame(rows)


def _md_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, not installed here)."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def _markdown(args: argparse.Namespace, points: pd.DataFrame, summary: pd.DataFrame,
              elapsed_s: float, load: list[float]) -> str:
    held = summary.heldout_within_25pct.sum(), summary.heldout_n.sum()
    errors = points[points.role == "heldout"].error.abs()
    one_line = points[points.role == "heldout"].error_one_line.abs()
    interpolated = points[points.role == "heldout"].error_interpolated.abs()
    return "\n".join([
        "# Alpha-beta fits of gloo collectives: held-out prediction error", "",
        f"Command: `{shlex.join([sys.executable.replace(os.getcwd() + '/', ''), *sys.argv])}`"
        + (" (a refit: the machine and load below are the refit's, not the measurement's)"
           if args.points else ""), "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, gloo on CPU, one thread "
        f"per rank; 1-minute load average {load[0]:.2f} before, {load[-1]:.2f} after, "
        f"{min(load):.2f} to {max(load):.2f} over the run (read at every progress line); "
        f"{elapsed_s:.0f} s in all.", "",
        f"Fit sizes: every power of 2 from {args.min_bytes} B to {args.max_bytes} B; "
        f"held-out sizes: 1.5 x each fit size but the last, never fitted; both measured "
        f"together, by size. {args.repeats} repeats (median; up to "
        f"{repeats_for(args.repeats, args.min_bytes)} for small sizes, profiler.comm."
        f"repeats_for, in {SWEEPS} passes over the sizes), {args.warmup} warm-up; ranks "
        f"outside the measured group wait on the c10d store. Fits: profiler.comm."
        f"fit_alpha_beta, piecewise alpha-beta with as many regimes as BIC keeps "
        f"(columns: from_KiB, alpha_us and bandwidth_GBps per regime, '/'-separated). "
        f"Error = predicted / measured - 1; target |error| <= {TARGET_ERROR:.0%}.", "",
        f"Held-out points within {TARGET_ERROR:.0%}: {held[0]} of {held[1]} "
        f"(median |error| {errors.median():.1%}). With one line per series on the same "
        f"points: {int((one_line <= TARGET_ERROR).sum())} of {held[1]} (median "
        f"{one_line.median():.1%}). With no model, interpolating in log-log between the "
        f"two neighbouring fit sizes: {int((interpolated <= TARGET_ERROR).sum())} of "
        f"{held[1]} (median {interpolated.median():.1%}).", "",
        *_rerun_lines(args, points),
        "Held-out points within the target by collective and size range:", "",
        _md_table(_by_range(points)), "",
        _md_table(summary), "",
    ])


def _rerun_lines(args: argparse.Namespace, points: pd.DataFrame) -> list[str]:
    """With --compare: how far the held-out measurements moved from the earlier run's."""
    if not args.compare:
        return []
    held = points[points.role == "heldout"]
    change = held.rerun_change.dropna().abs()
    both = held[(held.error.abs() > TARGET_ERROR)
                & (held.earlier_error.abs() > TARGET_ERROR)]
    return [f"Measured again: {len(change)} held-out points are in the earlier run "
            f"`{args.compare}` too; {int((change > TARGET_ERROR).sum())} of them moved by "
            f"more than {TARGET_ERROR:.0%} between the two runs (median |change| "
            f"{change.median():.1%}), and {len(both)} missed the target in both runs "
            f"(each run judged by its own fit).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-bytes", type=int, default=1024)
    parser.add_argument("--max-bytes", type=int, default=128 * 2**20)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("-o", "--output", default="benchmarks/results")
    parser.add_argument("--points", help="refit the points of an earlier comm_fit.csv "
                        "(its sizes must match) instead of measuring")
    parser.add_argument("--compare", help="an earlier run's comm_fit.csv: report how far the "
                        "same points moved between the runs (columns rerun_change and "
                        "earlier_error)")
    args = parser.parse_args()
    fit_sizes, heldout_sizes = _sizes(args.min_bytes, args.max_bytes)
    sizes = sorted(fit_sizes + heldout_sizes)
    load, start_s = [os.getloadavg()[0]], time.monotonic()

    def progress(nproc: int, line: str) -> None:
        load.append(os.getloadavg()[0])
        print(f"[{nproc}] {line} (load {load[-1]:.2f})", flush=True)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.points:
        measured = _read_points(args.points)
    else:
        measured = {}
        for nproc in args.nproc:
            measured[nproc] = measure_collectives(
                nproc, sizes, repeats=args.repeats, warmup=args.warmup,
                timeout_s=args.timeout_s, on_progress=lambda line, n=nproc: progress(n, line))
            # the raw points first, so that a failed fit loses no measurement (--points)
            pd.DataFrame([p.model_dump() | {"nproc": n} for n, points in measured.items()
                          for p in points]).to_csv(out / "comm_fit.csv", index=False)
    frames = [_fit_rows(nproc, points, fit_sizes, sizes) for nproc, points in measured.items()]
    points = pd.concat(frames, ignore_index=True)
    if args.compare:
        points = _with_earlier_run(points, args.compare)
    summary = _summary(points)
    points[KEY + [c for c in points.columns if c not in KEY]].to_csv(
        out / "comm_fit.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "comm_fit_fits.csv", index=False, float_format="%.4g")
    text = _markdown(args, points, summary, time.monotonic() - start_s,
                     load + [os.getloadavg()[0]])
    (out / "comm_fit.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
