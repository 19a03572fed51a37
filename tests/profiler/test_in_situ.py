"""In-situ layer timing (profiler/in_situ.py): ranks time each layer together, TP as DTensors,
and the cost model reads such a profile without pricing the TP collectives twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoplan.app.cli import main
from autoplan.app.profile import ProfileOptions
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel
from autoplan.cost_model.compute import core_share
from autoplan.errors import AutoplanError
from autoplan.models import build_model
from autoplan.plan import uniform_plan
from autoplan.profile import Machine, Profile, load_profile
from autoplan.profiler import MeasureSettings, time_layers_in_situ
from autoplan.profiler.in_situ import SWEEPS, max_sweeps, settled
from autoplan.tracing import layer_graph_of_built


@pytest.fixture(scope="module")
def in_situ_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("in_situ")
    assert main(["profile", "--model", "gpt-tiny", "--nproc", "2", "--in-situ", "--no-comm",
                 "--threads", "1", "--repeats", "1", "--warmup", "0", "--micro-batches", "1,2",
                 "--tp", "2", "--dtype", "fp32", "-o", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def in_situ(in_situ_folder: Path) -> Profile:
    return load_profile(in_situ_folder)


def test_in_situ_data_parallel_points_are_a_table(in_situ_folder: Path, in_situ: Profile) -> None:
    import pandas as pd

    table = pd.read_csv(in_situ_folder / "data_parallel.csv")
    assert len(table) == sum(len(layer.data_parallel) for layer in in_situ.layers) > 0
    assert {"first_layer", "dp", "tp", "zero", "micro_batch", "sync_bwd_s"} <= set(table.columns)


def test_in_situ_profile_times_tp_shards_and_the_optimizer(in_situ: Profile) -> None:
    assert in_situ.machine.ranks_timing == 2 and in_situ.machine.threads == 1
    block = next(layer for layer in in_situ.layers if layer.kind == "block")
    assert [f.tp for f in block.fits] == [1, 2]
    assert {(p.tp, p.micro_batch) for p in block.points} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(p.fwd_s > 0 and p.bwd_s > 0 for p in block.points)
    assert block.optimizer_s(1, "adamw") > 0 and block.optimizer_s(2, "adamw") > 0
    norm = next(layer for layer in in_situ.layers if layer.kind == "norm")
    assert [f.tp for f in norm.fits] == [1]  # nothing to shard: the run keeps it whole
    loss = next(layer for layer in in_situ.layers if layer.kind == "loss")
    assert loss.optimizer_s(1, "adamw") == 0.0  # no parameters
    # Under data parallelism on the one layout 2 ranks allow, each ZeRO stage, sync on and off.
    assert {(p.dp, p.tp, p.zero, p.micro_batch) for p in block.data_parallel} == {
        (2, 1, zero, mb) for zero in (0, 2, 3) for mb in (1, 2)}
    assert all(p.fwd_s > 0 and p.bwd_s > 0 and p.sync_bwd_s > 0 for p in block.data_parallel)
    assert loss.data_parallel == []  # nothing to replicate or shard


def test_cost_model_takes_tp_collectives_and_optimizer_from_an_in_situ_profile(
        in_situ: Profile) -> None:
    graph = layer_graph_of_built(build_model("gpt-tiny", dtype=torch.float32), torch.float32)
    model = CostModel(graph, parse_cluster_spec("local-cpu:procs=2"), in_situ)
    tp = model.estimate(uniform_plan("tp=2", graph, 2, 4))
    assert tp.breakdown["tp_comm"] == 0.0  # inside the measured layer times
    by_signature = {layer.signature: layer for layer in in_situ.layers}
    steps = [by_signature[n.signature].optimizer_s(2, "adamw") or
             by_signature[n.signature].optimizer_s(1, "adamw") for n in graph.nodes]
    assert tp.breakdown["optimizer"] == pytest.approx(sum(steps))  # 2 ranks on >= 2 cores


@pytest.mark.parametrize("zero", [0, 3])
def test_cost_model_takes_data_parallel_times_from_an_in_situ_profile(
        in_situ: Profile, zero: int) -> None:
    graph = layer_graph_of_built(build_model("gpt-tiny", dtype=torch.float32), torch.float32)
    model = CostModel(graph, parse_cluster_spec("local-cpu:procs=2"), in_situ)
    estimate = model.estimate(uniform_plan(f"dp=2,zero={zero}", graph, 2, 4))
    by_signature = {layer.signature: layer for layer in in_situ.layers}
    timed = [by_signature[n.signature].data_parallel_s(2, 1, zero, 1) for n in graph.nodes]
    sync = sum(t[2] for t in timed if t)  # what the gradient sync adds to one micro-batch
    if zero == 0:  # gathers inside the timed layers; whole gradients reduced once per step
        assert estimate.breakdown["fsdp_comm"] == 0.0
        assert estimate.breakdown["dp_comm"] == pytest.approx(sync)
    else:  # ZeRO 3 reduce-scatters after each of the 2 micro-batches
        assert estimate.breakdown["fsdp_comm"] == pytest.approx(2 * sync)
        assert estimate.breakdown["dp_comm"] == 0.0
    assert estimate.breakdown["forward"] == pytest.approx(2 * sum(t[0] for t in timed if t),
                                                          rel=0.2)  # + layers without weights


def test_core_share_counts_the_ranks_that_timed_together() -> None:
    machine = {"hostname": "h", "platform": "p", "python": "3", "torch": "2", "device": "cpu"}
    cluster = parse_cluster_spec("local-cpu:procs=4")
    cores = cluster.device.cores_per_node
    alone = Profile.model_construct(machine=Machine(**machine, threads=1))
    together = Profile.model_construct(machine=Machine(**machine, threads=1, ranks_timing=4))
    assert core_share(cluster, alone) == pytest.approx(max(1.0, 4 / cores))
    assert core_share(cluster, together) == 1.0  # the 4 ranks already shared the cores


def test_in_situ_needs_local_ranks() -> None:
    with pytest.raises(AutoplanError, match="--in-situ"):
        ProfileOptions(model="gpt-tiny", nproc=1, in_situ=True)


def test_a_point_is_settled_when_its_interval_is_tight() -> None:
    """The rule of profiler/in_situ.py: SWEEPS samples at least, then the 95% t-interval of
    their mean within TARGET (3%) of their median."""
    assert not settled([1.0, 1.0])  # too few, however quiet
    assert settled([1.0, 1.005, 0.995])  # half-width 4.303 x 0.005 / sqrt 3 = 1.2%
    assert not settled([1.0, 1.05, 0.95])  # 12%
    assert settled([1.0, 1.02, 0.98, 1.01, 0.99, 1.0])  # 2.571 x 0.0141 / sqrt 6 = 1.5%
    assert max_sweeps(20) == 5 and max_sweeps(12) == max_sweeps(1) == SWEEPS


def test_in_situ_times_only_the_data_parallel_points_asked_for(in_situ: Profile) -> None:
    """validate's second profile: no layer points, the one data-parallel point of the block
    it asks for; and a plan priced from a profile holding only its own points costs what it
    costs from the full profile (a price does not move with the other plans picked)."""
    block = next(layer for layer in in_situ.layers if layer.kind == "block")
    settings = MeasureSettings((1, 2), (2,), 1, 0, "cpu", torch.float32, 1)
    timings = time_layers_in_situ("gpt-tiny", "fp32", settings, 2, layers=False,
                                  data_parallel={block.signature: [(2, 1, 3, 2)]})
    assert {sig: ([len(x) for x in entry]) for sig, entry in timings.items()} == {
        sig: [0, 0, 1 if sig == block.signature else 0] for sig in timings}
    (point,) = timings[block.signature][2]
    assert (point.dp, point.tp, point.zero, point.micro_batch) == (2, 1, 3, 2)
    assert point.fwd_s > 0 and point.sync_bwd_s > 0

    graph = layer_graph_of_built(build_model("gpt-tiny", dtype=torch.float32), torch.float32)
    plan = uniform_plan("dp=2,zero=3,micro_batch=2", graph, 2, 8)
    own = in_situ.model_copy(update={"layers": [layer.model_copy(update={"data_parallel": [
        p for p in layer.data_parallel if (p.zero, p.micro_batch) == (3, 2)]})
        for layer in in_situ.layers]})
    cluster = parse_cluster_spec("local-cpu:procs=2")
    full = CostModel(graph, cluster, in_situ).estimate(plan)
    assert CostModel(graph, cluster, own).estimate(plan).step_time_s == full.step_time_s
