"""`autoplan run`: one rank in this process, local workers, torchrun, --verify, the memory
check, bad input, and a worker killed mid-run (issue 9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from autoplan.app.cli import main
from autoplan.app.run import RUN_FAULT_ENV
from autoplan.models import build_model
from tests.processes import processes_with

TAG_ENV = "AUTOPLAN_TEST_TAG"
RUN_TIMEOUT_S = 120


def _autoplan(*args: str, env: dict[str, str] | None = None,
              timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoplan", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _processes_with(tag: str) -> list[int]:
    return processes_with(TAG_ENV, tag)


def _one_line_error(err: str, command: str = "run") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"autoplan {command}: error: ")
    return lines[0]


# ------------------------------------------------------------------ one rank, in this process


def test_one_rank_reports_and_verifies(capsys) -> None:
    assert main(["run", "--model", "gpt-tiny", "--plan", "dp=1,micro_batch=2", "--steps", "3",
                 "--global-batch", "4", "--verify", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert {"max_rel_param_diff", "loss_diff"} <= set(data) and data["ok"]
    assert data["loss_diff"] < 1e-4 and data["max_rel_param_diff"] < 1e-3
    assert len(data["losses"]) == 3 and data["step_time_s"] > 0
    assert data["prediction"] is None and data["note"] == "no prediction: give --profile"
    memory = data["ranks"][0]
    # gpt-tiny's parameters in fp32: grads as large, AdamW keeps two moments (plus steps).
    assert memory["grads"] == memory["params"] and memory["optimizer"] >= 2 * memory["params"]
    assert "no prediction: give --profile" in captured.err


def test_prediction_sits_beside_the_measurement(capsys) -> None:
    assert main(["run", "--model", "gpt-tiny", "--plan", "dp=1", "--steps", "2",
                 "--cluster", "h100-sxm:gpus=1"]) == 0
    out = capsys.readouterr().out
    assert "step time: measured" in out and "predicted" in out
    assert "rank 0 (stage 0): params" in out and "predicted params" in out


def test_plan_that_does_not_fit_is_refused_unless_forced(capsys) -> None:
    args = ["run", "--model", "gpt-tiny", "--plan", "dp=1", "--steps", "1",
            "--cluster", "h100-sxm:gpus=1", "--memory-limit", "1e-6"]
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "plan does not fit memory: predicted peak" in line
    assert "exceeds the limit of 1.05 KiB; give --force" in line
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--plan", "dp=3", "--nproc", "2"], "dp 3 x tp 1 x pp 1 = 3, but the world has 2"),
    (["--plan", "dp=2", "--nproc", "2", "--global-batch", "3"], "global batch 3 does not divide"),
    (["--plan", "dp=1", "--steps", "0"], "--steps must be at least 1"),
    (["--plan", "dp=1", "--profile", "/nonexistent/profile"], "cannot be read"),
    (["--plan", "/nonexistent/plan.json"], "cannot be read"),
    (["--plan", "dp=1", "--cluster", "tpu:gpus=2"], "unknown cluster 'tpu'"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys) -> None:
    assert main(["run", "--model", "gpt-tiny", *args]) == 2
    assert message in _one_line_error(capsys.readouterr().err)


def test_plan_of_another_model_is_named(tmp_path, capsys) -> None:
    assert main(["inspect", "--model", "llama-tiny", "--plan", "dp=2", "--world-size", "2",
                 "--global-batch", "4", "-o", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["run", "--model", "gpt-tiny", "--plan", str(tmp_path / "plan.json")]) == 2
    assert "plan is for model llama-tiny" in _one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------ worker processes


@pytest.mark.slow
def test_local_workers_verify_against_one_process() -> None:
    # Two ranks keep the suite fast on 2 cores; 4-rank plans are checked in test_parallelize.
    out = _autoplan("run", "--model", "gpt-tiny", "--plan", "tp=2", "--steps", "3",
                    "--verify", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # --nproc left out: the plan's dp x tp x pp
    assert data["ok"] and data["problems"] == [] and data["world_size"] == 2
    assert data["loss_diff"] < 1e-4 and data["max_rel_grad_diff"] < 1e-5
    params = [rank["params"] for rank in data["ranks"]]
    whole = 4 * sum(p.numel() for p in build_model("gpt-tiny").module.parameters())
    # tp 2 splits all but norms and positions: both ranks hold the same, fewer bytes.
    assert len(set(params)) == 1 and params[0] < 0.75 * whole


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this python")
def test_runs_as_ranks_that_torchrun_started() -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2",
         "-m", "autoplan", "run", "--model", "gpt-tiny", "--plan", "pp=2,schedule=gpipe",
         "--steps", "2", "--verify", "--json"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)  # rank 0 alone prints
    assert data["ok"] and data["world_size"] == 2 and len(data["ranks"]) == 2
    assert [rank["stage"] for rank in data["ranks"]] == [0, 1]


@pytest.mark.slow
def test_killed_worker_ends_the_run_naming_its_rank() -> None:
    tag = uuid.uuid4().hex
    start_s = time.monotonic()
    out = _autoplan("run", "--model", "gpt-tiny", "--plan", "dp=2", "--nproc", "2",
                    "--steps", "50", env={RUN_FAULT_ENV: "kill:1:3", TAG_ENV: tag},
                    timeout=90)
    elapsed_s = time.monotonic() - start_s
    assert out.returncode == 1
    line = _one_line_error(out.stderr)
    assert "run worker rank 1 was killed by SIGKILL" in line and "all workers were stopped" in line
    assert elapsed_s < 60
    assert _processes_with(tag) == []
