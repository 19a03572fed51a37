"""`search --for`: the plan it returns is the fastest fitting plan the trainer can express,
checked against every such plan priced one by one, and export takes it."""

from __future__ import annotations

import itertools

import pytest

from autoplan.app.cli import main
from autoplan.app.export import export_plan
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model import CostModel
from autoplan.errors import AutoplanError
from autoplan.feasibility import plan_refusal
from autoplan.graph import LayerGraph
from autoplan.plan import CHECKPOINT_MODES, SCHEDULES, Plan, pipeline_units, uniform_plan
from autoplan.search import Searcher, SearchOptions, divisors
from autoplan.trainers import TRAINERS, block_indices, refusal
from autoplan.workload import load_graph
from tests.zoo import ZOO

GPUS, BATCH = 4, 4
MODELS = {"llama": "llama:layers=4,hidden=64,heads=4,kv_heads=2,ffn=128,seq=64,vocab=256",
          "mistral": ZOO["mistral"].spec, "nanogpt": ZOO["nanogpt"].spec}


def _expressible(graph: LayerGraph, name: str) -> list[Plan]:
    """Every uniform plan (the shorthand's expansion) of the trainer's settings,
    checkpointing the blocks only, that the executor and the trainer accept; where the
    trainer takes any stage cut (torchtitan), with every cut of the search's plan space
    (chunks starting at blocks; interleaved chunks cut evenly)."""
    t = TRAINERS[name]
    blocks = set(block_indices([node.name for node in graph.nodes]))
    out = []
    for pp, tp, per_rank, zero, sp, ckpt, schedule, virtual in itertools.product(
            divisors(GPUS), divisors(GPUS), divisors(BATCH), range(4), (False, True),
            CHECKPOINT_MODES, SCHEDULES, range(1, 5)):
        dp = GPUS // pp // tp if GPUS % (pp * tp) == 0 else 0
        if not dp or (zero and dp == 1) or (sp and tp == 1) or zero not in t.zero \
                or sp not in t.sequence_parallel or ckpt not in t.checkpoint \
                or (pp > 1 and schedule not in t.schedules) \
                or (pp == 1 and (schedule, virtual) != ("1f1b", 1)) \
                or (virtual > 1 and schedule != "interleaved_1f1b"):
            continue
        try:
            plan = uniform_plan(dict(pp=pp, tp=tp, dp=dp, micro_batch=per_rank, zero=zero,
                                     sequence_parallel=sp, ckpt=ckpt, schedule=schedule,
                                     virtual_stages=virtual), graph, GPUS, BATCH)
        except AutoplanError:
            continue
        layers = [lp if i in blocks else lp.model_copy(update={"checkpoint": "none"})
                  for i, lp in enumerate(plan.layers)]
        plan = plan.model_copy(update={"layers": layers})
        for cut in _cuts(graph, plan, t.even_split):
            cut_plan = Plan.model_validate(plan.model_dump() | {"stage_boundaries": cut})
            if plan_refusal(cut_plan, graph) is None and refusal(cut_plan, t) is None:
                out.append(cut_plan)
    return out


def _cuts(graph: LayerGraph, plan: Plan, even: bool) -> list[list[int]]:
    if even or plan.pp == 1 or plan.schedule == "interleaved_1f1b":
        return [plan.stage_boundaries]
    units = [u for u in pipeline_units(graph, plan.pp) if u > 0]
    return [[0, *starts] for starts in itertools.combinations(units, plan.pp - 1)]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_for_finds_the_fastest_expressible_plan_by_brute_force(model: str) -> None:
    graph = load_graph(MODELS[model])
    cluster = parse_cluster_spec(f"h100-sxm:gpus={GPUS}")
    for name in TRAINERS:
        plans = _expressible(graph, name)
        peaks = sorted(max(CostModel(graph, cluster).estimate(p).peak_memory_bytes)
                       for p in plans)
        # a limit that half the plans miss, so memory decides as well as time
        limit = peaks[len(peaks) // 2] + CostModel(graph, cluster).overhead_bytes
        model_ = CostModel(graph, cluster, memory_limit_bytes=limit)
        fitting = [e for e in map(model_.estimate, plans) if e.fits]
        best = min(e.step_time_s for e in fitting)
        options = SearchOptions(global_batch=BATCH, trainer=name, memory_limit_bytes=limit)
        found = Searcher(graph, cluster, options).run().trainer
        assert found is not None and found.estimate.fits, name
        assert found.estimate.step_time_s == pytest.approx(best, rel=1e-9), name
        assert refusal(found.plan, TRAINERS[name]) is None
        export_plan(found.plan, name)  # takes it without a word of refusal


def test_for_is_never_faster_than_the_unrestricted_plan() -> None:
    graph = load_graph(MODELS["llama"])
    cluster = parse_cluster_spec(f"h100-sxm:gpus={GPUS}")
    for name in TRAINERS:
        result = Searcher(graph, cluster, SearchOptions(global_batch=BATCH, trainer=name)).run()
        assert result.trainer.estimate.step_time_s >= result.best.estimate.step_time_s


def test_cli_reports_the_cost_of_the_restriction_and_writes_the_trainer_plan(
        tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["search", "--model", MODELS["llama"], "--cluster", "h100-sxm:gpus=4",
                 "--global-batch", "8", "--for", "megatron", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "what keeping to Megatron-Core 0.16.1 costs" in text and "x the found plan's" in text
    assert main(["export", str(out), "--to", "megatron"]) == 0
    assert "AUTOPLAN_PARALLEL_ARGS=(" in capsys.readouterr().out


def test_for_a_dtype_the_trainer_does_not_train_in_is_one_line_status_2(capsys) -> None:
    assert main(["search", "--model", MODELS["llama"], "--cluster", "h100-sxm:gpus=4",
                 "--global-batch", "8", "--for", "torchtitan", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("torchtitan 0.3.0 trains in bf16 or fp32, not fp16")
    assert len(err.splitlines()) == 1


def test_for_with_no_fitting_plan_says_what_it_would_need(capsys) -> None:
    assert main(["search", "--model", MODELS["llama"], "--cluster", "h100-sxm:gpus=4",
                 "--global-batch", "8", "--for", "deepspeed", "--memory-limit", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "no plan" in err and "GiB" in err and len(err.strip().splitlines()) == 1


def test_the_python_front_returns_the_trainers_plan() -> None:
    import autoplan

    plan = autoplan.search(MODELS["llama"], cluster="h100-sxm:gpus=4", global_batch=8,
                           for_trainer="deepspeed")
    graph = load_graph(MODELS["llama"])
    options = SearchOptions(global_batch=8, trainer="deepspeed")
    found = Searcher(graph, parse_cluster_spec("h100-sxm:gpus=4"), options).run().trainer
    assert plan.model_dump(exclude={"provenance"}) == found.plan.model_dump(
        exclude={"provenance"})
    assert plan.pp == 1 and refusal(plan, TRAINERS["deepspeed"]) is None
