"""The parallel degrees of a Plan as one validated value, and the DeviceMesh built from them.

Mesh axes follow torchtitan's order: pp, dp_replicate, dp_shard, tp (outermost first, so that
tp ranks are neighbours). Only axes larger than 1 are built. Data parallelism lives on
dp_replicate when every layer has ZeRO 0 (plain replication) and on dp_shard otherwise.
A plan whose layers differ in (dp, tp) gets one mesh per layout, all over the same ranks
(executor/hops.py moves activations between them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoplan.errors import AutoplanError
from autoplan.plan import Plan

__all__ = ["GROUP_TIMEOUT", "MESH_AXES", "Layout", "ParallelDims", "parallel_dims", "layout_dims",
           "build_mesh", "build_meshes", "get_mesh", "get_optional_mesh"]

log = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(seconds=120)
"""Every process group autoplan makes gives up after this (issue 9: nothing hangs). Mesh
groups are split from the default group and keep its timeout instead."""
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")
"""Mesh axis names, outermost first (torchtitan's order)."""

Layout = tuple[int, int]
"""(dp, tp) of a layer inside its pipeline stage."""


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of one (dp, tp) layout of a Plan (see layout_dims)."""

    pp: int
    dp: int
    tp: int
    dp_sharded: bool
    """True: some layer's data parallelism shards (FSDP, ZeRO >= 1); False: all replicate
    (ZeRO 0). It names the dp axis."""

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


def layout_dims(plan: Plan) -> dict[Layout, ParallelDims]:
    """The degrees of every (dp, tp) layout the plan's layers use, in order of first use.

    The dp axis is dp_shard when any layer with dp > 1 has ZeRO >= 1, else dp_replicate (a
    name only: ZeRO 0 layers beside sharded ones replicate on the same 1-D mesh).
    """
    sharded = any(layer.zero for layer in plan.layers if layer.dp > 1)
    out: dict[Layout, ParallelDims] = {}
    for layer in plan.layers:
        out.setdefault((layer.dp, layer.tp), ParallelDims(plan.pp, layer.dp, layer.tp, sharded))
    return out


def parallel_dims(plan: Plan) -> ParallelDims:
    """The degrees of the layout the loss is computed in (the plan's last layer, "loss" when
    the plan has it): its dp group averages the loss. For a plan with one layout, the degrees
    of every layer."""
    last = plan.layers[-1]
    return layout_dims(plan)[(last.dp, last.tp)]


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


def build_meshes(dims: Sequence[ParallelDims],
                 device_type: str | None = None) -> dict[Layout, DeviceMesh | None]:
    """One mesh per distinct (dp, tp) of `dims`, built in the given order (the same on every
    rank: building a mesh is a collective).

    Raises:
        AutoplanError: as build_mesh.
    """
    meshes: dict[Layout, DeviceMesh | None] = {}
    for one in dims:
        if (one.dp, one.tp) not in meshes:
            meshes[(one.dp, one.tp)] = build_mesh(one, device_type)
    return meshes


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
