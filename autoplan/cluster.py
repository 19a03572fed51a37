"""Cluster specs (`h100-sxm:nodes=128`, `a100-80g:gpus=1024`, `local-cpu:procs=4`, or a JSON
file) parsed into a frozen Cluster."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from autoplan.errors import AutoplanError
from autoplan.formats import check_version
from autoplan.profiler.presets import HARDWARE_PRESETS, DevicePreset, local_cpu_preset
from autoplan.specs import parse_int, parse_kv

__all__ = ["CLUSTER_FORMAT_VERSION", "Cluster", "parse_cluster_spec"]

CLUSTER_FORMAT_VERSION = 1
_PRESET_NAMES = [*HARDWARE_PRESETS, "local-cpu"]


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: `gpus` devices, `device.gpus_per_node` to a node."""

    spec: str
    device: DevicePreset
    gpus: int
    version: int = CLUSTER_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise AutoplanError(f"cluster '{self.spec}': needs at least one device")
        per_node = self.device.gpus_per_node
        if self.gpus > per_node and self.gpus % per_node:
            raise AutoplanError(
                f"cluster '{self.spec}': {self.gpus} devices do not fill nodes of {per_node}; "
                f"use a multiple of {per_node} or at most one node"
            )

    @property
    def gpus_per_node(self) -> int:
        return min(self.gpus, self.device.gpus_per_node)

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.device.gpus_per_node)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, spec: str) -> Cluster:
        check_version(data, f"cluster file '{spec}'", CLUSTER_FORMAT_VERSION)
        try:
            return cls(spec, DevicePreset(**data["device"]), int(data["gpus"]))
        except (KeyError, TypeError, ValueError) as err:
            raise AutoplanError(f"cluster file '{spec}' is malformed: {err}") from None


def parse_cluster_spec(text: str) -> Cluster:
    """Parse `PRESET[:nodes=N|gpus=N|procs=N][,gpus_per_node=G]` or a JSON file path.

    A JSON file is a saved Cluster or any document (a profile) with a "cluster" section.

    Raises:
        AutoplanError: on an unknown preset, bad numbers, or a malformed file.
    """
    text = text.strip()
    if text.endswith(".json"):
        return _from_file(text)
    name, _, rest = text.partition(":")
    if name not in _PRESET_NAMES:
        raise AutoplanError(f"unknown cluster '{name}'; choose from {', '.join(_PRESET_NAMES)}"
                            ", e.g. h100-sxm:nodes=4 or a100-80g:gpus=64, or a .json file")
    opts = parse_kv(rest, f"cluster spec '{text}'", ["nodes", "gpus", "procs", "gpus_per_node"])
    if sum(k in opts for k in ("nodes", "gpus", "procs")) > 1:
        raise AutoplanError(f"cluster spec '{text}': give one of nodes, gpus or procs")
    if name == "local-cpu":
        procs = parse_int(opts.get("procs") or opts.get("gpus") or "0", "procs", 0) or None
        device = local_cpu_preset(procs)
    else:
        device = HARDWARE_PRESETS[name]
    if "gpus_per_node" in opts:
        device = replace(device, gpus_per_node=parse_int(opts["gpus_per_node"], "gpus_per_node"))
    if "nodes" in opts:
        gpus = parse_int(opts["nodes"], "nodes") * device.gpus_per_node
    else:
        count = opts.get("gpus") or opts.get("procs")
        gpus = parse_int(count, "gpus") if count else device.gpus_per_node
    return Cluster(text, device, gpus)


def _from_file(path: str) -> Cluster:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise AutoplanError(f"cluster file '{path}' cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise AutoplanError(f"cluster file '{path}' is not JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("cluster"), dict):
        data = data["cluster"]
    if not isinstance(data, dict):
        raise AutoplanError(f"cluster file '{path}' holds no cluster object")
    return Cluster.from_dict(data, path)
