"""Where a process group sits on the cluster, from the mesh order pp, dp, tp (tp innermost).

Ranks are numbered with tp fastest, then dp, then pp (torchtitan's mesh order), so a group
whose members are `stride` ranks apart and `size` long spans nodes when size x stride exceeds
a node. The scope and ranks per node pick the link figures (NVLink or the network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoplan.cluster import Cluster

__all__ = ["GroupPlace", "place_group"]


@dataclass(frozen=True)
class GroupPlace:
    size: int
    scope: str
    """"intra": inside one node; "inter": spans nodes."""
    ranks_per_node: int


def place_group(cluster: Cluster, size: int, stride: int) -> GroupPlace:
    """The placement of a group of `size` ranks, `stride` ranks apart (tp: 1, dp: tp,
    pipeline neighbours: dp x tp)."""
    per_node = cluster.gpus_per_node
    span = min(cluster.nodes, math.ceil(size * stride / per_node))  # nodes the group touches
    if span < 2:
        return GroupPlace(size, "intra", size)
    return GroupPlace(size, "inter", math.ceil(size / span))
