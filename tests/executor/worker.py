"""One rank of an executor test world: runs each case's plan for a few AdamW steps and writes
its losses and the full parameters it holds (rank 0 also writes results.json, last)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from autoplan.executor import parallelize
from autoplan.io import atomic_write_text
from autoplan.plan import Plan
from autoplan.profiler.launch import watch_parent
from tests.executor import harness


def _full(runner, pick) -> dict[str, torch.Tensor]:
    """FQN -> whole tensor (gathered from DTensor shards) for each parameter this rank holds."""
    out = {}
    for fqn, param in runner.named_parameters():
        value = pick(param)
        value = value.full_tensor() if isinstance(value, DTensor) else value
        out[fqn] = value.detach().clone()
    return out


def _run_case(name: str, model_name: str, folder: Path, rank: int) -> dict:
    plan = Plan.model_validate_json((folder / f"{name}.plan.json").read_text())
    model = harness.build(model_name)
    data = harness.batches(model)
    runner = parallelize(model, plan, harness.lm_loss)
    opt = harness.optimizer(runner.parameters())
    # Step 1 without the optimizer, to read the gradients; the Runner zeroes nothing then.
    losses = [runner.step(*data[0]).item()]
    grads = _full(runner, lambda p: p.grad)
    opt.step()
    opt.zero_grad()
    losses += [runner.step(ids, targets, opt).item() for ids, targets in data[1:]]
    torch.save({"params": _full(runner, lambda p: p), "grads": grads},
               folder / f"{name}.rank{rank}.pt")
    return {"losses": losses, "replicated_layers": runner.replicated_layers}


def main(spec_path: str) -> None:
    watch_parent()
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in spec["cases"]:
        results[name] = _run_case(name, spec["model"], folder, rank)
        dist.barrier()
        if rank == 0:
            with open(folder / "progress.log", "a") as f:
                f.write(f"case {name} done\n")
    if rank == 0:
        atomic_write_text(folder / "results.json", json.dumps(results))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skips interpreter teardown, where gloo rarely aborts (NOTES-torch.md)


if __name__ == "__main__":
    main(sys.argv[1])
