"""Cluster specs (`h100-sxm:nodes=128`, `a100-80g:gpus=1024`, `local-cpu:procs=4`, or a JSON
file) parsed into a frozen Cluster."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

from autoplan.errors import AutoplanError
from autoplan.formats import check_version
from autoplan.hardware import HARDWARE_PRESETS, DevicePreset, local_cpu_preset
from autoplan.specs import parse_int, parse_kv, shown

__all__ = ["CLUSTER_FORMAT_VERSION", "MAX_DEVICES", "Cluster", "parse_cluster_spec"]

CLUSTER_FORMAT_VERSION = 1
MAX_DEVICES = 2**20
"""The largest cluster autoplan plans for (the largest trained on had about 10**5 GPUs); a
bound keeps the search's enumeration of degrees finite on a mistyped count."""
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
        if self.gpus > MAX_DEVICES:
            raise AutoplanError(f"cluster '{self.spec}': {self.gpus} devices; autoplan plans "
                                f"for at most {MAX_DEVICES}")
        per_node = self.device.gpus_per_node
        if not isinstance(per_node, int) or isinstance(per_node, bool) or per_node < 1:
            raise AutoplanError(f"cluster '{self.spec}': gpus_per_node must be an integer >= 1, "
                                f"got {per_node!r}")
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
        what = f"cluster file '{spec}'"
        check_version(data, what, CLUSTER_FORMAT_VERSION)
        device, gpus = data.get("device"), data.get("gpus")
        if not isinstance(device, dict):
            raise AutoplanError(f"{what} is malformed: device must be an object, got "
                                f"{shown(repr(device))}")
        if not _is_int(gpus, 1):
            raise AutoplanError(f"{what} is malformed: gpus must be an integer >= 1, got "
                                f"{shown(repr(gpus))}")
        known = {f.name: f.default is MISSING for f in fields(DevicePreset)}
        unknown = sorted(set(device) - set(known))
        missing = [name for name, required in known.items() if required and name not in device]
        if unknown or missing:
            raise AutoplanError(f"{what} is malformed: device field "
                                f"{shown(unknown[0]) if unknown else missing[0]} is "
                                f"{'unknown' if unknown else 'missing'}")
        for name, (check, wanted) in _DEVICE_FIELDS.items():
            if name in device and not check(device[name]):
                raise AutoplanError(f"{what} is malformed: device.{name} must be {wanted}, "
                                    f"got {shown(repr(device[name]))}")
        return cls(spec, DevicePreset(**device), gpus)


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_rate(value: object) -> bool:
    """A positive finite number, or None (unknown until measured)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                             and 0 < value < math.inf)


_DEVICE_FIELDS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "peak_flops": (_is_rate, "a positive number or null"),
    "memory_bytes": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "memory_bandwidth": (_is_rate, "a positive number or null"),
    "intra_node_bandwidth": (_is_rate, "a positive number or null"),
    "inter_node_bandwidth": (_is_rate, "a positive number or null"),
    "gpus_per_node": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "cores_per_node": (lambda v: v is None or _is_int(v, 1), "an integer >= 1 or null"),
}


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
    what = f"cluster spec '{text}':"
    if name == "local-cpu":
        procs = parse_int(opts.get("procs") or opts.get("gpus") or "0", f"{what} procs", 0)
        device = local_cpu_preset(procs or None)
    else:
        device = HARDWARE_PRESETS[name]
    if "gpus_per_node" in opts:
        device = replace(device, gpus_per_node=parse_int(opts["gpus_per_node"],
                                                         f"{what} gpus_per_node"))
    if "nodes" in opts:
        gpus = parse_int(opts["nodes"], f"{what} nodes") * device.gpus_per_node
    else:
        count = opts.get("gpus") or opts.get("procs")
        gpus = parse_int(count, f"{what} gpus") if count else device.gpus_per_node
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
