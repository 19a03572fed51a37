"""Wall time and peak memory of `autoplan inspect --json` on large presets, and of
`autoplan profile --mode analytic` for Llama 3 405B on 1024 H100s.

Each command runs in a fresh process (as a user would run it), several times; the table
gives the median and range of wall time and the peak resident memory of the process.

    .venv/bin/python benchmarks/inspect_speed.py [--repeats 3] [-o benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

COMMANDS = {
    **{f"inspect {m}": ["inspect", "--model", m, "--json"]
       for m in ("llama3-8b", "llama3-70b", "gpt3-175b", "llama3-405b")},
    "profile analytic llama3-405b": ["profile", "--model", "llama3-405b", "--mode", "analytic",
                                     "--cluster", "h100-sxm:nodes=128", "-o", "{tmp}"],
}


def _run_once(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `autoplan ...` process."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [a.replace("{tmp}", tmp) for a in argv]
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "autoplan", *argv],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"autoplan {' '.join(argv)} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--output", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for label, argv in COMMANDS.items():
        runs = [_run_once(argv) for _ in range(args.repeats)]
        walls = [w for w, _ in runs]
        rows.append({"command": label, "runs": len(runs),
                     "wall_s_median": statistics.median(walls),
                     "wall_s_min": min(walls), "wall_s_max": max(walls),
                     "peak_rss_mib": max(m for _, m in runs) / 2**20})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    table["machine"] = machine
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "inspect_speed.csv", index=False, float_format="%.3f")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
