"""One rank of an executor test world: runs each case's plan for a few AdamW steps and writes
its losses and the full parameters it holds (rank 0 also writes results.json, last)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from autoplan.app.run import RunOptions, train_rank
from autoplan.executor import parallelize, verify
from autoplan.io import atomic_write_text
from autoplan.models import build_model
from autoplan.plan import Plan
from tests.executor import harness


def _run_case(name: str, model_name: str, folder: Path, rank: int) -> dict:
    plan = Plan.model_validate_json((folder / f"{name}.plan.json").read_text())
    model = harness.build(model_name)
    data = [((ids,), targets) for ids, targets in harness.batches(model)]
    runner = parallelize(model, plan, harness.lm_loss)
    trace = verify.train(runner, harness.optimizer(runner.parameters()), data, keep=True)
    torch.save({"params": trace.params, "grads": trace.grads}, folder / f"{name}.rank{rank}.pt")
    return {"losses": trace.losses, "replicated_layers": runner.replicated_layers}


def _run_model_case(name: str, model_spec: str, folder: Path, rank: int) -> dict:
    """A case of another model, trained as `autoplan run --verify` trains it."""
    plan = Plan.model_validate_json((folder / f"{name}.plan.json").read_text())
    options = RunOptions(model=model_spec, plan=str(folder / f"{name}.plan.json"),
                         steps=harness.STEPS, verify=True, seed=harness.SEED, lr=harness.LR,
                         device="cpu")
    result = train_rank(options, plan)
    torch.save({"params": result["params"], "grads": result["grads"]},
               folder / f"{name}.rank{rank}.pt")
    return {"losses": result["losses"], "replicated_layers": result["replicated_layers"]}


def _resume_case(name: str, model_name: str, folder: Path, rank: int, other: str) -> dict:
    """Train under this case's plan, save after step 1, go on; then load the checkpoint into
    a differently initialised model under plan `other` and train the same later steps."""
    data = [((ids,), targets) for ids, targets in harness.batches(harness.build(model_name))]
    runner = parallelize(harness.build(model_name), _plan(folder, name), harness.lm_loss)
    opt = harness.optimizer(runner.parameters())
    runner.step(*data[0], opt)
    runner.save(folder / f"{name}.ckpt", opt)
    losses = [runner.step(*batch, opt).item() for batch in data[1:]]
    torch.manual_seed(harness.SEED + 99)  # another init: only the checkpoint can match
    fresh = build_model(model_name, device="cpu").module
    resumed = parallelize(fresh, _plan(folder, other), harness.lm_loss)
    opt = harness.optimizer(resumed.parameters())
    resumed.load(folder / f"{name}.ckpt", opt)
    later = [resumed.step(*batch, opt).item() for batch in data[1:]]
    torch.save({"params": {}, "grads": {}}, folder / f"{name}.rank{rank}.pt")
    return {"losses": losses, "resumed": later}


def _plan(folder: Path, name: str) -> Plan:
    return Plan.model_validate_json((folder / f"{name}.plan.json").read_text())


def _case(name: str, spec: dict, folder: Path, rank: int) -> dict:
    extra = spec.get("extra", {}).get(name, {})
    if extra.get("kind") == "run":
        return _run_model_case(name, extra["model"], folder, rank)
    if extra.get("kind") == "resume":
        return _resume_case(name, spec["model"], folder, rank, extra["plan"])
    return _run_case(name, spec["model"], folder, rank)


def _write(results: dict, folder: Path, rank: int) -> None:
    if rank == 0:
        atomic_write_text(folder / "results.json", json.dumps(results))


def main(spec_path: str) -> None:
    harness.serve_world(spec_path, _case, _write)


if __name__ == "__main__":
    main(sys.argv[1])
