"""Issue 9, distributed faults of `autoplan validate` and Ctrl-C of `autoplan run`: the
command exits non-zero within 60 s, says why in one line and leaves no worker behind.

The kill tests of `run` and `profile` sit beside their commands (tests/executor/test_run.py,
tests/profiler/test_comm.py). These run the CLI in this process (its imports are paid once)
on gpt-tiny with two ranks; workers inherit TAG_ENV, so any left over are found by it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from autoplan.app.cli import main
from autoplan.app.run import RUN_FAULT_ENV, RunFailed
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.analytic import analytic_profile
from autoplan.errors import WorkerFailed
from autoplan.launch import run_workers
from autoplan.profiler.comm import FAULT_ENV as COMM_FAULT_ENV
from autoplan.workload import load_graph
from tests.processes import TAG_ENV, processes_with
from tests.test_files import ROOT, SOURCES

pytestmark = pytest.mark.usefixtures("time_limited")  # each test ends at its limit

WAIT_S = 60  # longest wait for workers to reach the point a test interrupts them at
PROMPT_S = 10  # Ctrl-C must end the command this soon
GROUP_CALL = re.compile(r"\b(init_process_group|new_group|new_subgroups)\(")
# init_device_mesh is not scanned: its groups are split from the default group and keep its
# timeout (checked on gloo, torch 2.13: a 2-rank mesh of a world made with a 4 s timeout
# timed out an unanswered all-reduce after 4.0 s, where a new_group() group went on waiting
# until the silent rank exited 15 s later: its default is 30 minutes).
# A process group made without a timeout of ours would get torch's default, 30 minutes.
KNOWN_WITHOUT_TIMEOUT: list[str] = []


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the commands make their scratch folders in (tempfile's default)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in "measured" fp32 profile of gpt-tiny, so that validate goes straight to its
    runs: an H100's analytic figures relabelled (the cost model refuses an analytic profile
    for a local-cpu cluster; these tests are about faults, not figures)."""
    folder = tmp_path_factory.mktemp("profile")
    analytic = analytic_profile(load_graph("gpt-tiny", dtype="fp32"),
                                parse_cluster_spec("h100-sxm:gpus=2"))
    analytic.model_copy(update={"mode": "measure"}).save(folder / "profile.json")
    return folder


def _one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"autoplan {command}: ")
    return lines[0]


def _ctrl_c_when(ready: Callable[[], bool]) -> tuple[threading.Event, list[float]]:
    """Send this process SIGINT (as Ctrl-C does) once ready() holds; set the event returned
    to stop waiting. The list gets the time the signal went."""
    stop, sent = threading.Event(), []

    def watch() -> None:
        deadline = time.monotonic() + WAIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            if ready():
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
                return
            stop.wait(0.1)

    threading.Thread(target=watch, name="ctrl-c", daemon=True).start()
    return stop, sent


@pytest.mark.slow
def test_killed_worker_ends_validate_naming_plan_and_rank(
        tag: str, profile_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Rank 1 of validate's first run is SIGKILLed as step 1 begins: status 1 (a runtime
    fault, not bad input) within 60 s, one line naming the plan, the rank and the signal,
    and no process left."""
    monkeypatch.setenv(RUN_FAULT_ENV, "kill:1:1")
    start_s = time.monotonic()
    status = main(["validate", "--model", "gpt-tiny", "--nproc", "2", "--global-batch", "4",
                   "--top-k", "2", "--steps", "2", "--warmup", "1", "--profile",
                   str(profile_dir)])
    assert status == 1 and time.monotonic() - start_s < 60
    line = _one_line(capsys.readouterr().err, "validate")
    assert line.startswith("autoplan validate: error: plan dp=2,"), line
    assert "run worker rank 1 was killed by SIGKILL" in line
    assert "all workers were stopped" in line
    assert processes_with(TAG_ENV, tag) == []


@pytest.mark.slow
@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_ends_run_and_every_worker(tag: str, scratch: Path, capsys) -> None:
    """SIGINT to the launcher while its two workers train: status 130 within PROMPT_S, no
    worker left, the scratch folder removed."""
    def training() -> bool:
        try:
            return any("step" in path.read_text()
                       for path in scratch.glob("autoplan-run-*/progress.log"))
        except OSError:  # the run ended and removed its folder meanwhile
            return False

    stop, sent = _ctrl_c_when(training)
    try:
        status = main(["run", "--model", "gpt-tiny", "--plan", "dp=2", "--steps", "100000",
                       "--timeout", "60"])
    finally:
        stop.set()
    assert sent, "the workers never reported a step"
    assert status == 130 and time.monotonic() - sent[0] < PROMPT_S
    assert _one_line(capsys.readouterr().err, "run") == "autoplan run: interrupted"
    assert processes_with(TAG_ENV, tag) == []
    assert list(scratch.iterdir()) == []


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_ends_validate_and_every_worker(
        tag: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """SIGINT while validate's profiling workers run (rank 1 made to hang): status 130, no
    worker left. Its runs start workers the same way (autoplan/launch.run_workers)."""
    monkeypatch.setenv(COMM_FAULT_ENV, "hang:1")
    stop, sent = _ctrl_c_when(lambda: len(processes_with(TAG_ENV, tag)) >= 2)
    try:
        status = main(["validate", "--model", "gpt-tiny", "--nproc", "2", "--global-batch",
                       "4", "--top-k", "2", "--steps", "2", "--warmup", "1"])
    finally:
        stop.set()
    assert sent, "the profiling workers never started"
    assert status == 130 and time.monotonic() - sent[0] < PROMPT_S
    assert _one_line(capsys.readouterr().err, "validate") == "autoplan validate: interrupted"
    assert processes_with(TAG_ENV, tag) == []


def test_workers_exit_when_their_launcher_is_killed(tag: str, tmp_path: Path) -> None:
    """A launcher SIGKILLed (it cannot stop anyone) leaves no worker: each notices its parent
    went (launch.watch_parent) and exits within a second. No torch is imported here."""
    worker = ("import time; from autoplan.launch import watch_parent; "
              "watch_parent(); time.sleep(60)")
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys; from autoplan.launch import "
         "run_workers; run_workers(2, [sys.executable, '-c', sys.argv[1]], "
         "pathlib.Path(sys.argv[2]), 60)", worker, str(tmp_path)])
    try:
        deadline = time.monotonic() + WAIT_S
        while len(set(processes_with(TAG_ENV, tag)) - {launcher.pid}) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
    deadline = time.monotonic() + 5
    while processes_with(TAG_ENV, tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(TAG_ENV, tag) == []


def test_a_failed_worker_is_named_by_its_error_not_torchs_rank_prefix(tmp_path: Path) -> None:
    """torch.distributed writes "[rank0]: " before each line of a rank's traceback and ends
    it with a bare "[rank0]:"; the error names the traceback's last words instead (it said
    "last stderr line: [rank0]:")."""
    worker = ("import sys; sys.stderr.write('[rank0]: Traceback (most recent call last):\\n"
              "[rank0]: ValueError: the shapes disagree\\n[rank0]:\\n'); sys.exit(1)")
    with pytest.raises(WorkerFailed, match=r"last stderr line: ValueError: the shapes disagree"):
        run_workers(1, [sys.executable, "-c", worker], tmp_path, 60)


def test_debug_shows_the_traceback_of_a_runtime_fault(
        profile_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A dead worker is status 1 (2 is for bad input); --debug raises it instead. No process
    is started: the runs fail as run_plans' launcher reports a dead worker."""
    import autoplan.app.run

    def dead_worker(runs: list, world: int, on_progress: object = None) -> None:
        raise RunFailed(f"plan {runs[0][0].plan}: run worker rank 1 was killed by SIGKILL "
                        "after 1.0 s; all workers were stopped")

    monkeypatch.setattr(autoplan.app.run, "run_plans", dead_worker)
    args = ["validate", "--model", "gpt-tiny", "--nproc", "2", "--global-batch", "4",
            "--top-k", "2", "--steps", "2", "--warmup", "1", "--profile", str(profile_dir)]
    assert main(args) == 1
    assert "rank 1 was killed by SIGKILL" in _one_line(capsys.readouterr().err, "validate")
    with pytest.raises(WorkerFailed, match=r"^plan dp=2,.*rank 1 was killed by SIGKILL"):
        main(["--debug", *args])


def _call_text(text: str, start: int) -> str:
    """The source of the call whose "(" is at text[start]: up to its closing parenthesis."""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start:end + 1]
    return text[start:]


def test_every_process_group_is_made_with_a_timeout() -> None:
    """Issue 9: every process-group creation (and so every collective on it) has our
    timeout, but the known exceptions listed above."""
    missing = []
    for path in SOURCES:
        text = path.read_text()
        for match in GROUP_CALL.finditer(text):
            call = _call_text(text, match.end() - 1)
            if "timeout" not in call:
                missing.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
    assert missing == KNOWN_WITHOUT_TIMEOUT
