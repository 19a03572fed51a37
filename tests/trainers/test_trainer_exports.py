"""`autoplan export` read back by the trainers' own parsers, and `search --for` plans
exported and read back.

The trainers live in a test-only environment, .venv-trainers (tests/trainers/requirements.txt,
made by `make test`; see the Makefile for why it is apart from .venv): each parse runs there
as one subprocess per trainer, every case at once (importing torchtitan takes seconds).
Without that environment these tests skip, unless AUTOPLAN_TRAINERS_PYTHON names it, as
`make test` does: then a missing one fails.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from autoplan.app.export import export_plan
from autoplan.cluster import parse_cluster_spec
from autoplan.launch import free_port
from autoplan.plan import Plan, uniform_plan
from autoplan.search import Searcher, SearchOptions
from autoplan.trainers import block_indices
from autoplan.workload import load_graph
from tests.zoo import ZOO

pytestmark = pytest.mark.trainers

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ENV = "AUTOPLAN_TRAINERS_PYTHON"
LLAMA = "llama:layers=8,hidden=64,heads=4,kv_heads=2,ffn=128,seq=64,vocab=256"
"""The zoo's Llama names its modules as torchtitan's llama3 does (tok_embeddings, layers.N,
norm, output): its stage FQNs are torchtitan's own."""


@pytest.fixture(scope="module")
def trainers_python() -> str:
    given = os.environ.get(ENV)
    path = Path(given).absolute() if given else ROOT / ".venv-trainers" / "bin" / "python"
    if not path.exists():
        if given:
            pytest.fail(f"{ENV}={given} does not exist: `make test` builds it")
        pytest.skip("no .venv-trainers (make test builds it)")
    return str(path)


def _read_back(python: str, script: str, cases: list[dict], *args: str) -> list[dict]:
    done = subprocess.run([python, str(HERE / script), *args], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bash_array(text: str) -> list[str]:
    body = text.split("=(\n", 1)[1].rsplit("\n)", 1)[0]
    return shlex.split(body)


def _plan(shorthand: str, world: int, batch: int, model: str = LLAMA) -> Plan:
    return uniform_plan(shorthand, load_graph(model), world, batch, f"h100-sxm:gpus={world}")


def _found(model: str, gpus: int, batch: int, trainer: str) -> Plan:
    graph = load_graph(model)
    options = SearchOptions(global_batch=batch, trainer=trainer)
    result = Searcher(graph, parse_cluster_spec(f"h100-sxm:gpus={gpus}"), options).run()
    assert result.trainer is not None and result.trainer.estimate.fits
    return result.trainer.plan


# Plans of the zoo's Llama (torchtitan's names) and of transformers' Mistral and Qwen2 from
# configs, with each knob the trainers take set at least once.
SHORTHANDS = {
    "torchtitan": [("tp=2,pp=2,zero=3,ckpt=full,micro_batch=4", 16, 64),
                   ("pp=2,virtual_stages=2,micro_batch=2", 8, 32),
                   ("tp=2,sequence_parallel=true,zero=2,micro_batch=2", 4, 16),
                   ("pp=2,schedule=gpipe,ckpt=selective", 2, 8)],
    "megatron": [("tp=2,pp=2,virtual_stages=2,sequence_parallel=true,zero=1,ckpt=full,"
                  "micro_batch=2", 16, 64),
                 ("zero=3,ckpt=selective,micro_batch=4", 4, 16),
                 ("tp=4,pp=2,micro_batch=1", 8, 8)],
    "deepspeed": [("tp=2,zero=2,micro_batch=4", 8, 32), ("zero=3,micro_batch=2", 8, 16),
                  ("zero=1,micro_batch=2", 2, 8)],
}


def _cases(trainer: str) -> list[Plan]:
    plans = [_plan(s, world, batch) for s, world, batch in SHORTHANDS[trainer]]
    if trainer == "torchtitan":  # it takes any cut: stages of 3 and 5 blocks
        even = _plan("tp=2,pp=2,micro_batch=2", 8, 16)
        plans.append(Plan.model_validate(even.model_dump() | {"stage_boundaries": [0, 4]}))
    plans += [_found(ZOO[name].spec, 8, 16, trainer) for name in ("mistral", "qwen2")]
    plans.append(_found("llama3-8b", 64, 512, trainer))
    return plans


def _chunks(plan: Plan) -> list[list[str]]:
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    return [[lp.name for lp in plan.layers[a:b] if lp.name != "loss"]
            for a, b in zip(bounds, bounds[1:], strict=False)]


def _knobs(plan: Plan) -> dict:
    first = plan.layers[block_indices([lp.name for lp in plan.layers])[0]]
    return {"dp": first.dp, "tp": first.tp, "sp": first.sequence_parallel, "zero": first.zero,
            "checkpoint": first.checkpoint, "per_rank": plan.micro_batch_size // first.dp}


def test_torchtitan_reads_back_every_setting(trainers_python: str) -> None:
    plans = _cases("torchtitan")
    cases = [{"module": "llama3", "config": "llama3_debugmodel", "world_size": p.world_size,
              "args": _bash_array(export_plan(p, "torchtitan").text)} for p in plans]
    # the same export on a world it does not fill: torchtitan's own check must refuse it
    cases.append(cases[0] | {"world_size": cases[0]["world_size"] * 2})
    *read, wrong = _read_back(trainers_python, "parse_torchtitan.py", cases)
    assert "Invalid parallel dims" in wrong["error"]
    classes = {"none": "none", "full": "FullAC.Config", "selective": "SelectiveAC.Config"}
    schedules = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B"}
    for plan, got in zip(plans, read, strict=True):
        assert "error" not in got, got["error"]
        k = _knobs(plan)
        sharded = k["zero"] > 0 and k["dp"] > 1
        assert (got["dp_replicate"], got["dp_shard"]) == ((1, k["dp"]) if sharded
                                                          else (k["dp"], 1))
        assert (got["tp"], got["pp"], got["sequence_parallel"]) == (k["tp"], plan.pp, k["sp"])
        assert got["reshard"] == ({3: "always"}.get(k["zero"], "never") if sharded
                                  else "default")
        assert got["checkpoint"] == classes[k["checkpoint"]]
        assert got["global_batch"] == plan.global_batch
        assert got["param_dtype"] == "bfloat16"
        if plan.pp > 1:
            assert got["schedule"] == schedules[plan.schedule]
            assert got["pipeline_micro_batch"] == k["per_rank"]
            assert got["fqns"] == _chunks(plan)
            assert got["local_batch"] == plan.global_batch // k["dp"]
        else:
            assert got["local_batch"] == k["per_rank"]


def test_megatron_core_reads_back_every_setting(trainers_python: str) -> None:
    plans = _cases("megatron")
    sizes = [_model_size(p) for p in plans]
    cases = [{"args": _bash_array(export_plan(p, "megatron").text), "world_size": p.world_size}
             | size for p, size in zip(plans, sizes, strict=True)]
    cases.append(cases[0] | {"args": [*cases[0]["args"], "--tensor-model-parallel-sizes", "2"]})
    *read, wrong = _read_back(trainers_python, "parse_megatron.py", cases)
    assert "unrecognized arguments: --tensor-model-parallel-sizes" in wrong["error"]
    for plan, got in zip(plans, read, strict=True):
        assert "error" not in got, got["error"]
        k = _knobs(plan)
        assert (got["tp"], got["pp"], got["dp"], got["sequence_parallel"]) == (
            k["tp"], plan.pp, k["dp"], k["sp"])
        assert got["virtual"] == (plan.virtual_stages if plan.virtual_stages > 1 else None)
        assert got["recompute_granularity"] == (None if k["checkpoint"] == "none"
                                                else k["checkpoint"])
        assert (got["distributed_optimizer"], got["fsdp2"]) == (k["zero"] == 1, k["zero"] == 3)
        assert (got["micro_batch"], got["global_batch"], got["micro_batches"]) == (
            k["per_rank"], plan.global_batch, plan.num_micro_batches)
        assert got["bf16"] and not got["fp16"]


def _model_size(plan: Plan) -> dict:
    """What Megatron's TransformerConfig needs besides the export: the model's size."""
    blocks = len(block_indices([lp.name for lp in plan.layers]))
    return {"num_layers": blocks, "hidden_size": 64, "num_attention_heads": 4}


def test_deepspeed_reads_back_every_setting(trainers_python: str) -> None:
    plans = _cases("deepspeed")
    cases = [{"config": json.loads(export_plan(p, "deepspeed").text), "dp": _knobs(p)["dp"]}
             for p in plans]
    cases.append({"config": cases[0]["config"] | {"gradient_accumulation_steps": 3},
                  "dp": cases[0]["dp"]})
    *read, wrong = _read_back(trainers_python, "parse_deepspeed.py", cases, str(free_port()))
    assert "Check batch related parameters" in wrong["error"]
    for plan, got in zip(plans, read, strict=True):
        assert "error" not in got, got["error"]
        k = _knobs(plan)
        assert got["world_size"] == k["dp"]
        assert (got["train_batch_size"], got["micro_batch_per_gpu"],
                got["gradient_accumulation_steps"]) == (plan.global_batch, k["per_rank"],
                                                        plan.num_micro_batches)
        assert got["zero_stage"] == k["zero"]
        assert got["autotp_size"] == (k["tp"] if k["tp"] > 1 else 0)
        assert got["bf16"] and not got["fp16"]


def test_the_trainer_environment_holds_the_named_releases(trainers_python: str) -> None:
    wanted = dict(line.split("==") for line in (HERE / "requirements.txt").read_text()
                  .splitlines() if "==" in line and not line.startswith("#"))
    script = ("import importlib.metadata as m, json, sys; "
              "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    done = subprocess.run([trainers_python, "-c", script, *wanted], capture_output=True,
                          text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == wanted
