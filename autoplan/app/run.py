"""`autoplan run`: train a model under a plan on synthetic data, on local worker processes or
as one rank that torchrun started, and report measured step time and per-rank memory beside
the plan's prediction (and, with verify, the difference from a one-process reference).

Flow (run_plan):
1. load the model's layer graph and the plan, check them against each other and the world;
2. predict the plan with the CostModel (needs a profile or a cluster with datasheet figures)
   and refuse a plan that does not fit memory unless forced;
3. train: in this process when torchrun started it (RANK/WORLD_SIZE set) or for one rank,
   else in `nproc` local workers (autoplan/launch.py: a worker that dies stops them all);
4. with verify, train the same model, seed and batches in this process without parallelism
   and compare (executor/verify.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from autoplan import fmt
from autoplan.cost_model import CostModel, Estimate
from autoplan.errors import AutoplanError, WorkerFailed
from autoplan.executor import (
    GROUP_TIMEOUT,
    Batch,
    Comparison,
    DropoutOff,
    Trace,
    batch_norm_layers,
    compare,
    criterion,
    parallelize,
    reference_trace,
    train,
)
from autoplan.graph import LayerGraph
from autoplan.launch import (
    ProgressCount,
    call_workers,
    serve_worker,
    split_counted,
    under_torchrun,
)
from autoplan.models import BuiltModel, build_model, default_loss
from autoplan.plan import (
    Plan,
    check_plan,
    load_plan,
    parse_plan_shorthand,
    plan_from_json,
    uniform_plan,
)
from autoplan.tp_plan import infer_tp_plans
from autoplan.workload import load_graph, load_workload, memory_limit_bytes

__all__ = ["RUN_FAULT_ENV", "RunFailed", "RunOptions", "RunReport", "load_run_plan", "merge_ranks",
           "output_shape", "predict", "reference_run", "report_lines", "resolve_plan", "run_plan",
           "run_plans", "train_rank"]

log = logging.getLogger(__name__)

RUN_FAULT_ENV = "AUTOPLAN_RUN_FAULT"
"""Test-only: "kill:RANK:STEP" makes that rank SIGKILL itself as step STEP (from 1) begins."""


class RunFailed(WorkerFailed):
    """The run itself failed (a worker died or stalled): the CLI exits 1, not 2."""


@dataclass(frozen=True)
class RunOptions:
    """What `autoplan run` was asked to do."""

    model: str
    """A model spec or preset (`autoplan models`)."""
    plan: str
    """A plan.json path or shorthand ("dp=2,tp=2")."""
    nproc: int | None = None
    """Local worker processes; None: the plan file's world size, or the product of the degrees
    a shorthand plan names (under torchrun: the launched world)."""
    steps: int = 20
    global_batch: int | None = None
    """Samples per step; None: the plan file's, or 2 micro-batches per pipeline chunk."""
    warmup: int = 2
    """Steps left out of the measured step time (at most steps - 1)."""
    verify: bool = False
    force: bool = False
    """Run a plan whose predicted peak memory exceeds the limit."""
    profile: str | None = None
    cluster: str | None = None
    """What the prediction is for; None: local-cpu with one process per rank."""
    memory_limit_gib: float | None = None
    """GiB per device for the fit check; None: the cluster device's memory."""
    seed: int = 0
    lr: float = 1e-3
    """AdamW learning rate."""
    timeout_s: float = 300.0
    """Local workers are stopped after this long without finishing a step."""
    device: str | None = None
    """"cpu" or "cuda"; None: cuda when available."""
    cache: bool = True
    """Whether a spec's graph may come from, and go to, the graph cache (--no-cache: no)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AutoplanError(f"--steps must be at least 1, got {self.steps}")
        if self.nproc is not None and self.nproc < 1:
            raise AutoplanError(f"--nproc must be at least 1, got {self.nproc}")
        if self.global_batch is not None and self.global_batch < 1:
            raise AutoplanError(f"--global-batch must be at least 1, got {self.global_batch}")
        if self.warmup < 0:
            raise AutoplanError(f"--warmup must be at least 0, got {self.warmup}")
        memory_limit_bytes(self.memory_limit_gib)
        if not self.timeout_s > 0:
            raise AutoplanError(f"--timeout must be positive seconds, got {self.timeout_s}")
        if not 0 <= self.seed < 2**63:
            raise AutoplanError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.device not in (None, "cpu", "cuda"):
            raise AutoplanError(f"--device '{self.device}' is not cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise AutoplanError("--device cuda asked for, but CUDA is not available")

    @property
    def device_type(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class RunReport:
    """Measured against predicted, per rank, and the verification when asked for."""

    plan: Plan
    device: str
    losses: list[float]
    step_times_s: list[float]
    """Per step, the slowest rank's time."""
    warmup: int
    ranks: list[dict[str, int]]
    """Per rank: stage, params/grads/optimizer/state bytes (and max_allocated on CUDA)."""
    prediction: Estimate | None
    note: str | None = None
    """Why there is no prediction."""
    comparison: Comparison | None = None

    @property
    def step_time_s(self) -> float:
        """Median over the steps after warm-up."""
        return statistics.median(self.step_times_s[self.warmup:])

    def to_dict(self) -> dict:
        pred = self.prediction
        out: dict[str, Any] = {
            "model": self.plan.model, "world_size": self.plan.world_size, "device": self.device,
            "steps": len(self.losses), "warmup": self.warmup, "losses": self.losses,
            "step_time_s": self.step_time_s, "step_times_s": self.step_times_s,
            "ranks": self.ranks,
            "prediction": None if pred is None else {
                "step_time_s": pred.step_time_s, "peak_memory_bytes": pred.peak_memory_bytes,
                "memory_limit_bytes": pred.memory_limit_bytes, "fits": pred.fits,
                "stages": [s.memory.as_dict() for s in pred.stages]},
            "note": self.note,
        }
        if self.comparison is not None:
            out |= self.comparison.to_dict()
        return out


# ------------------------------------------------------------------------------ synthetic data


@dataclass
class _SyntheticData:
    """Seeded batches for a built model: token ids and their targets (next tokens, or the
    tokens themselves for an encoder) for token models; for any other module, its example
    inputs with random values and random regression targets."""

    built: BuiltModel
    global_batch: int
    seed: int
    device: str = "cpu"
    target_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.language_model:
            self.target_shape = output_shape(self.built)

    @property
    def language_model(self) -> bool:
        return self.built.token_targets is not None

    @property
    def loss_fn(self) -> Callable[[Any, torch.Tensor], torch.Tensor]:
        return default_loss  # cross entropy on token ids, mean squared error otherwise

    def batch(self, step: int) -> Batch:
        """The global batch of step `step` (from 0): the same on every rank and process."""
        gen = torch.Generator().manual_seed(self.seed + 1 + step)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1 + step)
            inputs = tuple(t.cpu() for t in self.built.example_inputs(self.global_batch))
        inputs = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype)
                       if t.is_floating_point() else t for t in inputs)
        if self.built.token_targets is not None:
            targets = self.built.token_targets(inputs)
        else:
            targets = torch.randn((self.global_batch, *self.target_shape), generator=gen)
        return tuple(t.to(self.device) for t in inputs), targets.to(self.device)


def output_shape(built: BuiltModel) -> tuple[int, ...]:
    """The shape of one sample of the model's first output tensor (what a model that is not
    a token model regresses on), from a forward of one sample in eval mode.

    Raises:
        AutoplanError: when the model returns no tensor.
    """
    module = built.module
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(*built.example_inputs(1))
    module.train(was_training)
    first = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not first:
        raise AutoplanError(f"model {built.spec.text} returned no tensor")
    return tuple(first[0].shape[1:])


def _build(model: str, seed: int) -> BuiltModel:
    """The model on the CPU, initialised from `seed` (the same on every rank)."""
    torch.manual_seed(seed)
    return build_model(model, device="cpu")


def _optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, foreach=False)


# ------------------------------------------------------------------------------ step 1-2


@dataclass(frozen=True)
class _Given:
    """The plan as given, read once: a plan file's Plan, or a shorthand's typed values."""

    plan: Plan | None
    values: dict[str, Any]


def _given(options: RunOptions) -> _Given:
    if options.plan.endswith(".json") or Path(options.plan).is_file():
        return _Given(load_plan(options.plan), {})
    return _Given(None, parse_plan_shorthand(options.plan))


def _world_size(options: RunOptions, given: _Given) -> int:
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if options.nproc is not None and options.nproc != world:
            raise AutoplanError(f"--nproc {options.nproc}, but torchrun started a world of "
                                f"{world}; leave --nproc out under torchrun")
        return world
    if options.nproc is not None:
        return options.nproc
    if given.plan is not None:
        return given.plan.world_size
    values = given.values  # dp x tp x pp, the degrees it names
    return values.get("dp", 1) * values.get("tp", 1) * values.get("pp", 1)


def _default_global_batch(options: RunOptions, given: _Given, world: int) -> int | None:
    """Two micro-batches per pipeline chunk for a shorthand plan (None for a plan file)."""
    if options.global_batch is not None or given.plan is not None:
        return options.global_batch
    values = given.values
    tp, pp = values.get("tp", 1), values.get("pp", 1)
    dp = values.get("dp", max(1, world // (tp * pp)))
    return dp * values.get("micro_batch", 1) * 2 * pp * values.get("virtual_stages", 1)


def load_run_plan(options: RunOptions, world: int,
                  given: _Given | None = None) -> tuple[Plan, LayerGraph]:
    """The plan (from its file or expanded from shorthand), checked against model and world.

    Raises:
        AutoplanError: naming the mismatch.
    """
    given = given or _given(options)
    graph = load_graph(options.model, dtype="fp32", cache=options.cache)
    global_batch = _default_global_batch(options, given, world)
    plan = given.plan or uniform_plan(given.values, graph, world, global_batch)
    if global_batch is not None and plan.global_batch != global_batch:
        raise AutoplanError(f"plan is for global batch {plan.global_batch}, not {global_batch}")
    if plan.model_hash not in (None, graph.structural_hash) and _searched_in_bf16_or_fp16(
            options, plan.model_hash):
        plan = plan.model_copy(update={"model_hash": graph.structural_hash})
    check_plan(plan, graph, world_size=world)
    return plan, graph


def _searched_in_bf16_or_fp16(options: RunOptions, model_hash: str) -> bool:
    """Whether `model_hash` is the model's traced in bf16 or fp16 (a search's dtypes; layer
    signatures hold the dtype): the same layers, which `autoplan run` trains in fp32."""
    return any(load_graph(options.model, dtype=dtype, cache=options.cache).structural_hash
               == model_hash for dtype in ("bf16", "fp16"))


def resolve_plan(options: RunOptions) -> tuple[Plan, LayerGraph, int]:
    """The plan, the model's graph and the world size `options` ask for (load_run_plan).

    Raises:
        AutoplanError: naming the mismatch.
    """
    given = _given(options)
    world = _world_size(options, given)
    return (*load_run_plan(options, world, given), world)


def _cluster_spec(options: RunOptions, world: int) -> str:
    if options.cluster:
        return options.cluster
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return f"local-cpu:procs={world}" + (f",gpus_per_node={local}" if local < world else "")


def predict(options: RunOptions, plan: Plan, graph: LayerGraph,
            world: int) -> tuple[Estimate | None, str | None]:
    """The CostModel's estimate of `plan`, or None and why not.

    Raises:
        AutoplanError: on a bad cluster or profile, or when the plan does not fit memory and
            options.force is not set (naming the peak and the limit).
    """
    work = load_workload(graph, _cluster_spec(options, world), options.profile,
                         memory_limit_gib=options.memory_limit_gib, takes_dtype=False)
    try:
        model = CostModel.of(work)
    except AutoplanError:
        if work.profile is not None:
            raise
        return None, "no prediction: give --profile"
    estimate = model.estimate(plan)
    if not estimate.fits and not options.force:
        stage = max(range(plan.pp), key=lambda s: estimate.peak_memory_bytes[s])
        peak = estimate.peak_memory_bytes[stage] + estimate.overhead_bytes
        raise AutoplanError(f"plan does not fit memory: predicted peak {fmt.nbytes(peak)} per "
                            f"rank (stage {stage}) exceeds the limit of "
                            f"{fmt.nbytes(estimate.memory_limit_bytes)}; give --force to run "
                            "it anyway")
    return estimate, None


# ------------------------------------------------------------------------------ step 3


def _maybe_fault(rank: int, step: int) -> None:
    """Test-only: SIGKILL this rank at the step RUN_FAULT_ENV names."""
    kind, _, rest = os.environ.get(RUN_FAULT_ENV, "").partition(":")
    target, _, at = rest.partition(":")
    if kind == "kill" and int(target) == rank and int(at or 1) == step + 1:
        os.kill(os.getpid(), signal.SIGKILL)


def train_rank(options: RunOptions, plan: Plan,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on this rank (a process group of the plan's world is up, or the world is one).

    Returns:
        This rank's results: losses, step times, state bytes (and, with verify, the whole
        step-1 gradients and final parameters it holds).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = options.device_type
    built = _build(options.model, options.seed)
    data = _SyntheticData(built, plan.global_batch, options.seed, device)
    module = built.module.to(device)
    if any(layer.tp > 1 for layer in plan.layers):  # split units as tracing planned them
        infer_tp_plans(module, built.example_inputs,
                       [layer.name for layer in plan.layers if layer.name != "loss"])
    runner = parallelize(module, plan, data.loss_fn, device=device)
    optimizer = _optimizer(runner.parameters(), options.lr)

    def batch(step: int) -> Batch:
        _maybe_fault(rank, step)
        if progress is not None and step:
            progress(f"step {step}/{options.steps} done")
        return data.batch(step)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # verify compares with a reference that draws other dropout masks: dropout off in both
    with DropoutOff(runner.module) if options.verify else contextlib.nullcontext():
        trace = train(runner, optimizer, steps=options.steps, make_batch=batch,
                      keep=options.verify, device_type=device)
    state = dict(trace.state_bytes)
    state["state"] = sum(state.values())
    state["stage"] = _stage_of(rank, plan)
    if device == "cuda":
        state["max_allocated"] = torch.cuda.max_memory_allocated()
    return {"losses": trace.losses, "step_times_s": trace.step_times_s, "memory": state,
            "params": trace.params, "grads": trace.grads,
            "replicated_layers": runner.replicated_layers}


def _stage_of(rank: int, plan: Plan) -> int:
    """The pipeline stage of a rank: the mesh puts pp outermost (executor/mesh.py)."""
    return rank // plan.stage_gpus


def _init_world(device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=GROUP_TIMEOUT)


def _train_world(options: RunOptions, plan: Plan,
                 progress: Callable[[str], None] | None = None) -> list[dict] | None:
    """Every rank trains; rank 0 gets all ranks' results (the others None)."""
    _init_world(options.device_type)
    result = train_rank(options, plan, progress)
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 \
        else None
    dist.gather_object(result, gathered, dst=0)
    return gathered


def _launch(options: RunOptions, plan: Plan, world: int) -> list[dict]:
    """Run the world as local workers (launch.call_workers) and read rank 0's file of all
    ranks' results.

    Raises:
        RunFailed: a worker died or stalled (every worker is stopped first), or the workers
            wrote no results.
    """
    request = {"options": asdict(options), "plan": plan.to_json()}
    try:
        return call_workers("autoplan.app.run", request, world, options.timeout_s,
                            _read_ranks, label="run worker")
    except WorkerFailed as err:
        raise RunFailed(str(err)) from None


def _read_ranks(path: Path) -> list[dict]:
    return torch.load(path, weights_only=True)["ranks"]


def _write_ranks(ranks: list[dict], tmp: Path) -> None:
    """Every rank's results (tensors among them) as a torch.save file, read back with
    weights_only=True."""
    torch.save({"ranks": ranks}, tmp)


def run_plans(runs: list[tuple[RunOptions, Plan]], world: int,
              on_progress: Callable[[str], None] | None = None) -> list[RunReport]:
    """Train several plans one after the other in one launch of `world` local workers (CPU
    only: gloo), each rank building the model and its process group afresh for each plan, and
    report each without a prediction (the caller has its own). A launch costs every rank a
    Python start, torch's import and the process group, which on this 2-core machine took as
    long as several steps of a small model: `autoplan validate` runs a dozen plans and pays
    it once.

    Args:
        runs: the options (steps, warm-up, seed, device) and the plan of each run.
        world: local processes, the plans' world size.
        on_progress: called with a line per step, counted over all runs (launch.counted_line).

    Raises:
        RunFailed: a worker died or stalled (every worker is stopped first), naming the plan
            being trained (its shorthand, RunOptions.plan) as "plan P: ...".
    """
    request = {"runs": [{"options": asdict(options), "plan": plan.to_json()}
                        for options, plan in runs]}
    current = [0]  # the run the workers' last line names ("plan i/n: ...", _train_many)

    def progress(line: str) -> None:
        text = split_counted(line)[0]
        if text.startswith("plan "):
            current[0] = int(text.split()[1].partition("/")[0]) - 1
        if on_progress is not None:
            on_progress(line)

    try:
        found = call_workers("autoplan.app.run", request, world,
                             max(options.timeout_s for options, _ in runs),
                             _read_ranks, label="run worker", on_progress=progress)
    except WorkerFailed as err:
        raise RunFailed(f"plan {runs[current[0]][0].plan}: {err}") from None
    return [_report(options, plan, ranks, None, None)
            for (options, plan), ranks in zip(runs, found, strict=True)]


def _train_many(spec: list[dict[str, Any]], progress: Callable[[str], None]) -> list | None:
    """Every rank trains each run in turn, each in a process group of its own over one store
    (its keys prefixed by the run), so that every plan starts from what a launch of its own
    gives it; rank 0 gets all results. With one group for all runs, a 12-layer GPT's second
    pipeline plan once waited 120 s on the store for a group's key and timed out
    (benchmarks/results/validate_notes.md; not reproduced with gpt-tiny)."""
    runs = [(RunOptions(**run["options"]), plan_from_json(run["plan"], "the launcher's plan"))
            for run in spec]
    count, before, out = ProgressCount(sum(options.steps for options, _ in runs), progress), 0, []
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0, timeout=GROUP_TIMEOUT)
    for i, (options, plan) in enumerate(runs, 1):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"run-{i}", store), rank=rank,
                                world_size=world, timeout=GROUP_TIMEOUT)

        count.done = before  # train_rank reports a step done as the next begins: not its last
        count.say(f"plan {i}/{len(runs)}: {options.plan} starting")
        result = train_rank(options, plan,
                            lambda line, i=i: count.step(f"plan {i}/{len(runs)}: {line}"))
        gathered: list[Any] | None = [None] * dist.get_world_size() \
            if dist.get_rank() == 0 else None
        dist.gather_object(result, gathered, dst=0)
        out.append(gathered)
        before += options.steps
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # the last plan's model and optimizer go before the next is built
    return out if rank == 0 else None


def _serve_rank(spec: dict[str, Any], progress: Callable[[str], None]) -> list | None:
    """One local rank's part (launch.serve_worker): train (one plan, or each of "runs");
    rank 0 gets every rank's results."""
    torch.set_num_threads(1)
    if "runs" in spec:
        return _train_many(spec["runs"], progress)
    options = RunOptions(**spec["options"])
    plan = plan_from_json(spec["plan"], "the launcher's plan")
    return _train_world(options, plan, progress)


# ------------------------------------------------------------------------------ step 4


def reference_run(options: RunOptions, plan: Plan) -> Trace:
    """The same model, seed and batches trained in this process without parallelism, in as
    many accumulated slices as the plan has (data-parallel ranks x micro-batches), with
    dropout off as in the verified run."""
    return _reference_with_notes(options, plan)[0]


def _reference_with_notes(options: RunOptions, plan: Plan) -> tuple[Trace, list[str]]:
    """reference_run's trace, and notes on what the comparison changed or what may explain
    a difference (dropout turned off, BatchNorm layers and the slices they normalize)."""
    built = _build(options.model, options.seed)
    data = _SyntheticData(built, plan.global_batch, options.seed)
    batches = [data.batch(step) for step in range(options.steps)]
    pieces = _reference_pieces(plan)
    with DropoutOff(built.module) as dropout:
        trace = reference_trace(built.module, batches, data.loss_fn, pieces,
                                _optimizer(list(built.module.parameters()), options.lr))
    notes = [dropout.summary()] if dropout.seen else []
    return trace, notes + _batch_norm_notes(built.module, plan)


def _reference_pieces(plan: Plan) -> int:
    return plan.layers[0].dp * plan.num_micro_batches


def _batch_norm_notes(module: torch.nn.Module, plan: Plan) -> list[str]:
    """Where BatchNorm normalizes other slices of the batch in the run than in the
    reference: a real difference of the training, not a fault of the executor."""
    names = batch_norm_layers(module)
    if not names:
        return []
    ref_samples = plan.global_batch // _reference_pieces(plan)
    differ = []
    for name in names:
        layer = max((lp for lp in plan.layers if name == lp.name or
                     name.startswith(f"{lp.name}.")), key=lambda lp: len(lp.name), default=None)
        samples = plan.global_batch // (plan.num_micro_batches * (layer.dp if layer else 1))
        if layer is not None and samples != ref_samples:
            differ.append(f"{name} ({samples})")
    if not differ:
        return [f"BatchNorm ({len(names)} layers) normalizes slices of {ref_samples} samples "
                "here as in the reference, so its per-rank statistics do not explain a "
                "difference"]
    return [f"BatchNorm layers normalize with per-rank batch statistics: {', '.join(differ[:4])}"
            f"{' ...' if len(differ) > 4 else ''} samples here, {ref_samples} in the "
            "reference; a real difference of the training (torch's SyncBatchNorm would share "
            "the statistics, but it runs on CUDA only)"]


def merge_ranks(ranks: list[dict]) -> Trace:
    """One Trace of the whole run from every rank's train_rank results."""
    run = Trace(ranks[0]["losses"])
    for rank in ranks:
        run.params.update(rank["params"])
        run.grads.update(rank["grads"])
    return run


def _verify(options: RunOptions, plan: Plan, ranks: list[dict]) -> Comparison:
    """Compare the merged run with the one-process reference, noting the criterion and
    what the comparison changed or what may explain a difference."""
    reference, notes = _reference_with_notes(options, plan)
    comparison = compare(merge_ranks(ranks), reference, options.lr)
    batch_norm = [n for n in notes if n.startswith("BatchNorm")]
    notes = [n for n in notes if n not in batch_norm]
    if not comparison.ok:
        notes += batch_norm
    return replace(comparison, notes=(f"criterion: {criterion(options.steps, options.lr)}",
                                      *notes))


# ------------------------------------------------------------------------------ entry


def run_plan(options: RunOptions) -> RunReport | None:
    """Check, predict, train and (with verify) compare, as the module docstring says.

    Returns:
        The report; None on a torchrun rank other than 0 (rank 0 reports for the world).

    Raises:
        AutoplanError: bad input, or a plan that does not fit memory without force.
        RunFailed: a worker died or stalled.
    """
    plan, graph, world = resolve_plan(options)
    estimate, note = predict(options, plan, graph, world)
    if under_torchrun():
        ranks = _train_world(options, plan)
        dist.destroy_process_group()
        if ranks is None:
            return None
    elif world == 1:
        ranks = [train_rank(options, plan)]
    else:
        ranks = _launch(options, plan, world)
    return _report(options, plan, ranks, estimate, note)


def _report(options: RunOptions, plan: Plan, ranks: list[dict], estimate: Estimate | None,
            note: str | None) -> RunReport:
    """The report of the ranks' results (each step's time is its slowest rank's)."""
    comparison = _verify(options, plan, ranks) if options.verify else None
    step_times = [max(r["step_times_s"][i] for r in ranks) for i in range(options.steps)]
    return RunReport(plan, options.device_type, ranks[0]["losses"], step_times,
                     min(options.warmup, options.steps - 1), [r["memory"] for r in ranks],
                     estimate, note, comparison)


def report_lines(report: RunReport) -> list[str]:
    """The report as text lines for the terminal."""
    plan, pred = report.plan, report.prediction
    lines = [f"{plan.model}: {plan.world_size} ranks on {report.device}, pp {plan.pp}, "
             f"global batch {plan.global_batch}, {len(report.losses)} steps, loss "
             f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}"]
    predicted = f"predicted {fmt.seconds(pred.step_time_s)}" if pred else report.note
    lines.append(f"step time: measured {fmt.seconds(report.step_time_s)} (median after "
                 f"{report.warmup} warm-up steps); {predicted}")
    for rank, mem in enumerate(report.ranks):
        text = (f"rank {rank} (stage {mem['stage']}): params {fmt.nbytes(mem['params'])}, grads "
                f"{fmt.nbytes(mem['grads'])}, optimizer {fmt.nbytes(mem['optimizer'])}")
        if "max_allocated" in mem:
            text += f", max allocated {fmt.nbytes(mem['max_allocated'])}"
        if pred is not None:
            stage = pred.stages[mem["stage"]].memory
            text += (f"; predicted params {fmt.nbytes(stage.params)}, grads "
                     f"{fmt.nbytes(stage.grads)}, optimizer {fmt.nbytes(stage.optimizer)}, "
                     f"peak {fmt.nbytes(stage.peak)}")
        lines.append(text)
    if report.comparison is not None:
        c = report.comparison
        verdict = "matches" if c.ok else "DIFFERS from"
        lines.append(f"verify: {verdict} the one-process reference: max_rel_param_diff "
                     f"{c.max_rel_param_diff:.2e}, loss_diff {c.loss_diff:.2e}, max_rel_grad_diff "
                     f"{c.max_rel_grad_diff:.2e}")
        lines += [f"  {problem}" for problem in c.problems[:10]]
        if len(c.problems) > 10:
            lines.append(f"  ... and {len(c.problems) - 10} more")
        lines += [f"  {note}" for note in c.notes]
    return lines


if __name__ == "__main__":
    serve_worker(sys.argv[1], _serve_rank, _write_ranks)
