"""True-scale dry runs: one rank of each plan's whole world played on this CPU under torch's
fake process group (`autoplan run --dry-run`), its measured bytes beside the cost model's.

Each case plays the first rank of every pipeline stage (`--rank all-stages`) with fake
tensors and the executor's own code, and records per rank the parameter, gradient and
optimizer bytes after a step and the peak of live tensor bytes during the next one
(profiler/live_bytes.py), with the prediction for that rank's stage and the seconds it
took. `autoplan run` trains in fp32, so plans are played and predicted in fp32.

    .venv/bin/python benchmarks/dry_run.py [--only NAME ...]
    .venv/bin/python benchmarks/dry_run.py --reprice

Writes benchmarks/results/dry_run.csv and dry_run.md. --reprice keeps the measured columns
of dry_run.csv and prices each row's stage again with the cost model as it is now (the
predictions are arithmetic; the measurements take 25 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    # name: (model, plan, global batch, cluster, where the setting comes from)
    "llama3-8b tp8 pp2": ("llama3-8b", "dp=4,tp=8,pp=2,micro_batch=1,zero=1", 64,
                          "h100-sxm:gpus=64", "issue 20: llama3-8b on 64 H100 (tp8 pp2)"),
    "llama3-70b demo plan": ("llama3-70b", "PLAN70", 2048, "h100-sxm:gpus=1024",
                             "`autoplan search --model llama3-70b --cluster h100-sxm:gpus=1024 "
                             "--global-batch 2048` (the demo's plan: mixed ZeRO stages "
                             "and checkpointing, pp2)"),
    "llama3-70b interleaved v2 plan": ("llama3-70b", "PLAN70V2", 2048, "h100-sxm:gpus=1024",
                                       "the search's plan before a layer's backward was "
                                       "priced less what its micro-batch had freed "
                                       "(interleaved pp2 v2, mixed ZeRO stages): "
                                       "benchmarks/results/plan-llama3-70b-v2.json"),
    "llama3-70b interleaved plan": ("llama3-70b", "PLAN70I", 2048, "h100-sxm:gpus=1024",
                                    "the demo's plan before the cost model counted what "
                                    "torch's pipeline keeps (mixed layouts, interleaved pp2 "
                                    "v9, ZeRO 3): benchmarks/results/"
                                    "plan-llama3-70b-interleaved.json"),
    "gpt3-175b tp8 pp8": ("gpt3-175b", "dp=24,tp=8,pp=8,micro_batch=1,zero=0", 1536,
                          "a100-80g:gpus=1536",
                          "Korthikanti et al. 2022, Table 5: GPT-3 175B, tp8 pp8, 1536 A100, "
                          "batch 1536"),
    "gpt3-13b zero3 dp64": ("gpt3-13b", "dp=64,zero=3,micro_batch=1", 64,
                            "h100-sxm:gpus=64", "a ZeRO-3-heavy plan: FSDP over 64 ranks"),
}
PLAN_FILES = {"PLAN70": "plan-llama3-70b.json", "PLAN70I": "plan-llama3-70b-interleaved.json",
              "PLAN70V2": "plan-llama3-70b-v2.json"}
"""Plans given as files under benchmarks/results/ (PLAN70: written by the search first)."""


def _plan70(folder: Path) -> str:
    path = folder / "plan-llama3-70b.json"
    subprocess.run([sys.executable, "-m", "autoplan", "search", "--model", "llama3-70b",
                    "--cluster", "h100-sxm:gpus=1024", "--global-batch", "2048", "-o",
                    str(path)], check=True, capture_output=True)
    return str(path)


def run_case(name: str, folder: Path) -> list[dict]:
    model, plan, batch, cluster, source = CASES[name]
    if plan == "PLAN70":
        plan = _plan70(folder)
    plan = str(RESULTS / PLAN_FILES[plan]) if plan in PLAN_FILES else plan
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "autoplan", "run", "--model", model, "--plan", plan,
         "--global-batch", str(batch), "--cluster", cluster, "--dry-run", "--rank",
         "all-stages", "--json", "--timeout", "1200"],
        capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["?"]
        return [{"case": name, "source": source, "error": tail[0], "seconds": seconds}]
    report = json.loads(out.stdout)
    rows = []
    for rank in report["ranks"]:
        predicted = rank["predicted"]
        rows.append({"case": name, "source": source, "world": report["world_size"],
                     "rank": rank["rank"], "stage": rank["stage"],
                     **{k: rank[k] for k in ("params", "grads", "optimizer", "peak")},
                     **{f"predicted_{k}": predicted[k] for k in
                        ("params", "grads", "optimizer", "activations", "transient",
                         "buffers", "peak")},
                     "seconds": seconds})
    return rows


def reprice(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of `table` with their predicted columns from today's cost model."""
    from autoplan.app.run import RunOptions, predict, resolve_plan

    out = table.copy()
    for name in dict.fromkeys(table.case):
        model, plan, batch, cluster, _ = CASES[name]
        plan = str(RESULTS / PLAN_FILES[plan]) if plan in PLAN_FILES else plan
        options = RunOptions(model=model, plan=plan, global_batch=batch, cluster=cluster,
                             force=True)
        found, graph, world = resolve_plan(options)
        estimate, _ = predict(options, found, graph, world)
        for index in out.index[out.case == name]:
            memory = estimate.stages[int(out.at[index, "stage"])].memory.as_dict()
            for key in ("params", "grads", "optimizer", "activations", "transient", "buffers",
                        "peak"):
                out.at[index, f"predicted_{key}"] = memory[key]
    return out


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def markdown(table: pd.DataFrame) -> str:
    lines = ["| case | world | rank (stage) | params GiB meas. / pred. | optimizer GiB meas. / "
             "pred. | peak GiB meas. / pred. | peak error |",
             "|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        if isinstance(getattr(row, "error", None), str):
            lines.append(f"| {row.case} | | | failed: {row.error} | | | |")
            continue
        error = row.peak / row.predicted_peak - 1
        lines.append(f"| {row.case} | {row.world:.0f} | {row.rank:.0f} ({row.stage:.0f}) | "
                     f"{_gib(row.params)} / {_gib(row.predicted_params)} | "
                     f"{_gib(row.optimizer)} / {_gib(row.predicted_optimizer)} | "
                     f"{_gib(row.peak)} / {_gib(row.predicted_peak)} | {error:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run")
    parser.add_argument("--reprice", action="store_true",
                        help="price the measured rows again, measure nothing")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.reprice:
        table = reprice(pd.read_csv(RESULTS / "dry_run.csv"))
        table.to_csv(RESULTS / "dry_run.csv", index=False)
        write_markdown(table)
        return
    rows = []
    for name in args.only or CASES:
        rows += run_case(name, RESULTS)
        print(f"{name}: done", file=sys.stderr)
    table = pd.DataFrame(rows)
    earlier = RESULTS / "dry_run.csv"
    if args.only and earlier.exists():  # the other cases' rows stay as they were measured
        kept = pd.read_csv(earlier)
        table = pd.concat([kept[~kept.case.isin(args.only)], table])
        table = table.sort_values("case", key=lambda c: c.map(list(CASES).index), kind="stable")
    table.to_csv(earlier, index=False)
    write_markdown(table)


def write_markdown(table: pd.DataFrame) -> None:
    def plan(name: str) -> str:
        text = CASES[name][1]
        return f"benchmarks/results/{PLAN_FILES[text]}" if text in PLAN_FILES else text

    sources = "\n".join(f"- {name}: `{CASES[name][0]}`, plan `{plan(name)}`, global batch "
                        f"{CASES[name][2]}, `{CASES[name][3]}`; {CASES[name][4]}"
                        for name in dict.fromkeys(table.case))
    (RESULTS / "dry_run.md").write_text(
        "Command: `.venv/bin/python benchmarks/dry_run.py`; fake tensors on this CPU, one "
        "rank per stage, fp32.\n\n" + markdown(table) + "\n\nCases:\n" + sources + "\n")
    print(markdown(table))


if __name__ == "__main__":
    main()
