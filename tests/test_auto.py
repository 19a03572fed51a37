"""autoplan.auto(): profile, search and parallelize in one call, in a world of one (no process
group) and in a 2-rank gloo world, where both ranks must apply the same plan and train as one
process does (gpt-tiny, float32, 3 AdamW steps, as the executor tests compare).

This file is also the worker of its 2-rank world: `python -m tests.test_auto SPEC` runs one
rank through the executor tests' harness (tests/executor/harness.py: serve_world).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import autoplan
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.analytic import analytic_profile
from autoplan.errors import AutoplanError
from autoplan.executor import Runner, verify
from autoplan.launch import run_workers
from autoplan.plan import Plan
from autoplan.tracing import layer_graph
from tests.executor import harness
from tests.executor.custom_models import ResidualMLP

PRESET = "h100-sxm:gpus={world}"
"""A cluster with datasheet figures: auto() times nothing and the cost model derives times."""
OTHER_MODEL = "gpt:layers=3,hidden=64,heads=4,seq=32,vocab=256"
"""gpt-tiny with one more block: what rank 1 builds in the "other_model" case."""
CASES: dict[str, dict] = {
    "measured": {},  # the current world, timed here
    "preset": {"cluster": PRESET.format(world=2)},
    "no_fit": {"cluster": PRESET.format(world=2), "memory_limit_gib": 1e-6},
    "other_model": {},
}
"""Case of the 2-rank world -> auto()'s options; the first two train, the others must fail
on both ranks (neither waits forever for the other)."""
TRAINED = ("measured", "preset")
FAILURES = {"no_fit": "^(rank 0 could not plan: AutoplanError: )?no plan fits in",
            "other_model": r"ranks \[1\] built another model than rank 0"}


def _batches(model: torch.nn.Module) -> list[verify.Batch]:
    return [((ids,), targets) for ids, targets in harness.batches(model)]


def _auto(model: torch.nn.Module, cluster: str | None = None, **options: object) -> Runner:
    ids = harness.batches(model)[0][0]
    return autoplan.auto(model, (ids,), global_batch=harness.GLOBAL_BATCH, cluster=cluster,
                         loss_fn=harness.lm_loss, **options)


def _pieces(plan: Plan) -> int:
    """How the one-process reference slices each batch (data-parallel ranks x micro-batches)."""
    return plan.layers[0].dp * plan.num_micro_batches


# ------------------------------------------------------------------------------ world of one


def test_world_of_one_times_searches_and_trains_like_one_process() -> None:
    model = harness.build()
    rng_before = torch.get_rng_state()
    runner = _auto(model)
    assert torch.equal(torch.get_rng_state(), rng_before)  # timing drew from a forked RNG
    plan = runner.plan
    assert (plan.world_size, plan.global_batch, plan.cluster) == (1, 8, "local-cpu:procs=1")
    assert plan.provenance.profile_hash is not None  # searched on the profile timed here
    assert plan.prediction is not None and plan.prediction.step_time_s > 0
    trace = verify.train(runner, harness.optimizer(runner.parameters()), _batches(model),
                         keep=True)
    assert verify.compare(trace, harness.reference(_pieces(plan)), harness.LR).problems == []


def test_preset_cluster_and_default_loss_on_a_custom_module() -> None:
    torch.manual_seed(0)
    model = ResidualMLP()
    inputs, targets = torch.randn(8, 8), torch.randn(8, 4)
    expected = F.mse_loss(copy.deepcopy(model)(inputs), targets)
    runner = autoplan.auto(model, inputs, global_batch=8, cluster=PRESET.format(world=1))
    assert runner.plan.cluster == "h100-sxm:gpus=1"
    assert runner.plan.provenance.profile_hash is None  # datasheet figures, nothing timed
    loss = runner.step(inputs, targets, torch.optim.AdamW(runner.parameters()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_given_profile_is_used_and_one_of_another_model_refused() -> None:
    model = harness.build()
    ids = harness.batches(model)[0][0]
    cluster = parse_cluster_spec(PRESET.format(world=1))
    profile = analytic_profile(layer_graph(model, (ids,), dtype=torch.float32), cluster)
    runner = _auto(model, cluster.spec, profile=profile)
    assert runner.plan.provenance.profile_hash == profile.content_hash
    other = harness.build(OTHER_MODEL)
    with pytest.raises(AutoplanError, match="the profile is of model .* not GPT"):
        _auto(other, cluster.spec, profile=profile)
    with pytest.raises(AutoplanError, match="analytic profile is of device h100-sxm"):
        _auto(model, profile=profile)  # the world's own cluster: local-cpu


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: autoplan.auto("gpt-tiny", x, global_batch=8), "takes an nn.Module, got str"),
    (lambda m, x: autoplan.auto(m, x, global_batch=0), "global_batch must be an integer >= 1"),
    (lambda m, x: autoplan.auto(m, x, global_batch=True), "got True"),
    (lambda m, x: autoplan.auto(m, 3, global_batch=8), "example_inputs must be a tensor"),
    (lambda m, x: autoplan.auto(m, (torch.tensor(1),), global_batch=8), "no tensor with a batch"),
    (lambda m, x: autoplan.auto(m, x, global_batch=8, cluster="h100-sxm:gpus=8"),
     "has 8 devices but this world has 1 ranks"),
    (lambda m, x: autoplan.auto(m, x, global_batch=8, cluster=4), "cluster must be a spec"),
    (lambda m, x: autoplan.auto(m, x, global_batch=8, fix="zero=9"), "--fix zero must be 0 to 3"),
    (lambda m, x: autoplan.auto(m, x, global_batch=8, cluster=PRESET.format(world=1),
                                memory_limit_gib=1e-6), "give a larger memory_limit_gib"),
])
def test_bad_input_is_refused_with_the_reason(call, message: str) -> None:  # noqa: ANN001
    model = harness.build()
    with pytest.raises(AutoplanError, match=message):
        call(model, harness.batches(model)[0][0])


# ------------------------------------------------------------------------------ two ranks


@pytest.mark.slow
def test_two_ranks_apply_one_plan_and_train_like_one_process(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"cases": list(CASES),
                                                    "folder": str(tmp_path)}))
    run_workers(2, [sys.executable, "-m", "tests.test_auto", str(tmp_path / "spec.json")],
                tmp_path, harness.WORLD_TIMEOUT_S, progress_path=tmp_path / "progress.log",
                done=(tmp_path / "results.json").exists, label="auto test worker")
    for case in TRAINED:
        ranks = [torch.load(tmp_path / f"{case}.rank{r}.pt", weights_only=True) for r in range(2)]
        assert ranks[0]["plan"] == ranks[1]["plan"], case  # rank 0's plan, on both ranks
        plan = Plan.model_validate_json(ranks[0]["plan"])
        assert plan.cluster == CASES[case].get("cluster", "local-cpu:procs=2")
        world = harness.WorldResult(
            {case: ranks[0]["losses"]}, {case: ranks[0]["params"] | ranks[1]["params"]},
            {case: ranks[0]["grads"] | ranks[1]["grads"]}, {})
        assert harness.compare(case, world, harness.reference(_pieces(plan))) == []
    for case, message in FAILURES.items():
        for rank in range(2):
            saved = torch.load(tmp_path / f"{case}.rank{rank}.pt", weights_only=True)
            error = saved.get("error", "")
            assert re.search(message, error), (case, rank, error)


def _run_case(name: str, spec: dict, folder: Path, rank: int) -> None:
    """One rank of one case: auto() then 3 AdamW steps; writes the plan and full tensors, or
    the AutoplanError auto() raised."""
    model = harness.build(OTHER_MODEL if name == "other_model" and rank == 1 else harness.MODEL)
    try:
        runner = _auto(model, **CASES[name])
    except AutoplanError as err:
        torch.save({"error": str(err)}, folder / f"{name}.rank{rank}.pt")
        return
    trace = verify.train(runner, harness.optimizer(runner.parameters()), _batches(model),
                         keep=True)
    torch.save({"plan": runner.plan.to_json(), "losses": trace.losses, "params": trace.params,
                "grads": trace.grads}, folder / f"{name}.rank{rank}.pt")


def _finish(results: dict, folder: Path, rank: int) -> None:
    if rank == 0:  # the last file: serve_world waited for every rank after each case
        (folder / "results.json").write_text(json.dumps(list(results)))


if __name__ == "__main__":
    harness.serve_world(sys.argv[1], _run_case, _finish)
