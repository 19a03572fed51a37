"""Analytic profiles: roofline arithmetic, TP sharding, fits, collective formulas, memory."""

from __future__ import annotations

import pytest

from autoplan import efficiency as eff
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.analytic import (
    OPTIMIZER_STATE_BYTES_PER_PARAM,
    analytic_profile,
    collective_fit,
    comm_group_sizes,
    layer_pass_work,
    replicated_fraction,
)
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.models import build_model
from autoplan.profile import COLLECTIVES, load_profile
from autoplan.tracing import layer_graph_of_built

H100_PEAK_FLOPS = 989e12  # HARDWARE.md
H100_HBM_BYTES_PER_S = 3.35e12  # HARDWARE.md
H100_NVLINK_BYTES_PER_S = 450e9  # HARDWARE.md, each direction
H100_NIC_BYTES_PER_S = 50e9  # NDR 400 Gb/s


def _node(name: str = "layers.0", kind: str = "block", signature: str = "sig", params: int = 0,
          fwd_flops: float = 0.0, bwd_flops: float = 0.0, act_bytes: int = 0,
          io_bytes: int = 0) -> LayerNode:
    return LayerNode(name=name, kind=kind, module_type="Synthetic", signature=signature,
                     params=params, shared_params=0, param_bytes=2 * params, fwd_flops=fwd_flops,
                     bwd_flops=bwd_flops, act_bytes=act_bytes, act_bytes_fixed=0,
                     input_bytes=io_bytes, output_bytes=io_bytes, output_shape=(1, 8),
                     calls=1)


def _graph(*nodes: LayerNode) -> LayerGraph:
    return LayerGraph("synthetic", "bfloat16", "flash", 8, tuple(nodes), ())


def _point(profile, signature: str, micro_batch: int, tp: int):
    points = profile.layer(signature).points
    return next(p for p in points if (p.micro_batch, p.tp) == (micro_batch, tp))


@pytest.fixture(scope="module")
def h100_one_node():
    return parse_cluster_spec("h100-sxm:nodes=1")


@pytest.fixture(scope="module")
def h100_two_nodes():
    return parse_cluster_spec("h100-sxm:nodes=2")


@pytest.fixture(scope="module")
def llama8b_profile(h100_two_nodes):
    return analytic_profile(layer_graph_of_built(build_model("llama3-8b")), h100_two_nodes)


def test_layer_time_of_a_known_layer_by_hand(h100_one_node) -> None:
    # compute-bound: 1 TFLOP forward per sample, 1000 params, no activations
    dense = _node(params=1000, fwd_flops=1e12, bwd_flops=2e12)
    # memory-bound: no FLOPs, 1 GB in and 1 GB out per sample, 0.5 GB saved
    stream = _node("norm", "norm", "norm", act_bytes=500_000_000, io_bytes=1_000_000_000)
    profile = analytic_profile(_graph(dense, stream), h100_one_node)
    e, t0 = eff.MATMUL_PEAK_FRACTION.value, eff.OP_OVERHEAD_S.value
    # 2 samples: 2e12 FLOPs at 989e12 x e, plus the fixed op time (t0 + W / (e peak)), then
    # its weights through HBM (graphs without traced traffic: read once forward, twice back)
    m = eff.MEMORY_PEAK_FRACTION.value
    assert _point(profile, "sig", 2, 1).fwd_s == pytest.approx(
        t0 + 2e12 / (e * 989e12) + t0 + 2000 / (m * 3.35e12))
    assert _point(profile, "sig", 2, 1).bwd_s == pytest.approx(
        t0 + 4e12 / (e * 989e12) + t0 + 4000 / (m * 3.35e12))
    # 2 samples x (1 GB + 1 GB + 0.5 GB) = 5 GB through HBM at 3.35e12 x m
    assert _point(profile, "norm", 2, 1).fwd_s == pytest.approx(t0 + 5e9 / (m * 3.35e12))
    # the memory side of the compute-bound layer: 2000 B of weights + nothing per sample
    work = layer_pass_work(dense, 2, 1, 2)
    assert (work.fwd_bytes, work.bwd_bytes) == (2000, 4000)


def test_matmul_efficiency_saturates_at_the_stated_fraction() -> None:
    small, large = eff.matmul_efficiency(1e6, 989e12), eff.matmul_efficiency(1e15, 989e12)
    assert small < 0.01 < large
    assert large == pytest.approx(eff.MATMUL_PEAK_FRACTION.value, rel=1e-3)
    assert 0.70 <= eff.MATMUL_PEAK_FRACTION.value <= 0.80  # HARDWARE.md's range
    assert 0.70 <= eff.NVLINK_BUS_FRACTION.value <= 0.85  # HARDWARE.md's range


def test_tp_halves_the_compute_of_a_block(llama8b_profile) -> None:
    block = next(n for n in layer_graph_of_built(build_model("llama-tiny")).nodes
                 if n.kind == "block")
    one, two = layer_pass_work(block, 4, 1, 2), layer_pass_work(block, 4, 2, 2)
    assert two.fwd_flops == one.fwd_flops / 2 and two.bwd_flops == one.bwd_flops / 2
    norm = next(n for n in layer_graph_of_built(build_model("llama-tiny")).nodes
                if n.kind == "norm")
    assert layer_pass_work(norm, 4, 2, 2) == layer_pass_work(norm, 4, 1, 2)  # replicated
    # traffic halves except the norms' and residual adds' hidden states; SP halves those too
    whole = replicated_fraction(block)
    assert 0 < whole < 1
    assert two.fwd_bytes == pytest.approx(one.fwd_bytes * (whole + (1 - whole) / 2))
    assert layer_pass_work(block, 4, 2, 2, sequence_parallel=True).fwd_bytes == pytest.approx(
        one.fwd_bytes / 2)
    sig = next(layer.signature for layer in llama8b_profile.layers if layer.kind == "block")
    t1, t2 = _point(llama8b_profile, sig, 2, 1), _point(llama8b_profile, sig, 2, 2)
    assert t2.fwd_s < t1.fwd_s and t2.bwd_s < t1.bwd_s


def test_bigger_micro_batches_take_longer(llama8b_profile) -> None:
    for layer in llama8b_profile.layers:
        for tp in (1, 2, 4, 8):
            points = sorted((p for p in layer.points if p.tp == tp), key=lambda p: p.micro_batch)
            assert [p.micro_batch for p in points] == [1, 2, 4, 8]
            assert all(a.fwd_s < b.fwd_s and a.bwd_s < b.bwd_s
                       for a, b in zip(points, points[1:], strict=False)), layer.names[0]
    blocks = [layer for layer in llama8b_profile.layers if layer.kind == "block"]
    assert len(blocks) == 1 and blocks[0].names == [f"layers.{i}" for i in range(32)]


def test_linear_fit_reproduces_a_compute_bound_layer(h100_one_node) -> None:
    dense = _node(params=10, fwd_flops=3e11, bwd_flops=6e11)
    profile = analytic_profile(_graph(dense), h100_one_node, micro_batches=(1, 2, 3, 8))
    layer = profile.layer("sig")
    assert [f.tp for f in layer.fits] == [1, 2, 4, 8]
    for point in layer.points:
        fit = layer.fit(point.tp)
        assert fit.fwd_s(point.micro_batch) == pytest.approx(point.fwd_s, rel=1e-9)
        assert fit.bwd_s(point.micro_batch) == pytest.approx(point.bwd_s, rel=1e-9)
    # the fixed part: one op overhead for the matmuls, one for reading the 20 weight bytes
    t0, m = eff.OP_OVERHEAD_S.value, eff.MEMORY_PEAK_FRACTION.value
    assert layer.fit(1).fwd_intercept_s == pytest.approx(2 * t0 + 20 / (m * 3.35e12))


def test_tp_degrees_stop_at_the_node_size() -> None:
    cluster = parse_cluster_spec("h100-sxm:gpus=4")
    profile = analytic_profile(_graph(_node(fwd_flops=1e9)), cluster, tps=(1, 2, 4, 8, 16))
    assert [f.tp for f in profile.layers[0].fits] == [1, 2, 4]
    with pytest.raises(AutoplanError, match="include tp=1"):
        analytic_profile(_graph(_node(fwd_flops=1e9)), cluster, tps=(8,))


def test_inter_node_all_reduce_is_slower_than_intra(llama8b_profile) -> None:
    for size in (2, 4, 8):
        intra = llama8b_profile.comm_fit("all_reduce", size, "intra")
        inter = llama8b_profile.comm_fit("all_reduce", size, "inter")
        for nbytes in (1e3, 1e6, 1e9):
            assert inter.time_s(nbytes) > intra.time_s(nbytes)
    # every collective, size 2..16, is fitted; inter only where it spans nodes
    keys = {(f.collective, f.group_size, f.scope) for f in llama8b_profile.comm}
    assert keys == {(c, s, "intra") for c in COLLECTIVES for s in (2, 4, 8)} | {
        (c, s, "inter") for c in COLLECTIVES for s in (2, 4, 8, 16)}


def test_ring_all_reduce_matches_the_closed_form(h100_one_node) -> None:
    n, nbytes = 8, 256 * 2**20
    fit = collective_fit("all_reduce", n, "intra", h100_one_node)
    busbw = H100_NVLINK_BYTES_PER_S * eff.NVLINK_BUS_FRACTION.value
    # ring: 2(n-1) steps of latency; each rank moves 2(n-1)/n x nbytes at the bus bandwidth
    alpha = eff.NCCL_BASE_LATENCY_S.value + 2 * (n - 1) * eff.NVLINK_RING_STEP_S.value
    assert fit.alpha_s == pytest.approx(alpha)
    assert fit.busbw == pytest.approx(busbw)
    assert fit.time_s(nbytes) == pytest.approx(alpha + 2 * (n - 1) / n * nbytes / busbw)
    gather = collective_fit("all_gather", n, "intra", h100_one_node)
    assert gather.bandwidth == pytest.approx(busbw * n / (n - 1))
    assert collective_fit("send_recv", 2, "intra", h100_one_node).bandwidth == pytest.approx(busbw)


def test_inter_node_fits_use_the_network_and_the_tree(h100_two_nodes) -> None:
    nic = H100_NIC_BYTES_PER_S * eff.NETWORK_BUS_FRACTION.value
    pair = collective_fit("all_reduce", 2, "inter", h100_two_nodes)  # one rank per node
    assert pair.busbw == pytest.approx(nic) and pair.bandwidth == pytest.approx(nic)
    whole = collective_fit("all_reduce", 16, "inter", h100_two_nodes)  # 8 ranks per node
    assert whole.busbw == pytest.approx(min(8 * nic, H100_NVLINK_BYTES_PER_S
                                            * eff.NVLINK_BUS_FRACTION.value))
    packed = collective_fit("all_reduce", 4, "inter", h100_two_nodes, ranks_on_node=2)
    assert packed.busbw == pytest.approx(2 * nic)  # two ranks per node drive two NICs
    with pytest.raises(AutoplanError, match="ranks per node"):
        collective_fit("all_reduce", 16, "inter", h100_two_nodes, ranks_on_node=1)
    big = parse_cluster_spec("h100-sxm:nodes=128")
    tree = collective_fit("all_reduce", 1024, "inter", big)  # 128 nodes: the tree is shorter
    assert tree.alpha_s == pytest.approx(eff.NCCL_BASE_LATENCY_S.value + 2 * (
        7 * eff.NVLINK_TREE_STEP_S.value + 7 * eff.NETWORK_TREE_STEP_S.value))
    assert comm_group_sizes(big) == [2 ** k for k in range(1, 11)]


def test_memory_bytes_per_optimizer() -> None:
    graph = layer_graph_of_built(build_model("llama-tiny"))
    profile = analytic_profile(graph, parse_cluster_spec("a100-80g"))
    for node in graph.nodes:
        memory = profile.layer(node.signature).memory
        assert (memory.params, memory.param_bytes) == (node.params, node.param_bytes)
        assert memory.grad_bytes == 2 * node.params  # bf16 gradients
        assert memory.optimizer_bytes["adamw/mixed"] == 12 * node.params
        assert memory.optimizer_bytes["adamw/fp32"] == 8 * node.params
        assert memory.optimizer_bytes["sgd/fp32"] == 4 * node.params
        assert memory.act_bytes_per_sample == node.act_bytes
        assert memory.act_bytes_per_sample_ckpt == node.input_bytes
    assert set(OPTIMIZER_STATE_BYTES_PER_PARAM) <= set(memory.optimizer_bytes)


def test_local_cpu_is_refused_with_one_line() -> None:
    with pytest.raises(AutoplanError, match="use --mode measure") as err:
        analytic_profile(_graph(_node(fwd_flops=1.0)), parse_cluster_spec("local-cpu:procs=2"))
    assert "\n" not in str(err.value)


def test_bad_micro_batches_are_refused(h100_one_node) -> None:
    with pytest.raises(AutoplanError, match="micro_batches must be positive"):
        analytic_profile(_graph(_node()), h100_one_node, micro_batches=(0, 2))


def test_profile_round_trips_through_json(tmp_path, llama8b_profile) -> None:
    assert llama8b_profile.mode == "analytic"
    assert any("ASSUMPTION" in note for note in llama8b_profile.notes)
    llama8b_profile.save(tmp_path / "profile.json")
    loaded = load_profile(tmp_path)
    assert loaded == llama8b_profile
    assert loaded.content_hash == llama8b_profile.content_hash
