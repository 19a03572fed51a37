"""Issue 9: generated inputs never escape as anything but AutoplanError.

Spec strings (model, cluster, plan shorthand, --fix: 1,250 per run) and JSON documents
(plan, profile, layer graph, cluster: 1,250 per run, random mutations of valid documents)
are parsed; each either parses or raises AutoplanError. Model specs are parsed only, never
built. The @example lines are edge cases always tried; the tests at the end hold documents
that once escaped as another exception or loaded garbage.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.analytic import analytic_profile
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.hardware import HARDWARE_PRESETS
from autoplan.models.presets import PRESETS
from autoplan.models.spec import parse_model_spec
from autoplan.plan import check_plan, parse_plan_shorthand, plan_from_json, uniform_plan
from autoplan.profile import load_profile
from autoplan.search.space import FIXABLE, parse_fix
from tests.graphs import synthetic_graph


def parses(parse: Callable[[], object]) -> None:
    """Run `parse`; AutoplanError is an answer too (anything else fails the test)."""
    try:
        parse()
        event("parsed")
    except AutoplanError:
        event("refused")


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])
GRAPH = synthetic_graph()
CLUSTER = parse_cluster_spec("h100-sxm:gpus=8")

# ------------------------------------------------------------------ spec strings

NUMBERS = ["0", "1", "2", "8", "-1", "-0", "1.5", "1e3", "nan", "inf", "-inf", "1_000",
           "0x10", "99999999999999999999999", "9" * 5000, "", " ", "\x00", "٣", "true", "²"]
WORDS = ["none", "full", "selective", "1f1b", "gpipe", "interleaved_1f1b", "yes", "off",
         "ckpt", "x", "=", ",", ":", "==", "a=b", "\n", "é", "🙂"]


def _spec(heads: list[str], keys: list[str], valid: list[str]) -> st.SearchStrategy[str]:
    """`head:key=value,...` with keys and values from the valid ones and near misses, a
    valid spec with one more key=value, or plain text."""
    value = (st.sampled_from(NUMBERS + WORDS) | st.integers(1, 64).map(str)
             | st.integers(-10**6, 10**30).map(str) | st.text(max_size=6))
    pair = st.tuples(st.sampled_from(keys) | st.text(max_size=4),
                     st.sampled_from(["=", "=", "=", "", "==", ":"]), value).map("".join)
    pairs = st.lists(pair, max_size=5).map(",".join)
    # a valid spec with one value changed: these reach the checks after the parsing
    near = st.tuples(st.sampled_from(valid), st.sampled_from(keys), value).map(
        lambda p: f"{p[0]}{',' if ':' in p[0] or '=' in p[0] else ':'}{p[1]}={p[2]}")
    if not heads:  # plan shorthand and --fix have no head
        return near | pairs | st.text(max_size=30)
    head = st.sampled_from(heads) | st.text(max_size=8)
    structured = st.tuples(head, st.sampled_from([":", ":", "", ",", "::"]), pairs).map(
        "".join)
    return near | structured | pairs | st.text(max_size=30)


MODEL_KEYS = ["layers", "hidden", "heads", "kv_heads", "ffn", "seq", "vocab", "dropout",
              "norm_eps", "rope_theta"]
MODEL_HEADS = [*PRESETS, "gpt", "llama", "hf", "module", "module:os.path", "hf:/nonexistent"]
CLUSTER_HEADS = [*HARDWARE_PRESETS, "local-cpu", "tpu", "h100"]
PLAN_KEYS = ["dp", "tp", "pp", "micro_batch", "ckpt", "zero", "schedule", "sequence_parallel",
             "virtual_stages"]


@settings(FUZZ, max_examples=350)
@given(_spec(MODEL_HEADS, MODEL_KEYS, ["gpt-tiny", "llama-tiny", "llama3-405b",
                                        "gpt:layers=2,hidden=64,heads=4,seq=32,vocab=256"]))
@example("gpt-tiny:layers=" + "9" * 5000)  # past int()'s 4300-digit limit
@example("hf:\x00")  # a path no file system takes
def test_model_specs(text: str) -> None:
    parses(lambda: parse_model_spec(text))


@settings(FUZZ, max_examples=300)
@given(_spec(CLUSTER_HEADS, ["nodes", "gpus", "procs", "gpus_per_node"],
             ["h100-sxm:nodes=2", "a100-80g:gpus=8", "local-cpu:procs=2", "h200"]))
@example("h100-sxm:nodes=" + "1" * 30)  # once accepted, then the search never ended
@example("local-cpu:procs=99999999999999999999999")
def test_cluster_specs(text: str) -> None:
    parses(lambda: parse_cluster_spec(text))


@settings(FUZZ, max_examples=350)
@given(_spec([], PLAN_KEYS, ["dp=8", "dp=2,tp=2,pp=2", "pp=2,virtual_stages=2"]),
       st.sampled_from([1, 2, 8, 16, 0, -1, 10**30]),
       st.sampled_from([1, 8, 16, 64, 0, -4, 10**30]))
def test_plan_shorthand(text: str, world_size: int, global_batch: int) -> None:
    parses(lambda: parse_plan_shorthand(text)
           and uniform_plan(text, GRAPH, world_size, global_batch))


@settings(FUZZ, max_examples=250)
@given(_spec([], list(FIXABLE), ["pp=2", "zero=1,ckpt=full", "tp=2,sequence_parallel=1"]))
def test_fix_strings(text: str) -> None:
    parses(lambda: parse_fix(text))


# ------------------------------------------------------------------ JSON documents

LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
        | st.sampled_from([0, -1, 1, 2, 3, 8, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308])
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
GARBAGE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
OPERATIONS = ["delete", "replace", "replace", "add", "duplicate", "empty", "number", "version"]


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """Apply one to four random changes at random places of a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 4))):
        operation = data.draw(st.sampled_from(OPERATIONS))
        if operation == "version":
            if isinstance(doc, dict):
                doc["version"] = data.draw(st.sampled_from([0, 2, -1, 10**30, "1", 1.0, None])
                                           | GARBAGE)
            continue
        parent, key = _place(doc, data)
        if parent is None:  # the root itself
            doc = data.draw(GARBAGE) if operation == "replace" else doc
            continue
        value = parent[key]
        if operation == "delete":
            del parent[key]
        elif operation == "replace":
            parent[key] = data.draw(GARBAGE)
        elif operation == "add":
            if isinstance(value, dict):
                value[data.draw(st.text(max_size=6))] = data.draw(GARBAGE)
            elif isinstance(value, list):
                value.append(data.draw(GARBAGE))
        elif operation == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[0]))
        elif operation == "empty":
            parent[key] = type(value)() if isinstance(value, list | dict | str) else None
        elif operation == "number" and isinstance(value, int | float):
            parent[key] = data.draw(st.sampled_from(
                [0, -1, -value, value * 10**20, value + 0.5, float("nan"), float("inf")]))
    return doc


def _place(doc: Any, data: st.DataObject) -> tuple[Any, Any]:
    """A random (container, key) inside `doc`, or (None, None) for the root."""
    parent, key, node = None, None, doc
    while isinstance(node, dict | list) and node and data.draw(st.integers(0, 3)) > 0:
        key = (data.draw(st.sampled_from(sorted(node))) if isinstance(node, dict)
               else data.draw(st.integers(0, len(node) - 1)))
        parent, node = node, node[key]
    return parent, key


def _text(doc: Any, data: st.DataObject) -> str:
    """The document as JSON, now and then cut short."""
    text = json.dumps(doc)
    if data.draw(st.integers(0, 9)) == 0:
        text = text[:data.draw(st.integers(0, len(text)))]
    return text


PLAN = json.loads(uniform_plan("dp=2,tp=2,pp=2,ckpt=full,zero=1", GRAPH, 8, 16).to_json())
PROFILE = json.loads(analytic_profile(GRAPH, CLUSTER, micro_batches=(1, 2), tps=(1, 2))
                     .to_json())
GRAPH_DOC = json.loads(json.dumps(GRAPH.to_dict()))
CLUSTER_DOC = CLUSTER.to_dict()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_plan_documents(data: st.DataObject) -> None:
    text = _text(_mutate(PLAN, data), data)
    parses(lambda: check_plan(plan_from_json(text), GRAPH, world_size=8))


@settings(FUZZ, max_examples=350)
@given(st.data())
def test_profile_documents(scratch: Path, data: st.DataObject) -> None:
    path = scratch / "profile.json"
    path.write_text(_text(_mutate(PROFILE, data), data))
    parses(lambda: load_profile(path).content_hash)


@settings(FUZZ, max_examples=350)
@given(st.data())
def test_graph_documents(scratch: Path, data: st.DataObject) -> None:
    path = scratch / "graph.json"
    path.write_text(_text(_mutate(GRAPH_DOC, data), data))
    def load() -> None:
        graph = LayerGraph.load(path)
        assert graph.structural_hash and graph.params >= 0 and graph.fwd_flops >= 0

    parses(load)


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_cluster_documents(scratch: Path, data: st.DataObject) -> None:
    path = scratch / "cluster.json"
    doc = _mutate(CLUSTER_DOC if data.draw(st.booleans()) else PROFILE, data)
    path.write_text(_text(doc, data))
    parses(lambda: parse_cluster_spec(str(path)))


def _graph_with(change: Any) -> dict:
    doc = copy.deepcopy(GRAPH_DOC)
    change(doc)
    return doc


@pytest.mark.parametrize("doc", [
    # Each of these once escaped as TypeError, ValueError or ZeroDivisionError, or loaded
    # and failed later.
    _graph_with(lambda d: d["nodes"][0].update(params="many")),
    _graph_with(lambda d: d["nodes"][0].update(output_shape=5)),
    _graph_with(lambda d: d["nodes"][0].update(name=["x"])),
    _graph_with(lambda d: d["nodes"][0].update(fwd_flops=float("nan"))),
    _graph_with(lambda d: d["nodes"].append(d["nodes"][0])),
    _graph_with(lambda d: d.update(nodes={"a": 1})),
    _graph_with(lambda d: d.update(edges=[{"src": "a", "dst": "b", "bytes": 1}])),
    _graph_with(lambda d: d.update(version="1")),
    [1, 2, 3],
    "graph",
])
def test_graph_regressions(doc: Any, scratch: Path) -> None:
    path = scratch / "regression.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AutoplanError):
        LayerGraph.load(path)


@pytest.mark.parametrize("device", [
    {**CLUSTER_DOC["device"], "gpus_per_node": 0},  # once ZeroDivisionError
    {**CLUSTER_DOC["device"], "gpus_per_node": "8"},
    {**CLUSTER_DOC["device"], "memory_bytes": -1},
    {**CLUSTER_DOC["device"], "peak_flops": "fast"},
    {**CLUSTER_DOC["device"], "name": None},
])
def test_cluster_regressions(device: dict, scratch: Path) -> None:
    path = scratch / "cluster_regression.json"
    path.write_text(json.dumps({**CLUSTER_DOC, "device": device}))
    with pytest.raises(AutoplanError):
        parse_cluster_spec(str(path))


def test_profile_and_plan_numbers_must_be_finite(scratch: Path) -> None:
    """NaN and Infinity are valid in Python's JSON; they once loaded into fits and estimates."""
    profile = copy.deepcopy(PROFILE)
    profile["layers"][0]["fits"][0]["fwd_intercept_s"] = float("nan")
    path = scratch / "nan_profile.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(AutoplanError, match="finite number"):
        load_profile(path)
    plan = copy.deepcopy(PLAN) | {"prediction": {"step_time_s": float("inf"), "tokens_per_s": 1,
                                                  "mfu": 0.5, "peak_memory_bytes": [1]}}
    with pytest.raises(AutoplanError, match="finite number"):
        plan_from_json(json.dumps(plan))
