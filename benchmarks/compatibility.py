"""Compatibility matrix: every zoo model (tests/zoo) against every plan kind, each cell run as
a fresh subprocess with a timeout, as a user would run it.

Cells: inspect, search (4 analytic H100s), dp ("dp=2"), tp ("tp=2"), pp ("pp=2", 4
micro-batches), zero3 ("dp=2,zero=3"), mixed (the search's own plan trained on 4 ranks), auto1
and auto2 (autoplan.auto on 1 rank and under torchrun on 2). Every run cell trains 3 steps and
is compared with one process (`--verify`). A cell is "verified", "refused: <reason>" (exit 2:
refused at plan time, in one line) or "FAILED: <last line>" (a traceback, crash, a verify that
does not match, a timeout = a hang).

    .venv/bin/python benchmarks/compatibility.py [--models a,b] [--cells dp,tp] [--timeout 240]
        [-o benchmarks/results] [--readme]

The same file is the driver of the auto cells (`--auto-worker SPEC`, one process per rank).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: tests.zoo and autoplan from this checkout
    sys.path.insert(0, str(ROOT))

from tests.zoo import ZOO  # noqa: E402

__all__ = ["CELLS", "RUN_CELLS", "CellResult", "main", "run_cell"]

CELLS = ("inspect", "search", "dp", "tp", "pp", "zero3", "mixed", "auto1", "auto2")
RUN_CELLS = ("dp", "tp", "pp", "zero3", "mixed", "auto1", "auto2")
"""The cells that train (and verify against one process); the others only plan."""
PLANS = {"dp": "dp=2", "tp": "tp=2", "pp": "pp=2,micro_batch=1", "zero3": "dp=2,zero=3"}
"""Cell -> the plan shorthand `autoplan run` is given."""
RUN_BATCH = 4
"""Global batch of the shorthand cells: 2 samples per dp rank, 4 micro-batches under pp=2."""
SEARCH_BATCH = 8
"""Global batch of the searched (mixed) plan and of auto: 2 samples per rank of 4."""
SEARCH_CLUSTER = "h100-sxm:gpus=4"
"""Datasheet figures: the search needs no profile and times nothing."""
STEPS = 3
LR = 1e-3
SEED = 0
MARK = "compat:"
"""The auto driver's result line starts with this."""
_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt)\b:?")
"""A line that names an exception, as a traceback's last line does."""
_RANK = re.compile(r"^\[(rank|default)\d+\]:\s*")
"""The prefix torchrun puts before each line of a rank's output."""
README_START, README_END = "<!-- compatibility:start -->", "<!-- compatibility:end -->"


@dataclass(frozen=True)
class CellResult:
    model: str
    cell: str
    status: str
    """verified, refused, FAILED, ok (inspect/search), or skipped (the plan came from a
    refused or failed search)."""
    detail: str
    wall_s: float

    @property
    def text(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


# ------------------------------------------------------------------------------ cells


def _autoplan(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoplan", *args]


def _command(model: str, cell: str, folder: Path) -> list[str]:
    """The argv of one cell (the mixed cell reads the plan the search cell wrote)."""
    spec = ZOO[model].spec
    run = ("run", "--model", spec, "--steps", str(STEPS), "--verify", "--seed", str(SEED))
    if cell == "inspect":
        return _autoplan("inspect", "--model", spec, "--json")
    if cell == "search":
        return _autoplan("search", "--model", spec, "--cluster", SEARCH_CLUSTER,
                         "--global-batch", str(SEARCH_BATCH), "--dtype", "fp32",
                         "-o", str(folder / "plan.json"))
    if cell in PLANS:
        return _autoplan(*run, "--plan", PLANS[cell], "--nproc", "2",
                         "--global-batch", str(RUN_BATCH))
    if cell == "mixed":
        return _autoplan(*run, "--plan", str(folder / "plan.json"), "--nproc", "4")
    worker = [str(Path(__file__).resolve()), "--auto-worker", spec]
    if cell == "auto1":
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *worker]


def _last_line(text: str) -> str:
    """The error a failed command ended with: the last exception line of a traceback (not
    torchrun's summary of its children), else the last non-empty line."""
    lines = [_RANK.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR.match(line) and "ChildFailedError" not in line]
    return errors[-1] if errors else lines[-1] if lines else "(no output)"


def _classify(cell: str, code: int, out: str, err: str) -> tuple[str, str]:
    """(status, detail) of a finished cell from its exit status and output."""
    if cell.startswith("auto"):
        marked = [line for line in (out + "\n" + err).splitlines() if line.startswith(MARK)]
        if marked:
            status, _, detail = marked[-1][len(MARK):].strip().partition(": ")
            if status in ("verified", "refused") and (code == 0 or status == "refused"):
                return status, detail
            return "FAILED", detail or f"exit {code}"
        return "FAILED", f"exit {code}: {_last_line(out + chr(10) + err)}"
    if code == 0:
        return ("ok" if cell in ("inspect", "search") else "verified"), ""
    verify = [line for line in out.splitlines() if line.startswith("verify:")]
    if code == 1 and verify:
        return "FAILED", verify[-1]
    line = _last_line(err or out)
    if code == 2 and "Traceback" not in err:
        return "refused", line.split(": error: ", 1)[-1]
    return "FAILED", f"exit {code}: {line}"


def run_cell(model: str, cell: str, folder: Path, timeout_s: float) -> CellResult:
    """Run one cell as a subprocess of its own process group (a timeout kills the group) and
    keep its command and output in <folder>/<cell>.log, from which the cell is classified."""
    if cell == "mixed" and not (folder / "plan.json").exists():
        return CellResult(model, cell, "skipped", "the search cell wrote no plan", 0.0)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                        "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(_command(model, cell, folder), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code = str(proc.returncode)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        code = f"timeout {timeout_s:.0f}"
    (folder / f"{cell}.log").write_text(
        f"$ {' '.join(proc.args)}\nexit {code}\nwall_s {time.perf_counter() - start:.1f}\n"
        f"--- stdout\n{out}\n--- stderr\n{err}")
    return cell_from_log(model, cell, folder / f"{cell}.log")


def cell_from_log(model: str, cell: str, path: Path) -> CellResult:
    """Classify a cell from the log run_cell wrote (or, with --from-logs, an earlier run's)."""
    text = path.read_text()
    head, _, rest = text.partition("\n--- stdout\n")
    out, _, err = rest.partition("\n--- stderr\n")
    fields = dict(line.split(" ", 1) for line in head.splitlines()[1:] if " " in line)
    wall_s = float(fields.get("wall_s", 0.0))
    code = fields.get("exit", "")
    if code.startswith("timeout"):
        return CellResult(model, cell, "FAILED",
                          f"timeout after {code.split()[1]} s (a hang): {_last_line(out + err)}",
                          wall_s)
    status, detail = _classify(cell, int(code), out, err)
    return CellResult(model, cell, status, detail, wall_s)


def _results_from_logs(models: list[str], cells: list[str], logs: Path) -> list[CellResult]:
    """The matrix of an earlier (or interrupted) run, from its logs; cells without one were
    not run (the mixed cell also when the search cell wrote no plan)."""
    results = []
    for model in models:
        for cell in cells:
            path = logs / model / f"{cell}.log"
            results.append(cell_from_log(model, cell, path) if path.exists() else
                           CellResult(model, cell, "skipped", "not run", 0.0))
    return results


# ------------------------------------------------------------------------------ auto driver


def _auto_worker(spec: str) -> int:
    """One rank of an auto cell: autoplan.auto() on the zoo model, STEPS AdamW steps, and on
    rank 0 the comparison with one process; prints one `compat:` line (rank 0)."""
    import torch
    import torch.distributed as dist

    import autoplan
    from autoplan.app.run import _build, _optimizer, _reference_pieces, _SyntheticData
    from autoplan.errors import AutoplanError
    from autoplan.executor.verify import DropoutOff, compare, reference_trace, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    built = _build(spec, SEED)
    data = _SyntheticData(built, SEARCH_BATCH, SEED)
    batches = [data.batch(step) for step in range(STEPS)]
    try:
        runner = autoplan.auto(built.module, batches[0][0], global_batch=SEARCH_BATCH,
                               loss_fn=data.loss_fn, device="cpu")
    except AutoplanError as err:
        if rank == 0:
            print(f"{MARK} refused: {str(err).splitlines()[0] if str(err) else err!r}")
        return 2
    # as `autoplan run --verify`: the reference draws other dropout masks, so dropout is off
    with DropoutOff(runner.module):
        trace = train(runner, _optimizer(runner.parameters(), LR), batches, keep=True)
    held = [(trace.params, trace.grads)]
    if world > 1:
        held = [None] * world
        dist.gather_object((trace.params, trace.grads), held if rank == 0 else None, dst=0)
    if rank != 0:
        dist.destroy_process_group()
        return 0
    for params, grads in held:
        trace.params.update(params)
        trace.grads.update(grads)
    plan = runner.plan
    ref_built = _build(spec, SEED)
    with DropoutOff(ref_built.module):
        ref = reference_trace(ref_built.module, batches, data.loss_fn, _reference_pieces(plan),
                              _optimizer(list(ref_built.module.parameters()), LR))
    comparison = compare(trace, ref, LR)
    if world > 1:
        dist.destroy_process_group()
    problems = comparison.problems
    print(f"{MARK} verified: {_plan_text(plan)}" if not problems
          else f"{MARK} FAILED: verify differs: {problems[0]}")
    return 0 if not problems else 1


def _plan_text(plan: object) -> str:
    """A short description of a plan: its degrees (the first layer's) and stages."""
    layer = plan.layers[0]
    return (f"pp={plan.pp},dp={layer.dp},tp={layer.tp},zero={layer.zero},"
            f"micro_batches={plan.num_micro_batches}")


# ------------------------------------------------------------------------------ output


def _write(results: list[CellResult], models: list[str], cells: list[str], out: Path) -> str:
    """Write compatibility.csv and .md; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compatibility.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "kind", "spec", "cell", "status", "detail", "wall_s"])
        for r in results:
            writer.writerow([r.model, ZOO[r.model].kind, ZOO[r.model].spec, r.cell, r.status,
                             r.detail, f"{r.wall_s:.1f}"])
    markdown = _markdown(results, models, cells)
    (out / "compatibility.md").write_text(markdown)
    return markdown


def _markdown(results: list[CellResult], models: list[str], cells: list[str]) -> str:
    by = {(r.model, r.cell): r for r in results}
    notes: list[str] = []
    rows = ["| model | kind | " + " | ".join(cells) + " |", "|---|---|" + "---|" * len(cells)]
    for model in models:
        texts = []
        for cell in cells:
            r = by.get((model, cell))
            if r is None:
                texts.append("")
                continue
            mark = {"verified": "verified", "ok": "ok"}.get(r.status, r.status)
            if r.detail and r.status not in ("verified", "ok"):
                notes.append(f"{model} / {cell}: {r.text}")
                mark += f" [{len(notes)}]"
            texts.append(mark)
        rows.append(f"| {model} | {ZOO[model].kind} | " + " | ".join(texts) + " |")
    verified, ran = _score(results)
    head = [f"Verified run cells: {verified} / {ran} (cells: {', '.join(cells)}; "
            f"run cells train {STEPS} steps and compare with one process).", ""]
    return "\n".join(head + rows + [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]) + "\n"


def _score(results: list[CellResult]) -> tuple[int, int]:
    run = [r for r in results if r.cell in RUN_CELLS and r.detail != "not run"]
    return sum(r.status == "verified" for r in run), len(run)


def _update_readme(markdown: str) -> None:
    """Replace the README's section between the markers (added under ## Compatibility,
    before ## the heading after ## Models, when absent)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{README_START}\n{markdown}{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        at = text.find("\n## ", text.find("## Models") + 1)
        section = ("\n## Compatibility\n\nEvery zoo model (tests/zoo) under every plan kind, "
                   "from `benchmarks/compatibility.py --readme`:\n\n" + block + "\n")
        text = text + section if at < 0 else text[:at + 1] + section.lstrip("\n") + "\n" + \
            text[at + 1:]
    readme.write_text(text)


# ------------------------------------------------------------------------------ main


def _pick(text: str | None, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    if not text:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"compatibility: unknown {what} {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return names


def _run_model(model: str, cells: list[str], timeout_s: float, logs: Path,
               on_done: Callable[[CellResult], None]) -> list[CellResult]:
    """A model's cells in order (mixed trains the plan the search cell wrote)."""
    folder = logs / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").unlink(missing_ok=True)
    results = []
    for cell in cells:
        if cell == "mixed" and "search" not in cells:
            run_cell(model, "search", folder, timeout_s)
        results.append(run_cell(model, cell, folder, timeout_s))
        on_done(results[-1])
    return results


def _run_all(models: list[str], cells: list[str], timeout_s: float, jobs: int, logs: Path,
             on_done: Callable[[CellResult], None]) -> list[CellResult]:
    """Every model's cells, `jobs` models at a time; results in (model, cell) order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_model, m, cells, timeout_s, logs, on_done) for m in models]
        return [r for future in futures for r in future.result()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, of: {', '.join(ZOO)}")
    parser.add_argument("--cells", help=f"comma-separated, of: {', '.join(CELLS)}")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per cell")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    parser.add_argument("--logs", type=Path, default=ROOT / "out" / "compatibility",
                        help="each cell's command and output (<model>/<cell>.log)")
    parser.add_argument("--from-logs", action="store_true",
                        help="run nothing: rebuild the tables from the logs of an earlier run")
    parser.add_argument("--readme", action="store_true", help="update README.md's table")
    parser.add_argument("--auto-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.auto_worker:
        return _auto_worker(args.auto_worker)
    models, cells = _pick(args.models, list(ZOO), "models"), _pick(args.cells, CELLS, "cells")
    if args.from_logs:
        return _finish(_results_from_logs(models, cells, args.logs), models, cells, args)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("compatibility", total=len(models) * len(cells))

        def on_done(r: CellResult) -> None:
            bar.console.print(f"{r.model:13s} {r.cell:7s} {r.wall_s:6.1f}s  {r.text[:150]}")
            bar.update(task, advance=1, description=f"{r.model} {r.cell}")

        results = _run_all(models, cells, args.timeout, args.jobs, args.logs, on_done)
    return _finish(results, models, cells, args)


def _finish(results: list[CellResult], models: list[str], cells: list[str],
            args: argparse.Namespace) -> int:
    """Write the tables (and the README section); print the score."""
    markdown = _write(results, models, cells, args.output)
    if args.readme:
        _update_readme(markdown)
    verified, ran = _score(results)
    print(f"verified run cells: {verified} / {ran}")
    print(json.dumps({"verified": verified, "run_cells": ran}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
