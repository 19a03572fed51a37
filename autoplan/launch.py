"""Start local worker processes with torchrun's environment, watch them, end them all on a fault;
the one request/result protocol of local multi-process runs (call_workers / serve_worker)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from autoplan.errors import AutoplanError, WorkerFailed
from autoplan.io import atomic_write_text

__all__ = ["LOOPBACK", "ProgressCount", "call_workers", "counted_line", "exit_worker",
           "free_port", "run_workers", "serve_worker", "split_counted", "under_torchrun",
           "watch_parent"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # local runs rendezvous here and nowhere else
PARENT_PID_ENV = "AUTOPLAN_PARENT_PID"
_POLL_S = 0.2  # how often the parent looks at its children: rarely enough not to steal a core
_PARENT_CHECK_S = 0.5  # how often a worker checks that its launcher is still alive
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")
_STDERR_TAIL_CHARS = 300  # how much of a failed worker's last stderr line goes into the error


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a rare race is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _worker_env(rank: int, nproc: int, ranks_per_node: int, port: int) -> dict[str, str]:
    """The variables torchrun sets, for one local rank, pinned to the loopback interface."""
    env = dict(os.environ)
    env.update({
        "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc), "RANK": str(rank),
        "LOCAL_RANK": str(rank % ranks_per_node), "LOCAL_WORLD_SIZE": str(ranks_per_node),
        "GROUP_RANK": str(rank // ranks_per_node),
        "GROUP_WORLD_SIZE": str(-(-nproc // ranks_per_node)),
        # gloo and NCCL otherwise pick the interface the hostname resolves to.
        "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        PARENT_PID_ENV: str(os.getpid()),
    })
    return env


@dataclass
class _Workers:
    """The running children, their log files and the progress file read so far."""

    procs: list[subprocess.Popen]
    log_dir: Path
    started_s: float
    progress_path: Path | None = None
    progress_offset: int = 0
    last_progress_s: float = 0.0
    warned: set[int] = field(default_factory=set)


def _start(nproc: int, argv: list[str], ranks_per_node: int,
           log_dir: Path) -> list[subprocess.Popen]:
    """Start every rank in its own session, so that one killpg ends it and anything it started."""
    port = free_port()
    procs = []
    try:
        for rank in range(nproc):
            with open(log_dir / f"rank{rank}.out", "wb") as out, \
                    open(log_dir / f"rank{rank}.err", "wb") as err:
                procs.append(subprocess.Popen(
                    argv, env=_worker_env(rank, nproc, ranks_per_node, port),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True))
    except BaseException:
        _end_all(procs)
        raise
    return procs


def _end_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every child's process group and reap it: nothing is left behind."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _stderr_tail(workers: _Workers, rank: int) -> str:
    """The last non-empty stderr line of a rank, for the error message, without the
    "[rankN]:" that torch.distributed puts before each line of a rank's traceback (a blank
    one ends it)."""
    try:
        lines = (workers.log_dir / f"rank{rank}.err").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [text for text in (_RANK_PREFIX.sub("", line, count=1).strip() for line in lines)
             if text]
    return f" (last stderr line: {lines[-1][-_STDERR_TAIL_CHARS:]})" if lines else ""


def _forward_progress(workers: _Workers, on_progress: Callable[[str], None] | None) -> None:
    """Pass the complete new lines of the progress file to on_progress (or the log), and note
    when the last one came."""
    if workers.progress_path is None or not workers.progress_path.exists():
        return
    with open(workers.progress_path, "rb") as f:
        f.seek(workers.progress_offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    workers.progress_offset += end
    if end:
        workers.last_progress_s = time.monotonic()
    for line in data[:end].decode(errors="replace").splitlines():
        if on_progress is None:
            log.info("%s", line)
        else:
            on_progress(line)


def _check(workers: _Workers, label: str, done: Callable[[], bool]) -> bool:
    """True once every worker has ended; raises on a failure that came before the results."""
    codes = [proc.poll() for proc in workers.procs]
    failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
    if failed and not done():
        elapsed_s = time.monotonic() - workers.started_s
        rank, code = failed[0]
        others = "".join(f"; rank {r} {_describe_exit(c)}" for r, c in failed[1:])
        raise WorkerFailed(f"{label} rank {rank} {_describe_exit(code)} after {elapsed_s:.1f} s"
                           f"{_stderr_tail(workers, rank)}{others}; all workers were stopped")
    for rank, code in failed:
        if rank not in workers.warned:  # after the results: the rare abort at exit, harmless
            workers.warned.add(rank)
            log.warning("%s rank %d %s after writing its results", label, rank,
                        _describe_exit(code))
    return all(code is not None for code in codes)


def run_workers(nproc: int, argv: list[str], log_dir: Path, timeout_s: float, *,
                ranks_per_node: int | None = None, progress_path: Path | None = None,
                on_progress: Callable[[str], None] | None = None,
                done: Callable[[], bool] = lambda: False, label: str = "worker") -> None:
    """Run `argv` as ranks 0..nproc-1 on this machine and wait for all of them.

    Each rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    GROUP_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), so the same worker code runs
    under torchrun. On any fault every worker is killed before this returns or raises.

    Args:
        nproc: number of ranks.
        argv: the command each rank runs (e.g. [sys.executable, "-m", "some.module", ...]).
        log_dir: where each rank's stdout and stderr go (rank<i>.out, rank<i>.err).
        timeout_s: wall-clock limit without progress: the run is stopped when this long passes
            after the start, or after the last progress line, with no new line (without a
            progress_path, a limit on the whole run).
        ranks_per_node: ranks that count as one node (default: all); fewer fakes a multi-node
            world on one machine.
        progress_path: a file the workers append lines to; each new line goes to on_progress.
        on_progress: called in this process with each progress line (default: logged).
        done: tells whether the workers' results are complete; a worker that fails after that
            (the rare SIGABRT at exit of a gloo process) is logged, not raised.
        label: names the workers in messages.

    Raises:
        WorkerFailed: a rank exited non-zero or by a signal before `done()`, or the run
            went `timeout_s` without progress; the message names the rank and its exit code or
            signal, or the ranks still running.
        KeyboardInterrupt: passed on after every worker has been killed.
    """
    workers = _Workers(_start(nproc, argv, ranks_per_node or nproc, log_dir), log_dir,
                       time.monotonic(), progress_path)
    workers.last_progress_s = workers.started_s
    try:
        while True:
            _forward_progress(workers, on_progress)
            if _check(workers, label, done):
                return
            if time.monotonic() > workers.last_progress_s + timeout_s:
                running = [r for r, p in enumerate(workers.procs) if p.poll() is None]
                raise WorkerFailed(f"{label}s made no progress for {timeout_s:g} s (the limit); "
                                   f"ranks still running: {', '.join(map(str, running))}; "
                                   f"all were killed")
            time.sleep(_POLL_S)
    finally:
        _end_all(workers.procs)
        _forward_progress(workers, on_progress)


def watch_parent() -> None:
    """In a worker: exit at once if the launcher that started it dies (no orphans)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent is None:
        return

    def _watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(_PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=_watch, name="autoplan-parent-watch", daemon=True).start()


# ---------------------------------------------------------------------------- torchrun

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE")
"""What marks a rank of a launched world: torchrun sets both (and run_workers does), as does
any launcher that env:// initialisation serves; LOCAL_WORLD_SIZE is not among them, since
launchers other than torchrun need not set it: read it with a default (WORLD_SIZE)."""


def under_torchrun() -> bool:
    """True in a process that torchrun (or a launcher like it) started as one rank of a world,
    so a command runs as that rank instead of starting local workers of its own."""
    return all(key in os.environ for key in _TORCHRUN_KEYS)


# ---------------------------------------------------------------------------- the protocol
# A local multi-process run (profiling collectives, timing layers in situ, `autoplan run`)
# is a call: the parent writes a request into a scratch folder and starts `python -m module
# request.json` as every rank (run_workers); each rank serves it (serve_worker), rank 0
# appends progress lines and writes the result; the parent reads that result. Files, not
# pipes: the parent only watches exit codes and one growing file, a rank that dies leaves
# nothing half-read, and the result's format is the caller's (JSON, a torch.save file).

_T = TypeVar("_T")
_RESULT = "result"
_PROGRESS = "progress.log"


def call_workers(module: str, request: Mapping[str, Any], nproc: int, timeout_s: float,
                 read_result: Callable[[Path], _T], *, label: str,
                 ranks_per_node: int | None = None,
                 on_progress: Callable[[str], None] | None = None) -> _T:
    """Run `python -m module` as nproc local ranks on `request` and return rank 0's result.

    The module's `__main__` block calls serve_worker. Everything lives in a scratch folder
    named after the module's last part (autoplan-<name>-*, e.g. autoplan-run-*), removed on
    return: request.json, progress.log, the result and each rank's stdout and stderr.

    Args:
        module: the worker module, e.g. "autoplan.profiler.comm".
        request: what the workers are to do, as JSON-able data (serve_worker's body gets it).
        nproc: number of ranks.
        timeout_s: the limit without progress (run_workers).
        read_result: reads the file rank 0's result writer wrote (serve_worker's
            write_result), in this process, before the folder is removed.
        label: names the workers in messages ("comm worker").
        ranks_per_node: ranks that count as one node (default: all); fewer fakes a
            multi-node world on one machine.
        on_progress: called with each progress line (default: logged).

    Returns:
        What read_result returned.

    Raises:
        WorkerFailed: a rank died or stalled (run_workers); or the workers ended without
            writing their result, or wrote one that read_result refused (ValueError,
            KeyError, TypeError), naming the label.
        KeyboardInterrupt: passed on after every worker has been killed.
    """
    name = module.rsplit(".", 1)[-1].replace("_", "-")
    with tempfile.TemporaryDirectory(prefix=f"autoplan-{name}-") as scratch:
        folder = Path(scratch)
        result, progress = folder / _RESULT, folder / _PROGRESS
        envelope = {"request": dict(request), "result": str(result), "progress": str(progress)}
        atomic_write_text(folder / "request.json", json.dumps(envelope))
        run_workers(nproc, [sys.executable, "-m", module, str(folder / "request.json")],
                    folder, timeout_s, ranks_per_node=ranks_per_node, progress_path=progress,
                    on_progress=on_progress, done=result.exists, label=label)
        return _read(result, read_result, label)


def _read(result: Path, read_result: Callable[[Path], _T], label: str) -> _T:
    """read_result's value, or WorkerFailed when the file is missing or unreadable."""
    missing = WorkerFailed(f"{label}s ended without writing their results")
    if not result.exists():
        raise missing
    try:
        return read_result(result)
    except AutoplanError:
        raise
    except OSError:
        raise missing from None
    except (ValueError, KeyError, TypeError) as err:
        raise WorkerFailed(f"{label}s wrote unreadable results: {err}") from None


def _write_json(value: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(value))


def serve_worker(request_path: str,
                 body: Callable[[dict[str, Any], Callable[[str], None]], _T],
                 write_result: Callable[[_T, Path], None] = _write_json) -> NoReturn:
    """Serve call_workers' request as one rank, then exit; a worker module's `__main__`
    block calls it with sys.argv[1].

    It watches the parent (a worker outlives no launcher), runs body(request, progress) on
    every rank, and on rank 0 writes body's value with write_result to a temporary file,
    renamed over the result path, so the parent never reads a half-written result.

    Args:
        request_path: the request.json call_workers wrote.
        body: this rank's part of the work: gets the request and `progress`, which appends a
            line to the progress file on rank 0 (a no-op on the others); returns the result
            (read on rank 0 only).
        write_result: writes the result to the path given (default: as JSON).
    """
    watch_parent()
    envelope = json.loads(Path(request_path).read_text())
    rank0 = int(os.environ["RANK"]) == 0

    def progress(line: str) -> None:
        if rank0:
            with open(envelope["progress"], "a") as f:
                f.write(line + "\n")

    value = body(envelope["request"], progress)
    if rank0:
        result = Path(envelope["result"])
        tmp = result.with_name(f".{result.name}.tmp")
        write_result(value, tmp)
        os.replace(tmp, result)
    exit_worker()


def exit_worker() -> NoReturn:
    """End a worker process: leave its default process group if one is up, flush its output
    and exit 0 at once, skipping interpreter teardown, where gloo rarely aborts
    (NOTES-torch.md)."""
    dist = sys.modules.get("torch.distributed")  # imported by the worker if it made a group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def counted_line(done: int, planned: int, text: str) -> str:
    """A progress line that says how far the work is: "done/planned text" (split_counted)."""
    return f"{done}/{planned} {text}"


class ProgressCount:
    """Counted progress lines (counted_line) to `emit`: `done` of `planned`, which the caller
    may raise when more work turns up; with no `emit` it only counts."""

    def __init__(self, planned: int, emit: Callable[[str], None] | None) -> None:
        self.done, self.planned, self.emit = 0, planned, emit

    def step(self, text: str) -> None:
        """One more piece of work done: `text` says which."""
        self.done += 1
        self.say(text)

    def say(self, text: str) -> None:
        if self.emit is not None:
            self.emit(counted_line(self.done, self.planned, text))


def split_counted(line: str) -> tuple[str, int | None, int | None]:
    """(text, done, planned) of a counted_line; (line, None, None) for any other line."""
    count, _, text = line.partition(" ")
    done, slash, planned = count.partition("/")
    if slash and done.isdigit() and planned.isdigit():
        return text, int(done), int(planned)
    return line, None, None
