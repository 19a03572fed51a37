"""Wall time of the front door: `autoplan search --model llama3-70b --cluster h100-sxm:gpus=1024
--global-batch 2048`, as a user runs it (a fresh process, table output), in three settings:

- warm: today's code, the graph already in the graph cache (autoplan/graph_cache.py);
- cold: today's code, an empty AUTOPLAN_CACHE_DIR each run (trace, then store);
- baseline: the code before the front-door work (commit 0f74754), via --baseline-python.

Runs alternate (warm, cold, baseline, warm, ...) so that the load of shared cores falls on
all three alike; each setting reports the median, min and max of its runs, and the search
time the command prints (its "search" row), so that the front door (wall minus search) is
seen apart from the search, which other work speeds up. One more warm run under
`-X importtime` counts the torch modules imported (the goal: none).

    .venv/bin/python benchmarks/front_door.py --baseline-python /tmp/front-base-venv/bin/python

Both trees' bytecode is compiled before the runs, as a pip install does (an editable
install does not, and this machine sets PYTHONDONTWRITEBYTECODE).

Writes benchmarks/results/front_door.json (every run) and front_door.md (the table).
Goal (the front-door issue): warm <= 2 s, cold <= 4 s.

Making the baseline interpreter (its `-m autoplan` is the old code; it borrows this
checkout's installed packages; the editable finder is copied with its paths moved):

    git -C /work/main worktree add /tmp/front-base 0f74754
    .venv/bin/python -m venv /tmp/front-base-venv --without-pip
    SP=/tmp/front-base-venv/lib/python3.11/site-packages
    echo "$PWD/.venv/lib/python3.11/site-packages" > $SP/zz_main_venv.pth
    sed "s#$PWD/#/tmp/front-base/#g" \\
        .venv/lib/python3.11/site-packages/__editable___autoplan_0_1_0_finder.py \\
        > $SP/_front_base_finder.py
    echo "import _front_base_finder; _front_base_finder.install()" > $SP/_front_base.pth
    (cd /tmp && /tmp/front-base-venv/bin/python -c "import autoplan; print(autoplan.__file__)")
    # ... /tmp/front-base/autoplan/__init__.py; afterwards:
    git -C /work/main worktree remove --force /tmp/front-base; rm -r /tmp/front-base-venv

Every command runs in an empty temporary folder, so that `-m autoplan` finds each
interpreter's own autoplan, never the current folder's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from autoplan.graph_cache import CACHE_DIR_ENV

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ["search", "--model", "llama3-70b", "--cluster", "h100-sxm:gpus=1024",
           "--global-batch", "2048"]
GOALS_S = {"warm": 2.0, "cold": 4.0}
"""The issue's wall-time goals in seconds (the baseline has none)."""
_SEARCH_ROW = re.compile(r"search\s*│\s*([0-9.]+) s:")


def _run_once(python: str, folder: Path, cache_dir: Path | None) -> dict:
    """One `python -m autoplan search ...` in `folder`: wall seconds and printed search time."""
    env = dict(os.environ)
    env.pop(CACHE_DIR_ENV, None)
    if cache_dir is not None:
        env[CACHE_DIR_ENV] = str(cache_dir)
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "autoplan", *COMMAND], cwd=folder, env=env,
                          capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{python} -m autoplan {' '.join(COMMAND)} failed "
                         f"({proc.returncode}): {proc.stderr[-2000:]}")
    found = _SEARCH_ROW.search(proc.stdout)
    return {"wall_s": wall_s, "search_s": float(found.group(1)) if found else None}


def _compile_bytecode(python: str, folder: Path) -> None:
    """Write the .pyc files of the autoplan tree `python` imports, as a pip install does:
    this machine sets PYTHONDONTWRITEBYTECODE, and an editable install never compiles, so
    without this every run would compile autoplan's modules from source (~0.1 s)."""
    root = subprocess.run([python, "-c", "import autoplan, pathlib; "
                           "print(pathlib.Path(autoplan.__file__).parent.parent)"],
                          cwd=folder, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([python, "-m", "compileall", "-q", "-x", r"/\.venv/|/\.git/", root],
                   cwd=folder, capture_output=True, check=True)


def _torch_modules(python: str, folder: Path, cache_dir: Path) -> int:
    """How many torch modules a warm run imports (lines of `-X importtime` naming one)."""
    env = dict(os.environ, **{CACHE_DIR_ENV: str(cache_dir)})
    proc = subprocess.run([python, "-X", "importtime", "-m", "autoplan", *COMMAND], cwd=folder,
                          env=env, capture_output=True, text=True, check=True)
    return sum(1 for line in proc.stderr.splitlines()
               if re.search(r"\|\s+torch(\.|$)", line))


def _summary(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    searches = [r["search_s"] for r in runs if r["search_s"] is not None]
    return {"runs": len(runs), "wall_s_median": statistics.median(walls),
            "wall_s_min": min(walls), "wall_s_max": max(walls),
            "search_s_median": statistics.median(searches) if searches else None}


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
            f"{platform.python_version()}, torch {version('torch')}")


def _table(summary: dict[str, dict], torch_modules: int) -> list[str]:
    lines = ["| setting | runs | median s | min s | max s | search s (median) | "
             "front door s (median wall - search) | goal s |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        search = s["search_s_median"]
        door = f"{s['wall_s_median'] - search:.2f}" if search is not None else "-"
        lines.append(f"| {name} | {s['runs']} | {s['wall_s_median']:.2f} | {s['wall_s_min']:.2f}"
                     f" | {s['wall_s_max']:.2f} | {search if search is not None else '-'} | "
                     f"{door} | {GOALS_S.get(name, '-')} |")
    lines.append("")
    lines.append(f"torch modules imported by a warm run (`-X importtime`): {torch_modules}")
    return lines


def _ratios(summary: dict[str, dict]) -> dict[str, float]:
    if "baseline" not in summary:
        return {}
    base = summary["baseline"]["wall_s_median"]
    return {f"baseline/{name}": base / summary[name]["wall_s_median"]
            for name in ("warm", "cold")}


def _write(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "front_door.json").write_text(json.dumps(record, indent=1) + "\n")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in record["ratios"].items()) or "no baseline"
    text = [f"# Front door: `autoplan {' '.join(COMMAND)}`", "",
            f"Command: `{record['command']}`", "",
            f"Machine: {record['machine']}; load average before {record['load_before']}, "
            f"after {record['load_after']}. Runs alternate between the settings "
            "(benchmarks/front_door.py says how the baseline interpreter is made); both "
            "trees' bytecode is compiled first, as a pip install does.", "",
            *_table(record["summary"], record["torch_modules_warm"]), "",
            f"Ratios of medians: {ratios}.", ""]
    (out / "front_door.md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-python", help="an interpreter whose `-m autoplan` is the "
                        "code before the front-door work (see this file's docstring)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per setting")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = ["warm", "cold"] + (["baseline"] if args.baseline_python else [])
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder, warm_cache = Path(tmp) / "cwd", Path(tmp) / "warm-cache"
        folder.mkdir()
        for python in {sys.executable, args.baseline_python} - {None}:
            _compile_bytecode(python, folder)
        _run_once(sys.executable, folder, warm_cache)  # fills the warm cache; not timed
        for round_ in range(args.repeats):
            for name in settings:
                cache = {"warm": warm_cache, "cold": Path(tmp) / f"cold-{round_}"}.get(name)
                python = args.baseline_python if name == "baseline" else sys.executable
                runs[name].append(_run_once(python, folder, cache))
                print(f"{name} {round_ + 1}/{args.repeats}: {runs[name][-1]}", flush=True)
        _run_once(sys.executable, folder, warm_cache)  # re-warms if the tracing code changed
        torch_modules = _torch_modules(sys.executable, folder, warm_cache)
    summary = {name: _summary(r) for name, r in runs.items()}
    record = {"command": " ".join(["python benchmarks/front_door.py", *sys.argv[1:]]),
              "autoplan_command": " ".join(["autoplan", *COMMAND]), "machine": _machine(),
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "summary": summary, "ratios": _ratios(summary), "goals_s": GOALS_S,
              "torch_modules_warm": torch_modules, "runs": runs}
    _write(args.output, record)
    print("\n".join(_table(summary, torch_modules)))
    print(json.dumps(record["ratios"]))


if __name__ == "__main__":
    main()
