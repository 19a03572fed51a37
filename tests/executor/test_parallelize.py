"""parallelize() on gloo worlds of 2 and 4 ranks against a one-process reference (gpt-tiny,
float32, dropout off, 3 AdamW steps), plus the checks and decisions that need no processes.

Each world runs several plans in one spawn (spawning costs seconds on 2 cores); the tests read
what the ranks wrote, never only their exit codes (gloo rarely aborts at exit).
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from autoplan.app.run import RunOptions, load_run_plan, reference_run
from autoplan.errors import AutoplanError
from autoplan.executor import parallelize, verify
from autoplan.executor.data_parallel import tied_groups
from autoplan.executor.hops import Hop, _check_activation, check_layouts, hop_layouts
from autoplan.executor.mesh import Layout, ParallelDims, layout_dims, parallel_dims
from autoplan.executor.pipeline import chunk_ranks, chunk_units
from autoplan.executor.tensor_parallel import tp_styles
from autoplan.graph import LayerGraph
from autoplan.models import build_model
from autoplan.tracing import layer_graph_of_built
from tests.executor import harness

_TP2 = {"dp": 1, "tp": 2}
_DP2_TP2 = {"dp": 2, "tp": 2}
TWO_RANKS = {
    "dp_zero0": ("dp=2", {}),
    "fsdp_zero1": ("dp=2,zero=1", {}),
    "fsdp_zero3_ckpt": ("dp=2,zero=3", {"h.0": {"checkpoint": "full"}}),
    "tp": ("tp=2", {}),
    "tp_sp_ckpt": ("tp=2,sequence_parallel=true",
                   {"h.0": {"checkpoint": "selective"}, "h.1": {"checkpoint": "full"}}),
    "pp_gpipe": ("pp=2,schedule=gpipe", {}),
    "pp_1f1b": ("pp=2,schedule=1f1b", {}),
    # Layers of different (dp, tp) (executor/hops.py): wpe and h.0 (sequence parallel) are
    # tp=2 between dp=2 layers, so wte's output hops; the loss is tp=2: output and targets
    # hop. h.1 is ZeRO 0 (replicated) among FSDP layers.
    "mixed_fsdp_tp_sp": ("dp=2,zero=1", {"wpe": _TP2, "h.0": _TP2 | {"sequence_parallel": True},
                                         "h.1": {"zero": 0}, "loss": _TP2}),
}
FOUR_RANKS = {
    "tp_fsdp_zero3": ("dp=2,tp=2,zero=3", {}),
    "tp_sp_dp_zero0": ("dp=2,tp=2,sequence_parallel=true", {"h.1": {"checkpoint": "full"}}),
    "pp_tp_1f1b": ("pp=2,tp=2,schedule=1f1b", {}),
    "pp_fsdp_zero2": ("pp=2,dp=2,zero=2,schedule=gpipe", {}),
    # ZeRO 3 reduces and reshards after every micro-batch's backward also inside torch's
    # pipeline stage (executor/pipeline.ZeroStage), ZeRO 1 beside it accumulates
    "pp_fsdp_zero3_1f1b": ("pp=2,dp=2,zero=3,schedule=1f1b", {"h.1": {"zero": 1}}),
    # Mixed layouts: wte's output hops to wpe's dp=2 x tp=2, h.0 is dp=4 again, h.1 is
    # dp=2 x tp=2 with sequence parallelism (recomputed), ln_f is tp=4 (its parameters
    # outside FSDP) and the loss is dp=2 x tp=2 beside a dp=4 head. h.0 is ZeRO 0.
    "mixed_fsdp_sp": ("dp=4,zero=3", {
        "wpe": _DP2_TP2, "h.0": {"zero": 0},
        "h.1": _DP2_TP2 | {"sequence_parallel": True, "checkpoint": "full"},
        "ln_f": {"dp": 1, "tp": 4}, "loss": _DP2_TP2}),
    # ... and across a pipeline boundary: stage 1 starts with a tp=2 block, the loss is tp=2.
    "mixed_pp_zero0": ("pp=2,dp=2,schedule=1f1b", {"h.1": _TP2, "loss": _TP2}),
}
# Other models, trained as `autoplan run --verify` trains them (autoplan/app/run.py): an HF Llama
# built from a config and a custom non-transformer module, under DP, FSDP and TP.
HF_LLAMA_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 16, "tie_word_embeddings": False, "attention_dropout": 0.0}
CUSTOM = "module:tests.executor.custom_models:build_residual_mlp"
RESNET = "module:tests.core.factories:build_resnet"
OTHER_MODELS = {  # case -> (model, plan shorthand); "hf" is replaced by the config's spec
    "hf_llama_dp": ("hf", "dp=2"),
    "hf_llama_fsdp_zero3": ("hf", "dp=2,zero=3"),
    "hf_llama_tp": ("hf", "tp=2"),
    "custom_dp": (CUSTOM, "dp=2"),
    "custom_fsdp_zero2": (CUSTOM, "dp=2,zero=2"),
    "custom_tp": (CUSTOM, "tp=2"),
    "resnet_fsdp_zero3": (RESNET, "dp=2,zero=3"),
}
# A plan with layers of different (dp, tp), trained as `autoplan run --verify` trains it.
MIXED_RUN = ("run_mixed_dp_tp", "dp=2", {"h.1": _TP2, "ln_f": _TP2})
# A checkpoint saved under TP2 x DP2 loads under PP2 x DP2 (FSDP) and training goes on.
RESUME = ("dp=2,tp=2", "pp=2,dp=2,zero=1,schedule=1f1b")
# A Linear that all blocks call, cut across two stages, each data-parallel (the search's plan
# for this zoo model on 4 H100s): the root must leave the shared weights to their group, also
# where a unit of the other stage reaches them.
SHARED_RUN = ("shared_linear_pp_dp", "module:tests.zoo.shared_mlp:build_shared_mlp",
              "pp=2,dp=2,schedule=gpipe")
# Interleaved 1F1B needs 4 chunks; gpt-tiny has 2 blocks, so the cut is given by hand:
# (wte, wpe) | h.0 | h.1 | (ln_f, lm_head).
INTERLEAVED = ("pp=2,dp=2,virtual_stages=2", {}, [0, 2, 3, 4])


@pytest.fixture(scope="module")
def graph() -> LayerGraph:
    return layer_graph_of_built(build_model(harness.MODEL))


@functools.cache
def _reference(pieces: int) -> verify.Trace:
    return harness.reference(pieces)


def _check(world: harness.WorldResult, plan_of: dict, case: str) -> None:
    plan = plan_of[case]
    ref = _reference(plan.layers[0].dp * plan.num_micro_batches)
    assert harness.compare(case, world, ref) == []


def _other_model_options(case: str, folder) -> RunOptions:  # noqa: ANN001
    model, text = OTHER_MODELS[case]
    if model == "hf":
        model = f"hf:{folder / 'llama_config.json'}"
    return RunOptions(model=model, plan=text, nproc=2, steps=harness.STEPS,
                      global_batch=harness.GLOBAL_BATCH, seed=harness.SEED, lr=harness.LR)


@pytest.fixture(scope="module")
def two_rank_world(graph: LayerGraph, tmp_path_factory) -> tuple[harness.WorldResult, dict]:
    folder = tmp_path_factory.mktemp("world2")
    (folder / "llama_config.json").write_text(json.dumps(HF_LLAMA_CONFIG))
    plans = {name: harness.make_plan(graph, 2, text, edit)
             for name, (text, edit) in TWO_RANKS.items()}
    extra = {}
    for case in OTHER_MODELS:
        options = _other_model_options(case, folder)
        plans[case] = load_run_plan(options, 2)[0]
        extra[case] = {"kind": "run", "model": options.model, "options": options}
    case, text, edit = MIXED_RUN
    plans[case] = harness.make_plan(graph, 2, text, edit)
    extra[case] = {"kind": "run", "model": harness.MODEL, "options": RunOptions(
        model=harness.MODEL, plan=str(folder / f"{case}.plan.json"), nproc=2,
        steps=harness.STEPS, global_batch=harness.GLOBAL_BATCH, seed=harness.SEED,
        lr=harness.LR)}
    world = harness.run_world(2, plans, folder, extra={
        case: {k: v for k, v in e.items() if k != "options"} for case, e in extra.items()})
    return world, plans | {"_options": {c: e["options"] for c, e in extra.items()}}


@pytest.fixture(scope="module")
def four_rank_world(graph: LayerGraph, tmp_path_factory) -> tuple[harness.WorldResult, dict]:
    plans = {name: harness.make_plan(graph, 4, text, edit)
             for name, (text, edit) in FOUR_RANKS.items()}
    text, edit, bounds = INTERLEAVED
    plans["pp_dp_interleaved"] = harness.make_plan(graph, 4, text, edit,
                                                   stage_boundaries=bounds)
    plans["tp_dp_save"] = harness.make_plan(graph, 4, RESUME[0])
    plans["_pp_dp_load"] = harness.make_plan(graph, 4, RESUME[1])
    extra = {"tp_dp_save": {"kind": "resume", "plan": "_pp_dp_load"}}
    case, model, text = SHARED_RUN
    options = RunOptions(model=model, plan=text, nproc=4, steps=harness.STEPS,
                         global_batch=harness.GLOBAL_BATCH, seed=harness.SEED, lr=harness.LR)
    plans[case] = load_run_plan(options, 4)[0]
    extra[case] = {"kind": "run", "model": model}
    world = harness.run_world(4, plans, tmp_path_factory.mktemp("world4"), extra=extra)
    return world, plans | {"_options": {case: options}}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_ranks_match_one_process(two_rank_world, case: str) -> None:
    _check(*two_rank_world, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [*FOUR_RANKS, "pp_dp_interleaved"])
def test_four_ranks_match_one_process(four_rank_world, case: str) -> None:
    _check(*four_rank_world, case)


@pytest.mark.slow
def test_a_linear_shared_across_stages_trains_under_pp_and_dp(four_rank_world) -> None:
    world, plans = four_rank_world
    case = SHARED_RUN[0]
    ref = reference_run(plans["_options"][case], plans[case])
    run = verify.Trace(world.losses[case], world.params[case], world.grads[case])
    assert verify.compare(run, ref, harness.LR).problems == []


@pytest.mark.slow
@pytest.mark.parametrize("case", [*OTHER_MODELS, MIXED_RUN[0]])
def test_other_models_match_one_process(two_rank_world, case: str) -> None:
    world, plans = two_rank_world
    options = plans["_options"][case]
    ref = reference_run(options, plans[case])
    run = verify.Trace(world.losses[case], world.params[case], world.grads[case])
    assert verify.compare(run, ref, harness.LR).problems == []


@pytest.mark.slow
def test_tp_infers_pairs_of_other_models(two_rank_world) -> None:
    world, _ = two_rank_world
    # The HF Llama's blocks split (its final norm stays whole); the custom MLP blocks split.
    assert world.info["hf_llama_tp"]["replicated_layers"] == ["model.norm"]
    assert world.info["custom_tp"]["replicated_layers"] == []


@pytest.mark.slow
def test_checkpoint_of_one_plan_resumes_under_another(four_rank_world) -> None:
    world, _ = four_rank_world
    info = world.info["tp_dp_save"]
    assert len(info["resumed"]) == harness.STEPS - 1
    assert info["resumed"] == pytest.approx(info["losses"], rel=1e-5, abs=0)


@pytest.mark.slow
def test_tp_reports_the_layers_it_leaves_whole(two_rank_world) -> None:
    world, _ = two_rank_world
    assert world.info["tp"]["replicated_layers"] == ["ln_f"]
    assert world.info["dp_zero0"]["replicated_layers"] == []


# ------------------------------------------------------------------ without processes


def test_layouts_of_a_mixed_plan(graph: LayerGraph) -> None:
    plan = harness.make_plan(graph, 4, "dp=2,tp=2,micro_batch=2",
                             {"h.1": {"dp": 4, "tp": 1, "zero": 1}, "loss": {"dp": 4, "tp": 1}})
    # ZeRO 0 layers beside ZeRO 1: the dp axis is named dp_shard
    assert layout_dims(plan) == {(2, 2): ParallelDims(1, 2, 2, True),
                                 (4, 1): ParallelDims(1, 4, 1, True)}
    assert parallel_dims(plan) == ParallelDims(1, 4, 1, True)  # the loss's layout
    # blocks: pairs of ranks for 2 <-> 4; all 6 ranks for dp 2 <-> dp 3 (gcd 1)
    assert hop_layouts([(2, 2), (4, 1), (4, 1), (2, 2)]) == [(2, 2)]
    assert hop_layouts([(2, 3), (3, 2), (2, 3)]) == [(1, 6)]


def _hop_all_ranks(src: Layout, dst: Layout, held: list[torch.Tensor],
                   backward: bool = False) -> list[torch.Tensor]:
    """Every rank's result of one hop (or its backward), the ranks simulated in one process:
    held[r] is rank r's tensor; a block gathers its ranks' tensors in order."""
    ranks = src[0] * src[1]
    block = ranks // math.gcd(src[0], dst[0])
    out = []
    for rank in range(ranks):
        start = rank - rank % block
        hop = Hop(src, dst, rank % block)
        run = hop.backward if backward else hop.forward
        out.append(run(held[rank], lambda _, s=start: held[s:s + block]))
    return out


@pytest.mark.parametrize("src, dst", [((2, 3), (3, 2)), ((3, 2), (2, 3)), ((6, 1), (1, 6)),
                                      ((1, 6), (3, 2)), ((2, 3), (6, 1))])
def test_hops_give_each_rank_its_slice_in_any_layout(src: Layout, dst: Layout) -> None:
    batch = torch.arange(12.0).repeat_interleave(2).view(12, 2)  # 12 samples of 2 features

    def slices(layout: Layout) -> list[torch.Tensor]:  # rank r: batch slice r // tp of dp
        return [batch.chunk(layout[0])[rank // layout[1]] for rank in range(6)]

    moved = _hop_all_ranks(src, dst, slices(src))
    assert all(torch.equal(a, b) for a, b in zip(moved, slices(dst), strict=True))
    back = _hop_all_ranks(src, dst, slices(dst), backward=True)
    scale = src[0] / dst[0]  # each rank's gradient is for the mean over its own samples
    assert all(torch.equal(a, b * scale) for a, b in zip(back, slices(src), strict=True))


def test_hops_refuse_inputs_that_are_not_the_activation(graph: LayerGraph) -> None:
    # A layer (not an embedding: those hop the output before them) given position ids.
    with pytest.raises(AutoplanError, match=r"layer h.0 changes layout \(dp 2, tp 1 -> "
                                            r"dp 1, tp 2\), but its first input is a "
                                            r"torch.int64 tensor"):
        _check_activation("h.0", (2, 1), (1, 2), torch.arange(4))
    model, units = harness.build(), [n for n in graph.names if n != "loss"]
    layouts = [(1, 2) if n == "lm_head" else (2, 1) for n in units]
    with pytest.raises(AutoplanError, match=r"wte \(dp 2, tp 1\), lm_head \(dp 1, tp 2\) "
                                            "share a parameter"):
        check_layouts(model, units, layouts)


def test_parallel_dims_and_mesh_axes(graph: LayerGraph) -> None:
    dims = parallel_dims(harness.make_plan(graph, 8, "pp=2,tp=2,zero=1"))
    assert dims == ParallelDims(pp=2, dp=2, tp=2, dp_sharded=True)
    assert dims.axes == [("pp", 2), ("dp_shard", 2), ("tp", 2)]
    assert parallel_dims(harness.make_plan(graph, 2, "dp=2")).axes == [("dp_replicate", 2)]


def test_world_size_mismatch_is_named(graph: LayerGraph) -> None:
    plan = harness.make_plan(graph, 2, "dp=2")
    with pytest.raises(AutoplanError, match="plan is for 2 devices; this world has 1"):
        parallelize(harness.build(), plan, harness.lm_loss)


def test_layers_the_model_lacks_are_named(graph: LayerGraph) -> None:
    plan = harness.make_plan(graph, 1, "dp=1")
    other = build_model("gpt:layers=3,hidden=64,heads=4,seq=32,vocab=256", device="cpu").module
    with pytest.raises(AutoplanError, match="the plan misses h.2"):
        parallelize(other, plan, harness.lm_loss)


def test_one_process_runner_matches_plain_training(graph: LayerGraph) -> None:
    plan = harness.make_plan(graph, 1, "dp=1,micro_batch=2,ckpt=full")
    model = harness.build()
    runner = parallelize(model, plan, harness.lm_loss)
    opt = harness.optimizer(runner.parameters())
    losses = [runner.step(ids, targets, opt).item() for ids, targets in harness.batches(model)]
    ref = _reference(plan.num_micro_batches)
    assert losses == pytest.approx(ref.losses, rel=verify.RTOL, abs=0)


def test_tp_styles_of_a_gpt_block_are_data() -> None:
    block = harness.build().h[0]
    plain = tp_styles(block, sequence_parallel=False)
    assert {n: type(s) for n, s in plain.items()} == {
        "attn.q": ColwiseParallel, "attn.k": ColwiseParallel, "attn.v": ColwiseParallel,
        "attn.proj": RowwiseParallel, "mlp.fc": ColwiseParallel, "mlp.proj": RowwiseParallel}
    sp = tp_styles(block, sequence_parallel=True)
    assert isinstance(sp["ln_1"], SequenceParallel) and isinstance(sp["ln_2"], SequenceParallel)
    assert {"attn", "mlp"} <= set(sp)  # they gather the sequence before the column split


def test_chunks_and_tied_groups() -> None:
    units = ["wte", "wpe", "h.0", "h.1", "ln_f", "lm_head"]
    assert chunk_units(units, [0, 2, 3, 4]) == [["wte", "wpe"], ["h.0"], ["h.1"],
                                                ["ln_f", "lm_head"]]
    assert chunk_ranks(4, 2, 1) == [1, 3]
    groups = tied_groups(harness.build(), units)
    assert groups[0] == ("wte", "lm_head") and ("h.0",) in groups
