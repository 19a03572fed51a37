"""One rank of a memory-accounting world (tests/cost_model/test_memory_vs_executor.py).

For each case's plan it builds the model, parallelizes it with the executor and counts, on
this rank, the bytes of:
- params: the local parameter shards (DTensor.to_local()), each tensor once;
- grads: the local gradients after one step (before the optimizer);
- optimizer: AdamW's exp_avg and exp_avg_sq after one optimizer step; its "step" counters
  (one 4-byte scalar per parameter) are reported apart as optimizer_steps, not compared;
- activations: the peak of the bytes saved for backward and still held, over step 2: the
  storages autograd saves (saved_tensors_hooks, each storage once, parameters and their
  FSDP-gathered copies left out, as profiler/memory.py saved_bytes and the tracer count
  them), plus the inputs that full activation checkpointing keeps for recomputation (the
  non-reentrant checkpoint keeps them outside the saved-tensor hooks). A packed storage is
  released when autograd drops it after its backward, so with pipelining the peak counts
  the micro-batches the schedule keeps in flight, as the cost model's `held` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from autoplan.executor import parallelize
from autoplan.io import atomic_write_text
from autoplan.plan import Plan
from tests.executor import harness


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the local shards of `tensors` (each tensor's own elements, views once)."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in tensors:
        local = _local(tensor)
        seen[(local.data_ptr(), local.numel())] = local.numel() * local.element_size()
    return sum(seen.values())


class SavedCounter:
    """Bytes of distinct storages saved for backward and still alive; their peak."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.bytes = self.peak = self.packed = 0

    def _param_storages(self) -> set[int]:
        # The parameters registered now: under FSDP2 the gathered ones during forward.
        return {_local(p).untyped_storage().data_ptr()
                for m in self.modules for p in m.parameters()}

    def hold(self, t: torch.Tensor, keep: torch.Tensor | None = None) -> Any:
        """Count `t`'s storage until the returned handle (which keeps `keep`, default `t`,
        for autograd) is dropped."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Handle(self, key, t if keep is None else keep)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[key]

    def pack(self, t: torch.Tensor) -> Any:
        if torch._C._current_graph_task_id() != -1:  # saved in backward: not an activation
            return t
        local = _local(t)  # under tensor parallelism autograd saves DTensors
        if local.untyped_storage().data_ptr() in self._param_storages():
            return t
        self.packed += 1
        return self.hold(local, t)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Handle) else packed

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Handle:
    """Keeps a saved tensor for autograd; its storage stops counting when autograd drops it."""

    def __init__(self, counter: SavedCounter, key: int, tensor: torch.Tensor) -> None:
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self) -> None:
        self.counter.release(self.key)


def _keep_checkpoint_inputs(counter: SavedCounter, runner: Any, plan: Plan) -> list[Any]:
    """Count the inputs of fully checkpointed units from their forward until their backward
    (one micro-batch in flight: the tests run checkpointing without pipelining)."""
    handles: list[Any] = []
    full = {layer.name for layer in plan.layers if layer.checkpoint == "full"}

    def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    handles.append(counter.hold(_local(t)))

    for chunk in runner.chunks.values():
        for name, module in chunk.named_modules():
            if name in full:
                module.register_forward_pre_hook(keep, with_kwargs=True)
    return handles


def run_case(plan: Plan, model_spec: str, rank: int) -> dict[str, Any]:
    """Step 1 (no optimizer) gives the gradients, then the optimizer steps once; step 2 gives
    the activations, in steady state: step 1 of a pipeline also runs torch's metadata
    inference (a forward of one micro-batch, PipelineStage._forward_metadata_inference),
    whose saved tensors stay alive after it; they are reported as `retained`."""
    model = harness.build(model_spec)
    runner = parallelize(model, plan, harness.lm_loss)
    optimizer = harness.optimizer(runner.parameters())
    modules = list(runner.chunks.values())
    data = harness.batches(model)
    first = SavedCounter(modules)
    with first.hooks():
        runner.step(*data[0])
    params = runner.parameters()
    grads = [p.grad for p in params if p.grad is not None]
    result = {"rank": rank, "stage": rank // plan.stage_gpus,  # the mesh puts pp outermost
              "params": local_bytes(params), "grads": local_bytes(grads)}
    optimizer.step()
    optimizer.zero_grad()
    state = [(k, v) for s in optimizer.state.values() for k, v in s.items()
             if isinstance(v, torch.Tensor)]
    result["optimizer"] = local_bytes([v for k, v in state if k != "step"])
    result["optimizer_steps"] = local_bytes([v for k, v in state if k == "step"])
    second = SavedCounter(modules)
    held = _keep_checkpoint_inputs(second, runner, plan)
    with second.hooks():
        runner.step(*data[1], optimizer)
    held.clear()
    result |= {"activations": second.peak, "activations_step1": first.peak,
               "retained": first.bytes, "left_alive": second.bytes}
    return result


def _case(name: str, spec: dict, folder: Path, rank: int) -> dict:
    plan = Plan.model_validate_json((folder / f"{name}.plan.json").read_text())
    return run_case(plan, spec["model"], rank)


def _write(results: dict, folder: Path, rank: int) -> None:
    atomic_write_text(folder / f"memory.rank{rank}.json", json.dumps(results))
    dist.barrier()
    if rank == 0:
        atomic_write_text(folder / "done", "")


def main(spec_path: str) -> None:
    harness.serve_world(spec_path, _case, _write)


if __name__ == "__main__":
    main(sys.argv[1])
