"""The simulated pipeline schedule against the closed forms of cost_model/pipeline.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel
from autoplan.cost_model.pipeline import (
    chunks_in_flight,
    micro_batches_in_flight,
    pipeline_time_s,
)
from autoplan.cost_model.schedule import (
    ChunkTimes,
    chunk_times_from_estimate,
    op_order,
    plan_timeline,
    simulate_schedule,
)
from autoplan.feasibility import schedule_refusal
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import uniform_plan

EQUAL = ChunkTimes(forward_s=1.0, backward_s=2.0, recompute_s=0.5, comm_s=0.25)
T = 3.75  # EQUAL's seconds per micro-batch


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64])
def test_equal_stages_end_at_m_plus_pp_minus_1_times_t(schedule: str, pp: int, m: int) -> None:
    timeline = simulate_schedule(schedule, pp, m, [EQUAL] * pp)
    assert timeline.makespan_s == pytest.approx((m + pp - 1) * T)
    assert timeline.makespan_s == pytest.approx(pipeline_time_s([T] * pp, m))


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("virtual", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 4, 8, 16, 40])
def test_interleaved_equal_chunks_end_at_the_closed_form(pp: int, virtual: int, m: int) -> None:
    """Also with fewer micro-batches than stages, where one micro-batch crossing every
    chunk sets the step (the closed form's second term)."""
    if schedule_refusal("interleaved_1f1b", pp, m):
        pytest.skip("torch's interleaved schedule refuses this many micro-batches")
    chunk = ChunkTimes(1.0 / virtual, 2.0 / virtual)
    timeline = simulate_schedule("interleaved_1f1b", pp, m, [chunk] * (pp * virtual), virtual)
    assert timeline.makespan_s == pytest.approx(pipeline_time_s([3.0] * pp, m, virtual))


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1),
                                              ("interleaved_1f1b", 2),
                                              ("interleaved_1f1b", 3)])
@pytest.mark.parametrize("pp", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 5, 7, 12])
def test_each_op_runs_once_after_what_it_needs(schedule: str, virtual: int, pp: int,
                                               m: int) -> None:
    chunks = [ChunkTimes(1.0 + 0.3 * c, 2.0 + 0.1 * c) for c in range(pp * virtual)]
    timeline = simulate_schedule(schedule, pp, m, chunks, virtual)
    ends = {(op.kind, op.chunk, op.micro_batch): op for op in timeline.ops}
    assert len(ends) == len(timeline.ops) == 2 * m * pp * virtual
    last = pp * virtual - 1
    for op in timeline.ops:
        assert op.rank == op.chunk % pp
        if op.kind == "forward" and op.chunk > 0:
            assert op.start_s >= ends[("forward", op.chunk - 1, op.micro_batch)].end_s
        if op.kind == "backward":
            before = ("forward", last, op.micro_batch) if op.chunk == last else \
                ("backward", op.chunk + 1, op.micro_batch)
            assert op.start_s >= ends[before].end_s
    for rank in range(pp):  # a rank runs one op at a time
        mine = sorted((op.start_s, op.end_s) for op in timeline.ops if op.rank == rank)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:], strict=False))


@pytest.mark.parametrize(("pp", "virtual", "m"), [(2, 2, 2), (2, 2, 4), (2, 9, 16), (4, 2, 8),
                                                  (4, 3, 12), (8, 3, 24), (4, 2, 4)])
def test_interleaved_op_order_is_torchs(pp: int, virtual: int, m: int) -> None:
    """op_order (and so micro_batches_in_flight) against the order torch's
    ScheduleInterleaved1F1B computes for each rank (its _calculate_single_rank_operations,
    called on the attributes it reads)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    rounds = max(1, m // pp)
    schedule = SimpleNamespace(n_local_stages=virtual, pp_group_size=pp, _n_microbatches=m,
                               number_of_rounds=rounds, microbatches_per_round=m // rounds)
    for rank in range(pp):
        ops = ScheduleInterleaved1F1B._calculate_single_rank_operations(schedule, rank)
        theirs = [("forward" if op.computation_type.name == "FORWARD" else "backward",
                   op.stage_index // pp, op.microbatch_index) for op in ops if op is not None]
        assert theirs == op_order("interleaved_1f1b", pp, rank, m, virtual)


@pytest.mark.parametrize(("schedule", "m", "virtual"), [
    ("gpipe", 10, 1), ("1f1b", 10, 1), ("interleaved_1f1b", 8, 2),
    ("interleaved_1f1b", 12, 3), ("interleaved_1f1b", 16, 9), ("interleaved_1f1b", 4, 3)])
def test_micro_batches_held_match_the_memory_model(schedule: str, m: int, virtual: int) -> None:
    """The most chunk passes a rank holds in torch's op order, in passes of all its chunks
    (interleaved: the last rank holds more than pp - rank, e.g. 17/9 at pp 2, v 9)."""
    pp = 4 if virtual < 9 else 2
    for rank in range(pp):
        held = most = 0
        for kind, _, _ in op_order(schedule, pp, rank, m, virtual):
            held += 1 if kind == "forward" else -1
            most = max(most, held)
        assert most / virtual == pytest.approx(
            micro_batches_in_flight(schedule, pp, rank, m, virtual))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([("gpipe", 4, 10, 1), ("1f1b", 4, 10, 1), ("interleaved_1f1b", 2, 16, 9),
                        ("interleaved_1f1b", 4, 8, 2), ("interleaved_1f1b", 4, 12, 3),
                        ("interleaved_1f1b", 8, 64, 8), ("interleaved_1f1b", 4, 6, 3),
                        ("interleaved_1f1b", 3, 21, 5), ("interleaved_1f1b", 4, 40, 7),
                        ("interleaved_1f1b", 4, 10, 2), ("interleaved_1f1b", 2, 6, 4)]),
       st.lists(st.floats(0, 1e9), min_size=9, max_size=9))
def test_chunks_in_flight_hold_the_most_bytes_the_schedule_does(
        setting: tuple[str, int, int, int], per_chunk: list[float]) -> None:
    """For any bytes per micro-batch in each chunk, the most a rank holds at any point of
    its op order is the most at one of chunks_in_flight's vectors, each a point the order
    reaches; the largest sum of one is micro_batches_in_flight x v."""
    schedule, pp, m, virtual = setting
    for rank in range(pp):
        held, reached = [0] * virtual, set()
        for kind, chunk, _ in op_order(schedule, pp, rank, m, virtual):
            held[chunk] += 1 if kind == "forward" else -1
            reached.add(tuple(held))
        vectors = chunks_in_flight(schedule, pp, rank, m, virtual)
        assert set(vectors) <= reached
        bytes_at = [sum(n * b for n, b in zip(point, per_chunk, strict=False))
                    for point in reached]
        assert max(sum(n * b for n, b in zip(v, per_chunk, strict=False)) for v in vectors) \
            == pytest.approx(max(bytes_at), rel=1e-12)
        assert max(map(sum, vectors)) / virtual == pytest.approx(
            micro_batches_in_flight(schedule, pp, rank, m, virtual))


def test_an_interleaved_rank_holds_its_chunks_unequally() -> None:
    """torch's interleaved 1F1B on the last rank of pp 2, v 2, 8 micro-batches: the first
    chunk holds up to 3 micro-batches, the last (the loss's) at most 1, where (W + 1) / v
    takes 1.5 passes of both."""
    assert chunks_in_flight("interleaved_1f1b", 2, 1, 8, 2) == ((2, 1), (3, 0))
    assert micro_batches_in_flight("interleaved_1f1b", 2, 1, 8, 2) == 1.5


def test_parts_of_the_ops_add_up_to_the_chunk_time() -> None:
    forward, backward = EQUAL.parts("forward"), EQUAL.parts("backward")
    assert [p for p, _ in forward] == ["forward", "comm"]
    assert [p for p, _ in backward] == ["recompute", "backward", "comm"]
    assert sum(s for _, s in forward + backward) == pytest.approx(T)


def test_wrong_chunk_count_and_unknown_schedule_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk times"):
        simulate_schedule("1f1b", 4, 8, [EQUAL] * 3)
    with pytest.raises(ValueError, match="not one of"):
        simulate_schedule("zigzag", 2, 8, [EQUAL] * 2)
    with pytest.raises(ValueError, match="interleaved_1f1b"):
        op_order("1f1b", 2, 0, 4, virtual=2)


def _graph(blocks: int = 8) -> LayerGraph:
    def node(i: int) -> LayerNode:
        return LayerNode(name=f"layers.{i}", kind="block", module_type="Synthetic",
                         signature="b", params=10**6, shared_params=0, param_bytes=2 * 10**6,
                         fwd_flops=1e12, bwd_flops=2e12, act_bytes=1000, act_bytes_fixed=0,
                         input_bytes=100, output_bytes=100, output_shape=(1, 8, 8),
                         fwd_io_bytes=1000, bwd_io_bytes=2000)
    return LayerGraph("synthetic", "bfloat16", "flash", 8, tuple(map(node, range(blocks))), ())


@pytest.mark.parametrize("shorthand", ["pp=4,schedule=1f1b", "pp=4,schedule=gpipe",
                                       "pp=2,virtual_stages=2", "pp=1"])
def test_a_plan_timeline_uses_the_estimate_times(shorthand: str) -> None:
    graph = _graph()
    model = CostModel(graph, parse_cluster_spec("h100-sxm:gpus=8"))
    plan = uniform_plan(shorthand, graph, 8, 64)
    estimate = model.estimate(plan)
    timeline = plan_timeline(model, plan, estimate)
    tail = max(sum(s.tail_s.values()) for s in estimate.stages)
    # equal blocks, pp dividing m: the simulation meets the closed form the estimate uses, up
    # to the pipeline hop the first and last stage send one fewer of
    assert timeline.makespan_s + tail == pytest.approx(estimate.step_time_s, rel=1e-3)
    for rank, stage in enumerate(estimate.stages):
        assert timeline.busy_s(rank) == pytest.approx(plan.num_micro_batches
                                                      * stage.micro_batch_s)


def test_chunk_times_follow_the_weights_and_add_up_to_the_stage() -> None:
    graph = _graph()
    model = CostModel(graph, parse_cluster_spec("h100-sxm:gpus=8"))
    plan = uniform_plan("pp=2,virtual_stages=2", graph, 8, 64)
    estimate = model.estimate(plan)
    times = chunk_times_from_estimate(estimate, 2, 2, [1.0, 1.0, 3.0, 1.0])
    stage0 = estimate.stages[0].per_micro_batch_s
    assert times[0].forward_s == pytest.approx(stage0["forward"] / 4)
    assert times[2].forward_s == pytest.approx(stage0["forward"] * 3 / 4)
    assert times[1].backward_s + times[3].backward_s == pytest.approx(
        estimate.stages[1].per_micro_batch_s["backward"])
