"""Does the sum of per-layer profiles add up to a whole training step? (profiler issue)

Profiles every distinct layer of a 12-layer GPT (hidden 512) in isolation, predicts a
step's forward + backward as the sum over its layers of the fitted times, then measures
the real model's step (forward, loss, backward) at the same micro-batch sizes in the same
process and thread count, alternating prediction-free timing runs with warm-up.

    .venv/bin/python benchmarks/layer_sum.py [--threads 2] [-o benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from autoplan.models import build_model
from autoplan.profiler.compute import MeasureSettings
from autoplan.profiler.measure import measure_layers
from autoplan.tracing import layer_graph_of_built

SPEC = "gpt:layers=12,hidden=512,heads=8,seq=256,vocab=8192"
MICRO_BATCHES = (1, 2, 4, 8)


def predicted_step_s(profile_layers: list, graph, micro_batch: int) -> float:  # noqa: ANN001
    """Sum over the graph's layers of the fitted forward + backward time at tp = 1."""
    by_signature = {layer.signature: layer.fit(1) for layer in profile_layers}
    return sum(by_signature[n.signature].fwd_s(micro_batch)
               + by_signature[n.signature].bwd_s(micro_batch) for n in graph.nodes)


def measured_step_s(model: torch.nn.Module, built, micro_batch: int,  # noqa: ANN001
                    repeats: int, warmup: int) -> tuple[float, float]:
    """Median and spread of forward + loss + backward of the real model."""
    inputs = (torch.randint(built.spec.config.vocab, (micro_batch, built.spec.config.seq)),)
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        loss = built.loss_fn(model(*inputs), inputs)
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times), max(times) - min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("-o", "--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = build_model(SPEC, dtype=torch.float32)
    graph = layer_graph_of_built(meta, torch.float32)
    settings = MeasureSettings(micro_batches=MICRO_BATCHES, tps=(1,), repeats=args.repeats,
                               warmup=3, threads=args.threads)
    layers = measure_layers(meta, graph, settings)
    real = build_model(SPEC, device="cpu")
    rows = []
    for micro_batch in MICRO_BATCHES:
        measured, spread = measured_step_s(real.module, real, micro_batch, args.repeats, 3)
        predicted = predicted_step_s(layers, graph, micro_batch)
        rows.append({"micro_batch": micro_batch, "predicted_s": predicted,
                     "measured_s": measured, "measured_spread_s": spread,
                     "error": predicted / measured - 1})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["model"] = SPEC
    table["threads"] = args.threads
    table["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "layer_sum.csv", index=False, float_format="%.5f")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
