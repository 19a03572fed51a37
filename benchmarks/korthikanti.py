"""Reproduce Korthikanti et al. 2022, Table 5 (Megatron-LM on A100-80GB) with the a100-80g
preset: predicted vs published iteration time, full and selective recomputation.

The models are traced in fp16 with the unfused attention Megatron-LM ran in 2022
(--attention math); plans are the paper's (Table 3, interleave from ../shared/validation).
Writes benchmarks/results/korthikanti.csv and prints the table.

    .venv/bin/python benchmarks/korthikanti.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel, Estimate
from autoplan.graph import LayerGraph
from autoplan.models import build_model
from autoplan.plan import uniform_plan
from autoplan.tracing import layer_graph_of_built

# a copy of ../shared/validation/korthikanti2022_table5.csv (benchmarks/data/README.md)
TABLE = Path(__file__).resolve().parent / "data" / "korthikanti2022_table5.csv"
RESULTS = Path(__file__).resolve().parent / "results" / "korthikanti.csv"
PRESETS = {"22B": "gpt-22b", "175B": "gpt3-175b", "530B": "gpt-530b", "1T": "gpt-1t"}


def published_rows(path: Path = TABLE) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def predict(row: dict[str, str], graphs: dict[str, LayerGraph]) -> Estimate:
    """The a100-80g prediction of one published row (its model traced once per run)."""
    name = PRESETS[row["model"]]
    if name not in graphs:
        graphs[name] = layer_graph_of_built(build_model(name), torch.float16, "math")
    graph, gpus = graphs[name], int(row["gpus"])
    plan = uniform_plan(
        dict(tp=int(row["tp"]), pp=int(row["pp"]), micro_batch=int(row["micro_batch"]),
             ckpt=row["recompute"], sequence_parallel=row["sequence_parallel"] == "true",
             virtual_stages=int(row["interleave"])),
        graph, gpus, int(row["global_batch"]))
    return CostModel(graph, parse_cluster_spec(f"a100-80g:gpus={gpus}")).estimate(plan)


def main() -> int:
    graphs: dict[str, LayerGraph] = {}
    out = []
    for row in published_rows():
        estimate = predict(row, graphs)
        published = float(row["iteration_time_s"])
        out.append({"model": row["model"], "recompute": row["recompute"], "gpus": row["gpus"],
                    "published_s": published, "predicted_s": round(estimate.step_time_s, 3),
                    "error": round(estimate.step_time_s / published - 1, 4),
                    "mfu": round(estimate.mfu, 4)})
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    print(f"{'model':>5} {'recompute':>9} {'gpus':>5} {'published':>9} {'predicted':>9} "
          f"{'error':>7} {'MFU':>6}")
    for r in out:
        print(f"{r['model']:>5} {r['recompute']:>9} {r['gpus']:>5} {r['published_s']:>9.2f} "
              f"{r['predicted_s']:>9.2f} {r['error']:>+7.1%} {r['mfu']:>6.1%}")
    worst = max(abs(r["error"]) for r in out)
    print(f"largest error {worst:.1%}; wrote {RESULTS}")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
