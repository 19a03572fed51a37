"""Shared by the executor tests and their worker processes: the model, data, reference run and
the comparison of a parallel run's results with it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autoplan.graph import LayerGraph
from autoplan.models import build_model
from autoplan.plan import Plan, uniform_plan
from autoplan.profiler.launch import run_workers

MODEL = "gpt-tiny"
GLOBAL_BATCH = 8
STEPS = 3
LR = 1e-3
SEED = 0
RTOL = 1e-5
"""Losses per step (elementwise) and step-1 gradients (per tensor, max norm) must agree to this."""
ZERO_GRAD = 1e-6
"""A tensor whose reference gradient stays below this fraction of the model's largest gradient
entry is zero up to rounding (GPT's k bias: softmax ignores a shift of the keys); its error is
measured against the model's largest gradient entry instead of its own."""
ADAM_NOISE = 0.05 * STEPS * LR
"""Parameters after STEPS AdamW steps may differ by this much plus RTOL x |p|. AdamW divides
each gradient entry by its own magnitude (plus eps 1e-8), so an entry whose gradient is near
rounding level (GPT's k bias has an exactly-zero gradient by softmax shift invariance) moves
by an amount set by rounding. Measured: two single-process runs of the same batches, one whole
and one in 8 accumulated slices, differ by up to 3.4e-5 x max|p| in parameters after 3 steps,
while losses and gradients agree to 1e-6. The gradients are the exact test; this bound only
catches errors larger than 5% of the steps' total movement."""
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


def reference(pieces: int = 1, model_name: str = MODEL) -> dict:  # noqa: C901
    """One process: losses and parameters after STEPS AdamW steps, each batch run as `pieces`
    equal slices in order with their gradients accumulated (loss / pieces each): the same
    mathematics for any `pieces`, and the order of additions a plan with
    dp x num_micro_batches = pieces uses, so that rounding does not differ needlessly."""
    model = build(model_name)
    opt = optimizer(list(model.parameters()))
    losses, grads = [], {}
    for step, (ids, targets) in enumerate(batches(model)):
        total = 0.0
        for piece_ids, piece_targets in zip(ids.chunk(pieces), targets.chunk(pieces), strict=True):
            loss = lm_loss(model(piece_ids), piece_targets)
            (loss / pieces).backward()
            total += loss.item()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        opt.zero_grad()
        losses.append(total / pieces)
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return {"losses": losses, "params": params, "grads": grads}


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


def run_world(nproc: int, cases: dict[str, Plan], folder: Path,
              model: str = MODEL) -> WorldResult:
    """Run every case in one world of nproc gloo ranks; read what the ranks wrote."""
    for name, plan in cases.items():
        plan.save(folder / f"{name}.plan.json")
    spec = {"model": model, "cases": list(cases), "folder": str(folder)}
    (folder / "spec.json").write_text(json.dumps(spec))
    result = folder / "results.json"
    run_workers(nproc, [sys.executable, "-m", "tests.executor.worker", str(folder / "spec.json")],
                folder, WORLD_TIMEOUT_S, progress_path=folder / "progress.log",
                done=result.exists, label="executor test worker")
    data = json.loads(result.read_text())
    params: dict[str, dict[str, torch.Tensor]] = {n: {} for n in cases}
    grads: dict[str, dict[str, torch.Tensor]] = {n: {} for n in cases}
    for name in cases:
        for rank in range(nproc):
            saved = torch.load(folder / f"{name}.rank{rank}.pt")
            params[name].update(saved["params"])
            grads[name].update(saved["grads"])
    return WorldResult({n: data[n]["losses"] for n in cases}, params, grads,
                       {n: data[n] for n in cases})


def compare(case: str, world: WorldResult, ref: dict) -> list[str]:
    """Differences of one case from the reference beyond the bounds (empty when it matches)."""
    problems = []
    losses = torch.tensor(world.losses[case], dtype=torch.float64)
    want = torch.tensor(ref["losses"], dtype=torch.float64)
    if not torch.allclose(losses, want, rtol=RTOL, atol=0):
        problems.append(f"{case}: losses {losses.tolist()} != reference {want.tolist()}")
    missing = sorted(set(ref["params"]) - set(world.params[case]))
    if missing:
        problems.append(f"{case}: parameters not reported: {missing}")
    top = max(g.abs().max() for g in ref["grads"].values())
    for name, expected in ref["grads"].items():
        got = world.grads[case].get(name)
        scale = expected.abs().max()
        scale = scale if scale > ZERO_GRAD * top else top
        if got is not None and (got - expected).abs().max() > RTOL * scale:
            err = ((got - expected).abs().max() / scale).item()
            problems.append(f"{case}: step-1 gradient of {name}: max diff {err:.2e} x max|g|")
    for name, expected in ref["params"].items():
        got = world.params[case].get(name)
        if got is not None and not torch.allclose(got, expected, rtol=RTOL, atol=ADAM_NOISE):
            err = (got - expected).abs().max().item()
            problems.append(f"{case}: {name} after {STEPS} steps: max diff {err:.2e}")
    return problems
