"""`autoplan run --dry-run`: one process plays one rank of a plan's whole world, with the
executor's own code, and weighs what that rank holds against the cost model's prediction.

The first question about a plan for 1,024 GPUs is whether it fits; nothing here has 1,024
GPUs. torch's fake process group (torch.testing._internal.distributed.fake_pg) lets one
process be rank R of any world: meshes, tensor parallelism, FSDP2 and the pipeline schedule
build exactly R's shards and run, and every collective returns at once without data. The
model is built on the meta device and only R's pipeline chunks are materialised, so the
rank's state is its real size, never the model's.

On a CPU the rank's tensors are fake (FakeTensorMode: shapes, no memory, no arithmetic), so
a 70B model's stage at sequence 8,192 steps in about a minute; on CUDA they are real and
`torch.cuda.max_memory_allocated` is read beside the count. Either way the live tensor
bytes are counted op by op (profiler/live_bytes.py). Values are meaningless (collectives
return nothing), so no loss is reported.

Flow: the plan and its prediction as `autoplan run` makes them; the ranks to play (the
fullest stage's first rank by default); for each, a fake world, the model on meta, the
executor's parallelize() with static pipeline shapes, two steps (the first creates the
optimizer's state), and the second step's peak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._tools.mod_tracker import ModTracker

from autoplan import fmt
from autoplan.app.run import RunOptions, output_shape, predict, resolve_plan
from autoplan.cost_model import Estimate, StageMemory
from autoplan.errors import AutoplanError
from autoplan.executor import GROUP_TIMEOUT, Batch, local_bytes, optimizer_tensors, parallelize
from autoplan.launch import call_workers, serve_worker
from autoplan.models import BuiltModel, build_model, default_loss
from autoplan.plan import Plan, plan_from_json
from autoplan.profiler import LiveBytes
from autoplan.tp_plan import infer_tp_plans

__all__ = ["DryRunReport", "RankMemory", "dry_run", "dry_run_lines", "ranks_to_play"]

log = logging.getLogger(__name__)

ALL_STAGES = "all-stages"
PEAK_LINES = 4
"""How many of the largest parts of a played rank's peak the text report names."""


@dataclass
class RankMemory:
    """What one played rank held: state bytes after a step, and the peak during one."""

    rank: int
    stage: int
    params: int
    grads: int
    optimizer: int
    peak: int
    """Live tensor bytes at their highest during the second step (profiler/live_bytes.py)."""
    max_allocated: int | None
    """torch.cuda.max_memory_allocated during that step (real tensors on CUDA only)."""
    seconds: float
    """Wall time of the second step (meaningful only with real tensors)."""
    at_peak: dict[str, int] = field(default_factory=dict)
    """Bytes alive at the peak by what made them (peak_label), largest first."""

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass
class DryRunReport:
    plan: Plan
    device: str
    tensors: str
    """"fake" (shapes only) or "real"."""
    ranks: list[RankMemory]
    estimate: Estimate | None
    note: str | None

    def predicted(self, mem: RankMemory) -> StageMemory | None:
        """The cost model's memory for the rank's stage (None without a prediction)."""
        return None if self.estimate is None else self.estimate.stages[mem.stage].memory

    def peak_error(self, mem: RankMemory) -> float | None:
        """The played peak over the predicted one, less 1 (None without a prediction)."""
        stage = self.predicted(mem)
        if stage is None:
            return None
        return mem.peak / stage.peak - 1 if stage.peak else 0.0

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for mem in self.ranks:
            row: dict[str, Any] = {"rank": mem.rank, "stage": mem.stage, "params": mem.params,
                                   "grads": mem.grads, "optimizer": mem.optimizer,
                                   "peak": mem.peak, "max_allocated": mem.max_allocated,
                                   "step_s": mem.seconds, "at_peak": mem.at_peak}
            predicted = self.predicted(mem)
            if predicted is not None:
                row["predicted"] = predicted.as_dict()
            rows.append(row)
        return {"world_size": self.plan.world_size, "device": self.device,
                "tensors": self.tensors, "ranks": rows, "note": self.note}


def ranks_to_play(plan: Plan, estimate: Estimate | None, asked: str | None) -> list[int]:
    """The ranks a dry run plays: `asked` ("all-stages": the first rank of every stage; an
    integer: that rank), else the first rank of the stage predicted fullest (stage 0
    without a prediction).

    Raises:
        AutoplanError: on a rank outside the world or text that is neither.
    """
    if asked == ALL_STAGES:
        return [stage * plan.stage_gpus for stage in range(plan.pp)]
    if asked is not None:
        try:
            rank = int(asked)
        except ValueError:
            raise AutoplanError(f"--rank must be a rank or '{ALL_STAGES}', got '{asked}'") \
                from None
        if not 0 <= rank < plan.world_size:
            raise AutoplanError(f"--rank {rank} is outside the plan's world of "
                                f"{plan.world_size} ranks")
        return [rank]
    if estimate is None:
        return [0]
    fullest = max(range(plan.pp), key=lambda s: estimate.stages[s].memory.peak)
    return [fullest * plan.stage_gpus]


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """This process as rank `rank` of `world` under torch's fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if dist.is_initialized():
        raise AutoplanError("a dry run needs a process without a process group of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world,
                            timeout=GROUP_TIMEOUT)  # no wait ever: every group gets one
    try:
        yield
    finally:
        dist.destroy_process_group()


def default_tensors(device: str) -> str:
    """Fake tensors on a CPU (a stage of a large model would neither fit nor finish here),
    real ones on CUDA."""
    return "real" if device == "cuda" else "fake"


def _tensors(kind: str) -> contextlib.AbstractContextManager[Any]:
    if kind == "real":
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _materialise(chunks: list[nn.Module], built: BuiltModel, device: str, kind: str) -> None:
    """Give the rank's chunks storage on `device` (only its shards: the executor has split
    them on meta). Real tensors get small random weights and the model's buffer values."""
    from autoplan.meta_state import rebuild_buffer_values

    for chunk in chunks:
        chunk.to_empty(device=device)
        if kind == "real":
            with torch.no_grad():
                for param in chunk.parameters():
                    param.normal_(0.0, 0.02)
            rebuild_buffer_values(chunk, built.spec)


def _batch_maker(built: BuiltModel, samples: int, device: str) -> Callable[[], Batch]:
    """Zeros shaped as `samples` of the model's inputs, and their targets (for a model
    that is not a token model, shaped as its output, from a forward on meta now, before
    the executor changes the module)."""
    target_shape = output_shape(built) if built.token_targets is None else ()

    def make() -> Batch:
        inputs = tuple(torch.zeros(t.shape, dtype=t.dtype, device=device)
                       for t in built.example_inputs(samples))
        if built.token_targets is not None:
            return inputs, built.token_targets(inputs)
        return inputs, torch.zeros((samples, *target_shape), device=device)

    return make


def play_rank(model: str, plan: Plan, rank: int, device: str, tensors: str,
              progress: Callable[[str], None] = log.info) -> RankMemory:
    """Rank `rank` of `plan` in a fake world: built, parallelized and stepped twice, with
    `tensors` "fake" or "real".

    Raises:
        AutoplanError: the executor's refusals, as `autoplan run` would meet them.
    """
    with fake_world(rank, plan.world_size):
        built = build_model(model, device="meta")
        if any(layer.tp > 1 for layer in plan.layers):
            infer_tp_plans(built.module, built.example_inputs,
                           [layer.name for layer in plan.layers if layer.name != "loss"])
        share = plan.global_batch // plan.layers[0].dp
        batch = _batch_maker(built, share, device)
        runner = parallelize(built.module, plan, default_loss, device=device,
                             micro_inputs=built.example_inputs(share // plan.num_micro_batches))
        with _tensors(tensors):
            _materialise(list(runner.chunks.values()), built, device, tensors)
            optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-3, foreach=False)
            inputs, targets = batch()
            progress(f"rank {rank}: built; step 1")
            runner.step(inputs, targets, optimizer)  # creates the optimizer's state
            progress(f"rank {rank}: step 2")
            params = runner.parameters()
            tracker = ModTracker()
            counter = LiveBytes([*params, *optimizer_tensors(optimizer),
                                 *runner.pipeline_buffers()],
                                label=lambda func: peak_label(tracker, func))
            on_cuda = device == "cuda" and tensors == "real"
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with tracker, counter:
                # the gradients of a step, as `autoplan run` counts them (before zero_grad)
                grads = _step_keeping_grads(runner, inputs, targets, optimizer)
            if on_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return RankMemory(
            rank, rank // plan.stage_gpus, local_bytes(params), grads,
            local_bytes(optimizer_tensors(optimizer)), counter.peak,
            torch.cuda.max_memory_allocated() if on_cuda else None, seconds, counter.at_peak)


def peak_label(tracker: ModTracker, func: Any) -> str:
    """What an op's outputs are, for the peak's breakdown: forward or backward, the
    innermost module running (layer indices as '#': every layer's alike add up) and the op."""
    inner = max(tracker.parents - {"Global"}, key=len, default="")
    where = re.sub(r"\.\d+(?=\.|$)", ".#", inner.partition(".")[2])  # not the root's class
    return " ".join(part for part in ("backward" if tracker.is_bw else "forward", where,
                                      func.__name__) if part)


def _step_keeping_grads(runner: Any, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
                        optimizer: torch.optim.Optimizer) -> int:
    """One step: forward and backward, the gradients' bytes, then the optimizer."""
    runner.step(inputs, targets)
    grads = local_bytes([p.grad for p in runner.parameters() if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad()
    return grads


def _play_in_worker(options: RunOptions, plan: Plan, rank: int, device: str,
                    tensors: str) -> RankMemory:
    """play_rank in a process of its own: each fake world starts from a fresh torch (one
    process's second fake world found the first one's process groups cached in its
    meshes), and a rank's memory goes with its process."""
    request = {"model": options.model, "plan": plan.to_json(), "rank": rank, "device": device,
               "tensors": tensors}
    return call_workers("autoplan.app.dry_run", request, 1, options.timeout_s,
                        lambda path: RankMemory(**json.loads(path.read_text())),
                        label="dry-run worker")


def _serve(request: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    plan = plan_from_json(request["plan"], "the launcher's plan")
    memory = play_rank(request["model"], plan, request["rank"], request["device"],
                       request["tensors"], progress)
    return asdict(memory)


def dry_run(options: RunOptions, asked: str | None = None,
            tensors: str | None = None) -> DryRunReport:
    """Play the ranks `asked` for (ranks_to_play) of the plan `options` name, predicted as
    `autoplan run` predicts it (a plan predicted not to fit is played too: a dry run is how
    to find out), and report what each held.

    Raises:
        AutoplanError: bad input, or a refusal of the executor's.
    """
    plan, graph, world = resolve_plan(options)
    estimate, note = predict(replace(options, force=True), plan, graph, world)
    device = options.device_type
    tensors = tensors or default_tensors(device)
    ranks = [_play_in_worker(options, plan, rank, device, tensors)
             for rank in ranks_to_play(plan, estimate, asked)]
    return DryRunReport(plan, device, tensors, ranks, estimate, note)


def dry_run_lines(report: DryRunReport) -> list[str]:
    """The report as text lines: each played rank's bytes beside the prediction."""
    plan = report.plan
    lines = [f"{plan.model}: dry run of {len(report.ranks)} rank(s) of a world of "
             f"{plan.world_size} (fake process group, {report.tensors} tensors on "
             f"{report.device}), pp {plan.pp}, global batch {plan.global_batch}"]
    for mem in report.ranks:
        text = (f"rank {mem.rank} (stage {mem.stage}): params {fmt.nbytes(mem.params)}, grads "
                f"{fmt.nbytes(mem.grads)}, optimizer {fmt.nbytes(mem.optimizer)}, peak "
                f"{fmt.nbytes(mem.peak)}")
        if mem.max_allocated is not None:
            text += f", max allocated {fmt.nbytes(mem.max_allocated)}"
        stage = report.predicted(mem)
        if stage is not None:
            text += (f"; predicted params {fmt.nbytes(stage.params)}, grads "
                     f"{fmt.nbytes(stage.grads)}, optimizer {fmt.nbytes(stage.optimizer)}, "
                     f"peak {fmt.nbytes(stage.peak)} ({report.peak_error(mem):+.1%})")
        lines.append(text)
        top = list(mem.at_peak.items())[:PEAK_LINES]
        if top:
            lines.append("  largest at the peak: " + "; ".join(
                f"{fmt.nbytes(size)} {label}" for label, size in top))
    if report.note:
        lines.append(report.note)
    return lines


if __name__ == "__main__":
    serve_worker(sys.argv[1], _serve)
