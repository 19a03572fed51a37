"""Does the sum of per-layer profiles add up to a whole training step? (profiler issue)

A 12-layer GPT (hidden 512) on this CPU. For each micro-batch size, rounds alternate: one
real training step of the whole model (forward, loss, backward; no optimizer), then one
isolated forward + backward of every distinct layer, timed exactly as `autoplan profile`
times it (profiler.compute.time_unit). Alternating keeps the two side by side, so a drift
in the machine's speed affects both. The layer sum is the sum over all the model's layers
(embeddings, 12 blocks, norm, head, loss) of the median isolated time of its signature.

    .venv/bin/python benchmarks/layer_sum.py [--threads 2] [--rounds 10] [-o benchmarks/results]
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
from autoplan.profiler.compute import (
    MeasureSettings,
    capture_unit_calls,
    make_inputs,
    materialize,
    time_unit,
    unit_module,
)
from autoplan.tracing import layer_graph_of_built

SPEC = "gpt:layers=12,hidden=512,heads=8,seq=256,vocab=8192"
MICRO_BATCHES = (1, 2, 4, 8)
WARMUP_ROUNDS = 2


def _step_s(built, inputs: tuple) -> float:  # noqa: ANN001
    start = time.perf_counter()
    built.loss_fn(built.module(*inputs), inputs).backward()
    elapsed = time.perf_counter() - start
    built.module.zero_grad(set_to_none=True)
    return elapsed


def compare(micro_batch: int, rounds: int, meta, graph, calls, units, real) -> dict:  # noqa: ANN001
    """Median whole step and median-based layer sum at one micro-batch size."""
    once = MeasureSettings(repeats=1, warmup=0)
    layer_inputs = {sig: make_inputs(calls[sig], micro_batch, "cpu", torch.float32)
                    for sig in units}
    vocab, seq = real.spec.config.vocab, real.spec.config.seq
    step_inputs = (torch.randint(vocab, (micro_batch, seq)),)
    steps, layers = [], {sig: [] for sig in units}
    for index in range(WARMUP_ROUNDS + rounds):
        step = _step_s(real, step_inputs)
        timed = {sig: time_unit(unit, layer_inputs[sig], once) for sig, unit in units.items()}
        if index >= WARMUP_ROUNDS:
            steps.append(step)
            for sig, t in timed.items():
                layers[sig].append(t["fwd_s"] + t["bwd_s"])
    layer_sum = sum(statistics.median(layers[n.signature]) for n in graph.nodes)
    step = statistics.median(steps)
    return {"micro_batch": micro_batch, "layer_sum_s": layer_sum, "step_s": step,
            "step_spread_s": max(steps) - min(steps), "error": layer_sum / step - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("-o", "--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = build_model(SPEC, dtype=torch.float32)
    graph = layer_graph_of_built(meta, torch.float32)
    calls = capture_unit_calls(meta, graph)
    units = {sig: materialize(unit_module(meta, nodes[0]), "cpu", torch.float32)
             for sig, nodes in graph.by_signature().items()}
    real = build_model(SPEC, device="cpu")
    rows = []
    for micro_batch in MICRO_BATCHES:
        rows.append(compare(micro_batch, args.rounds, meta, graph, calls, units, real))
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
