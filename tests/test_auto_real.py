"""autoplan.auto() on models nobody here wrote (tests/zoo): transformers models built from
tiny configs and module factories are traced, timed layer by layer here (with their real
buffers), searched and parallelized, in one process and on 2 gloo ranks, and train as one
process does; mixture-of-experts blocks are priced with their routed experts.

This file is also the worker of its 2-rank world: `python -m tests.test_auto_real SPEC`
runs one rank through the executor tests' harness (tests/executor/harness.py: serve_world).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autoplan
from autoplan.app.cli import main
from autoplan.errors import AutoplanError
from autoplan.executor import Runner, verify
from autoplan.launch import run_workers
from autoplan.models import build_model
from autoplan.models.build import default_loss
from autoplan.plan import Plan
from autoplan.tracing import layer_graph
from tests.core.test_tracing_real import NormMLP
from tests.executor import harness
from tests.zoo import zoo_model

transformers = pytest.importorskip("transformers")

GLOBAL_BATCH = 4
STEPS = 2
LR = 1e-3
TWO_RANKS = ("llama", "resnet")
"""Zoo models auto() plans and trains on 2 ranks: RoPE buffers, BatchNorm buffers."""


def _model_and_batches(name: str) -> tuple[nn.Module, list[verify.Batch]]:
    """The zoo model on the CPU (seed 0) and STEPS batches of its inputs with integer
    targets: the next token for language models, a class for image models."""
    torch.manual_seed(0)
    built = build_model(zoo_model(name).spec, device="cpu")
    batches = []
    for _ in range(STEPS):
        inputs = built.example_inputs(GLOBAL_BATCH)
        if inputs[0].is_floating_point():
            targets = torch.randint(10, (GLOBAL_BATCH,))
        else:
            targets = inputs[0].roll(-1, dims=1)
        batches.append((tuple(inputs), targets))
    return built.module, batches


def _auto(model: nn.Module, batches: list[verify.Batch]) -> Runner:
    return autoplan.auto(model, batches[0][0], global_batch=GLOBAL_BATCH)


def _reference(model: nn.Module, batches: list[verify.Batch], plan: Plan) -> verify.Trace:
    pieces = plan.layers[0].dp * plan.num_micro_batches
    return verify.reference_trace(model, batches, default_loss, pieces,
                                  harness.optimizer(list(model.parameters())))


# ------------------------------------------------------------------------------ world of one


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "resnet", "nanogpt",
                                  pytest.param("mixtral", marks=pytest.mark.slow)])
def test_auto_times_and_trains_a_zoo_model_like_one_process(name: str) -> None:
    model, batches = _model_and_batches(name)
    reference_model = copy.deepcopy(model)
    runner = _auto(model, batches)
    assert runner.plan.provenance.profile_hash is not None  # layers timed here
    trace = verify.train(runner, harness.optimizer(runner.parameters()), batches, keep=True)
    reference = _reference(reference_model, batches, runner.plan)
    assert verify.compare(trace, reference, LR).problems == []


def test_auto_times_a_batchnorm_model_that_refuses_one_sample_and_trains_it() -> None:
    """BatchNorm1d sees one value per channel at one sample: traced, timed and sized from
    2 samples up (before, timing raised BatchNorm's ValueError)."""
    torch.manual_seed(0)
    model = NormMLP()
    batches = [((torch.randn(GLOBAL_BATCH, 8),), torch.randn(GLOBAL_BATCH, 2))
               for _ in range(STEPS)]
    reference_model = copy.deepcopy(model)
    runner = _auto(model, batches)
    trace = verify.train(runner, harness.optimizer(runner.parameters()), batches, keep=True)
    assert verify.compare(trace, _reference(reference_model, batches, runner.plan),
                          LR).problems == []


class _IndexesByValue(nn.Module):
    """A block that indexes a table by its input's values: shapes run on meta, but the real
    run of its timed copy (random inputs) indexes out of bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.table = nn.Embedding(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.table((x * 100).long().clamp(max=3)).mean(1)


def test_a_layer_that_fails_when_timed_is_named_in_one_line() -> None:
    model = nn.Sequential(_IndexesByValue(), _IndexesByValue())
    with pytest.raises(AutoplanError, match=r"^layer 0 could not be timed on cpu: "
                       r"IndexError: index out of range"):
        autoplan.auto(model, torch.randn(4, 8), global_batch=4)


# ------------------------------------------------------------------------------ experts


def _moe_block_flops(top_k: int, dtype: torch.dtype, experts: int | None = 4) -> tuple[float,
                                                                                      float]:
    """(forward, backward) FLOPs per sample of the first block of a tiny Mixtral (or, with
    experts None, the Mistral of the same shapes: one dense MLP)."""
    shapes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
              "max_position_embeddings": 16}
    if experts is None:
        config = transformers.AutoConfig.for_model("mistral", **shapes)
    else:
        config = transformers.AutoConfig.for_model(
            "mixtral", num_local_experts=experts, num_experts_per_tok=top_k, **shapes)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    graph = layer_graph(model, (torch.zeros(1, 16, dtype=torch.long),), dtype=dtype)
    block = next(node for node in graph.nodes if node.kind == "block")
    return block.fwd_flops, block.bwd_flops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_mixture_of_experts_block_is_priced_with_its_routed_experts(dtype) -> None:  # noqa: ANN001
    """Per token, each of the top_k experts costs a SwiGLU MLP (6 x hidden x intermediate
    FLOPs forward, twice that backward) and the router 2 x hidden x experts; bf16 runs
    aten's grouped matmul, float32 transformers' fallback op (both uncounted before)."""
    tokens, hidden, inner, experts = 16, 32, 64, 4
    one = _moe_block_flops(1, dtype)
    two = _moe_block_flops(2, dtype)
    dense = _moe_block_flops(1, dtype, experts=None)
    expert, router = 6 * hidden * inner * tokens, 2 * hidden * experts * tokens
    assert (two[0] - one[0], two[1] - one[1]) == (expert, 2 * expert)
    # one routed expert costs what the dense MLP does; the router's logits come on top
    assert (one[0] - dense[0], one[1] - dense[1]) == (router, 2 * router)


@pytest.mark.slow
def test_run_trains_a_mixture_of_experts_with_dp_2_like_one_process(capsys) -> None:  # noqa: ANN001
    """`autoplan run --verify` of the zoo Mixtral on 2 ranks, whose experts run as grouped
    matmuls (issue 16 saw run refuse an MoE model, blaming meta tensors)."""
    status = main(["run", "--model", zoo_model("mixtral").spec, "--plan", "dp=2", "--steps",
                   "2", "--warmup", "1", "--verify", "--timeout", "300"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "matches the one-process reference" in out


# ------------------------------------------------------------------------------ two ranks


@pytest.mark.slow
def test_two_ranks_plan_and_train_zoo_models_like_one_process(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"cases": list(TWO_RANKS),
                                                    "folder": str(tmp_path)}))
    run_workers(2, [sys.executable, "-m", "tests.test_auto_real", str(tmp_path / "spec.json")],
                tmp_path, 4 * harness.WORLD_TIMEOUT_S, progress_path=tmp_path / "progress.log",
                done=(tmp_path / "results.json").exists, label="auto zoo worker")
    for name in TWO_RANKS:
        ranks = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True)
                 for r in range(2)]
        assert "error" not in ranks[0], ranks[0].get("error")
        assert ranks[0]["plan"] == ranks[1]["plan"], name  # rank 0's plan, on both ranks
        plan = Plan.model_validate_json(ranks[0]["plan"])
        assert plan.world_size == 2
        model, batches = _model_and_batches(name)
        world = verify.Trace(ranks[0]["losses"], grads=ranks[0]["grads"] | ranks[1]["grads"],
                             params=ranks[0]["params"] | ranks[1]["params"])
        assert verify.compare(world, _reference(model, batches, plan), LR).problems == [], name


def _run_case(name: str, spec: dict, folder: Path, rank: int) -> None:
    """One rank of one case: auto() then STEPS AdamW steps; writes the plan and full
    tensors, or the error auto() raised."""
    model, batches = _model_and_batches(name)
    try:
        runner = _auto(model, batches)
    except Exception as err:  # reported to the test, which fails naming it
        torch.save({"error": f"{type(err).__name__}: {err}"}, folder / f"{name}.rank{rank}.pt")
        return
    trace = verify.train(runner, harness.optimizer(runner.parameters()), batches, keep=True)
    torch.save({"plan": runner.plan.to_json(), "losses": trace.losses, "params": trace.params,
                "grads": trace.grads}, folder / f"{name}.rank{rank}.pt")


def _finish(results: dict, folder: Path, rank: int) -> None:
    if rank == 0:  # the last file: serve_world waited for every rank after each case
        (folder / "results.json").write_text(json.dumps(list(results)))


if __name__ == "__main__":
    harness.serve_world(sys.argv[1], _run_case, _finish)
