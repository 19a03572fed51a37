"""`autoplan export`: what torchtitan, Megatron-LM and DeepSpeed are given, and refusals."""

from __future__ import annotations

import json
import shlex

import pytest

from autoplan.app.cli import main
from autoplan.app.export import export_plan
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import Plan, uniform_plan


def _node(name: str, kind: str) -> LayerNode:
    return LayerNode(name=name, kind=kind, module_type="Synthetic", signature=kind,
                     params=10**6, shared_params=0, param_bytes=2 * 10**6, fwd_flops=1e12,
                     bwd_flops=2e12, act_bytes=1000, act_bytes_fixed=0, input_bytes=100,
                     output_bytes=100, output_shape=(1, 8, 8), fwd_io_bytes=1000,
                     bwd_io_bytes=2000)


GRAPH = LayerGraph("llama:layers=8", "bfloat16", "flash", 8, (
    _node("tok_embeddings", "embedding"), *(_node(f"layers.{i}", "block") for i in range(8)),
    _node("norm", "norm"), _node("output", "head")), ())


def _plan(shorthand: str, world: int = 16, batch: int = 64) -> Plan:
    return uniform_plan(shorthand, GRAPH, world, batch, f"h100-sxm:gpus={world}")


def _with_layers(plan: Plan, names: tuple[str, ...], **change) -> Plan:
    layers = [lp.model_copy(update=change) if lp.name in names else lp for lp in plan.layers]
    return Plan.model_validate(plan.model_dump() | {"layers": [lp.model_dump()
                                                               for lp in layers]})


# --------------------------------------------------------------------------- torchtitan


def _overrides(text: str) -> dict[str, str | None]:
    """The exported bash array as {flag: value}, the checkpointing subcommand as a key."""
    words = shlex.split(text.split("=(\n", 1)[1].rsplit("\n)", 1)[0])
    out: dict[str, str | None] = {}
    for word in words:
        if word.startswith("--") or ":" in word:
            out[word], last = None, word
        else:
            out[last] = word if out[last] is None else f"{out[last]} {word}"
    return out


def test_torchtitan_pipeline_with_fsdp_and_full_checkpointing() -> None:
    plan = _plan("tp=2,pp=2,zero=3,ckpt=full,micro_batch=2")  # dp 4: micro-batch 8
    args = _overrides(export_plan(plan, "torchtitan").text)
    assert args == {
        "--parallelism.data_parallel_replicate_degree": "1",
        "--parallelism.data_parallel_shard_degree": "4",
        "--parallelism.tensor_parallel_degree": "2",
        "--parallelism.no-enable-sequence-parallel": None,
        "--parallelism.pipeline_parallel_degree": "2",
        "--parallelism.fsdp_reshard_after_forward": "always",
        "--parallelism.pipeline_parallel_schedule": "1F1B",
        "--parallelism.pipeline_parallel_microbatch_size": "2",
        "--parallelism.module_fqns_per_model_part":
            "tok_embeddings,layers.0,layers.1,layers.2,layers.3 "
            "layers.4,layers.5,layers.6,layers.7,norm,output",
        "--training.disable_cuda_graphs": None,
        # all 8 micro-batches in one local batch of 64 / 4 samples per dp rank
        "--training.local_batch_size": "16", "--training.global_batch_size": "64",
        "--training.mixed_precision_param": "bfloat16", "activation_checkpoint:full": None}


def test_torchtitan_ddp_interleaved_and_selective() -> None:
    plan = _plan("pp=2,virtual_stages=2,ckpt=selective", world=8)
    result = export_plan(plan, "torchtitan", dtype="fp32")
    args = _overrides(result.text)
    assert args["--parallelism.data_parallel_replicate_degree"] == "4"
    assert args["--parallelism.data_parallel_shard_degree"] == "1"
    assert args["--parallelism.pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert [chunk.split(",")[0] for chunk in
            args["--parallelism.module_fqns_per_model_part"].split()] == [
        "tok_embeddings", "layers.2", "layers.4", "layers.6"]
    assert "activation_checkpoint:selective" in args
    assert args["--training.mixed_precision_param"] == "float32"
    assert any("selective" in note for note in result.notes)


def test_torchtitan_without_pipeline_accumulates_over_micro_batches() -> None:
    args = _overrides(export_plan(_plan("dp=8,tp=2,zero=3,sequence_parallel=true"),
                                  "torchtitan").text)
    assert "--parallelism.pipeline_parallel_schedule" not in args
    assert "--parallelism.enable_sequence_parallel" in args
    assert args["--parallelism.fsdp_reshard_after_forward"] == "always"
    assert args["--training.local_batch_size"] == "1"  # x dp 8 x 8 steps = 64
    assert "activation_checkpoint:none" in args


# --------------------------------------------------------------------------- Megatron-LM


def _megatron_args(text: str) -> list[str]:
    body = text.split("AUTOPLAN_PARALLEL_ARGS=(\n")[1].split("\n)")[0]
    return " ".join(body.split()).split(" ")


def test_megatron_arguments_for_an_interleaved_plan() -> None:
    plan = _plan("tp=2,pp=2,virtual_stages=2,sequence_parallel=true,zero=1,ckpt=full,"
                 "micro_batch=2")
    args = _megatron_args(export_plan(plan, "megatron").text)
    assert args == ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "2", "--sequence-parallel",
                    "--micro-batch-size", "2", "--global-batch-size", "64",
                    "--recompute-granularity", "full", "--recompute-method", "uniform",
                    "--recompute-num-layers", "1", "--use-distributed-optimizer", "--bf16"]


def test_megatron_selective_fp16_and_gpipe_note() -> None:
    result = export_plan(_plan("pp=2,ckpt=selective,schedule=gpipe", world=2), "megatron",
                         dtype="fp16")
    args = _megatron_args(result.text)
    assert args[-3:] == ["--recompute-granularity", "selective", "--fp16"]
    assert "--use-distributed-optimizer" not in args
    assert any("GPipe" in note for note in result.notes)


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_json() -> None:
    config = json.loads(export_plan(_plan("dp=8,tp=2,zero=2,micro_batch=2", batch=128),
                                    "deepspeed").text)
    assert config == {"train_batch_size": 128, "train_micro_batch_size_per_gpu": 2,
                      "gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2},
                      "bf16": {"enabled": True}, "fp16": {"enabled": False},
                      "tensor_parallel": {"autotp_size": 2}}
    assert (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
            * 8 == config["train_batch_size"])


def test_deepspeed_notes_that_checkpointing_is_the_models_job() -> None:
    result = export_plan(_plan("zero=3,ckpt=full", world=4), "deepspeed")
    assert json.loads(result.text)["zero_optimization"] == {"stage": 3}
    assert any("deepspeed.checkpointing" in note for note in result.notes)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("target", ["torchtitan", "megatron", "deepspeed"])
def test_layers_with_another_tp_are_refused_by_name(target: str) -> None:
    plan = _with_layers(_plan("tp=2,zero=1,micro_batch=2", world=8), ("tok_embeddings", "output"),
                        dp=8,
                        tp=1)
    with pytest.raises(AutoplanError) as err:
        export_plan(plan, target)
    message = str(err.value)
    assert "tok_embeddings, output" in message and "dp 8" in message
    assert "cannot express" in message and "\n" not in message


def test_checkpointing_is_compared_over_the_blocks_only() -> None:
    plan = _with_layers(_plan("ckpt=full,zero=1", world=8), ("tok_embeddings", "norm"),
                        checkpoint="none")
    assert "activation_checkpoint:full" in export_plan(plan, "torchtitan").text
    plan = _with_layers(plan, ("layers.3",), checkpoint="selective")
    with pytest.raises(AutoplanError, match="layers layers.3 have checkpoint selective"):
        export_plan(plan, "megatron")


def test_uneven_stages_are_refused_by_megatron_but_not_torchtitan() -> None:
    plan = _plan("pp=2,zero=1", world=8)
    uneven = Plan.model_validate(plan.model_dump() | {"stage_boundaries": [0, 4]})
    with pytest.raises(AutoplanError, match="hold 3, 5 blocks.*splits the blocks evenly"):
        export_plan(uneven, "megatron")
    args = _overrides(export_plan(uneven, "torchtitan").text)
    assert args["--parallelism.module_fqns_per_model_part"].split()[1].startswith("layers.3,")


@pytest.mark.parametrize("target,shorthand,dtype,reason", [
    ("deepspeed", "pp=2", "bf16", "pp 2"),
    ("deepspeed", "tp=2,sequence_parallel=true", "bf16", "sequence parallelism"),
    ("deepspeed", "tp=2,zero=3", "bf16", "tp 2 with zero 3"),
    ("megatron", "zero=2", "bf16", "zero 2"),
    ("megatron", "pp=2,zero=3", "bf16", "zero 3 with pp 2"),
    ("torchtitan", "zero=1", "fp16", "bf16 or fp32, not fp16"),
])
def test_what_a_target_cannot_run_is_refused(target: str, shorthand: str, dtype: str,
                                             reason: str) -> None:
    with pytest.raises(AutoplanError, match=reason):
        export_plan(_plan(shorthand, world=8), target, dtype)


# --------------------------------------------------------------------------- CLI


def test_export_cli_prints_or_writes(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    _plan("tp=2,pp=2,zero=1").save(path)
    assert main(["export", str(path), "--to", "torchtitan"]) == 0
    out = capsys.readouterr()
    assert "--parallelism.tensor_parallel_degree 2" in out.out and "zero 1" in out.err
    target = tmp_path / "ds" / "megatron.sh"
    assert main(["export", str(path), "--to", "megatron", "-o", str(target)]) == 0
    assert "--pipeline-model-parallel-size 2" in target.read_text()
    assert f"wrote {target}" in capsys.readouterr().err


def test_export_cli_refusal_is_one_line_status_2(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    _plan("pp=2").save(path)
    assert main(["export", str(path), "--to", "deepspeed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoplan export: error: DeepSpeed 0.19.8 cannot express this plan: "
                          "pp 2")
    assert err.endswith("`autoplan search --for deepspeed` finds the fastest plan DeepSpeed "
                        "0.19.8 can run")
    assert len(err.splitlines()) == 1
    assert main(["export", str(tmp_path / "none.json"), "--to", "megatron"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_checkpointing_outside_the_blocks_is_noted_not_refused() -> None:
    plan = _with_layers(_plan("ckpt=full,zero=1", world=8), ("norm", "output"),
                        checkpoint="none")  # the embedding keeps the shorthand's "full"
    for target in ("torchtitan", "megatron", "deepspeed"):
        notes = export_plan(plan, target).notes
        assert any("checkpoints tok_embeddings besides the blocks" in n for n in notes)


@pytest.mark.parametrize("target", ["torchtitan", "megatron", "deepspeed"])
def test_a_refusal_points_at_search_for(target: str) -> None:
    plan = _with_layers(_plan("tp=2,zero=1,micro_batch=2", world=8), ("output",), dp=8, tp=1)
    with pytest.raises(AutoplanError, match=f"`autoplan search --for {target}` finds the "
                                            "fastest plan"):
        export_plan(plan, target)
