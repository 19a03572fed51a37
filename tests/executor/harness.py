"""Shared by the executor tests and their worker processes: the model, data, reference run and
the comparison of a parallel run's results with it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from autoplan.executor import verify
from autoplan.graph import LayerGraph
from autoplan.launch import run_workers
from autoplan.models import build_model
from autoplan.plan import Plan, uniform_plan

MODEL = "gpt-tiny"
GLOBAL_BATCH = 8
STEPS = 3
LR = 1e-3
SEED = 0
WORLD_TIMEOUT_S = 120.0


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of (B, S, V) logits against (B, S) targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build(model: str = MODEL) -> nn.Module:
    torch.manual_seed(SEED)
    return build_model(model, device="cpu").module


def batches(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of token ids and their next-token targets."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(SEED + 1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(cfg.vocab, (GLOBAL_BATCH, cfg.seq), generator=gen)
        out.append((ids, ids.roll(-1, dims=1)))
    return out


def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, foreach=False)


def reference(pieces: int = 1, model_name: str = MODEL) -> verify.Trace:
    """One process: losses, step-1 gradients and parameters after STEPS AdamW steps, each batch
    run as `pieces` accumulated slices (see verify.reference_trace)."""
    model = build(model_name)
    data = [((ids,), targets) for ids, targets in batches(model)]
    return verify.reference_trace(model, data, lm_loss, pieces,
                                  optimizer(list(model.parameters())))


def make_plan(graph: LayerGraph, world: int, shorthand: str,
              edit: dict[str, dict] | None = None, **fields: object) -> Plan:
    """A uniform plan from shorthand, with optional per-layer and plan field changes."""
    plan = uniform_plan(shorthand, graph, world_size=world, global_batch=GLOBAL_BATCH)
    if not edit and not fields:
        return plan
    data = json.loads(plan.to_json()) | fields
    edit = edit or {}
    for layer in data["layers"]:
        layer.update(edit.get(layer["name"], {}))
    return Plan.model_validate(data)


@dataclass
class WorldResult:
    losses: dict[str, list[float]]
    params: dict[str, dict[str, torch.Tensor]]
    """case -> FQN -> full parameter after the last step (merged over the ranks)."""
    grads: dict[str, dict[str, torch.Tensor]]
    """case -> FQN -> full gradient of step 1."""
    info: dict[str, dict]


def run_world(nproc: int, cases: dict[str, Plan], folder: Path, model: str = MODEL,
              extra: dict[str, dict] | None = None) -> WorldResult:
    """Run every case in one world of nproc gloo ranks; read what the ranks wrote.

    `extra` gives cases of another kind (tests/executor/worker.py): {"kind": "run", "model":
    spec} trains another model as `autoplan run` does; {"kind": "resume", "plan": case}
    saves a checkpoint under this case's plan and resumes under that case's plan (a plan
    saved beside the cases, not run on its own when it is not in `cases`)."""
    for name, plan in cases.items():
        plan.save(folder / f"{name}.plan.json")
    spec = {"model": model, "cases": [n for n in cases if not n.startswith("_")],
            "folder": str(folder), "extra": extra or {}}
    (folder / "spec.json").write_text(json.dumps(spec))
    result = folder / "results.json"
    run_workers(nproc, [sys.executable, "-m", "tests.executor.worker", str(folder / "spec.json")],
                folder, WORLD_TIMEOUT_S, progress_path=folder / "progress.log",
                done=result.exists, label="executor test worker")
    data = json.loads(result.read_text())
    params: dict[str, dict[str, torch.Tensor]] = {n: {} for n in cases}
    grads: dict[str, dict[str, torch.Tensor]] = {n: {} for n in cases}
    cases = {n: p for n, p in cases.items() if not n.startswith("_")}
    for name in cases:
        for rank in range(nproc):
            saved = torch.load(folder / f"{name}.rank{rank}.pt")
            params[name].update(saved["params"])
            grads[name].update(saved["grads"])
    return WorldResult({n: data[n]["losses"] for n in cases}, params, grads,
                       {n: data[n] for n in cases})


def compare(case: str, world: WorldResult, ref: verify.Trace) -> list[str]:
    """Differences of one case from the reference beyond the bounds (empty when it matches)."""
    run = verify.Trace(world.losses[case], world.params[case], world.grads[case])
    return [f"{case}: {problem}" for problem in verify.compare(run, ref, LR).problems]


def serve_world(spec_path: str, run_case: Callable[[str, dict, Path, int], Any],
                finish: Callable[[dict, Path, int], None]) -> NoReturn:
    """The body of one worker rank: join the gloo world, run each case of the spec (all
    ranks in step, rank 0 logging progress), let `finish` write the results, and leave."""
    import torch.distributed as dist

    from autoplan.launch import exit_worker, watch_parent

    watch_parent()
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in spec["cases"]:
        results[name] = run_case(name, spec, folder, rank)
        dist.barrier()
        if rank == 0:
            with open(folder / "progress.log", "a") as f:
                f.write(f"case {name} done\n")
    finish(results, folder, rank)
    exit_worker()
