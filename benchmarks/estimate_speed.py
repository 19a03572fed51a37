"""How long the cost model takes to estimate one plan of llama3-405b on 16,384 H100s (the
cost-model issue asks for under 1 s), apart from tracing the model, and the whole
`autoplan estimate` command from a saved graph.json.

    .venv/bin/python benchmarks/estimate_speed.py

Writes benchmarks/results/estimate_speed.csv.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel
from autoplan.models import build_model
from autoplan.plan import uniform_plan
from autoplan.tracing import layer_graph_of_built

RESULTS = Path(__file__).resolve().parent / "results" / "estimate_speed.csv"
PLAN = "tp=8,pp=16,micro_batch=1,ckpt=none,zero=1,schedule=interleaved_1f1b,virtual_stages=4"
CLUSTER, BATCH, REPEATS = "h100-sxm:gpus=16384", 2048, 5


def main() -> int:
    started = time.perf_counter()
    graph = layer_graph_of_built(build_model("llama3-405b"), torch.bfloat16)
    trace_s = time.perf_counter() - started
    cluster = parse_cluster_spec(CLUSTER)
    plan = uniform_plan(PLAN, graph, cluster.gpus, BATCH)
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        estimate = CostModel(graph, cluster).estimate(plan)
        times.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.json"
        graph.save(path)
        command = [sys.executable, "-m", "autoplan", "estimate", "--model", str(path),
                   "--cluster", CLUSTER, "--global-batch", str(BATCH), "--plan", PLAN, "--json"]
        cli = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cli.append(time.perf_counter() - started)
    rows = [{"what": "trace llama3-405b (once)", "seconds": round(trace_s, 3)},
            {"what": f"CostModel.estimate, median of {REPEATS}",
             "seconds": round(statistics.median(times), 4)},
            {"what": "autoplan estimate --model graph.json, median of 3",
             "seconds": round(statistics.median(cli), 3)}]
    with RESULTS.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["what", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['what']:<52} {row['seconds']:>8} s")
    print(f"predicted step {estimate.step_time_s:.2f} s, MFU {estimate.mfu:.1%}, "
          f"peak {max(estimate.peak_memory_bytes) / 2**30:.1f} GiB; wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
