"""`autoplan profile` under torchrun: two agents on this machine make a two-node world, and
the profile separates inter-node collectives from intra-node ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from autoplan.launch import free_port
from autoplan.profile import load_profile


def _agent(node_rank: int, port: int, out: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=autoplan-test", f"--node-rank={node_rank}", "-m", "autoplan",
               "profile", "--model", "gpt-tiny", "--micro-batches", "1", "--tp", "1",
               "--repeats", "1", "--warmup", "0", "--comm-sizes", "4096,65536", "-o", out]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    # Output to a file, not a pipe: waiting on one agent while the other fills its pipe would
    # stop that agent's worker mid-collective. A session of its own, so that killing its
    # process group ends the agent's workers too.
    with log.open("w") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(agent: subprocess.Popen) -> None:
    try:
        os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tails(logs: list[Path]) -> str:
    """What each agent printed (its last 4000 characters), to read a failure's cause in CI."""
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-4000:]}" for log in logs)


def test_profile_under_torchrun_separates_inter_node_groups(tmp_path) -> None:
    port = free_port()
    logs = [tmp_path / f"agent-{rank}.log" for rank in (0, 1)]
    agents = [_agent(rank, port, str(tmp_path / "profile"), log) for rank, log in enumerate(logs)]
    try:
        for agent in agents:
            agent.wait(timeout=180)
    except subprocess.TimeoutExpired:
        raise AssertionError("torchrun agents ran past 180 s:\n" + _tails(logs)) from None
    finally:
        for agent in agents:
            _kill(agent)
    # Judged by the profile it wrote, not only exit codes: a gloo process can rarely abort at
    # exit after its work is done (NOTES-torch.md).
    assert (tmp_path / "profile" / "profile.json").exists(), _tails(logs)
    profile = load_profile(tmp_path / "profile")
    assert {p.scope for p in profile.comm_points} == {"inter"}  # one rank per node
    assert {p.group_size for p in profile.comm_points} == {2}
    assert profile.cluster["gpus"] == 2 and profile.cluster["device"]["gpus_per_node"] == 1
    assert profile.layers and profile.comm
