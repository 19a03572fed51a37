"""`autoplan profile` under torchrun: two agents on this machine make a two-node world, and
the profile separates inter-node collectives from intra-node ones."""

from __future__ import annotations

import os
import subprocess
import sys

from autoplan.profiler.launch import free_port
from autoplan.profiler.profile import load_profile


def _agent(node_rank: int, port: int, out: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=autoplan-test", f"--node-rank={node_rank}", "-m", "autoplan",
               "profile", "--model", "gpt-tiny", "--micro-batches", "1", "--tp", "1",
               "--repeats", "1", "--warmup", "0", "--comm-sizes", "4096,65536", "-o", out]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_profile_under_torchrun_separates_inter_node_groups(tmp_path) -> None:
    port = free_port()
    agents = [_agent(rank, port, str(tmp_path)) for rank in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    # Judged by the profile it wrote, not only exit codes: a gloo process can rarely abort at
    # exit after its work is done (NOTES-torch.md).
    assert (tmp_path / "profile.json").exists(), outputs
    profile = load_profile(tmp_path)
    assert {p.scope for p in profile.comm_points} == {"inter"}  # one rank per node
    assert {p.group_size for p in profile.comm_points} == {2}
    assert profile.cluster["gpus"] == 2 and profile.cluster["device"]["gpus_per_node"] == 1
    assert profile.layers and profile.comm
