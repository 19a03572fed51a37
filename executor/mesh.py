"""The parallel degrees of a Plan as one validated value, and the DeviceMesh built from them.

Mesh axes follow torchtitan's order: pp, dp_replicate, dp_shard, tp (outermost first, so that
tp ranks are neighbours). Only axes larger than 1 are built. Data parallelism lives on
dp_replicate when every layer has ZeRO 0 (plain replication) and on dp_shard otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoplan.errors import AutoplanError
from autoplan.plan import Plan

__all__ = ["MESH_AXES", "ParallelDims", "parallel_dims", "build_mesh", "get_mesh",
           "get_optional_mesh"]

log = logging.getLogger(__name__)

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")
"""Mesh axis names, outermost first (torchtitan's order)."""


@dataclass(frozen=True)
class ParallelDims:
    """The degrees one Plan runs with; every layer shares dp and tp (see parallel_dims)."""

    pp: int
    dp: int
    tp: int
    dp_sharded: bool
    """True: data parallelism shards (FSDP, ZeRO >= 1); False: it replicates (ZeRO 0)."""

    def __post_init__(self) -> None:
        if min(self.pp, self.dp, self.tp) < 1:
            raise ValueError(f"degrees pp {self.pp}, dp {self.dp}, tp {self.tp} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def dp_axis(self) -> str:
        return "dp_shard" if self.dp_sharded else "dp_replicate"

    @property
    def axes(self) -> list[tuple[str, int]]:
        """(name, size) of the axes the mesh has: those larger than 1, outermost first."""
        sizes = {"pp": self.pp, "tp": self.tp, "dp_replicate": 1, "dp_shard": 1}
        sizes[self.dp_axis] = self.dp
        return [(name, sizes[name]) for name in MESH_AXES if sizes[name] > 1]


def parallel_dims(plan: Plan) -> ParallelDims:
    """The degrees of a plan whose layers share one (dp, tp) layout and one kind of ZeRO.

    Raises:
        AutoplanError: when layers differ in (dp, tp) (DTensor cannot move a tensor between
            two meshes in torch 2.13, so per-layer layouts are not executed yet), or when ZeRO 0
            layers sit beside ZeRO >= 1 layers.
    """
    layouts = {(layer.dp, layer.tp) for layer in plan.layers}
    if len(layouts) > 1:
        first = (plan.layers[0].dp, plan.layers[0].tp)
        odd = [f"{lay.name} (dp {lay.dp}, tp {lay.tp})" for lay in plan.layers
               if (lay.dp, lay.tp) != first]
        raise AutoplanError(
            f"the executor runs one (dp, tp) layout per plan; layer {plan.layers[0].name} has "
            f"dp {first[0]}, tp {first[1]} but these differ: {', '.join(odd[:6])}"
            f"{' ...' if len(odd) > 6 else ''}; give every layer the same dp and tp")
    zeros = {layer.zero for layer in plan.layers}
    if 0 in zeros and len(zeros) > 1:
        plain = [lay.name for lay in plan.layers if lay.zero == 0]
        raise AutoplanError(
            f"layers {', '.join(plain[:6])} have ZeRO 0 (replication) but others have ZeRO "
            f"{sorted(zeros - {0})}; the executor needs all ZeRO 0 or all ZeRO >= 1")
    dp, tp = layouts.pop()
    return ParallelDims(pp=plan.pp, dp=dp, tp=tp, dp_sharded=0 not in zeros)


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> DeviceMesh | None:
    """The world's DeviceMesh for `dims` (None when every degree is 1).

    Args:
        dims: the degrees; their product must be the world size.
        device_type: "cuda" or "cpu"; default: cuda when available.

    Raises:
        AutoplanError: when the world size differs from the degrees' product.
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world != dims.world_size:
        raise AutoplanError(f"plan needs pp {dims.pp} x dp {dims.dp} x tp {dims.tp} = "
                            f"{dims.world_size} ranks; this world has {world}")
    if not dims.axes:
        return None
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    names, sizes = zip(*dims.axes, strict=True)
    mesh = init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))
    log.info("built mesh %s", dict(dims.axes))
    return mesh


def get_optional_mesh(mesh: DeviceMesh | None, axis: str) -> DeviceMesh | None:
    """The 1-D sub-mesh of `axis`, or None when the mesh lacks that axis (its degree is 1)."""
    if mesh is None or axis not in (mesh.mesh_dim_names or ()):
        return None
    return mesh[axis]


def get_mesh(mesh: DeviceMesh | None, axis: str) -> DeviceMesh:
    """The 1-D sub-mesh of `axis`.

    Raises:
        AutoplanError: naming the axes the mesh has.
    """
    sub = get_optional_mesh(mesh, axis)
    if sub is None:
        have = ", ".join(mesh.mesh_dim_names or ()) if mesh is not None else "none"
        raise AutoplanError(f"the mesh has no axis '{axis}' (its axes: {have})")
    return sub
