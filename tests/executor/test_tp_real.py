"""Tensor parallelism of blocks nobody here wrote (tests/zoo): the plans inferred by data flow
(autoplan/tp_plan.py), checked without processes, and tp=2 on gloo worlds of 2 ranks against
a one-process reference (float32, dropout off, 3 AdamW steps), as `autoplan run --verify`
trains them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoplan.app.run import RunOptions, load_run_plan, reference_run
from autoplan.executor import verify
from autoplan.executor.tensor_parallel import TPLayer, sequence_splits
from autoplan.models import build_model
from autoplan.tp_plan import COLWISE, ROWWISE, TPPlan, infer_tp_plan, infer_tp_plans
from autoplan.tracing import meta_inputs
from autoplan.units import find_units
from tests.executor import harness
from tests.zoo import zoo_model

_C, _R = COLWISE, ROWWISE
BERT_LAYER = {"attention.self.query": _C, "attention.self.key": _C, "attention.self.value": _C,
              "attention.output.dense": _R, "intermediate.dense": _C, "output.dense": _R}
LLAMA_LAYER = {"self_attn.q_proj": _C, "self_attn.k_proj": _C, "self_attn.v_proj": _C,
               "self_attn.o_proj": _R, "mlp.gate_proj": _C, "mlp.up_proj": _C,
               "mlp.down_proj": _R}
NANOGPT_MLP = {"mlp.c_fc": _C, "mlp.c_proj": _R}
# zoo model -> plan shorthand, trained on 2 ranks against one process
_SP = "tp=2,sequence_parallel=true"
TWO_RANKS = {"bert": "tp=2", "shared_mlp": "tp=2", "nanogpt": "tp=2", "bert_sp": _SP,
             "llama_sp": _SP, "nanogpt_sp": _SP}


def _module(name: str) -> nn.Module:
    return build_model(zoo_model(name).spec, device="meta").module


def _unit_calls(name: str) -> dict[str, tuple[tuple, dict]]:
    """Each unit's (args, kwargs) in one meta forward of the whole zoo model."""
    built = build_model(zoo_model(name).spec, device="meta")
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = [built.module.get_submodule(unit).register_forward_pre_hook(
        lambda m, a, k, u=unit: calls.setdefault(u, (a, k)), with_kwargs=True)
        for unit, _ in find_units(built.module)]
    with torch.no_grad():
        built.module(*meta_inputs(built.example_inputs, torch.float32)(2))
    for handle in handles:
        handle.remove()
    return calls


# ------------------------------------------------------------------ plans, no processes


def test_bert_pairs_siblings_by_data_flow() -> None:
    # q/k/v sit in attention.self, their row-wise partner in the sibling attention.output;
    # intermediate.dense and output.dense are siblings too.
    plan = infer_tp_plan(_module("bert").get_submodule("bert.encoder.layer.0"))
    assert plan.styles == BERT_LAYER and plan.refusal == ""
    assert plan.sizes == (4, 32, 64)  # heads, q/k/v and dense widths, intermediate width
    assert plan.max_degree_divides(4) and not plan.max_degree_divides(8)


def test_gpt2_conv1d_blocks_stay_whole() -> None:
    model = _module("gpt2")
    block = infer_tp_plan(model.get_submodule("transformer.h.0"))
    assert not block.shardable and block.refusal == ""
    assert infer_tp_plan(model.get_submodule("transformer.wte")).styles == {"": _R}


def test_llama_pairs_with_its_real_inputs() -> None:
    # The real call carries the rotary tables and a cache object (left out): q/k/v|o and
    # gate,up|down pair; the kv heads (2) bound tp.
    calls = _unit_calls("llama")
    unit = _module("llama").get_submodule("model.layers.0")
    plan = infer_tp_plan(unit, inputs=calls["model.layers.0"])
    assert plan.styles == LLAMA_LAYER and plan.refusal == ""
    assert 2 in plan.sizes and 4 in plan.sizes
    assert plan.max_degree_divides(2) and not plan.max_degree_divides(4)


def test_plans_from_one_meta_forward_of_the_model_are_reused() -> None:
    # A worker that did not trace the model (autoplan/app/run.py) learns each unit's inputs from
    # one meta forward; later plans of equal units (the executor's) are those plans.
    built = build_model(zoo_model("qwen2").spec, device="cpu")
    units = [unit for unit, _ in find_units(built.module)]
    plans = infer_tp_plans(built.module, built.example_inputs, units)
    assert plans["model.layers.1"].styles == LLAMA_LAYER
    assert infer_tp_plan(built.module.get_submodule("model.layers.1")) is plans["model.layers.1"]


def test_fused_qkv_stays_whole_with_its_reason() -> None:
    plan = infer_tp_plan(_module("nanogpt").get_submodule("transformer.h.0"))
    assert plan.styles == NANOGPT_MLP
    assert "attn.c_attn" in plan.replicated and "attn.c_proj" in plan.replicated
    assert "fused projection" in plan.notes["attn.c_attn"]


def test_a_shared_linear_pairs_in_every_block() -> None:
    model = _module("shared_mlp")
    for block in ("blocks.0", "blocks.1"):
        assert infer_tp_plan(model.get_submodule(block)).styles == {"shared": _C, "out": _R}


class _HeadsByCount(nn.Module):
    """Attention that reshapes by a stored head count with -1 as head width: split by
    columns it would still run, with half-width heads (wrong), so it must stay whole."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.n_head = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.n_head, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(y)
        return x + self.down(torch.relu(self.up(x)))


def test_a_reshape_by_stored_head_count_is_left_whole() -> None:
    plan = infer_tp_plan(_HeadsByCount())
    assert plan.styles == {"up": _C, "down": _R}
    assert "split dimension" in plan.notes["q"] and "o" in plan.notes


def test_one_head_per_rank_still_splits() -> None:
    # 2 heads at tp 2: `reshape` after the transpose becomes a plain view (the strides
    # allow it), where the whole unit ran clone + view; layout alone is no reason to refuse.
    x = torch.randn(1, 32, 64)
    gpt = build_model("gpt:layers=1,hidden=64,heads=2,seq=32,vocab=64").module
    plan = infer_tp_plan(gpt.get_submodule("h.0"), inputs=((x,), {}))
    assert set(plan.styles) == {"attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"}
    assert plan.sizes == (2, 64, 256) and not plan.notes


def test_equal_shapes_with_other_head_counts_get_their_own_plans() -> None:
    # Plans are reused between units of one structure: the head count is part of it.
    four, two = _HeadsByCount(width=16, heads=4), _HeadsByCount(width=16, heads=2)
    assert 4 in infer_tp_plan(four).sizes
    assert 2 in infer_tp_plan(two).sizes and 4 not in infer_tp_plan(two).sizes


def test_override_sizes_and_refusal() -> None:
    unit = _HeadsByCount(width=12, heads=3)
    plan = infer_tp_plan(unit, {"up": _C, "down": _R})
    assert plan.sizes == (3, 24)  # the module's head count counts too
    assert not plan.max_degree_divides(2) and plan.max_degree_divides(3)
    assert not TPPlan({"up": _C}, refusal="why").max_degree_divides(2)
    with pytest.raises(ValueError, match="colwise or rowwise"):
        infer_tp_plan(unit, {"up": "diagonal"})


def test_plans_are_the_same_in_every_process() -> None:
    # Every rank infers its own plan: the order of its styles (the order parallelize_module
    # runs collectives in) must not follow string hashing.
    code = ("from autoplan.models import build_model; from autoplan.tp_plan import "
            "infer_tp_plan; m = build_model('module:tests.zoo.vit:build_vit').module; "
            "print(list(infer_tp_plan(m.get_submodule('blocks.0')).styles))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           check=True).stdout for seed in (1, 2, 3)}
    assert outs == {"['mlp.fc1', 'mlp.fc2']\n"}


def test_which_units_take_sequence_slices() -> None:
    # Only units whose split Linears gather and scatter the sequence around all they do
    # besides norms: not BERT's embeddings (token ids), not nanoGPT's blocks (their whole
    # attention would see a slice), not GPT-2's Conv1D blocks or a unit of norms alone.
    expected = {"bert": {"bert.encoder.layer.0", "bert.encoder.layer.1"}, "nanogpt": set(),
                "gpt2": set(), "llama": {"model.layers.0", "model.layers.1"}}
    for name, blocks in expected.items():
        model = build_model(zoo_model(name).spec, device="cpu").module
        units = [unit for unit, _ in find_units(model)]
        splits = sequence_splits(model, [TPLayer(unit, True) for unit in units])
        assert {u for u, split in zip(units, splits, strict=True) if split} == blocks


# ------------------------------------------------------------------ gloo worlds of 2 ranks


def _options(case: str) -> RunOptions:
    name = case.removesuffix("_sp")
    return RunOptions(model=zoo_model(name).spec, plan=TWO_RANKS[case], nproc=2,
                      steps=harness.STEPS, global_batch=harness.GLOBAL_BATCH,
                      seed=harness.SEED, lr=harness.LR)


@pytest.fixture(scope="module")
def two_rank_world(tmp_path_factory) -> tuple[harness.WorldResult, dict]:
    plans, extra = {}, {}
    for case in TWO_RANKS:
        options = _options(case)
        plans[case] = load_run_plan(options, 2)[0]
        extra[case] = {"kind": "run", "model": options.model}
    world = harness.run_world(2, plans, tmp_path_factory.mktemp("tp_real"), extra=extra)
    return world, plans


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_tp2_matches_one_process(two_rank_world, case: str) -> None:
    world, plans = two_rank_world
    ref = reference_run(_options(case), plans[case])
    run = verify.Trace(world.losses[case], world.params[case], world.grads[case])
    assert verify.compare(run, ref, harness.LR).problems == []


@pytest.mark.slow
def test_tp2_splits_the_blocks(two_rank_world) -> None:
    # The blocks really split (a replicated block would match the reference too).
    world, _ = two_rank_world
    assert world.info["bert"]["replicated_layers"] == ["bert.embeddings", "cls"]
    assert world.info["shared_mlp"]["replicated_layers"] == []
    assert not any(".h." in n for n in world.info["nanogpt"]["replicated_layers"])
