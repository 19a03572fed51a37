"""The tiny-model zoo (tests/zoo): every model, whatever its architecture, is inspected into a
LayerGraph and searched on 4 analytic H100s, or refused with one AutoplanError line. Cases
that fail today because of a library defect are strict xfails naming it (issue 16), so that
each flips to a failure, to be unmarked, once the defect is fixed."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from autoplan.app.search import SearchCommand, run_search
from autoplan.errors import AutoplanError
from autoplan.models import build_model
from autoplan.tracing import layer_graph_of_built
from tests.zoo import CONFIGS, ZOO

transformers = pytest.importorskip("transformers")

CLUSTER = "h100-sxm:gpus=4"
"""Datasheet figures: the search needs no profile, so no process is started."""

DEFECTS = {
    "t5": "issue 16: hf T5's units are its whole encoder and decoder (T5Stack holds its blocks "
          "and its embedding is the tied 'shared', called through the stacks): no blocks",
}
"""Zoo model -> the library defect that stops its inspection (blocks) today."""

STOCK_DROPOUT = {"gpt2_dropout"}
"""The configs that keep transformers' default dropout on purpose (--verify must cope)."""


def _cases() -> list:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=DEFECTS[name]))
            if name in DEFECTS else name for name in ZOO]


def _dropouts(config: object) -> dict[str, float]:
    return {k: v for k, v in config.to_dict().items()
            if "drop" in k and isinstance(v, float) and v > 0}


def test_the_zoo_has_eight_architectures_from_configs_and_factories() -> None:
    hf = [m for m in ZOO.values() if m.spec.startswith("hf:")]
    factories = [m for m in ZOO.values() if m.spec.startswith("module:")]
    assert len(ZOO) >= 13 and len(hf) >= 8 and len(factories) >= 4
    assert {"encoder", "enc-dec", "vision", "moe", "causal-lm"} <= {m.kind for m in hf}
    assert {p.stem for p in CONFIGS.glob("*.json")} == {m.name for m in hf}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_each_config_builds_in_transformers_with_dropout_off_unless_stock(path) -> None:  # noqa: ANN001
    raw = json.loads(path.read_text())
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    assert config.num_hidden_layers == 2
    with torch.device("meta"):
        module = transformers.AutoModel.from_config(config)
    assert 10_000 < sum(p.numel() for p in module.parameters()) < 100_000
    if path.stem in STOCK_DROPOUT:
        assert _dropouts(config) and set(_dropouts(config).values()) == {0.1}
    else:
        assert _dropouts(config) == {}


@pytest.mark.parametrize("name", _cases())
def test_inspect_gives_blocks_holding_every_parameter_once(name: str) -> None:
    built = build_model(ZOO[name].spec)
    graph = layer_graph_of_built(built)
    assert [n.kind for n in graph.nodes].count("block") >= 2
    assert graph.nodes[-1].kind == "loss"
    assert sum(n.params for n in graph.nodes) == sum(p.numel() for p in built.module.parameters())
    assert all(n.fwd_flops >= 0 and n.act_bytes >= 0 for n in graph.nodes)


@pytest.mark.parametrize("name", list(ZOO))
def test_search_plans_four_devices_or_refuses_in_one_line(name: str) -> None:
    try:
        result = run_search(SearchCommand(model=ZOO[name].spec, cluster=CLUSTER,
                                          global_batch=8), None)
    except AutoplanError as err:
        assert "\n" not in str(err) and str(err)
        raise  # a refusal is well formed, but these models are meant to be planned
    assert result.best is not None
    plan = result.best.plan
    assert plan.world_size == 4 and plan.global_batch == 8
    assert result.best.estimate.step_time_s > 0


# ------------------------------------------------------------------ the compatibility matrix


@functools.cache
def _compatibility():  # noqa: ANN202 - the benchmark script, imported from its path
    spec = importlib.util.spec_from_file_location(
        "compatibility", Path(__file__).parent.parent / "benchmarks" / "compatibility.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("cell", "code", "out", "err", "expected"), [
    ("dp", 0, "verify: matches the one-process reference", "", ("verified", "")),
    ("tp", 2, "", "autoplan run: error: tp=2 does not divide 3 heads", (
        "refused", "tp=2 does not divide 3 heads")),
    ("pp", 1, "verify: DIFFERS from the one-process reference: x", "note",
     ("FAILED", "verify: DIFFERS from the one-process reference: x")),
    ("zero3", 2, "", "Traceback (most recent call last):\n  File x\nKeyError: 'a'",
     ("FAILED", "exit 2: KeyError: 'a'")),
    ("auto2", 1, "compat: FAILED: verify differs: g", "", ("FAILED", "verify differs: g")),
    ("auto1", 2, "compat: refused: no plan fits", "", ("refused", "no plan fits")),
    ("auto2", 1, "", "RuntimeError: boom\nChildFailedError:\n====", ("FAILED",
                                                                    "exit 1: RuntimeError: boom")),
    ("auto2", 1, "", "[rank1]: ValueError: tied\n  error_file: <N/A>\n====",
     ("FAILED", "exit 1: ValueError: tied")),
])
def test_the_matrix_classifies_a_cell_by_its_exit_and_output(
        cell: str, code: int, out: str, err: str, expected: tuple[str, str]) -> None:
    assert _compatibility()._classify(cell, code, out, err) == expected


def test_a_timed_out_cell_is_a_failed_hang(tmp_path: Path) -> None:
    log = tmp_path / "dp.log"
    log.write_text("$ cmd\nexit timeout 240\nwall_s 240.3\n--- stdout\nstep 1\n--- stderr\n")
    result = _compatibility().cell_from_log("gpt2", "dp", log)
    assert (result.status, result.wall_s) == ("FAILED", 240.3)
    assert result.detail.startswith("timeout after 240 s (a hang)")
