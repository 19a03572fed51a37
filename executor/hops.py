"""Hops: moving the activation between two (dp, tp) layouts of one pipeline stage.

Within a stage of R ranks a layout (dp, tp) has dp x tp = R with tp innermost: the rank at
position r of its stage holds slice r // tp of dp equal slices of the micro-batch, whole
(replicated over its tp group, as tensor parallelism leaves the activations between units;
sequence-split activations are gathered before a hop, so hops move whole sequences). The
micro-batch's order is set where it enters, by the first layer's layout. Adjacent layers may
use different layouts (the search prices the edge). DTensor cannot redistribute between two
meshes in torch 2.13 (NOTES-torch.md), so a hop moves the plain local tensor with collectives
on an explicit group, inside a torch.autograd.Function that also moves the gradient back:

- forward, from dp a to dp b through g = gcd(a, b): a block is the R/g consecutive ranks that
  share one of g slices (the tp group of layout (g, R/g)). When a > g the block all-gathers
  its pieces and keeps one copy of each a-slice (every tp_a-th); when b > g each rank then
  keeps its own b-slice of that g-slice. b < a only gathers, b > a only slices.
- backward, the same in reverse (gather the b-slices of the gradient, keep my a-slice), and
  the gradient is scaled by a / b. Why: each rank's loss is the mean over its own samples of
  the micro-batch of B, and data parallelism (FSDP, replicate) averages gradients over its dp
  ranks, so in a layout with dp d every rank must hold d / B times the summed per-sample
  gradient of its activation for every parameter to get the one-process gradient. The hop
  receives that for d = b and must pass it on for d = a.

The hop acts on a unit's first positional input, where pipelining cuts too: that input must be
the activation of the units before it (a floating tensor that requires grad), not a model input
or a value made from one; other inputs of the unit reach it as the glue code made them. An
embedding takes indices, so a layout change at one (GPT's wpe) hops the output of the unit
before it instead (wte), and the glue joining them runs in the embedding's layout. The loss
(the plan's "loss" layer) has a layout too: the model's output hops to it, and so do the
targets, which the Runner shares by the first layer's layout.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoplan.errors import AutoplanError
from autoplan.executor.data_parallel import tied_groups
from autoplan.executor.mesh import Layout, get_mesh
from autoplan.executor.tensor_parallel import gather_sequence_input

__all__ = ["Hop", "apply_hops", "apply_output_hops", "check_layouts", "hop_layouts",
           "loss_with_hop"]

log = logging.getLogger(__name__)

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
"""All-gather over the block: every block rank's tensor, in block order."""


@dataclass(frozen=True)
class Hop:
    """The data movement of one hop as seen by one rank (pure: collectives come in `gather`)."""

    src: Layout
    dst: Layout
    position: int
    """This rank's position in its block (0 .. R / via_dp - 1)."""

    def __post_init__(self) -> None:
        if self.src[0] * self.src[1] != self.dst[0] * self.dst[1]:
            raise AutoplanError(f"a hop from (dp {self.src[0]}, tp {self.src[1]}) to (dp "
                                f"{self.dst[0]}, tp {self.dst[1]}) changes the stage's ranks")

    @property
    def via_dp(self) -> int:
        """g = gcd of the two dp degrees: the coarsest slicing both refine."""
        return math.gcd(self.src[0], self.dst[0])

    def forward(self, x: torch.Tensor, gather: Gather) -> torch.Tensor:
        """This rank's dst batch slice, from its src batch slice `x` (batch first)."""
        (a, tp_a), (b, tp_b), g = self.src, self.dst, self.via_dp
        if a > g:
            x = torch.cat(gather(x)[::tp_a])
        if b > g:
            x = _piece(x, b // g, self.position // tp_b)
        return x

    def backward(self, grad: torch.Tensor, gather: Gather) -> torch.Tensor:
        """The gradient of this rank's src slice from that of its dst slice, scaled a / b."""
        (a, tp_a), (b, tp_b), g = self.src, self.dst, self.via_dp
        if b > g:
            grad = torch.cat(gather(grad)[::tp_b])
        if a > g:
            grad = _piece(grad, a // g, self.position // tp_a)
        return grad * (a / b)


def _piece(x: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Slice `index` of `parts` equal batch slices of x (a copy, so no view leaves the hop)."""
    if x.shape[0] % parts:
        raise AutoplanError(f"a layout hop splits {x.shape[0]} samples into {parts} equal "
                            "slices; give a micro-batch that every layer's dp divides")
    size = x.shape[0] // parts
    return x.narrow(0, index * size, size).clone()


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


class _HopFunction(torch.autograd.Function):
    """A hop with its gradient: plain dist.all_gather on the block group both ways (the
    functional all_gather_tensor_autograd gave 2x gradients here, NOTES-torch.md)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hop: Hop,  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.hop, ctx.group = hop, group
        return hop.forward(x, functools.partial(_all_gather, group=group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.hop.backward(grad, functools.partial(_all_gather, group=ctx.group)), None, None


def _via_layout(src: Layout, dst: Layout) -> Layout:
    g = math.gcd(src[0], dst[0])
    return g, src[0] * src[1] // g


def hop_layouts(layouts: Sequence[Layout]) -> list[Layout]:
    """The layouts whose tp groups are the blocks of the hops between adjacent `layouts` and
    from the first to the last (the targets' hop to the loss), each once, in order: their
    meshes must be built with the others."""
    out: list[Layout] = []
    pairs = [*zip(layouts, layouts[1:], strict=False), (layouts[0], layouts[-1])]
    for src, dst in pairs:
        via = _via_layout(src, dst)
        if src != dst and via not in out:
            out.append(via)
    return out


def _block(src: Layout, dst: Layout,
           meshes: Mapping[Layout, DeviceMesh | None]) -> tuple[Hop, dist.ProcessGroup]:
    """This rank's Hop and the group of its block."""
    via = _via_layout(src, dst)
    block = get_mesh(meshes[via], "tp")
    return Hop(src, dst, block.get_local_rank()), block.get_group()


def _describe(layout: Layout) -> str:
    return f"dp {layout[0]}, tp {layout[1]}"


def _check_activation(name: str, src: Layout, dst: Layout, value: Any,
                      role: str = "its first input") -> torch.Tensor:
    """The tensor a hop into layer `name` is about to move, checked to be the activation.

    Raises:
        AutoplanError: naming the layer, the two layouts and what came instead.
    """
    what = None
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        what = "no batch-first tensor"
    elif not value.is_floating_point():
        what = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    elif torch.is_grad_enabled() and not value.requires_grad:
        what = "a tensor that does not require grad (a model input or made from one)"
    if what is not None:
        raise AutoplanError(
            f"layer {name} changes layout ({_describe(src)} -> {_describe(dst)}), but "
            f"{role} is {what}, not the activation of the layers before it; give {name} "
            "the layout of the layer before it")
    return value


def _input_hop_hook(name: str, hop: Hop,
                    group: dist.ProcessGroup) -> Callable[..., tuple[Any, ...]]:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = _check_activation(name, hop.src, hop.dst, args[0] if args else None)
        return (_HopFunction.apply(x, hop, group), *args[1:])

    return hook


def _output_hop_hook(name: str, before: str, hop: Hop,
                     group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        x = _check_activation(name, hop.src, hop.dst, output, f"the output of {before}")
        return _HopFunction.apply(x, hop, group)

    return hook


def _hops_at_output(unit: nn.Module) -> bool:
    """An embedding takes indices, not the activation (GPT's wpe takes position ids): the hop
    into its layout moves the output of the unit before it instead, so that the glue that
    joins the two (wte(idx) + wpe(pos)) and the embedding's gradient are in its layout."""
    return isinstance(unit, nn.Embedding)


def _changes(units: Sequence[str], layouts: Sequence[Layout]) -> list[int]:
    """Indices of the units whose layout differs from the unit's before."""
    return [i for i in range(1, len(units)) if layouts[i] != layouts[i - 1]]


def apply_hops(model: nn.Module, units: Sequence[str], layouts: Sequence[Layout],
               splits: Sequence[bool], meshes: Mapping[Layout, DeviceMesh | None],
               present: set[str]) -> list[str]:
    """Before each unit whose layout differs from the unit before it, move its first input
    from that layout to its own (a forward pre-hook, registered before tensor parallelism's
    so that it runs first). A sequence-split input is gathered first, on the tp mesh of the
    layout it comes from: hops move whole sequences. Embeddings are left to
    apply_output_hops.

    Args:
        model: the module holding the units (a pipeline chunk holds some of them).
        units: every unit of the model, in execution order.
        layouts: each unit's (dp, tp).
        splits: tensor_parallel.sequence_splits() of the whole model.
        meshes: the mesh of every layout and of every hop_layouts() block layout.
        present: the unit names this module really holds.

    Returns:
        The units that hop: their input arrives with the whole sequence.
    """
    hopped = []
    for index in _changes(units, layouts):
        name, src, dst = units[index], layouts[index - 1], layouts[index]
        unit = model.get_submodule(name) if name in present else None
        if unit is None or (_hops_at_output(unit) and units[index - 1] in present):
            continue
        if splits[index - 1]:
            gather_sequence_input(unit, get_mesh(meshes[src], "tp"))
        unit.register_forward_pre_hook(_input_hop_hook(name, *_block(src, dst, meshes)))
        hopped.append(name)
    if hopped:
        log.info("layout hops before %s", ", ".join(hopped))
    return hopped


def apply_output_hops(model: nn.Module, units: Sequence[str], layouts: Sequence[Layout],
                      splits: Sequence[bool], meshes: Mapping[Layout, DeviceMesh | None],
                      present: set[str]) -> list[str]:
    """After the unit before each embedding whose layout differs from its own, move that
    unit's output to the embedding's layout (a forward hook, registered after tensor
    parallelism's so that it sees the local output). Arguments as for apply_hops.

    Returns:
        The units whose output hops.

    Raises:
        AutoplanError: when that output is split by sequence (sequence parallelism).
    """
    hopped = []
    for index in _changes(units, layouts):
        name, before = units[index], units[index - 1]
        if name not in present or before not in present \
                or not _hops_at_output(model.get_submodule(name)):
            continue
        if splits[index - 1]:
            raise AutoplanError(f"layer {before} gives sequence slices, but the layout changes "
                                f"at the embedding {name} after it; turn sequence_parallel off "
                                f"on {before}")
        hop, group = _block(layouts[index - 1], layouts[index], meshes)
        model.get_submodule(before).register_forward_hook(
            _output_hop_hook(name, before, hop, group))
        hopped.append(before)
    if hopped:
        log.info("layout hops after %s", ", ".join(hopped))
    return hopped


def loss_with_hop(loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                  sources: tuple[Layout, Layout], dst: Layout,
                  meshes: Mapping[Layout, DeviceMesh | None]
                  ) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """loss_fn computed in the loss's layout `dst` (the plan's "loss" layer).

    Args:
        loss_fn: (output, targets) -> scalar mean over the batch.
        sources: the layouts of the targets (the first layer's: the Runner shares the batch
            by it) and of the output (the last unit's).
        dst: the loss's layout.
        meshes: as for apply_hops, with the blocks of both hops.

    Why the targets hop too: a micro-batch is a slice of every rank's share of the batch
    under the first layout, so a layout of another dp holds other samples than a plain
    split of the batch by that dp would give; hops keep the micro-batch's order, so the same
    hop brings every rank the targets of the samples it holds.
    """
    first, last = sources
    if first == last == dst:
        return loss_fn
    output_hop = None if last == dst else _block(last, dst, meshes)
    target_hop = None if first[0] == dst[0] else _block(first, dst, meshes)

    def loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
        if output_hop is not None:
            x = _check_activation("loss", last, dst, output, "the model's output")
            output = _HopFunction.apply(x, *output_hop)
        if target_hop is not None:
            hop, group = target_hop
            targets = hop.forward(targets, functools.partial(_all_gather, group=group))
        return loss_fn(output, targets)

    return loss


def check_layouts(model: nn.Module, units: Sequence[str], layouts: Sequence[Layout]) -> None:
    """Refuse what hops cannot run: parameters one layout cannot hold.

    Raises:
        AutoplanError: when units that share a parameter (tied weights) differ in layout, or
            when the model holds parameters outside its units (their layout is unknown).
    """
    if len(set(layouts)) < 2:
        return
    layout_of = dict(zip(units, layouts, strict=True))
    for group in tied_groups(model, units):
        if len({layout_of[n] for n in group}) > 1:
            found = ", ".join(f"{n} ({_describe(layout_of[n])})" for n in group)
            raise AutoplanError(f"layers {found} share a parameter (tied weights) but differ "
                                "in layout; give them one (dp, tp)")
    outside = [n for n, _ in model.named_parameters()
               if not any(n.startswith(u + ".") for u in units)]
    if outside:
        raise AutoplanError(f"parameters {', '.join(outside[:5])} belong to no layer, so "
                            "they have no layout; with layers of different (dp, tp) every "
                            "parameter must sit in a layer: move them into a sub-module")
