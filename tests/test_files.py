"""Issue 9, "Files": writes are atomic, nothing a user exchanges is pickled, and every file
format refuses another version by naming both."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from autoplan.app.cli import main
from autoplan.cluster import CLUSTER_FORMAT_VERSION, parse_cluster_spec
from autoplan.cost_model.analytic import analytic_profile
from autoplan.errors import AutoplanError
from autoplan.graph import GRAPH_FORMAT_VERSION, LayerGraph
from autoplan.io import atomic_write_text
from autoplan.plan import PLAN_FORMAT_VERSION, load_plan, uniform_plan
from autoplan.profile import PROFILE_FORMAT_VERSION, load_profile
from autoplan.profiler.output import write_profile
from tests.graphs import synthetic_graph

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("autoplan", "profiler", "search", "cost_model", "executor")
                 for p in (ROOT / folder).rglob("*.py"))
GRAPH = synthetic_graph()
CLUSTER = parse_cluster_spec("h100-sxm:gpus=8")


def _fail_replace(*args: object) -> None:
    raise OSError(28, "No space left on device")


WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda folder: atomic_write_text(folder / "plan.json", "new"),
    "plan": lambda folder: uniform_plan("dp=4,tp=2", GRAPH, 8, 16).save(folder / "plan.json"),
    "graph": lambda folder: synthetic_graph(4).save(folder / "plan.json"),
    "profile": lambda folder: write_profile(analytic_profile(GRAPH, CLUSTER), folder),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_interrupted_write_leaves_the_old_file(writer: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["plan.json", "profile.json", "layers.csv", "comm.csv"]
    for name in names:
        (tmp_path / name).write_text(f"old {name}")
    monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OSError, match="No space left"):
        WRITERS[writer](tmp_path)
    for name in names:
        assert (tmp_path / name).read_text() == f"old {name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary left


def test_an_interrupted_write_of_a_new_file_leaves_nothing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        GRAPH.save(tmp_path / "graph.json")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a new file gets 0666 less the umask, a replaced one keeps its."""
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        (tmp_path / "kept.json").write_text("old")
        (tmp_path / "kept.json").chmod(0o640)
        atomic_write_text(tmp_path / "kept.json", "new")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "kept.json").read_text() == "new"


def test_search_output_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys) -> None:
    GRAPH.save(tmp_path / "graph.json")
    (tmp_path / "plan.json").write_text("old")
    monkeypatch.setattr(os, "replace", _fail_replace)
    argv = ["search", "--model", str(tmp_path / "graph.json"), "--cluster", "h100-sxm:gpus=8",
            "--global-batch", "16", "--time-limit", "5", "-o", str(tmp_path / "plan.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and len(err.splitlines()) == 1
    assert (tmp_path / "plan.json").read_text() == "old"


# ---------------------------------------------------------------- what the source may do

def _lines(pattern: str) -> list[str]:
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line.split("#")[0]):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_nothing_is_pickled_or_evaluated() -> None:
    modules = r"(pickle|marshal|shelve|dill|cloudpickle)"
    assert _lines(rf"import {modules}\b|\b{modules}\.|(?<![\w.])(eval|exec)\(") == []


def test_torch_load_only_reads_tensors() -> None:
    calls = _lines(r"torch\.load\(")
    assert calls and all("weights_only=True" in line for line in calls), calls


def test_files_are_written_only_through_atomic_write_text() -> None:
    """Writers of plans, graphs, profiles and CSVs go through autoplan.io; what remains is
    /dev/null, append-only progress logs and the workers' own stdout/stderr logs."""
    allowed = ("os.devnull", '"a")', 'f"rank{rank}.out", "wb"', 'f"rank{rank}.err", "wb"',
               "os.fdopen(fd")
    writes = _lines(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wax]b?['\"]|"
                    r"\.to_csv\([^)=]+[,)]|json\.dump\(|torch\.save\(")
    others = [line for line in writes if not any(ok in line for ok in allowed)]
    # autoplan/app/run.py: the workers' results, torch.save to a .tmp in a private folder, then
    # os.replace, read back with weights_only=True.
    assert [line for line in others if "torch.save({\"ranks\": ranks}, tmp)" not in line] == []


# ---------------------------------------------------------------- format versions

def _document(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.json"
    if kind == "plan":
        uniform_plan("dp=8", GRAPH, 8, 16).save(path)
    elif kind == "profile":
        analytic_profile(GRAPH, CLUSTER).save(path)
    elif kind == "graph":
        GRAPH.save(path)
    else:
        path.write_text(json.dumps(CLUSTER.to_dict()))
    return path


LOADERS: dict[str, tuple[int, Callable[[str], object]]] = {
    "plan": (PLAN_FORMAT_VERSION, load_plan),
    "profile": (PROFILE_FORMAT_VERSION, load_profile),
    "graph": (GRAPH_FORMAT_VERSION, LayerGraph.load),
    "cluster": (CLUSTER_FORMAT_VERSION, parse_cluster_spec),
}
# The oldest version each loader reads where it is not the current one: older profiles are
# upgraded on load (profile.Profile._known_version). A negative offset counts from here.
OLDEST_READ = {"profile": 1}


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("offset", [-1, 1, 41])
def test_another_format_version_names_both(kind: str, offset: int, tmp_path: Path) -> None:
    current, load = LOADERS[kind]
    path = _document(kind, tmp_path)
    load(str(path))  # the current version loads
    other = (OLDEST_READ.get(kind, current) if offset < 0 else current) + offset
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"version": other}))
    with pytest.raises(AutoplanError, match=rf"format version {other} is not supported "
                                            rf"\(this autoplan \S+ reads version {current}\)"):
        load(str(path))


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("version", ["1", 1.5, None, [1], True])
def test_a_version_that_is_not_an_integer_is_refused(kind: str, version: object,
                                                     tmp_path: Path) -> None:
    current, load = LOADERS[kind]
    path = _document(kind, tmp_path)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"version": version}))
    with pytest.raises(AutoplanError, match=rf"format version must be an integer.*reads "
                                            rf"version {current}"):
        load(str(path))
