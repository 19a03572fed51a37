"""The Plan schema: shorthand, JSON round trips and the errors bad plans get."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.models import build_model
from autoplan.plan import (
    PLAN_FORMAT_VERSION,
    Plan,
    check_plan,
    load_plan,
    parse_plan_shorthand,
    plan_from_json,
    split_stages,
    uniform_plan,
)
from autoplan.tracing import layer_graph_of_built


@pytest.fixture(scope="module")
def graph() -> LayerGraph:
    return layer_graph_of_built(build_model("gpt-small-test"))


def test_shorthand_expands_with_defaults(graph: LayerGraph) -> None:
    plan = uniform_plan("tp=2,pp=2", graph, world_size=8, global_batch=16)
    assert plan.version == PLAN_FORMAT_VERSION
    strategies = {(lay.dp, lay.tp, lay.zero, lay.checkpoint) for lay in plan.layers}
    assert strategies == {(2, 2, 0, "none")}
    assert plan.schedule == "1f1b" and plan.virtual_stages == 1
    # micro_batch defaults to 1 per dp rank: micro-batches of dp = 2 samples.
    assert (plan.micro_batch_size, plan.num_micro_batches) == (2, 8)
    assert plan.stage_boundaries == [0, graph.names.index("h.2")]
    assert [lay.name for lay in plan.layers] == graph.names
    assert plan.model_hash == graph.structural_hash


def test_full_shorthand(graph: LayerGraph) -> None:
    text = ("dp=2,tp=2,pp=2,micro_batch=2,ckpt=full,zero=1,schedule=interleaved_1f1b,"
            "sequence_parallel=true,virtual_stages=2")
    plan = uniform_plan(text, graph, world_size=8, global_batch=32)
    assert plan.layers[3].sequence_parallel and plan.layers[3].checkpoint == "full"
    assert plan.micro_batch_size == 4 and plan.num_micro_batches == 8
    assert len(plan.stage_boundaries) == 4  # pp x virtual stages, one block each


def test_json_round_trip_of_a_mixed_plan(graph: LayerGraph, tmp_path) -> None:
    plan = uniform_plan("tp=2,pp=2,zero=3,micro_batch=2", graph, world_size=8, global_batch=32)
    data = json.loads(plan.to_json())
    data["layers"][2] |= {"dp": 4, "tp": 1, "checkpoint": "selective"}
    data["layers"][3] |= {"dp": 1, "tp": 4, "sequence_parallel": True}
    mixed = plan_from_json(json.dumps(data))
    path = tmp_path / "plan.json"
    mixed.save(path)
    assert load_plan(str(path)) == mixed
    assert mixed.layers[3].tp == 4 and mixed.layers[2].checkpoint == "selective"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize(("change", "message"), [
    ({"pp": 3}, "pp 3 does not divide world_size 8"),
    ({"global_batch": 15}, "must equal global_batch 15"),
    ({"schedule": "zigzag"}, "schedule"),
    ({"stage_boundaries": [0, 0]}, "rise strictly"),
    ({"stage_boundaries": [1, 4]}, "start at 0"),
    ({"stage_boundaries": [0]}, "pp x virtual_stages is 2"),
    ({"virtual_stages": 2}, "interleaved_1f1b"),
    ({"version": 7}, "plan format version 7 is not supported"),
    ({"colour": "red"}, "colour"),
    ({"world_size": 0}, "world_size"),
])
def test_invalid_plans_name_the_field(graph: LayerGraph, change: dict, message: str) -> None:
    data = json.loads(uniform_plan("tp=2,pp=2", graph, 8, 16).to_json()) | change
    with pytest.raises(AutoplanError, match=message):
        plan_from_json(json.dumps(data))


@pytest.mark.parametrize(("layer_change", "message"), [
    ({"tp": 3}, "layer h.2: dp 2 x tp 3 must equal the 4 devices"),
    ({"zero": 4}, r"layers\.4\.zero"),
    ({"checkpoint": "some"}, r"layers\.4\.checkpoint"),
    ({"tp": 1, "dp": 4, "sequence_parallel": True}, "sequence_parallel needs tp > 1"),
    ({"name": "h.1"}, "layer names repeat"),
])
def test_invalid_layers_name_the_layer(graph: LayerGraph, layer_change: dict, message: str) -> None:
    data = json.loads(uniform_plan("tp=2,pp=2", graph, 8, 16).to_json())
    data["layers"][4] |= layer_change
    with pytest.raises(AutoplanError, match=message):
        plan_from_json(json.dumps(data))


@pytest.mark.parametrize(("text", "message"), [
    ("tp=3", "tp 3 x pp 1 does not divide the 8 devices"),
    ("dp=2,tp=2", "dp 2 x tp 2 x pp 1 = 4, but the world has 8"),
    ("micro_batch=3", "does not divide into micro-batches"),
    ("pp=2,virtual_stages=5", "10 pipeline chunks need at least 10 layers"),
    ("ckpt=most", "ckpt 'most' is not one of none, selective, full"),
    ("zero=5", "zero must be 0, 1, 2 or 3"),
    ("flavour=1", "unknown key 'flavour'; choose from"),
    ("tp", "is not key=value"),
    ("tp=2,tp=2", "given twice"),
    ("sequence_parallel=maybe", "true or false"),
])
def test_bad_shorthand(graph: LayerGraph, text: str, message: str) -> None:
    with pytest.raises(AutoplanError, match=message):
        uniform_plan(text, graph, world_size=8, global_batch=16)


def test_check_plan_against_model_and_world(graph: LayerGraph) -> None:
    plan = uniform_plan("tp=4", graph, 8, 16)
    check_plan(plan, graph, world_size=8)
    with pytest.raises(AutoplanError, match="for 8 devices; this world has 4"):
        check_plan(plan, graph, world_size=4)
    four = layer_graph_of_built(build_model("gpt:layers=2,hidden=64,heads=4,seq=16,vocab=64"))
    with pytest.raises(AutoplanError, match=r"tp 8 does not divide 4 of the sizes it splits"):
        check_plan(uniform_plan("tp=8", four, 8, 16), four)  # 4 heads, traced into tp_divides
    other = layer_graph_of_built(build_model("llama-tiny"))
    with pytest.raises(AutoplanError, match="hash"):
        check_plan(plan, other)
    unhashed = plan.model_copy(update={"model_hash": None})
    with pytest.raises(AutoplanError, match="layers the model does not have: wte"):
        check_plan(unhashed, other)


def test_split_stages_balances_blocks(graph: LayerGraph) -> None:
    names = graph.names
    assert split_stages(graph, 1) == [0]
    assert split_stages(graph, 4) == [0, *(names.index(f"h.{i}") for i in (1, 2, 3))]
    # More chunks than blocks: the 8 layers themselves are split, 2 2 1 1 1 1, the loss
    # going with the last (a chunk of the loss alone holds no layer to run).
    assert split_stages(graph, 6) == [0, 2, 4, 5, 6, 7]


def test_world_and_batch_must_be_positive(graph: LayerGraph) -> None:
    with pytest.raises(AutoplanError, match="must be at least 1"):
        uniform_plan("tp=1", graph, world_size=0, global_batch=8)


def test_shorthand_needs_context() -> None:
    with pytest.raises(AutoplanError, match="needs the model"):
        load_plan("dp=2")
    with pytest.raises(AutoplanError, match="cannot be read"):
        load_plan("/no/such/plan.json")


_VALUES = {
    "dp": st.integers(-2, 40).map(str), "tp": st.integers(-2, 40).map(str),
    "pp": st.integers(-2, 12).map(str), "micro_batch": st.integers(-1, 9).map(str),
    "ckpt": st.sampled_from(["none", "full", "selective", "x"]),
    "zero": st.integers(-1, 5).map(str), "schedule": st.sampled_from(["gpipe", "1f1b", "?"]),
    "sequence_parallel": st.sampled_from(["true", "false", "2"]),
    "virtual_stages": st.integers(0, 3).map(str),
}


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_VALUES)), st.just(None), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: _VALUES[k] for k in keys})),
    st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 8, 12, 64]))
def test_any_shorthand_gives_a_plan_or_a_clear_error(graph: LayerGraph, values: dict,
                                                     world: int, batch: int) -> None:
    text = ",".join(f"{k}={v}" for k, v in values.items())
    try:
        plan = uniform_plan(text, graph, world, batch)
    except AutoplanError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert plan_from_json(plan.to_json()) == plan
    assert all(lay.dp * lay.tp * plan.pp == world for lay in plan.layers)
    assert plan.micro_batch_size * plan.num_micro_batches == batch


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_junk_shorthand_never_crashes(graph: LayerGraph, text: str) -> None:
    try:
        parse_plan_shorthand(text)
    except AutoplanError:
        pass


def test_plan_is_frozen(graph: LayerGraph) -> None:
    plan = uniform_plan("dp=8", graph, 8, 16)
    with pytest.raises(Exception, match="frozen"):
        plan.pp = 2  # type: ignore[misc]
    assert isinstance(plan, Plan)
