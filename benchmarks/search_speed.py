"""Search wall time (tracing apart) and peak memory on the issue's cases, and how search
time scales with layers (8 to 512) and GPUs (8 to 16,384). Each case runs in its own process
so its peak RSS is its own.

    .venv/bin/python benchmarks/search_speed.py [--quick]

Writes benchmarks/results/search_speed.csv, search_scaling.csv and search_scaling.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [  # (name, model spec, cluster, global batch): the search issue's figures
    ("llama3-70b, 1024 H100, batch 2048, seq 8192", "llama3-70b", "h100-sxm:gpus=1024", 2048),
    ("llama3-405b, 16384 H100, batch 2048, seq 8192", "llama3-405b", "h100-sxm:gpus=16384",
     2048),
    ("gpt3-175b, 1536 A100", "gpt3-175b", "a100-80g:gpus=1536", 1536),
    ("1T GPT (128 layers), 3072 A100", "gpt-1t", "a100-80g:gpus=3072", 3072),
]
LAYERS = (8, 16, 32, 64, 128, 256, 512)
GPUS = (8, 64, 512, 2048, 8192, 16384)


def _gpt(layers: int) -> str:
    return f"gpt:layers={layers},hidden=4096,heads=32,seq=2048,vocab=51200"


def run_case(spec: str, cluster: str, batch: int) -> dict:
    """Trace, then search; in this process (the worker side)."""
    import resource
    import time

    import torch

    from autoplan.cluster import parse_cluster_spec
    from autoplan.models import build_model
    from autoplan.search.search import Searcher, SearchOptions
    from autoplan.tracing import layer_graph_of_built

    started = time.perf_counter()
    graph = layer_graph_of_built(build_model(spec), torch.bfloat16)
    trace_s = time.perf_counter() - started
    searcher = Searcher(graph, parse_cluster_spec(cluster), SearchOptions(global_batch=batch))
    result = searcher.run()
    best = result.best
    return {"trace_s": round(trace_s, 2), "search_s": round(result.search_time_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "outer_solved": result.outer_solved, "outer_settings": result.outer_settings,
            "stage_problems": result.stage_problems,
            "step_time_s": round(best.estimate.step_time_s, 3) if best else None,
            "grid_step_time_s": round(result.baselines["grid"].estimate.step_time_s, 3)
            if result.baselines["grid"] else None}


def _in_process(spec: str, cluster: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", spec, cluster, str(batch)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"case {spec} on {cluster} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, label in ((axes[0], "layers", "layers (GPT h4096, 64 A100)"),
                             (axes[1], "gpus", "GPUs (llama3-8b on H100)")):
        mine = [r for r in rows if r["sweep"] == sweep]
        ax.plot([r["x"] for r in mine], [r["search_s"] for r in mine], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("search time (s)")
        ax.grid(alpha=0.3)
    fig.suptitle("autoplan search time (tracing apart), one core")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs=3, metavar=("SPEC", "CLUSTER", "BATCH"))
    parser.add_argument("--quick", action="store_true", help="fewer scaling points")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], int(args.case[2]))))
        return 0
    rows = []
    for name, spec, cluster, batch in CASES:
        rows.append({"case": name, **_in_process(spec, cluster, batch)})
        print(rows[-1], flush=True)
    _write(RESULTS / "search_speed.csv", rows)
    scaling = []
    for layers in LAYERS[:4] if args.quick else LAYERS:
        scaling.append({"sweep": "layers", "x": layers,
                        **_in_process(_gpt(layers), "a100-80g:gpus=64", 512)})
        print(scaling[-1], flush=True)
    for gpus in GPUS[:3] if args.quick else GPUS:
        scaling.append({"sweep": "gpus", "x": gpus,
                        **_in_process("llama3-8b", f"h100-sxm:gpus={gpus}", 2 * gpus)})
        print(scaling[-1], flush=True)
    _write(RESULTS / "search_scaling.csv", scaling)
    _plot(scaling, RESULTS / "search_scaling.png")
    print(f"wrote {RESULTS / 'search_speed.csv'}, search_scaling.csv, search_scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
