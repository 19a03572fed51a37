"""Is a parallel run the same training as one process? The training loop both run, and the
comparison of their losses, step-1 gradients and final parameters, with its tolerances.

Used by `autoplan run --verify` and by the executor tests (tests/executor/harness.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from autoplan.executor.parallelize import LossFn, Runner

__all__ = ["RTOL", "ZERO_GRAD", "Comparison", "DropoutOff", "Trace", "adam_noise",
           "batch_norm_layers", "compare", "criterion", "full_tensors", "local_bytes",
           "optimizer_tensors", "reference_trace", "train", "zero_dropout"]

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]
"""(positional inputs, targets) of one global batch."""

RTOL = 1e-5
"""Losses per step (elementwise) and step-1 gradients (per tensor, max norm) must agree to this."""
ZERO_GRAD = 1e-6
"""A tensor whose reference gradient stays below this fraction of the model's largest gradient
entry is zero up to rounding (GPT's k bias: softmax ignores a shift of the keys); its error is
measured against the model's largest gradient entry instead of its own."""
_SMALL_PARAM = 1e-2
"""max_rel_param_diff measures a tensor whose entries all stay below this fraction of the
model's largest |p| (a bias near zero) against that fraction instead of its own size, so
that rounding-level moves of near-zero tensors (see adam_noise) do not dominate the figure."""
_ADAM_NOISE_PER_STEP = 0.05
"""Fraction of one step's largest AdamW move (lr) that rounding may account for; see
adam_noise."""


def adam_noise(steps: int, lr: float) -> float:
    """Absolute parameter difference allowed (beside RTOL x |p|) after `steps` AdamW steps.

    AdamW divides each gradient entry by its own magnitude (plus eps 1e-8), so an entry whose
    gradient is near rounding level (GPT's k bias has an exactly-zero gradient by softmax shift
    invariance) moves by an amount set by rounding. Measured: two single-process runs of the
    same batches, one whole and one in 8 accumulated slices, differ by up to 3.4e-5 x max|p| in
    parameters after 3 steps, while losses and gradients agree to 1e-6. The gradients are the
    exact test; this bound only catches errors larger than 5% of the steps' total movement.
    """
    return _ADAM_NOISE_PER_STEP * steps * lr


def criterion(steps: int, lr: float) -> str:
    """The bounds compare() applies, in words, for a report."""
    return (f"losses and step-1 gradients within {RTOL:g} relative (a gradient per tensor, "
            f"against its max |g|); parameters after {steps} steps within {RTOL:g} x |p| + "
            f"{adam_noise(steps, lr):.1e} (AdamW rounding allowance, {_ADAM_NOISE_PER_STEP:g} "
            f"x steps x lr), or + steps x lr where the step-1 gradient is at rounding level "
            f"(below {RTOL:g} x the largest: rounding picks AdamW's direction there)")


# torch functions that drop out, and where their probability is: (keyword, position)
_DROPOUTS: dict[Any, tuple[str, int]] = {
    F.dropout: ("p", 1), F.dropout1d: ("p", 1), F.dropout2d: ("p", 1), F.dropout3d: ("p", 1),
    F.alpha_dropout: ("p", 1), F.feature_alpha_dropout: ("p", 1), torch.dropout: ("p", 1),
    torch.feature_dropout: ("p", 1), torch.alpha_dropout: ("p", 1),
    torch.feature_alpha_dropout: ("p", 1),
    F.scaled_dot_product_attention: ("dropout_p", 4),
}


_DROPOUT_NAMES = ("dropout", "pdrop", "drop_prob", "drop_rate", "layerdrop")
"""Parts of the names of float attributes (of modules and their configs) that hold a dropout
probability: attention_dropout, attn_pdrop, hidden_dropout_prob, dropout_rate, layerdrop."""


def zero_dropout(module: nn.Module) -> dict[str, float]:
    """Set every dropout probability `module` holds to 0: nn.Dropout's p, and float
    attributes named like one on its sub-modules and their `config`s (transformers attention
    reads self.attention_dropout or self.config.attention_dropout when called). They stay 0.

    Returns:
        What was nonzero: attribute name (or "nn.Dropout") -> largest probability.
    """
    found: dict[str, float] = {}
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            found["nn.Dropout"] = max(found.get("nn.Dropout", 0.0), sub.p)
            sub.p = 0.0
        for holder in (sub, getattr(sub, "config", None)):
            for name, value in list(getattr(holder, "__dict__", {}).items()):
                if isinstance(value, float) and value > 0 and \
                        any(part in name.lower() for part in _DROPOUT_NAMES):
                    found[name] = max(found.get(name, 0.0), value)
                    setattr(holder, name, 0.0)
    return found


class DropoutOff(TorchFunctionMode):
    """Inside, every dropout probability is 0: `module`'s settings (zero_dropout, which a
    recomputation under activation checkpointing also reads) and every call to F.dropout, its
    kin and scaled_dot_product_attention's dropout_p, whatever the probability's source.

    A parallel run and the one-process reference draw different random masks, so with dropout
    on they differ by far more than rounding. `seen` records the probabilities the model
    asked for: name -> largest p.
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self.seen: dict[str, float] = zero_dropout(module) if module is not None else {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        where = _DROPOUTS.get(func)
        if where is not None:
            args, kwargs = self._zeroed(func, where, list(args), kwargs)
        return func(*args, **kwargs)

    def __enter__(self) -> DropoutOff:
        super().__enter__()
        return self

    def _zeroed(self, func: Any, where: tuple[str, int], args: list,
                kwargs: dict) -> tuple[list, dict]:
        key, position = where
        if key in kwargs:
            p, kwargs[key] = kwargs[key], 0.0
        elif len(args) > position:
            p, args[position] = args[position], 0.0
        else:
            return args, kwargs
        if isinstance(p, float | int) and p > 0:
            name = getattr(func, "__name__", str(func))
            self.seen[name] = max(self.seen.get(name, 0.0), float(p))
        return args, kwargs

    def summary(self) -> str:
        """What was turned off, for a report ("" when the model asked for no dropout)."""
        if not self.seen:
            return ""
        asked = ", ".join(f"{name} p={p:g}" for name, p in sorted(self.seen.items()))
        return f"dropout turned off in both runs (the model asked for {asked})"


def batch_norm_layers(module: nn.Module) -> list[str]:
    """The BatchNorm layers of `module` that normalize with batch statistics in training."""
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


@dataclass
class Trace:
    """What a training run yields, on one rank or merged over the ranks."""

    losses: list[float]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    """FQN -> whole parameter after the last step (empty when not kept)."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """FQN -> whole gradient of step 1 (empty when not kept)."""
    step_times_s: list[float] = field(default_factory=list)
    state_bytes: dict[str, int] = field(default_factory=dict)
    """This rank's bytes of "params", "grads" (step 1) and "optimizer" state (after step 1)."""


def full_tensors(runner: Runner, pick: Callable[[nn.Parameter], torch.Tensor | None]
                 ) -> dict[str, torch.Tensor]:
    """FQN -> whole CPU tensor (gathered from DTensor shards) of pick(p) for each parameter
    this rank holds. A collective when tensors are DTensors: call it on every rank."""
    out = {}
    for fqn, param in runner.named_parameters():
        value = pick(param)
        if value is None:
            continue
        value = value.full_tensor() if isinstance(value, DTensor) else value
        out[fqn] = value.detach().cpu().clone()
    return out


def local_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the local storage behind `tensors` (DTensor shards), each storage once
    (by identity: fake tensors, which the dry run weighs, have no addresses)."""
    seen: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        seen[id(storage)] = storage  # kept alive, so no id is reused meanwhile
    return sum(storage.nbytes() for storage in seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def train(runner: Runner, optimizer: torch.optim.Optimizer, batches: Sequence[Batch] | None = None,
          *, steps: int | None = None, make_batch: Callable[[int], Batch] | None = None,
          keep: bool = False, device_type: str = "cpu") -> Trace:
    """Train `runner` for its batches: step 1 without the optimizer (to read its gradients
    and their bytes), then optimizer.step(); later steps through Runner.step with it.

    Args:
        runner: the parallelized model.
        optimizer: over runner.parameters().
        batches: the global batches, one per step; or give `steps` and `make_batch(step)`.
        keep: also gather the whole step-1 gradients and final parameters (a collective).
        device_type: "cuda" synchronizes before each step time is read.

    Returns:
        The Trace of this rank (losses are the same on every rank).
    """
    count = len(batches) if batches is not None else steps or 0
    batch_of = (lambda i: batches[i]) if batches is not None else make_batch
    trace = Trace([])
    for index in range(count):
        inputs, targets = batch_of(index)
        _sync(device_type)
        start_s = time.perf_counter()
        if index == 0:
            loss = runner.step(inputs, targets)
            _sync(device_type)
            pause_s = time.perf_counter()
            trace.state_bytes["params"] = local_bytes(runner.parameters())
            trace.state_bytes["grads"] = local_bytes(
                [p.grad for p in runner.parameters() if p.grad is not None])
            if keep:
                trace.grads = full_tensors(runner, lambda p: p.grad)
            start_s += time.perf_counter() - pause_s  # the reading is not part of the step
            optimizer.step()
            optimizer.zero_grad()
            trace.state_bytes["optimizer"] = local_bytes(optimizer_tensors(optimizer))
        else:
            loss = runner.step(inputs, targets, optimizer)
        trace.losses.append(loss.item())
        _sync(device_type)
        trace.step_times_s.append(time.perf_counter() - start_s)
    if keep:
        trace.params = full_tensors(runner, lambda p: p)
    return trace


def reference_trace(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, pieces: int,
                    optimizer: torch.optim.Optimizer) -> Trace:
    """One process, no parallelism: each batch run as `pieces` equal slices in order with their
    gradients accumulated (loss / pieces each). The same mathematics for any `pieces`, and the
    order of additions a plan with dp x num_micro_batches = pieces uses, so that rounding does
    not differ needlessly.

    Returns:
        A Trace with losses, step-1 gradients and final parameters (CPU tensors).
    """
    trace = Trace([])
    for step, (inputs, targets) in enumerate(batches):
        total = 0.0
        slices = zip(*(t.chunk(pieces) for t in (*inputs, targets)), strict=True)
        for *piece_inputs, piece_targets in slices:
            loss = loss_fn(model(*piece_inputs), piece_targets)
            (loss / pieces).backward()
            total += loss.item()
        if step == 0:
            trace.grads = {n: p.grad.detach().cpu().clone()
                           for n, p in model.named_parameters(remove_duplicate=False)
                           if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        trace.losses.append(total / pieces)
    trace.params = {n: p.detach().cpu().clone()
                    for n, p in model.named_parameters(remove_duplicate=False)}
    return trace


@dataclass(frozen=True)
class Comparison:
    """How far a run is from the reference, and what exceeds the tolerances."""

    loss_diff: float
    """Largest |loss - reference loss| over the steps."""
    max_rel_loss_diff: float
    max_rel_grad_diff: float
    """Largest step-1 gradient difference of a tensor over its own max |g| (or the model's,
    for tensors whose gradient is zero up to rounding); 0 when gradients were not kept."""
    max_rel_param_diff: float
    """Largest final parameter difference of a tensor over its own max |p| (at least 1% of
    the model's largest |p|)."""
    problems: list[str]
    notes: tuple[str, ...] = ()
    """What the comparison assumed or changed (the criterion, dropout turned off) and what
    may explain a difference (BatchNorm's per-rank statistics)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"max_rel_param_diff": self.max_rel_param_diff, "loss_diff": self.loss_diff,
                "max_rel_loss_diff": self.max_rel_loss_diff,
                "max_rel_grad_diff": self.max_rel_grad_diff, "ok": self.ok,
                "problems": self.problems, "notes": list(self.notes)}


def _loss_problems(run: Trace, ref: Trace) -> tuple[float, float, list[str]]:
    got = torch.tensor(run.losses, dtype=torch.float64)
    want = torch.tensor(ref.losses, dtype=torch.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf"), [f"{len(run.losses)} losses, reference has "
                                            f"{len(ref.losses)}"]
    diff = (got - want).abs()
    rel = (diff / want.abs().clamp_min(1e-30)).max().item() if len(want) else 0.0
    ok = torch.allclose(got, want, rtol=RTOL, atol=0)
    problems = [] if ok else [f"losses {got.tolist()} != reference {want.tolist()}"]
    return (diff.max().item() if len(diff) else 0.0), rel, problems


def _grad_problems(run: Trace, ref: Trace) -> tuple[float, list[str]]:
    if not run.grads or not ref.grads:
        return 0.0, []
    top = max(g.abs().max() for g in ref.grads.values())
    worst, problems = 0.0, []
    for name, expected in ref.grads.items():
        got = run.grads.get(name)
        if got is None:
            continue
        scale = expected.abs().max()
        scale = scale if scale > ZERO_GRAD * top else top
        err = ((got - expected).abs().max() / scale.clamp_min(1e-30)).item()
        worst = max(worst, err)
        if err > RTOL:
            problems.append(f"step-1 gradient of {name}: max diff {err:.2e} x max|g|")
    return worst, problems


def _param_problems(run: Trace, ref: Trace, steps: int, lr: float) -> tuple[float, list[str]]:
    missing = sorted(set(ref.params) - set(run.params))
    problems = [f"parameters not reported: {missing}"] if missing else []
    worst = 0.0
    top = max((p.abs().max() for p in ref.params.values()), default=torch.tensor(1.0))
    for name, expected in ref.params.items():
        got = run.params.get(name)
        if got is None:
            continue
        bound = RTOL * expected.abs() + _param_allowance(ref, name, expected, steps, lr)
        diff = (got - expected).abs().max()
        scale = expected.abs().max().clamp_min(_SMALL_PARAM * top).clamp_min(1e-30)
        worst = max(worst, (diff / scale).item())
        if ((got - expected).abs() > bound).any():
            problems.append(f"{name} after {steps} steps: max diff {diff.item():.2e}")
    return worst, problems


def _param_allowance(ref: Trace, name: str, expected: torch.Tensor, steps: int,
                     lr: float) -> torch.Tensor | float:
    """The absolute allowance per entry: adam_noise, or for an entry whose step-1 reference
    gradient is at rounding level (below RTOL x the model's largest), AdamW's largest move,
    steps x lr: Adam divides that gradient by its own magnitude, so rounding alone picks
    the direction of every step (a k bias, whose gradient softmax's shift invariance makes
    exactly zero, moves by lr a step either way in both runs)."""
    grads = ref.grads
    if not grads or name not in grads or grads[name].shape != expected.shape:
        return adam_noise(steps, lr)
    top = max(g.abs().max() for g in grads.values())
    rounding = grads[name].abs() <= RTOL * top
    return torch.where(rounding, steps * lr, adam_noise(steps, lr))


def compare(run: Trace, ref: Trace, lr: float) -> Comparison:
    """Differences of a run from the reference beyond the bounds (RTOL for losses and step-1
    gradients; RTOL x |p| + adam_noise for final parameters).

    Args:
        run: the parallel run, parameters and gradients merged over the ranks.
        ref: the reference_trace of the same batches.
        lr: the AdamW learning rate both used.
    """
    loss_diff, rel_loss, problems = _loss_problems(run, ref)
    grad_diff, grad_problems = _grad_problems(run, ref)
    param_diff, param_problems = _param_problems(run, ref, len(ref.losses), lr)
    return Comparison(loss_diff, rel_loss, grad_diff, param_diff,
                      problems + grad_problems + param_problems)
