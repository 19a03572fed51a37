"""How well alpha-beta fits of measured collectives predict message sizes they never saw.

For each local world size (gloo on CPU here), every collective is timed over sizes that double
from --min-bytes to --max-bytes; the fit uses every other size (the powers of 4 from 1 KiB) and
predicts the sizes in between. Error = predicted / measured - 1, per held-out point.

    .venv/bin/python benchmarks/comm_fit.py [--nproc 2 4] [--repeats 21] [-o benchmarks/results]

Writes comm_fit.csv (every point: its role, prediction and error, and the error of a single
line fitted to the same points), comm_fit_fits.csv (every fit, with its second regime if it
has one, and its held-out errors; "small" = held-out sizes <= 1 MiB, "large" = above) and
comm_fit.md (the command, the machine, the table).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from autoplan.profiler.comm import fit_alpha_beta, measure_collectives
from autoplan.profiler.profile import CommFit, CommPoint

TARGET_ERROR = 0.25  # the held-out accuracy this benchmark checks against
KEY = ["nproc", "collective", "group_size", "scope"]


def _sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two from min_bytes to max_bytes."""
    sizes = [min_bytes]
    while sizes[-1] * 2 <= max_bytes:
        sizes.append(sizes[-1] * 2)
    return sizes


def _fit_rows(nproc: int, points: list[CommPoint], sizes: list[int]) -> pd.DataFrame:
    """Each point with its role (fit / heldout), the prediction of the fit and the error;
    error_one_line is the error of a single line (max_regimes=1) on the same fit points."""
    fit_sizes = set(sizes[::2])
    train = [p for p in points if _requested(p.nbytes, sizes) in fit_sizes]
    fits = {(f.collective, f.group_size, f.scope): f for f in fit_alpha_beta(train)}
    lines = {(f.collective, f.group_size, f.scope): f
             for f in fit_alpha_beta(train, max_regimes=1)}
    rows = []
    for p in points:
        key = (p.collective, p.group_size, p.scope)
        fit: CommFit = fits[key]
        predicted_s = fit.time_s(p.nbytes)
        role = "fit" if _requested(p.nbytes, sizes) in fit_sizes else "heldout"
        rows.append(p.model_dump() | {
            "nproc": nproc, "role": role, "predicted_s": predicted_s,
            "error": predicted_s / p.time_s - 1,
            "error_one_line": lines[key].time_s(p.nbytes) / p.time_s - 1,
            "fit_alpha_s": fit.alpha_s, "fit_bandwidth": fit.bandwidth,
            "fit_large_from_bytes": fit.large_from_bytes, "fit_large_alpha_s": fit.large_alpha_s,
            "fit_large_bandwidth": fit.large_bandwidth})
    return pd.DataFrame(rows)


def _requested(nbytes: int, sizes: list[int]) -> int:
    """The requested size a point came from (nbytes is rounded down to whole elements per rank)."""
    return min(sizes, key=lambda s: abs(s - nbytes))


def _summary(points: pd.DataFrame) -> pd.DataFrame:
    """One row per fit: alpha, bandwidth, peak busbw and its held-out errors."""
    rows = []
    for key, group in points.groupby(KEY, sort=False):
        held = group[group.role == "heldout"].error.abs()
        held_one_line = group[group.role == "heldout"].error_one_line.abs()
        first = group.iloc[0]
        two = pd.notna(first.fit_large_from_bytes)
        rows.append(dict(zip(KEY, key, strict=True)) | {
            "alpha_us": first.fit_alpha_s * 1e6,
            "bandwidth_GBps": first.fit_bandwidth / 1e9,
            "large_from_MiB": first.fit_large_from_bytes / 2**20 if two else "-",
            "large_alpha_us": first.fit_large_alpha_s * 1e6 if two else "-",
            "large_bandwidth_GBps": first.fit_large_bandwidth / 1e9 if two else "-",
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


def _md_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, not installed here)."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


def _markdown(args: argparse.Namespace, points: pd.DataFrame, summary: pd.DataFrame,
              elapsed_s: float, load: tuple[float, float]) -> str:
    held = summary.heldout_within_25pct.sum(), summary.heldout_n.sum()
    errors = points[points.role == "heldout"].error.abs()
    one_line = points[points.role == "heldout"].error_one_line.abs()
    return "\n".join([
        "# Alpha-beta fits of gloo collectives: held-out prediction error", "",
        f"Command: `{shlex.join([sys.executable.replace(os.getcwd() + '/', ''), *sys.argv])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, gloo on CPU, one thread "
        f"per rank; load average {load[0]:.2f} before, {load[1]:.2f} after; "
        f"{elapsed_s:.0f} s in all.", "",
        f"Sizes {args.min_bytes} B to {args.max_bytes} B doubling; fit on every other size "
        f"(the powers of 4 from {args.min_bytes} B), predict the sizes in between; "
        f"{args.repeats} repeats (median; below 1 MiB up to 10x more, profiler.comm."
        f"repeats_for), {args.warmup} warm-up; ranks outside the measured group wait on the "
        f"c10d store. Fits: "
        f"profiler.comm.fit_alpha_beta, one line or two regimes (large_* columns). "
        f"Error = predicted / measured - 1; target |error| <= {TARGET_ERROR:.0%}.", "",
        f"Held-out points within {TARGET_ERROR:.0%}: {held[0]} of {held[1]} "
        f"(median |error| {errors.median():.1%}). With one line per series on the same "
        f"points: {int((one_line <= TARGET_ERROR).sum())} of {held[1]} (median "
        f"{one_line.median():.1%}).", "",
        _md_table(summary), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-bytes", type=int, default=1024)
    parser.add_argument("--max-bytes", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("-o", "--output", default="benchmarks/results")
    args = parser.parse_args()
    sizes = _sizes(args.min_bytes, args.max_bytes)
    load_before, start_s = os.getloadavg()[0], time.monotonic()
    frames = []
    for nproc in args.nproc:
        points = measure_collectives(nproc, sizes, repeats=args.repeats, warmup=args.warmup,
                                     timeout_s=args.timeout_s,
                                     on_progress=lambda line, n=nproc: print(f"[{n}] {line}",
                                                                             flush=True))
        frames.append(_fit_rows(nproc, points, sizes))
    points = pd.concat(frames, ignore_index=True)
    summary = _summary(points)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    points[KEY + [c for c in points.columns if c not in KEY]].to_csv(
        out / "comm_fit.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "comm_fit_fits.csv", index=False, float_format="%.4g")
    text = _markdown(args, points, summary, time.monotonic() - start_s,
                     (load_before, os.getloadavg()[0]))
    (out / "comm_fit.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
