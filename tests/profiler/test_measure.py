"""Measured layer profiles: shard shapes, saved bytes, optimizer state, fits, files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autoplan.app.cli import main
from autoplan.errors import AutoplanError
from autoplan.models import build_model
from autoplan.profile import fit_line, load_profile
from autoplan.profiler.compute import (
    MeasureSettings,
    capture_unit_calls,
    make_inputs,
    materialize,
    runs_on_meta,
    shard_copy,
)
from autoplan.profiler.memory import optimizer_state_bytes, saved_bytes
from autoplan.tracing import layer_graph, layer_graph_of_built

FAST = MeasureSettings(micro_batches=(1, 2), tps=(1, 2), repeats=2, warmup=1)


def test_saved_bytes_equal_a_hand_count() -> None:
    # Linear(8, 32) -> GELU -> Linear(32, 8), fp32, batch 3: fc1 saves its input (3 x 8),
    # GELU saves its input (3 x 32), fc2 saves its input, the GELU output (3 x 32).
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(3, 8, requires_grad=True)
    counted = saved_bytes(lambda: mlp(x), list(mlp.parameters()))
    assert counted == 4 * 3 * (8 + 32 + 32)


def test_profiler_saved_bytes_equal_the_tracer_count() -> None:
    # Two independent counts of each layer alone: real tensors with saved_tensors_hooks
    # here, meta tensors under the tracer's dispatch mode there. (Inside a whole model the
    # tracer counts a storage once, at the first unit that saves it.)
    layers = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.LayerNorm(16),
              nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))]
    for layer in layers:
        traced = layer_graph(layer, (torch.zeros(1, 16),), dtype=torch.float32)
        x = torch.randn(1, 16, requires_grad=True)
        real = saved_bytes(lambda layer=layer, x=x: layer(x), list(layer.parameters()))
        assert real == sum(node.act_bytes for node in traced.nodes[:-1]) > 0


def test_gpt_block_saved_bytes_match_the_tracer() -> None:
    from autoplan.profiler.memory import measure_memory

    built = build_model("gpt:layers=2,hidden=64,heads=4,seq=32,vocab=128", dtype=torch.float32)
    graph = layer_graph_of_built(built, torch.float32)
    calls = capture_unit_calls(built, graph)
    node = graph["h.0"]
    memory = measure_memory(built.module.h[0], node, calls[node.signature], FAST)
    # The traced flash kernel also keeps a 24-byte RNG state the CPU kernel does not.
    assert abs(memory.act_bytes_per_sample - node.act_bytes) <= 24
    assert memory.act_bytes_per_sample_ckpt == node.input_bytes  # checkpointing keeps the input
    assert memory.param_bytes == node.params * 4


def test_shard_shapes_and_degrees_that_do_not_fit() -> None:
    built = build_model("llama-tiny", dtype=torch.float32)
    block = built.module.layers[0]
    half = shard_copy(block, 2)
    assert half.attention.wq.out_features == 32 and half.attention.wo.in_features == 32
    assert half.attention.wk.out_features == 16 and half.feed_forward.w2.in_features == 88
    graph = layer_graph_of_built(built, torch.float32)
    calls = capture_unit_calls(built, graph)
    call = calls[graph["layers.0"].signature]
    assert runs_on_meta(half, call)
    # tp 4 leaves half a kv head: the shapes check refuses it before any timing.
    quarter = shard_copy(block, 4)
    assert quarter is None or not runs_on_meta(quarter, call)
    assert shard_copy(built.module.norm, 2) is None  # no TP plan for a norm


def test_inputs_take_the_batch_where_the_model_has_it() -> None:
    built = build_model("llama-tiny", dtype=torch.float32)
    graph = layer_graph_of_built(built, torch.float32)
    call = capture_unit_calls(built, graph)[graph["layers.0"].signature]
    (x, cos, sin), _ = make_inputs(call, 5, "cpu", torch.float32)
    assert x.shape == (5, 32, 64) and cos.shape == (32, 8)  # rope tables have no batch
    real = materialize(built.module.layers[0], "cpu", torch.float32)
    assert real(x, cos, sin).shape == (5, 32, 64)


def test_optimizer_state_bytes_per_parameter() -> None:
    layer = nn.Linear(10, 10, bias=False)  # 100 parameters
    state = optimizer_state_bytes(layer)
    assert state["adamw/fp32"] - 4 == 100 * 8  # momentum and variance (+ a 4-byte step)
    assert state["adamw/bf16"] - 4 == 100 * 4
    assert state["adamw/mixed"] == state["adamw/fp32"] + 100 * 4  # fp32 master weights
    assert state["sgd/fp32"] == 100 * 4


def test_fit_line() -> None:
    assert fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))
    assert fit_line([2], [4]) == (0.0, 2.0)


def test_profile_command_writes_versioned_files(tmp_path, capsys) -> None:
    args = ["profile", "--model", "gpt-tiny", "--no-comm", "--repeats", "2", "--warmup", "0",
            "--micro-batches", "1,2", "--tp", "2", "-o", str(tmp_path)]
    assert main(args) == 0
    profile = load_profile(tmp_path)
    graph = layer_graph_of_built(build_model("gpt-tiny", dtype=torch.float32), torch.float32)
    assert profile.model_hash == graph.structural_hash
    assert {layer.kind for layer in profile.layers} == {"embedding", "block", "norm", "head",
                                                         "loss"}
    block = next(layer for layer in profile.layers if layer.kind == "block")
    assert block.names == ["h.0", "h.1"] and [f.tp for f in block.fits] == [1, 2]
    norm = next(layer for layer in profile.layers if layer.kind == "norm")
    assert [f.tp for f in norm.fits] == [1]  # tp = 1 is always profiled
    assert all(p.fwd_s > 0 and p.bwd_s > 0 for p in block.points)
    head = next(layer for layer in profile.layers if layer.kind == "head")
    assert head.memory.param_bytes == 0  # tied to the embedding, which owns it
    import pandas as pd
    assert len(pd.read_csv(tmp_path / "layers.csv")) == sum(len(x.points) for x in profile.layers)
    assert pd.read_csv(tmp_path / "comm.csv").empty  # no collectives, still a readable table
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["content_hash"] == profile.content_hash
    data["version"] = 4
    (tmp_path / "profile.json").write_text(json.dumps(data))
    with pytest.raises(AutoplanError, match="profile format version 4 is not supported .* "
                                            "reads version 3"):
        load_profile(tmp_path)


@pytest.mark.parametrize(("args", "message"), [
    (["--micro-batches", "1,x"], "--micro-batches must be integers"),
    (["--tp", "0"], "--tp must list integers >= 1"),
    (["--mode", "analytic"], "--mode analytic needs --cluster"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "gpu"], "is not cpu or cuda"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--comm-sizes", "0,1024"], "--comm-sizes must list byte counts >= 1"),
])
def test_profile_bad_input(tmp_path, capsys, args: list[str], message: str) -> None:
    assert main(["profile", "--model", "gpt-tiny", "-o", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_forward_peak_counts_every_tensor_forward_allocates() -> None:
    from autoplan.profiler.memory import live_peaks

    # Linear(16, 64) -> GELU -> Linear(64, 16) on 8 samples, fp32: forward allocates the
    # first output, the GELU output and the second output, and frees none of them.
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(8, 16, requires_grad=True)
    forward, backward = live_peaks(lambda: mlp(x), "cpu")
    assert forward == 4 * 8 * (64 + 64 + 16)
    # Backward allocates the weight and bias gradients while some activations are still held.
    assert backward >= max(forward, 4 * (2 * 16 * 64 + 64 + 16))


def test_profile_times_the_collectives_at_the_sizes_its_plans_are_priced_at() -> None:
    """Powers of 2 of the default range, from the one at or below the smallest message the
    cost model prices for the model to the one at or above the largest."""
    from autoplan.app.profile import DEFAULT_COMM_SIZES, priced_comm_sizes
    from autoplan.cost_model.communication import priced_message_bytes
    from autoplan.workload import load_graph

    graph = load_graph("gpt:layers=2,hidden=256,heads=4,seq=128,vocab=1024", dtype="fp32")
    priced = priced_message_bytes(graph, (1, 2, 4), (1, 2, 4), 4)
    # the block's weights whole and as a TP shard, a micro-batch of activations, the logits
    block = next(n for n in graph.nodes if n.kind == "block")
    head = next(n for n in graph.nodes if n.kind == "head")
    assert {block.params * 4, block.params, 4 * block.output_bytes,
            4 * head.output_bytes} <= set(priced)
    sizes = priced_comm_sizes(graph, (1, 2, 4), (1, 2, 4), 4)
    assert set(sizes) <= set(DEFAULT_COMM_SIZES) and list(sizes) == sorted(sizes)
    assert sizes[0] <= max(priced[0], DEFAULT_COMM_SIZES[0]) and sizes[-1] >= priced[-1]
    assert sizes[1] > priced[0] and sizes[-2] < priced[-1]  # no wider than that
    assert sizes[-1] < DEFAULT_COMM_SIZES[-1]  # a small model sends no 128 MiB message
    tiny = load_graph("gpt-tiny", dtype="fp32")
    assert len(priced_comm_sizes(tiny, (1,), (1,), 4)) >= 6  # two regimes of three sizes
