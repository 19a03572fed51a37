"""The graph cache (autoplan/graph_cache.py): hits without tracing, misses on any change of
key, distrusts broken entries, and stays out of the way of --no-cache and module: specs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import autoplan.tracing
from autoplan import graph_cache
from autoplan.app.cli import main
from autoplan.graph_cache import CACHE_DIR_ENV, get_cache_dir, graph_cache_key
from autoplan.workload import load_graph

MODEL = "gpt-tiny"
MODULE_SPEC = "module:tests.core.factories:build_resnet"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of this test's own (the session's is shared by every test)."""
    folder = tmp_path / "graphs"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The specs traced from here on (load_graph imports trace_spec when it traces)."""
    traced: list[str] = []
    trace_spec = autoplan.tracing.trace_spec

    def counting(spec_text: str, *args, **kwargs):  # noqa: ANN202
        traced.append(spec_text)
        return trace_spec(spec_text, *args, **kwargs)

    monkeypatch.setattr(autoplan.tracing, "trace_spec", counting)
    return traced


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def test_a_hit_returns_an_equal_graph_without_tracing(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traced = load_graph(MODEL)
    assert len(_entries(cache_dir)) == 1

    def no_tracing(*args, **kwargs):  # noqa: ANN202
        raise AssertionError("traced although the graph was cached")

    monkeypatch.setattr(autoplan.tracing, "trace_spec", no_tracing)
    cached = load_graph(MODEL)
    assert cached == traced and cached.structural_hash == traced.structural_hash
    assert cached.to_dict() == traced.to_dict()


@pytest.mark.parametrize("change", ["dtype", "seq", "attention", "torch", "sources"])
def test_a_changed_key_misses(change: str, cache_dir: Path, traces: list[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_graph(MODEL)
    arguments = {"dtype": "fp32"} if change == "dtype" else {"seq": 16} if change == "seq" \
        else {"attention": "math"} if change == "attention" else {}
    if change == "torch":
        monkeypatch.setattr(graph_cache, "_package_version", lambda name: "0.0.0-other")
    if change == "sources":  # as if the tracing code had been edited
        monkeypatch.setattr(graph_cache, "_sources_digest", lambda: "edited")
    second = load_graph(MODEL, **arguments)
    assert len(traces) == 2 and len(_entries(cache_dir)) == 2
    if change in ("dtype", "seq"):
        assert second != first
    load_graph(MODEL, **arguments)  # now a hit
    assert len(traces) == 2


@pytest.mark.parametrize("broken", [
    "not json {", json.dumps({"version": 99}), json.dumps([1, 2]),
    "KEY", "NODES", "\udcff"])
def test_a_corrupt_entry_is_rebuilt_and_overwritten(
        broken: str, cache_dir: Path, traces: list[str], caplog: pytest.LogCaptureFixture) -> None:
    graph = load_graph(MODEL)
    (entry,) = _entries(cache_dir)
    good = json.loads(entry.read_text())
    if broken == "KEY":  # another key under this name
        broken = json.dumps(good | {"key": good["key"] | {"dtype": "fp16"}})
    elif broken == "NODES":  # the key matches, the graph fails LayerGraph's checks
        broken = json.dumps(good | {"graph": good["graph"] | {"nodes": "three"}})
    entry.write_bytes(broken.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="autoplan.graph_cache"):
        assert load_graph(MODEL) == graph
    assert len(traces) == 2
    assert "tracing the model again" in caplog.text and str(entry) in caplog.text
    assert json.loads(entry.read_text()) == good  # overwritten with the new trace
    load_graph(MODEL)
    assert len(traces) == 2


def test_no_cache_traces_and_leaves_the_cache_alone(cache_dir: Path, traces: list[str]) -> None:
    load_graph(MODEL, cache=False)
    assert _entries(cache_dir) == []
    load_graph(MODEL)
    (entry,) = _entries(cache_dir)
    before = entry.stat().st_mtime_ns
    load_graph(MODEL, cache=False)
    assert len(traces) == 3 and entry.stat().st_mtime_ns == before


def test_the_cli_no_cache_option_bypasses(cache_dir: Path, traces: list[str], capsys) -> None:
    argv = ["estimate", "--model", MODEL, "--cluster", "h100-sxm:gpus=1", "--global-batch",
            "2", "--plan", "dp=1,tp=1,pp=1", "--json"]
    assert main([*argv, "--no-cache"]) == 0
    assert _entries(cache_dir) == [] and len(traces) == 1
    assert main(argv) == 0 and main(argv) == 0
    assert len(_entries(cache_dir)) == 1 and len(traces) == 2
    capsys.readouterr()


def test_module_specs_are_not_cached(cache_dir: Path, traces: list[str]) -> None:
    assert graph_cache_key(MODULE_SPEC, "bf16", "flash") is None
    assert load_graph(MODULE_SPEC) == load_graph(MODULE_SPEC)
    assert len(traces) == 2 and _entries(cache_dir) == []


def test_an_hf_key_holds_the_config_content_and_transformers(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2", "n_layer": 2}')
    first = graph_cache_key(f"hf:{config},seq=8", "bf16", "flash")
    config.write_text('{"model_type": "gpt2", "n_layer": 3}')
    second = graph_cache_key(f"hf:{config},seq=8", "bf16", "flash")
    assert first is not None and second is not None
    assert first["hf_config"] != second["hf_config"] and "transformers" in first
    assert graph_cache_key(f"hf:{tmp_path / 'missing.json'}", "bf16", "flash") is None
    assert graph_cache_key("hf:\x00", "bf16", "flash") is None


def test_an_unwritable_cache_costs_only_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "file" / "graphs"))
    with caplog.at_level(logging.WARNING, logger="autoplan.graph_cache"):
        assert load_graph(MODEL).model == MODEL
    assert "cannot write" in caplog.text


def test_the_cache_folder_follows_the_environment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert get_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert get_cache_dir() == tmp_path / "xdg" / "autoplan" / "graphs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_cache_dir() == tmp_path / "home" / ".cache" / "autoplan" / "graphs"
