"""`autoplan validate` end to end, timed: the README's validation table and the issue 22 model.

    .venv/bin/python benchmarks/validate.py                      # the README's model
    .venv/bin/python benchmarks/validate.py --issue-22 [--tag b]  # 12 layers, hidden 384

Writes benchmarks/results/validate[_<name>]/: plans.csv, scatter.png, profile/ and
summary.json with the command, the wall time end to end, each stage's span (collectives,
layers, data-parallel points, runs; from the progress lines), the points the in-situ
profile holds and the samples it took, and the machine's load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from autoplan.app.validate import ValidateOptions, validate, write_outputs
from autoplan.io import atomic_write_text
from autoplan.profile import load_profile

RESULTS = Path(__file__).resolve().parent / "results"
README_MODEL = "gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024"
ISSUE_22_MODEL = "gpt:layers=12,hidden=384,heads=6,seq=256,vocab=4096"


def _options(args: argparse.Namespace, folder: Path) -> ValidateOptions:
    if args.issue_22:  # the command of issue 22's "Done when"
        return ValidateOptions(model=ISSUE_22_MODEL, nproc=4, global_batch=16, top_k=8,
                               steps=5, output=str(folder))
    return ValidateOptions(model=README_MODEL, nproc=4, global_batch=16, top_k=10, steps=8,
                           warmup=3, output=str(folder))


def _command(options: ValidateOptions, folder: Path) -> str:
    where = folder.relative_to(RESULTS.parent.parent)
    return (f"autoplan validate --model {shlex.quote(options.model)} --nproc {options.nproc} "
            f"--global-batch {options.global_batch} --top-k {options.top_k} --steps "
            f"{options.steps} --warmup {options.warmup} -o {where}")


def _points(folder: Path) -> dict[str, int]:
    """The points of the profile validate wrote, by kind."""
    profile = load_profile(folder / "profile")
    return {"layer_points": sum(len(layer.points) for layer in profile.layers),
            "optimizer_points": sum(len(layer.optimizer) for layer in profile.layers),
            "data_parallel_points": sum(len(layer.data_parallel) for layer in profile.layers),
            "comm_points": len(profile.comm_points)}


def _short(plan: str) -> str:
    """A plan's shorthand without the fields at their defaults, as the README's tables."""
    defaults = {"dp=1", "tp=1", "pp=1", "zero=0", "ckpt=none"}
    parts = [p for p in plan.split(",") if p not in defaults]
    if not any(p.startswith("pp=") for p in parts):
        parts = [p for p in parts if not p.startswith("schedule=")]
    return ", ".join(parts)


def markdown(summary: dict) -> str:
    """The run as the README shows it: the table of plans, the figures, the stages' spans."""
    rows = [f"| {_short(p['plan'])} | {p['role']} | {p['predicted_s'] * 1e3:.0f} ms | "
            f"{p['measured_s'] * 1e3:.0f} ms | {p['time_error']:+.0%} | "
            f"{p['memory_error']:+.1%} |" for p in summary["plans"]]
    spans = ", ".join(f"{stage} {b - a:.0f} s" for stage, (a, b) in
                      summary["stage_spans_s"].items())
    return "\n".join([
        f"Command: `{summary['command']}`; {summary['wall_s']:.0f} s end to end ({spans}; "
        f"the rest is tracing, pricing and starting workers); load average "
        f"{summary['load_average_before'][0]:.1f} before, {summary['cores']} cores.", "",
        "| plan | role | predicted | measured | error | state memory error |",
        "|---|---|---|---|---|---|", *rows, "",
        f"MAPE {summary['mape']:.1%}, Spearman {summary['spearman']:.2f}, regret "
        f"{summary['regret']:.2f}, memory error {summary['memory_error']:.1%}. In-situ "
        f"profile: {summary['profile_points']}.", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issue-22", action="store_true", help="the 12-layer model")
    parser.add_argument("--tag", default="", help="suffix of the results folder (a repeat)")
    args = parser.parse_args()
    name = "validate" + ("_issue22" if args.issue_22 else "") + (f"_{args.tag}" if args.tag
                                                                  else "")
    folder = RESULTS / name
    options = _options(args, folder)
    spans: dict[str, list[float]] = {}
    samples: dict[str, int] = {}
    load_before, started = os.getloadavg(), time.perf_counter()

    def on_progress(stage: str, text: str, done: int | None, planned: int | None) -> None:
        now = time.perf_counter() - started
        spans.setdefault(stage, [now, now])[1] = now
        if done is not None:
            samples[stage] = done
        print(f"{now:7.1f} s  {stage}: {done}/{planned} {text}", flush=True)

    result = validate(options, on_progress)
    wall = time.perf_counter() - started
    write_outputs(result, folder)
    summary = result.to_dict() | {
        "command": _command(options, folder), "wall_s": round(wall, 1),
        "stage_spans_s": {stage: [round(a, 1), round(b, 1)] for stage, (a, b) in spans.items()},
        "samples_taken": samples, "profile_points": _points(folder),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cores": os.cpu_count()}
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(folder / "validate.md", markdown(summary))
    print(f"MAPE {result.mape:.1%}, Spearman {result.spearman:.2f}, regret {result.regret:.2f}, "
          f"memory error {result.memory_error:.1%} over {len(result.plans)} plans in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
