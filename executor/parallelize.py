"""parallelize(model, plan): apply a Plan to an existing module and return a Runner that trains it.

The steps, in torchtitan's fixed order (each takes a mesh and per-layer decisions, never the
Plan):
1. build the DeviceMesh (pp, dp_replicate, dp_shard, tp), one per (dp, tp) layout when layers
   differ in it (and one per hop block, executor/hops.py);
2. split the pipeline into chunks (copies that hold only their units): later steps act on each
   chunk, so the split comes first;
3. layout hops, then tensor/sequence parallelism: hops register their input hooks first so
   that they run before tensor parallelism's; TP replaces parameters by DTensors on each
   layout's tp mesh, which FSDP must then see (so before 5);
4. activation checkpointing: wraps each unit's forward inside the module hooks of 3 and 5;
5. data parallelism: per unit FSDP2 (ZeRO >= 1) or replicate (ZeRO 0) on its layout's dp
   mesh, then the root; last, because it shards whatever parameters (plain or DTensor) the
   earlier steps left.

Batch convention (autoplan/plan.py): Runner.step takes the global batch (plan.global_batch
samples) or this rank's data-parallel share of it; each data-parallel rank runs
global_batch / dp samples as num_micro_batches micro-batches. loss_fn must average over the
samples of its batch, so that averaging over micro-batches and ranks gives the loss of the
whole batch, exactly as one process computes it. With layers of different layouts, the
batch is shared by the first layer's dp, the targets hop to the loss's layout (the plan's last
layer) with the output, and the loss is averaged over the loss layout's dp group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from autoplan.errors import AutoplanError
from autoplan.executor.checkpointing import apply_ac
from autoplan.executor.data_parallel import (
    DPGroup,
    apply_fsdp,
    apply_replicate,
    gradient_sync,
    tied_groups,
)
from autoplan.executor.distributed_checkpoint import load_checkpoint, save_checkpoint
from autoplan.executor.hops import (
    apply_hops,
    apply_output_hops,
    check_layouts,
    hop_layouts,
    loss_with_hop,
)
from autoplan.executor.mesh import (
    GROUP_TIMEOUT,
    Layout,
    ParallelDims,
    build_meshes,
    get_mesh,
    get_optional_mesh,
    layout_dims,
)
from autoplan.executor.pipeline import (
    build_chunk,
    build_schedule,
    chunk_ranks,
    chunk_units,
    input_kwargs,
    stage_shapes,
)
from autoplan.executor.tensor_parallel import TPLayer, apply_tp, sequence_splits
from autoplan.feasibility import tp_split_refusal
from autoplan.graph import LayerGraph
from autoplan.plan import LayerPlan, Plan, check_plan
from autoplan.tp_plan import infer_tp_plan
from autoplan.units import find_units

__all__ = ["LossFn", "Runner", "parallelize", "precheck"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""(model output, targets) -> scalar loss, averaged over the samples of the batch."""


@dataclass
class _TiedCopies:
    """One parameter that several pipeline chunks hold copies of (a tied embedding/head)."""

    fqns: dict[int, str]
    """chunk index -> the parameter's FQN in that chunk."""
    group: dist.ProcessGroup | None
    """The pipeline ranks (same dp/tp coordinate) holding a copy; None when only this one."""


@dataclass
class Runner:
    """A parallelized model and the one training-step call that works for every plan.

    Example:
        runner = parallelize(model, plan, loss_fn)
        optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-3)
        for inputs, targets in batches:
            loss = runner.step(inputs, targets, optimizer)
    """

    plan: Plan
    dims: ParallelDims
    """The degrees of the loss's layout (the plan's last layer): its dp group averages the
    loss. With one layout for all layers, the plan's degrees."""
    mesh: DeviceMesh | None
    chunks: dict[int, nn.Module]
    """chunk index -> module on this rank (one chunk, index 0, without pipelining)."""
    loss_fn: LossFn
    replicated_layers: list[str] = field(default_factory=list)
    """Layers with parameters that tensor parallelism left whole."""
    schedule: Any = None
    tied: list[_TiedCopies] = field(default_factory=list)
    input_dims: ParallelDims | None = None
    """The first layer's degrees, by whose dp the batch is shared (None: those of dims, the
    loss's layout, by whose dp group the loss is averaged)."""
    input_mesh: DeviceMesh | None = None

    @property
    def module(self) -> nn.Module:
        """The module this rank holds: the model, or its pipeline chunk(s) in a ModuleList."""
        if len(self.chunks) == 1:
            return next(iter(self.chunks.values()))
        return nn.ModuleList(self.chunks[i] for i in sorted(self.chunks))

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (for the optimizer)."""
        seen: dict[int, nn.Parameter] = {}
        for index in sorted(self.chunks):
            for param in self.chunks[index].parameters():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def pipeline_buffers(self) -> list[torch.Tensor]:
        """The receive buffers torch's pipeline stages keep from their first step on: one
        per micro-batch for each input a stage receives and each output gradient (its
        prepare_*_infra); they sit in memory beside everything a step makes."""
        if self.schedule is None:
            return []
        stages = getattr(self.schedule, "_stages", None) or [self.schedule._stage]
        infos = [info for stage in stages
                 for table in (stage.args_recv_info, stage.grad_recv_info)
                 for infos in table.values() for info in infos]
        return [info.buffer for info in infos if isinstance(info.buffer, torch.Tensor)]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(FQN in the original model, parameter) of this rank, tied names included."""
        return [(name, param) for index in sorted(self.chunks)
                for name, param in self.chunks[index].named_parameters(remove_duplicate=False)]

    def save(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write a distributed checkpoint of the model (and optimizer) that any plan of the
        same model can load (executor/distributed_checkpoint.py). Call on every rank."""
        save_checkpoint([self.chunks[i] for i in sorted(self.chunks)], path, optimizer)

    def load(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read a checkpoint written by save() under this or another plan. Call on every rank,
        after creating the optimizer."""
        load_checkpoint([self.chunks[i] for i in sorted(self.chunks)], path, optimizer)

    def step(self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor,
             optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Forward and backward over one global batch, then optimizer.step() and zero_grad().

        Args:
            inputs: the model's positional input(s), batch first: the global batch or this
                rank's data-parallel share of it.
            targets: what loss_fn compares the output with, batch first, sized like inputs.
            optimizer: stepped and zeroed after backward; None leaves the gradients.

        Returns:
            The batch's loss (a detached scalar, the same on every rank).

        Raises:
            AutoplanError: when the batch is neither the global batch nor this rank's share.
        """
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        inputs, targets = self._local_batch(inputs, targets)
        if self.schedule is None:
            loss = self._step_without_pipeline(inputs, targets)
        else:
            loss = self._step_pipeline(inputs, targets)
        # The loss is averaged over the data-parallel ranks for reporting only: the sum runs
        # beside the optimizer step rather than before it.
        pending = None
        if self.dims.dp > 1:
            pending = dist.all_reduce(loss, group=get_mesh(self.mesh, self.dims.dp_axis)
                                      .get_group(), async_op=True)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if pending is not None:
            pending.wait()
            loss /= self.dims.dp
        return loss

    def _local_batch(self, inputs: tuple[torch.Tensor, ...],
                     targets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """This rank's data-parallel share of the batch (a contiguous slice), by the first
        layer's layout (the loss takes its targets from there, executor/hops.py)."""
        dims, mesh = (self.dims, self.mesh) if self.input_dims is None \
            else (self.input_dims, self.input_mesh)
        size, share = targets.shape[0], self.plan.global_batch // dims.dp
        if size == share:
            return inputs, targets
        if size != self.plan.global_batch:
            raise AutoplanError(f"batch of {size} samples: give the global batch of "
                                f"{self.plan.global_batch} or this rank's share of {share}")
        rank = get_mesh(mesh, dims.dp_axis).get_local_rank() if dims.dp > 1 else 0
        cut = slice(rank * share, (rank + 1) * share)
        return tuple(t[cut] for t in inputs), targets[cut]

    def _step_without_pipeline(self, inputs: tuple[torch.Tensor, ...],
                               targets: torch.Tensor) -> torch.Tensor:
        model, count = self.chunks[0], self.plan.num_micro_batches
        total = torch.zeros(())
        pieces = zip(*(t.chunk(count) for t in (*inputs, targets)), strict=True)
        for index, (*micro_inputs, micro_targets) in enumerate(pieces):
            gradient_sync(model, last=index == count - 1)
            loss = self.loss_fn(model(*micro_inputs), micro_targets)
            (loss / count).backward()
            total += loss.detach().float().cpu()
        return total / count

    def _step_pipeline(self, inputs: tuple[torch.Tensor, ...],
                       targets: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        is_last = max(self.chunks) == len(self.plan.stage_boundaries) - 1
        # return_outputs=False: else the last stage keeps every micro-batch's output (the
        # logits) until the next step, to return them merged; the losses are all we read
        self.schedule.step(target=targets if is_last else None,
                           losses=losses if is_last else None, return_outputs=False,
                           **input_kwargs(inputs))
        self._sum_tied_grads()
        loss = torch.stack([x.detach().float().cpu() for x in losses]).mean() if is_last \
            else torch.zeros(())
        # Only the last stage knows the loss: a sum over the pipeline ranks tells everyone.
        dist.all_reduce(loss, group=get_mesh(self.mesh, "pp").get_group())
        return loss

    def _sum_tied_grads(self) -> None:
        """Copies of one parameter in several chunks get the sum of their gradients. The
        holders sum whole gradients: stages may shard their copy differently (ZeRO 0 beside
        ZeRO 3, a row-split embedding beside a row-split head), so local pieces differ."""
        for tied in self.tied:
            params = [self.chunks[c].get_parameter(fqn) for c, fqn in tied.fqns.items()
                      if c in self.chunks]
            if tied.group is None and all(p.grad is None for p in params):
                continue
            with torch.no_grad():  # a copy no use reached (a class token on a later stage)
                total = torch.stack([_whole_grad(p) for p in params]).sum(0)  # takes zeros
                if tied.group is not None:
                    dist.all_reduce(total, group=tied.group)
                for param in params:
                    _set_whole_grad(param, total)


def _whole_grad(param: nn.Parameter) -> torch.Tensor:
    """The whole gradient of `param` (gathered when sharded, reduced when partial; zeros
    when no use reached it)."""
    grad = param.grad
    if grad is None:
        local = param.to_local() if isinstance(param, DTensor) else param
        return torch.zeros(param.shape, dtype=param.dtype, device=local.device)
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _set_whole_grad(param: nn.Parameter, whole: torch.Tensor) -> None:
    """Give `param` the gradient `whole`, placed as the parameter is (slicing only: every
    rank holds the whole)."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        param.grad = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim,
                                        run_check=False).redistribute(mesh, param.placements)
    else:
        param.grad = whole.clone()


# ------------------------------------------------------------------------------ checks


def precheck(model: nn.Module, plan: Plan, graph: LayerGraph | None = None, *,
             world_size: int | None = None,
             tp_overrides: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Every check parallelize() makes before it builds a mesh or changes the model: the
    plan against the model and the world, then what the executor can run
    (autoplan.feasibility with a graph; the layouts, pipeline chunks and tp splits in any
    case). Runs on a meta model without processes.

    Args:
        model: the module (any device, meta included).
        plan: the plan to run.
        graph: the model's LayerGraph (its hash and feasibility facts are checked).
        world_size: the world to check against (default: this process group's, or 1).
        tp_overrides: as for parallelize.

    Returns:
        The model's unit FQNs in execution order.

    Raises:
        AutoplanError: naming what the executor would refuse.
    """
    units = _check(model, plan, graph, world_size)
    layout = {layer.name: (layer.dp, layer.tp) for layer in plan.layers}
    check_layouts(model, units, [layout[name] for name in units])
    layout_dims(plan)  # pipelining copies parameters outside every layer into each chunk
    for name in units:
        tp = layout[name][1]
        unit = model.get_submodule(name)
        split = infer_tp_plan(unit, (tp_overrides or {}).get(name)) if tp > 1 else None
        why = split and tp_split_refusal(name, split.sizes, split.refusal, tp)
        if why:
            raise AutoplanError(why)
    return units


def _check(model: nn.Module, plan: Plan, graph: LayerGraph | None,
           world: int | None = None) -> list[str]:
    """The model's unit FQNs in execution order, after checking the plan names exactly them.

    Raises:
        AutoplanError: naming the layers that differ, or the world-size mismatch.
    """
    if world is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
    if graph is not None:
        check_plan(plan, graph, world_size=world)
    elif world != plan.world_size:
        raise AutoplanError(f"plan is for {plan.world_size} devices; this world has {world}")
    planned = [layer.name for layer in plan.layers if layer.name != "loss"]
    held = {id(p) for name in planned for p in model.get_submodule(name).parameters()}
    units = [name for name, _ in find_units(model)
             if not _aliases_planned(model, name, planned, held)]
    if sorted(planned) != sorted(units):
        unknown = [n for n in planned if n not in units]
        missing = [n for n in units if n not in planned]
        raise AutoplanError(
            "the plan's layers do not match this model's"
            + (f"; the model has no {', '.join(unknown[:5])}" if unknown else "")
            + (f"; the plan misses {', '.join(missing[:5])}" if missing else "")
            + ("" if unknown or missing else "; a layer is named twice"))
    return planned  # execution order (the LayerGraph's), which pipelining cuts


def _aliases_planned(model: nn.Module, unit: str, planned: list[str], held: set[int]) -> bool:
    """Whether `unit` is not planned and holds only parameters that planned units hold
    (`held`: their ids): a module the forward never calls whose weight another unit uses
    (T5's and BART's `shared` embedding, tied to the encoder's and decoder's), which
    tracing leaves out of the graph."""
    if unit in planned:
        return False
    own = list(model.get_submodule(unit).parameters())
    return bool(own) and all(id(p) in held for p in own)


# ------------------------------------------------------------------------------ steps


def _chunk_plan(plan: Plan, units: list[str], mesh: DeviceMesh | None,
                dims: ParallelDims) -> tuple[list[list[str]], list[int]]:
    """Every chunk's units, and the chunk indices this rank runs."""
    if dims.pp == 1:
        return [units], [0]
    chunks = chunk_units(units, plan.stage_boundaries)
    empty = [i for i, chunk in enumerate(chunks) if not chunk]
    if empty:
        raise AutoplanError(f"pipeline chunks {empty} hold no layer (stage_boundaries "
                            f"{plan.stage_boundaries} of {len(units)} layers before the loss); "
                            "move the boundaries so that every chunk holds a layer")
    return chunks, chunk_ranks(len(chunks), dims.pp, get_mesh(mesh, "pp").get_local_rank())


@dataclass(frozen=True)
class _Layouts:
    """Each layer's (dp, tp) and every layout's degrees and mesh (one of each for most plans)."""

    of: dict[str, Layout]
    """Layer name (every unit, and "loss" when the plan has it) -> its layout."""
    dims: dict[Layout, ParallelDims]
    """The layers' layouts, in order of first use."""
    meshes: dict[Layout, DeviceMesh | None]
    """The layers' layouts and the hops' block layouts (executor/hops.py)."""


def _build_layouts(model: nn.Module, plan: Plan, units: list[str], device_type: str) -> _Layouts:
    """Step 1: check what hops can run, then build a mesh per layout and per hop block.

    Raises:
        AutoplanError: as hops.check_layouts, mesh.layout_dims and mesh.build_mesh.
    """
    of = {layer.name: (layer.dp, layer.tp) for layer in plan.layers}
    check_layouts(model, units, [of[n] for n in units])
    dims = layout_dims(plan)
    loss = dims[of[plan.layers[-1].name]]
    blocks = [ParallelDims(loss.pp, dp, tp, loss.dp_sharded)
              for dp, tp in hop_layouts([of[layer.name] for layer in plan.layers])]
    return _Layouts(of, dims, build_meshes([*dims.values(), *blocks], device_type))


def _parallelize_chunk(chunk: nn.Module, layers: dict[str, LayerPlan], units: list[str],
                       owned: list[str], splits: list[bool], layouts: _Layouts,
                       tp_overrides: dict[str, dict[str, str]]) -> list[str]:
    """Steps 3-5 on one chunk; returns the layers TP left replicated."""
    present = set(owned)
    hopped = apply_hops(chunk, units, [layouts.of[n] for n in units], splits, layouts.meshes,
                        present)
    replicated = _apply_tp_per_layout(chunk, layers, units, present, splits, layouts,
                                      tp_overrides, hopped)
    apply_output_hops(chunk, units, [layouts.of[n] for n in units], splits, layouts.meshes,
                      present)  # after TP: its output hooks give the local tensor first
    apply_ac(chunk, [(n, layers[n].checkpoint) for n in units], present)
    _apply_dp(chunk, layers, owned, layouts)
    return replicated


def _apply_tp_per_layout(chunk: nn.Module, layers: dict[str, LayerPlan], units: list[str],
                         present: set[str], splits: list[bool], layouts: _Layouts,
                         tp_overrides: dict[str, dict[str, str]], hopped: list[str]) -> list[str]:
    """Step 3: each layout's units on its own tp mesh; returns the layers left replicated."""
    tp_layers = [TPLayer(n, layers[n].sequence_parallel, tp_overrides.get(n)) for n in units]
    aliases = _alias_groups(chunk)
    replicated: set[str] = set()
    for layout in layouts.dims:
        tp_mesh = get_optional_mesh(layouts.meshes[layout], "tp")
        mine = {n for n in present if layouts.of[n] == layout}
        if tp_mesh is not None and mine:
            replicated.update(apply_tp(chunk, tp_layers, splits, tp_mesh, mine, hopped))
            _retie(chunk, aliases, units)
    return [n for n in units if n in replicated]


def _apply_dp(chunk: nn.Module, layers: dict[str, LayerPlan], owned: list[str],
              layouts: _Layouts) -> None:
    """Step 5: each group of units on its layout's dp mesh (replicate for ZeRO 0, FSDP
    otherwise), then the root on the first such mesh (FSDP when any group shards: replicated
    groups sit under it as their own units); the root leaves alone the parameters of layers
    with dp 1 (they need no reduction: each rank of such a layer sees the whole micro-batch)."""
    by_layout: dict[Layout, list[DPGroup]] = {}
    ignored: set[nn.Parameter] = set()
    for group in tied_groups(chunk, owned):
        layout = layouts.of[group[0]]
        if layout[0] == 1:
            ignored.update(p for n in group for p in chunk.get_submodule(n).parameters())
        else:
            zero = max(layers[n].zero for n in group)
            by_layout.setdefault(layout, []).append((_with_aliases(chunk, group, owned), zero))
    if not by_layout:
        return
    meshes = {lay: get_mesh(layouts.meshes[lay], layouts.dims[lay].dp_axis) for lay in by_layout}
    for layout, groups in by_layout.items():
        plain = [g for g in groups if g[1] == 0]
        if plain:
            apply_replicate(chunk, plain, meshes[layout], root=False)
        if len(plain) < len(groups):
            apply_fsdp(chunk, [g for g in groups if g[1] > 0], meshes[layout], root=False)
    # the groups' parameters are theirs, also where the root reaches them another way (a
    # module shared by a unit of this chunk and by one another chunk runs)
    ignored.update(p for groups in by_layout.values() for names, _ in groups
                   for n in names for p in chunk.get_submodule(n).parameters())
    sharded = any(zero for groups in by_layout.values() for _, zero in groups)
    apply = apply_fsdp if sharded else apply_replicate
    apply(chunk, [], next(iter(meshes.values())), ignored_params=ignored or None)


def _with_aliases(chunk: nn.Module, group: tuple[str, ...],
                  owned: list[str]) -> tuple[str, ...]:
    """The group's units and the modules outside every unit whose own parameters are all
    the group's (T5's `shared` embedding, tied to its embed_tokens): one data-parallel
    group must hold a parameter wherever it is reached, or FSDP sees it twice."""
    held = {id(p) for name in group for p in chunk.get_submodule(name).parameters()}
    aliases = []
    for name, module in chunk.named_modules():
        own = list(module.parameters(recurse=False))
        inside = any(name == u or name.startswith(u + ".") for u in owned)
        if own and not inside and all(id(p) in held for p in own):
            aliases.append(name)
    return (*group, *aliases)


def _alias_groups(chunk: nn.Module) -> list[list[str]]:
    """FQNs that share one parameter (tied weights), found before TP replaces parameters."""
    by_param: dict[int, list[str]] = {}
    for name, param in chunk.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _retie(chunk: nn.Module, aliases: list[list[str]], units: list[str]) -> None:
    """Tensor parallelism replaces each module's parameters: make tied ones one again. A
    name outside every unit (a module the forward never calls, e.g. T5's `shared`) takes
    the units' parameter as it is.

    Raises:
        AutoplanError: when tied copies in units were split differently.
    """
    for group in aliases:
        inside = [n for n in group if _unit_of(n, [units]) is not None]
        keep_name = next((n for n in inside if isinstance(chunk.get_parameter(n), DTensor)),
                         group[0])
        keep = chunk.get_parameter(keep_name)
        for name in group:
            other = chunk.get_parameter(name)
            if other is keep:
                continue
            if name in inside and (isinstance(keep, DTensor) != isinstance(other, DTensor) or (
                    isinstance(keep, DTensor) and keep.placements != other.placements)):
                raise AutoplanError(f"tied parameters {keep_name} and {name} were split "
                                    "differently by tensor parallelism; give a tp override")
            module_name, _, attr = name.rpartition(".")
            setattr(chunk.get_submodule(module_name), attr, keep)


def _tied_across_chunks(model: nn.Module, chunks: list[list[str]], mesh: DeviceMesh | None,
                        dims: ParallelDims) -> list[_TiedCopies]:
    """Parameters shared by units of different chunks, with a group of their holders."""
    where: dict[int, dict[int, str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        unit = _unit_of(name, chunks)
        # a parameter outside every unit (units.loose_parameters): every chunk holds it
        for holder in range(len(chunks)) if unit is None else [unit]:
            where.setdefault(id(param), {}).setdefault(holder, name)
    tied = []
    for holders in where.values():
        if len(holders) < 2:
            continue
        ranks = sorted({c % dims.pp for c in holders})
        tied.append(_TiedCopies(holders, _holder_group(mesh, ranks)))
    return tied


def _unit_of(param_name: str, chunks: list[list[str]]) -> int | None:
    for index, units in enumerate(chunks):
        if any(param_name.startswith(u + ".") for u in units):
            return index
    return None


def _holder_group(mesh: DeviceMesh | None, pp_ranks: list[int]) -> dist.ProcessGroup | None:
    """The group of the given pipeline ranks at this rank's dp/tp coordinate."""
    pp_mesh = get_mesh(mesh, "pp")
    if len(pp_ranks) < 2 or pp_mesh.get_local_rank() not in pp_ranks:
        return None
    global_ranks = pp_mesh.mesh.tolist()
    return dist.new_group([global_ranks[r] for r in pp_ranks], timeout=GROUP_TIMEOUT,
                          use_local_synchronization=True)


# ------------------------------------------------------------------------------ entry


def parallelize(model: nn.Module, plan: Plan, loss_fn: LossFn, *,
                graph: LayerGraph | None = None,
                tp_overrides: dict[str, dict[str, str]] | None = None,
                device: torch.device | str | None = None,
                micro_inputs: Sequence[torch.Tensor] | None = None) -> Runner:
    """Apply `plan` to `model` with torch-native parallelism and return its Runner.

    Call it on every rank after torch.distributed.init_process_group (torchrun, or
    `autoplan run`), with the same model (same seed) on each. Without pipelining the model is
    changed in place; with it, each rank keeps copies of its chunks and the model is left
    as it was.

    Args:
        model: the module; its units (autoplan.units.find_units) must be the plan's layers.
        plan: the plan; layers may differ in (dp, tp) within a stage (executor/hops.py
            moves the activation between layouts), and tied layers must share one.
        loss_fn: (output, targets) -> scalar, averaged over the batch.
        graph: the model's LayerGraph; when given, the plan's model hash is checked too.
        tp_overrides: layer FQN -> {sub-module FQN: "colwise" | "rowwise"} replacing the
            inferred tensor-parallel plan of that layer.
        device: where the model runs (default: cuda when available, else cpu).
        micro_inputs: the inputs of one micro-batch (meta tensors do): the pipeline stages
            take their shapes from a forward on them (pipeline.stage_shapes) instead of
            from their neighbours, which a fake process group (the dry run) cannot give.

    Returns:
        The Runner: .step(inputs, targets, optimizer) -> loss, .module, .parameters().

    Raises:
        AutoplanError: the plan does not fit the model or the world (names the mismatch),
            or asks for something the executor does not run: tied layers of different
            layouts, parameters outside the layers beside layouts that differ
            (hops.check_layouts); at the first forward, a layout change at a layer whose
            first input is not the activation of the layers before it.
    """
    units = precheck(model, plan, graph, tp_overrides=tp_overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layouts = _build_layouts(model, plan, units, device.type)                 # step 1
    first, last = layouts.of[units[0]], layouts.of[plan.layers[-1].name]
    dims, mesh = layouts.dims[last], layouts.meshes[last]
    layers = {layer.name: layer for layer in plan.layers}
    splits = sequence_splits(model, [TPLayer(n, layers[n].sequence_parallel) for n in units])
    chunk_lists, mine = _chunk_plan(plan, units, mesh, dims)                  # step 2
    sliced = {n: layers[n].tp for n, split in zip(units, splits, strict=True) if split}
    shapes = stage_shapes(model, units, chunk_lists, micro_inputs, sliced,
                          {n: layers[n].dp for n in units}) \
        if dims.pp > 1 and micro_inputs is not None else None
    chunks = {c: build_chunk(model, units, chunk_lists[c]) if dims.pp > 1 else model
              for c in mine}
    loss = loss_with_hop(loss_fn, (first, layouts.of[units[-1]]), last, layouts.meshes)
    runner = Runner(plan, dims, mesh, chunks, loss, input_dims=layouts.dims[first],
                    input_mesh=layouts.meshes[first])
    for index, chunk in chunks.items():                                       # steps 3-5
        runner.replicated_layers += _parallelize_chunk(
            chunk, layers, units, chunk_lists[index], splits, layouts, tp_overrides or {})
    if dims.pp > 1:
        runner.tied = _tied_across_chunks(model, chunk_lists, mesh, dims)
        runner.schedule = build_schedule(chunks, len(chunk_lists), plan.schedule,
                                         plan.num_micro_batches, loss,
                                         get_mesh(mesh, "pp").get_group(), device, shapes)
    log.info("parallelized %d layers: pp %d, layouts %s (data parallelism %s)", len(units),
             dims.pp, ", ".join(f"dp {d.dp} x tp {d.tp}" for d in layouts.dims.values()),
             "sharded" if dims.dp_sharded else "replicated")
    return runner
