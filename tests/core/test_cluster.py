"""Cluster specs and hardware presets."""

from __future__ import annotations

import json

import pytest

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.hardware import HARDWARE_PRESETS


def test_presets_and_sizes() -> None:
    c = parse_cluster_spec("h100-sxm:nodes=128")
    assert (c.gpus, c.nodes, c.gpus_per_node) == (1024, 128, 8)
    assert c.device.peak_flops == 989e12 and c.device.memory_bytes == 80 * 2**30
    a = parse_cluster_spec("a100-80g:gpus=1024")
    assert (a.gpus, a.nodes) == (1024, 128) and a.device.inter_node_bandwidth == 25e9
    assert parse_cluster_spec("h200").gpus == 8  # one node by default
    small = parse_cluster_spec("a100-40g:gpus=4")
    assert (small.gpus, small.nodes, small.gpus_per_node) == (4, 1, 4)
    local = parse_cluster_spec("local-cpu:procs=4")
    assert (local.gpus, local.nodes) == (4, 1) and local.device.peak_flops is None
    assert set(HARDWARE_PRESETS) >= {"a100-40g", "a100-80g", "h100-sxm", "h200"}
    assert all(p.source for p in HARDWARE_PRESETS.values())


@pytest.mark.parametrize(("text", "message"), [
    ("v100", "unknown cluster 'v100'; choose from a100-40g"),
    ("h100-sxm:gpus=12", "12 devices do not fill nodes of 8"),
    ("h100-sxm:nodes=2,gpus=16", "give one of nodes, gpus or procs"),
    ("h100-sxm:nodes=0", "nodes must be at least 1"),
    ("h100-sxm:racks=2", "unknown key 'racks'"),
    ("/no/such/cluster.json", "cannot be read"),
])
def test_bad_cluster_specs(text: str, message: str) -> None:
    with pytest.raises(AutoplanError, match=message):
        parse_cluster_spec(text)


def test_cluster_json_file_and_profile_section(tmp_path) -> None:
    cluster = parse_cluster_spec("h100-sxm:nodes=2")
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster.to_dict()))
    loaded = parse_cluster_spec(str(path))
    assert (loaded.gpus, loaded.device) == (cluster.gpus, cluster.device)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"cluster": cluster.to_dict(), "layers": []}))
    assert parse_cluster_spec(str(profile)).gpus == 16
    newer = cluster.to_dict() | {"version": 9}
    path.write_text(json.dumps(newer))
    with pytest.raises(AutoplanError, match="format version 9 is not supported .* reads version 1"):
        parse_cluster_spec(str(path))
    path.write_text("{not json")
    with pytest.raises(AutoplanError, match="is not JSON"):
        parse_cluster_spec(str(path))
    assert isinstance(loaded, Cluster)
