"""The cost model against closed forms and against published Megatron-LM measurements."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from autoplan import efficiency as eff
from autoplan.app.cli import main
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import STEP_PARTS, CostModel
from autoplan.cost_model.collectives import CommModel
from autoplan.cost_model.communication import grad_sync_time_s
from autoplan.cost_model.pipeline import (
    bubble_fraction,
    micro_batches_in_flight,
    pipeline_time_s,
)
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import uniform_plan
from autoplan.workload import load_graph

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "korthikanti.py"


def _block(i: int, params: int = 1_000_000, flops: float = 1e12) -> LayerNode:
    return LayerNode(name=f"layers.{i}", kind="block", module_type="Synthetic", signature="b",
                     params=params, shared_params=0, param_bytes=2 * params, fwd_flops=flops,
                     bwd_flops=2 * flops, act_bytes=1000, act_bytes_fixed=0, input_bytes=100,
                     output_bytes=100, output_shape=(1, 8, 8), fwd_io_bytes=1000,
                     bwd_io_bytes=2000)


def _graph(layers: int = 8, **kw) -> LayerGraph:
    return LayerGraph("synthetic", "bfloat16", "flash", 8,
                      tuple(_block(i, **kw) for i in range(layers)), ())


def _korthikanti():
    spec = importlib.util.spec_from_file_location("korthikanti", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_korthikanti_table_5_within_10_percent() -> None:
    bench, graphs = _korthikanti(), {}
    rows = bench.published_rows()
    assert {(r["model"], r["recompute"]) for r in rows} == {
        (m, c) for m in ("22B", "175B", "530B", "1T") for c in ("full", "selective")}
    for row in rows:
        predicted = bench.predict(row, graphs).step_time_s
        published = float(row["iteration_time_s"])
        assert predicted == pytest.approx(published, rel=0.10), (row["model"], row["recompute"])


def test_pure_dp_gradient_all_reduce_is_the_ring_formula() -> None:
    cluster = parse_cluster_spec("h100-sxm:gpus=8")
    graph = _graph(layers=4, params=10_000_000)
    plan = uniform_plan("dp=8", graph, 8, 8)
    sync, gather = grad_sync_time_s(CommModel(cluster), graph.nodes[0], plan.layers[0], 2)
    n, nbytes = 8, 10_000_000 * 2  # the bf16 gradients of one layer, one collective
    busbw = 450e9 * eff.NVLINK_BUS_FRACTION.value
    alpha = eff.NCCL_BASE_LATENCY_S.value + 2 * (n - 1) * eff.NVLINK_RING_STEP_S.value
    assert sync == pytest.approx(alpha + 2 * (n - 1) / n * nbytes / busbw, rel=1e-12)
    assert gather == 0.0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(schedule: str) -> None:
    graph, pp, m = _graph(layers=8), 4, 6
    cluster = parse_cluster_spec("h100-sxm:gpus=4")
    plan = uniform_plan(f"pp={pp},micro_batch=1,schedule={schedule}", graph, 4, m)
    estimate = CostModel(graph, cluster).estimate(plan)
    pipeline = estimate.step_time_s - estimate.breakdown["dp_comm"] - estimate.breakdown[
        "optimizer"]
    # exact for equal stages
    t = 0.125
    assert pipeline_time_s([t] * pp, m) == (m + pp - 1) * t
    assert bubble_fraction(pp, m) == (pp - 1) / (m + pp - 1)
    # a plan's end stages make one pipeline hop per micro-batch, the middle ones two: near it
    assert estimate.breakdown["bubble"] / pipeline == pytest.approx((pp - 1) / (m + pp - 1),
                                                                    rel=0.01)
    assert sum(estimate.breakdown[p] for p in STEP_PARTS) == pytest.approx(estimate.step_time_s)


def test_zero3_state_is_16_bytes_per_param_over_dp() -> None:
    graph, dp = _graph(layers=4, params=3_000_000), 8
    plan = uniform_plan(f"dp={dp},zero=3", graph, 8, 8)
    stage = CostModel(graph, parse_cluster_spec("a100-80g:gpus=8")).estimate(plan).stages[0]
    state = stage.memory.params + stage.memory.grads + stage.memory.optimizer
    assert state == pytest.approx(16 * graph.params / dp)  # AdamW mixed precision, ZeRO 3


def test_memory_follows_the_schedule_and_checkpointing() -> None:
    assert micro_batches_in_flight("gpipe", 4, 0, 16) == 16
    assert [micro_batches_in_flight("1f1b", 4, s, 16) for s in range(4)] == [4, 3, 2, 1]
    graph = _graph(layers=8)
    cluster = parse_cluster_spec("a100-80g:gpus=4")
    none, full = (CostModel(graph, cluster).estimate(uniform_plan(
        f"pp=4,micro_batch=2,ckpt={c}", graph, 4, 16)) for c in ("none", "full"))
    assert [s.memory.activations for s in none.stages] == [4 * 2 * 2 * 1000, 3 * 2 * 2 * 1000,
                                                          2 * 2 * 2 * 1000, 1 * 2 * 2 * 1000]
    assert full.stages[0].memory.activations == 4 * 2 * 2 * 100  # only the inputs
    assert full.breakdown["recompute"] == pytest.approx(full.breakdown["forward"])
    assert full.step_time_s > none.step_time_s


def test_a_plan_that_does_not_fit_is_reported_not_hidden() -> None:
    graph = _graph(layers=8, params=2_000_000_000)  # 16 B/param x 16e9 params on one GPU
    estimate = CostModel(graph, parse_cluster_spec("h100-sxm:gpus=1")).estimate(
        uniform_plan("dp=1", graph, 1, 1))
    assert not estimate.fits and max(estimate.peak_memory_bytes) > 80 * 2**30


def test_plan_for_another_world_is_refused() -> None:
    graph = _graph()
    with pytest.raises(AutoplanError, match="plan is for 4 devices"):
        CostModel(graph, parse_cluster_spec("h100-sxm:gpus=8")).estimate(
            uniform_plan("dp=4", graph, 4, 4))


def test_estimate_cli_prints_the_fields_the_issue_names(tmp_path, capsys) -> None:
    graph_path = tmp_path / "graph.json"
    _graph().save(graph_path)
    assert main(["estimate", "--model", str(graph_path), "--cluster", "h100-sxm:gpus=8",
                 "--global-batch", "16", "--plan", "dp=2,tp=2,pp=2,micro_batch=2,zero=1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "tokens_per_s", "model_tflops_per_gpu", "hardware_tflops_per_gpu",
                "mfu", "peak_memory_bytes", "fits", "breakdown"):
        assert key in out
    assert len(out["peak_memory_bytes"]) == 2 and out["breakdown"]["tp_comm"] > 0
    assert main(["estimate", "--model", str(graph_path), "--cluster", "h100-sxm:gpus=8",
                 "--global-batch", "16", "--plan", "dp=2,tp=2,pp=2"]) == 0
    assert "step time on the critical path" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--plan", "dp=3"], "the world has 8 devices"),
    (["--plan", "tp=9"], "does not divide"),
    (["--cluster", "tpu:gpus=8"], "unknown cluster"),
    (["--global-batch", "0"], "global-batch"),
    (["--profile", "/nonexistent/profile.json"], "cannot be read"),
])
def test_estimate_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, message) -> None:
    graph_path = tmp_path / "graph.json"
    _graph().save(graph_path)
    base = {"--model": str(graph_path), "--cluster": "h100-sxm:gpus=8", "--global-batch": "16",
            "--plan": "dp=8"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    assert main(["estimate", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_layout_change_at_an_embedding_moves_the_layer_before_it() -> None:
    """GPT's wpe takes position ids (input 0 bytes), so the executor hops wte's output there
    (executor/hops.py, apply_output_hops): the cost model prices that activation, not 0."""
    import dataclasses

    from autoplan.cost_model.communication import reshard_bytes
    from autoplan.plan import LayerStrategy

    first = dataclasses.replace(_block(0), name="wte", kind="embedding", output_bytes=4096)
    wpe = dataclasses.replace(_block(1), name="wpe", kind="embedding", input_bytes=0)
    graph = LayerGraph("synthetic", "bfloat16", "flash", 8, (first, wpe, _block(2)), ())
    model = CostModel(graph, parse_cluster_spec("h100-sxm:gpus=8"))
    assert reshard_bytes(wpe, first) == 4096 and reshard_bytes(first, None) == first.input_bytes
    wide, narrow = LayerStrategy(dp=8, tp=1), LayerStrategy(dp=2, tp=4)
    moved = model.reshard_s(wpe, wide, narrow, 8)
    as_input = model.reshard_s(dataclasses.replace(wpe, kind="block", input_bytes=4096),
                               wide, narrow, 8)
    assert moved > 0 and moved == pytest.approx(as_input)
    assert model.reshard_s(graph.nodes[2], wide, narrow, 8) < moved  # a block moves its input


def test_a_linear_shared_by_blocks_is_held_once() -> None:
    # blocks.0 owns the Linear every block calls; on one stage its weights count once, as
    # in the model (the cost of the owner is not the cost of its equals).
    graph = load_graph("module:tests.zoo.shared_mlp:build_shared_mlp", cache=False)
    plan = uniform_plan("dp=1", graph, 1, 8)
    estimate = CostModel(graph, parse_cluster_spec("a100-80g:gpus=1")).estimate(plan)
    assert estimate.stages[0].memory.params == sum(n.param_bytes for n in graph.nodes)
