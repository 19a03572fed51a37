"""Issue 9, "Bad input": a corpus of malformed and impossible inputs for every command.

Each case must end with exit status 2 and exactly one line on stderr that names the problem
(a key word is checked) and, where there are valid choices, lists them; never a traceback.
Everything runs in-process through main() on gpt-tiny or on synthetic graph.json files, so
no case traces a large model or starts a worker process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoplan.app.cli import main
from autoplan.cluster import parse_cluster_spec
from autoplan.cost_model.analytic import analytic_profile
from autoplan.graph import GRAPH_FORMAT_VERSION
from autoplan.plan import uniform_plan
from autoplan.profile import PROFILE_FORMAT_VERSION
from tests.graphs import synthetic_graph

CLUSTER = "h100-sxm:gpus=8"


def _with(path: Path, **changes: object) -> None:
    """Rewrite the JSON document at `path` with top-level keys changed."""
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | changes))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Valid and broken documents, by the placeholder names the cases use."""
    root = tmp_path_factory.mktemp("bad-input")
    graph, other = synthetic_graph(), synthetic_graph(4, "other")
    cluster = parse_cluster_spec(CLUSTER)
    graph.save(root / "graph.json")
    other.save(root / "other_graph.json")
    uniform_plan("dp=8", graph, 8, 16).save(root / "plan.json")
    uniform_plan("dp=8", other, 8, 16).save(root / "other_model_plan.json")
    uniform_plan("dp=16", graph, 16, 16).save(root / "world16_plan.json")
    uniform_plan("dp=8", graph, 8, 64).save(root / "batch64_plan.json")
    analytic_profile(graph, cluster).save(root / "profile.json")
    analytic_profile(other, cluster).save(root / "other_profile.json")
    (root / "cluster.json").write_text(json.dumps(cluster.to_dict()))
    for name in ("graph", "plan", "profile", "cluster"):
        (root / f"{name}_v2.json").write_text((root / f"{name}.json").read_text())
        _with(root / f"{name}_v2.json", version=2)
        (root / f"{name}_v0.json").write_text((root / f"{name}.json").read_text())
        _with(root / f"{name}_v0.json", version=0)
    (root / "graph_next.json").write_text((root / "graph.json").read_text())
    _with(root / "graph_next.json", version=GRAPH_FORMAT_VERSION + 1)
    (root / "profile_next.json").write_text((root / "profile.json").read_text())
    _with(root / "profile_next.json", version=PROFILE_FORMAT_VERSION + 1)  # graphs etc. at 1
    (root / "plan_zero_world.json").write_text((root / "plan.json").read_text())
    _with(root / "plan_zero_world.json", world_size=0)
    (root / "plan_bad_batch.json").write_text((root / "plan.json").read_text())
    _with(root / "plan_bad_batch.json", global_batch=17)
    graph_data = json.loads((root / "graph.json").read_text())
    graph_data["nodes"][0]["params"] = "many"
    (root / "graph_bad_type.json").write_text(json.dumps(graph_data))
    del graph_data["nodes"]
    (root / "graph_no_nodes.json").write_text(json.dumps(graph_data))
    (root / "not_json.json").write_text("{this is not json")
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "dir.json").mkdir()
    (root / "empty_dir").mkdir()
    (root / "a_file").write_text("x")
    names = {p.stem: str(p) for p in root.iterdir()}
    return names | {"missing": str(root / "missing.json"), "root": str(root),
                    "out": str(root / "out"), "under_file": str(root / "a_file" / "sub")}


def _argv(base: list[str], overrides: dict[str, str | None], files: dict[str, str]) -> list[str]:
    """`base` with each option in `overrides` replaced (None: dropped), placeholders filled."""
    argv, i = [], 0
    while i < len(base):
        item = base[i]
        if item in overrides:
            i += 2
            continue
        argv.append(item)
        i += 1
    for key, value in overrides.items():
        if key.startswith("+"):  # a flag: "+--json": "" appends --json
            argv.append(key[1:])
        elif value is not None:
            argv += [key, value]
    return [part.format(**files) for part in argv]


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse usage errors
        return int(stop.code)


def check_one_line_error(argv: list[str], words: list[str], capsys) -> str:
    status = _status(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (argv, status, captured.err)
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1, (argv, captured.err)
    for word in words:
        assert word in lines[0], (argv, word, lines[0])
    return lines[0]


BASES = {
    "inspect": ["inspect", "--model", "gpt-tiny"],
    "profile": ["profile", "--model", "gpt-tiny", "--mode", "analytic", "--cluster", CLUSTER,
                "-o", "{out}"],
    "estimate": ["estimate", "--model", "{graph}", "--cluster", CLUSTER, "--global-batch", "16",
                 "--plan", "dp=8"],
    "search": ["search", "--model", "{graph}", "--cluster", CLUSTER, "--global-batch", "16",
               "--time-limit", "5"],
    "run": ["run", "--model", "gpt-tiny", "--plan", "dp=1", "--steps", "1"],
}

PRESET_CHOICES = ["gpt-tiny", "llama3-405b", "gpt", "llama", "hf", "module"]
CLUSTER_CHOICES = ["a100-40g", "a100-80g", "h100-sxm", "h200", "local-cpu"]

# Shared by every command that takes --model (a spec, not a graph file).
MODEL_CASES = [
    ({"--model": "bert-large"}, ["unknown model 'bert-large'", *PRESET_CHOICES]),
    ({"--model": ""}, ["unknown model ''", *PRESET_CHOICES]),
    ({"--model": "gpt:layers=2"}, ["missing", "hidden", "heads"]),
    ({"--model": "gpt-tiny:layers=0"}, ["layers must be at least 1"]),
    ({"--model": "gpt-tiny:layers=-3"}, ["layers must be at least 1"]),
    ({"--model": "gpt-tiny:layers=two"}, ["layers must be an integer", "'two'"]),
    ({"--model": "gpt-tiny:layers=1.5"}, ["layers must be an integer"]),
    ({"--model": "gpt-tiny:layers=" + "9" * 5000}, ["layers must be an integer"]),
    ({"--model": "gpt-tiny:depth=3"}, ["unknown key 'depth'", "layers", "hidden", "vocab"]),
    ({"--model": "gpt-tiny:layers=2,layers=3"}, ["given twice"]),
    ({"--model": "gpt-tiny:layers"}, ["is not key=value"]),
    ({"--model": "gpt-tiny:heads=3"}, ["not divisible by heads 3"]),
    ({"--model": "gpt-tiny:dropout=1.5"}, ["dropout must be in [0, 1)"]),
    ({"--model": "gpt-tiny:dropout=nan"}, ["dropout"]),
    ({"--model": "gpt-tiny:dropout=inf"}, ["dropout", "finite"]),
    ({"--model": "llama-tiny:kv_heads=3"}, ["not divisible by kv_heads 3"]),
    ({"--model": "llama-tiny:hidden=12,heads=4,kv_heads=2"}, ["even head dim"]),
    ({"--model": "hf:"}, ["needs a path"]),
    ({"--model": "hf:{missing}"}, ["no such file"]),
    ({"--model": "hf:{graph},seq=0"}, ["seq must be at least 1"]),
    ({"--model": "module:os"}, ["module:package.module:factory"]),
    ({"--model": "module:os.path:join()"}, ["module:package.module:factory"]),
    ({"--model": "module:os..path:join"}, ["not a dotted module name"]),
    ({"--model": "module:autoplan_no_such_package:build"}, ["autoplan_no_such_package"]),
    ({"--model": "module:tests.core.factories:build_that_raises"},
     ["model factory tests.core.factories:build_that_raises raised RuntimeError: CUDA out of"]),
    ({"--model": "module:os.path:join,seq=64"}, ["module: spec takes no options", "seq=64"]),
]

# Shared by every command that takes --cluster.
CLUSTER_CASES = [
    ({"--cluster": "tpu-v5:nodes=2"}, ["unknown cluster 'tpu-v5'", *CLUSTER_CHOICES]),
    ({"--cluster": "h100-sxm:nodes=0"}, ["nodes must be at least 1"]),
    ({"--cluster": "h100-sxm:nodes=-1"}, ["nodes must be at least 1"]),
    ({"--cluster": "h100-sxm:nodes=x"}, ["nodes must be an integer"]),
    ({"--cluster": "h100-sxm:gpus=12"}, ["12 devices do not fill nodes of 8"]),
    ({"--cluster": "h100-sxm:nodes=2,gpus=16"}, ["give one of nodes, gpus or procs"]),
    ({"--cluster": "h100-sxm:racks=2"}, ["unknown key 'racks'", "nodes", "gpus", "procs"]),
    ({"--cluster": "h100-sxm:gpus_per_node=0"}, ["gpus_per_node must be at least 1"]),
    ({"--cluster": "h100-sxm:nodes=" + "1" * 30}, ["nodes", "at most"]),
    ({"--cluster": "{missing}"}, ["cannot be read"]),
    ({"--cluster": "{not_json}"}, ["is not JSON"]),
    ({"--cluster": "{list}"}, ["holds no cluster"]),
    ({"--cluster": "{dir}"}, ["cannot be read"]),
    ({"--cluster": "{cluster_v2}"}, ["format version 2", "reads version 1"]),
    ({"--cluster": "{plan}"}, ["malformed"]),
]

# Shared by commands that take a plan (shorthand or file) for the 8-GPU synthetic graph.
PLAN_CASES = [
    ({"--plan": "dp=3"}, ["dp 3 x tp 1 x pp 1 = 3", "8 devices"]),
    ({"--plan": "tp=3"}, ["tp 3 x pp 1 does not divide the 8 devices"]),
    ({"--plan": "dp=0"}, ["plan dp must be at least 1"]),
    ({"--plan": "dp=-8"}, ["plan dp must be at least 1"]),
    ({"--plan": "dp=eight"}, ["plan dp must be an integer"]),
    ({"--plan": "dp=8.0"}, ["plan dp must be an integer"]),
    ({"--plan": "dp=8,fsdp=1"}, ["unknown key 'fsdp'", "dp", "tp", "pp", "micro_batch"]),
    ({"--plan": "dp=8,ckpt=some"}, ["ckpt 'some'", "none", "selective", "full"]),
    ({"--plan": "dp=8,schedule=zb"}, ["schedule 'zb'", "gpipe", "1f1b", "interleaved_1f1b"]),
    ({"--plan": "dp=8,zero=4"}, ["zero must be 0, 1, 2 or 3"]),
    ({"--plan": "dp=8,sequence_parallel=maybe"}, ["must be true or false"]),
    ({"--plan": "dp=8,sequence_parallel=true"}, ["sequence_parallel needs tp > 1"]),
    ({"--plan": "dp=8,micro_batch=3"}, ["does not divide into micro-batches"]),
    ({"--plan": "pp=8,dp=1,virtual_stages=2"}, ["16 pipeline chunks need at least 16 layers"]),
    ({"--plan": "dp=8,virtual_stages=2,schedule=1f1b"}, ["interleaved_1f1b"]),
    ({"--plan": "dp=" + "8" * 40}, ["dp", "8 devices"]),
    ({"--plan": "dp=8,dp=8"}, ["given twice"]),
    ({"--plan": "=8"}, ["is not key=value"]),
    ({"--plan": "{missing}"}, ["cannot be read"]),
    ({"--plan": "{not_json}"}, ["Invalid JSON"]),
    ({"--plan": "{empty}"}, ["plan file"]),
    ({"--plan": "{list}"}, ["plan file"]),
    ({"--plan": "{dir}"}, ["cannot be read"]),
    ({"--plan": "{plan_v2}"}, ["plan format version 2", "reads version 1"]),
    ({"--plan": "{plan_v0}"}, ["plan format version 0", "reads version 1"]),
    ({"--plan": "{plan_zero_world}"}, ["world_size", "greater than or equal to 1"]),
    ({"--plan": "{plan_bad_batch}"}, ["must equal global_batch 17"]),
    ({"--plan": "{world16_plan}"}, ["16 devices", "8"]),
    ({"--plan": "{batch64_plan}"}, ["global batch 64"]),
    ({"--plan": "{other_model_plan}"}, ["plan is for model other"]),
]

# --profile for the synthetic graph.
PROFILE_CASES = [
    ({"--profile": "{missing}"}, ["cannot be read"]),
    ({"--profile": "{empty_dir}"}, ["cannot be read"]),
    ({"--profile": "{not_json}"}, ["is not JSON"]),
    ({"--profile": "{list}"}, ["profile", "valid dictionary"]),
    ({"--profile": "{dir}"}, ["cannot be read"]),
    ({"--profile": "{profile_next}"}, [f"profile format version {PROFILE_FORMAT_VERSION + 1}",
                                         f"reads version {PROFILE_FORMAT_VERSION}"]),
    ({"--profile": "{plan}"}, ["profile", "mode"]),
    ({"--profile": "{other_profile}"}, ["is of model other"]),
]

# --model as a saved graph.json.
GRAPH_CASES = [
    ({"--model": "{missing}"}, ["cannot be read"]),
    ({"--model": "{dir}"}, ["cannot be read"]),
    ({"--model": "{not_json}"}, ["is not JSON"]),
    ({"--model": "{empty}"}, ["is not JSON"]),
    ({"--model": "{list}"}, ["layer graph"]),
    ({"--model": "{graph_next}"}, ["layer graph", f"format version {GRAPH_FORMAT_VERSION + 1}",
                                   f"reads version {GRAPH_FORMAT_VERSION}"]),
    ({"--model": "{graph_v0}"}, ["layer graph", "format version 0",
                                 f"reads version {GRAPH_FORMAT_VERSION}"]),
    ({"--model": "{graph_bad_type}"}, ["params", "many"]),
    ({"--model": "{graph_no_nodes}"}, ["nodes"]),
    ({"--model": "{plan}"}, ["layer graph"]),
    ({"--model": "{graph}", "--seq": "128"}, ["--seq applies to a model spec"]),
]

NUMBER_CASES = {  # option -> bad values; every one must be refused with the option named
    "--global-batch": ["0", "-16", "1.5", "many"],
    "--memory-limit": ["0", "-1", "nan", "inf", "1e400", "x"],
    "--seq": ["0", "-5", "1e3"],
}


def _number_cases(command: str, options: list[str]) -> list:
    out = []
    for option in options:
        for value in NUMBER_CASES[option]:
            out.append(({option: value}, [option.lstrip("-").split("-")[0]]))
    return out


CASES: dict[str, list] = {
    "models": [
        ({"+--bogus": ""}, ["unrecognized arguments: --bogus"]),
    ],
    "inspect": [
        *MODEL_CASES,
        ({"--dtype": "fp8"}, ["invalid choice: 'fp8'", "bf16", "fp16", "fp32"]),
        ({"--attention": "sdpa"}, ["invalid choice: 'sdpa'", "flash", "math"]),
        ({"--plan": "dp=2", "--world-size": "2", "--global-batch": "3"},
         ["global batch 3 does not divide"]),
        ({"--plan": "dp=2"}, ["needs the model, the world size and the global batch"]),
        ({"--plan": "dp=2", "--world-size": "0", "--global-batch": "4"},
         ["world size 0", "at least 1"]),
        ({"--plan": "dp=2", "--world-size": "-2", "--global-batch": "4"}, ["world size -2"]),
        ({"--plan": "dp=2", "--world-size": "two", "--global-batch": "4"},
         ["--world-size", "invalid int value"]),
        ({"--plan": "dp=2", "--world-size": "2", "--global-batch": "0"}, ["global batch 0"]),
        ({"--plan": "tp=8", "--world-size": "8", "--global-batch": "8"},
         ["layer h.0: tp 8 does not divide 4 of the sizes it splits"]),
        ({"--plan": "pp=16", "--world-size": "16", "--global-batch": "32"},
         ["16 pipeline chunks need at least 16 layers"]),
        ({"--plan": "{plan}"}, ["plan is for model synthetic"]),
        ({"--plan": "{plan_v2}"}, ["plan format version 2", "reads version 1"]),
        ({"--plan": "{not_json}"}, ["Invalid JSON"]),
        ({"--plan": "{dir}"}, ["cannot be read"]),
        ({"--plan": "{missing}"}, ["cannot be read"]),
        ({"-o": "{under_file}"}, ["a_file"]),
    ],
    "profile": [
        *MODEL_CASES,
        *CLUSTER_CASES,
        ({"--mode": "guess"}, ["invalid choice: 'guess'", "measure", "analytic"]),
        ({"--cluster": None}, ["--mode analytic needs --cluster"]),
        ({"--micro-batches": "1,two"}, ["--micro-batches must be integers"]),
        ({"--micro-batches": "0"}, ["--micro-batches must list integers >= 1"]),
        ({"--micro-batches": ","}, ["--micro-batches must list integers >= 1"]),
        ({"--tp": "-2"}, ["--tp must list integers >= 1"]),
        ({"--tp": "1.5"}, ["--tp must be integers"]),
        ({"--nproc": "0"}, ["--nproc"]),
        ({"--repeats": "0"}, ["--repeats"]),
        ({"--warmup": "-1"}, ["--warmup"]),
        ({"--threads": "0"}, ["--threads must be >= 1"]),
        ({"--comm-sizes": "-1024"}, ["--comm-sizes must list byte counts >= 1"]),
        ({"--dtype": "int8"}, ["invalid choice: 'int8'", "bf16", "fp16", "fp32"]),
        ({"--device": "tpu"}, ["device 'tpu' is not cpu or cuda"]),
        ({"-o": "{under_file}"}, ["a_file"]),
        ({"-o": None}, ["the following arguments are required: -o/--output"]),
    ],
    "estimate": [
        *[case for case in MODEL_CASES if "{graph}" not in case[0]["--model"]],
        *GRAPH_CASES,
        *CLUSTER_CASES,
        *PLAN_CASES,
        *PROFILE_CASES,
        *_number_cases("estimate", ["--global-batch", "--memory-limit", "--seq"]),
        ({"--global-batch": "12"}, ["global batch 12 does not divide"]),
        ({"--optimizer": "lion"}, ["invalid choice: 'lion'", "adamw", "sgd"]),
        ({"--cluster": "local-cpu:procs=8"}, ["no datasheet figures", "--profile"]),
        ({"--plan": None}, ["the following arguments are required: --plan"]),
    ],
    "search": [
        *[case for case in MODEL_CASES if "{graph}" not in case[0]["--model"]],
        *GRAPH_CASES,
        *CLUSTER_CASES,
        *PROFILE_CASES,
        *_number_cases("search", ["--global-batch", "--memory-limit", "--seq"]),
        ({"--global-batch": "7", "--fix": "dp=8"}, ["no plan exists"]),
        ({"--model": "gpt-tiny:seq=64", "--seq": "32"}, ["--seq 32", "seq=64", "differ"]),
        ({"--model": "module:tests.zoo.resnet:build_resnet", "--seq": "32"},
         ["module: spec takes no seq", "leave --seq out"]),
        ({"--cluster": "local-cpu:procs=8"}, ["no datasheet figures", "autoplan profile "
                                              "--model synthetic --nproc 8 -o profile-8",
                                              "--profile profile-8 --dtype fp32"]),
        ({"--global-batch": str(10**30)}, ["global", "at most"]),
        ({"--cluster": "h100-sxm:nodes=1000000000"}, ["at most"]),
        ({"--memory-limit": "0.001"}, ["no plan fits in 0.0 GiB", "needs"]),
        ({"--solver": "cplex"}, ["invalid choice: 'cplex'", "auto", "ilp", "dp"]),
        ({"--max-tp": "0"}, ["--max-tp must be at least 1"]),
        ({"--top-k": "-1"}, ["--top-k must be >= 0"]),
        ({"--time-limit": "0"}, ["--time-limit"]),
        ({"--time-limit": "nan"}, ["--time-limit"]),
        ({"--time-limit": "-inf"}, ["--time-limit"]),
        ({"--fix": "pp=0"}, ["--fix pp must be at least 1"]),
        ({"--fix": "zero=7"}, ["--fix zero must be 0 to 3"]),
        ({"--fix": "zero=-1"}, ["--fix zero must be at least 0"]),
        ({"--fix": "ckpt=half"}, ["ckpt 'half'", "none", "selective", "full"]),
        ({"--fix": "schedule=zb"}, ["schedule 'zb'", "gpipe", "1f1b", "interleaved_1f1b"]),
        ({"--fix": "sequence_parallel=2"}, ["must be true or false"]),
        ({"--fix": "fsdp=1"}, ["unknown key 'fsdp'", "pp", "tp", "zero", "ckpt"]),
        ({"--fix": "pp"}, ["is not key=value"]),
        ({"--fix": "pp=3"}, ["no plan exists"]),
        ({"-o": "{under_file}"}, ["a_file"]),
    ],
    "run": [
        *MODEL_CASES,
        *CLUSTER_CASES,
        ({"--plan": "dp=3", "--nproc": "2"}, ["dp 3 x tp 1 x pp 1 = 3", "2 devices"]),
        ({"--plan": "dp=0"}, ["plan dp must be at least 1"]),
        ({"--plan": "dp=1,ckpt=some"}, ["ckpt 'some'", "none", "selective", "full"]),
        ({"--plan": "dp=1,zero=9"}, ["zero must be 0, 1, 2 or 3"]),
        ({"--plan": "tp=3", "--nproc": "3"}, ["tp 3 does not divide"]),
        ({"--plan": "{plan}"}, ["plan is for model synthetic"]),
        ({"--plan": "{plan_v2}"}, ["plan format version 2", "reads version 1"]),
        ({"--plan": "{not_json}"}, ["Invalid JSON"]),
        ({"--plan": "{dir}"}, ["cannot be read"]),
        ({"--plan": "{missing}"}, ["cannot be read"]),
        ({"--plan": "dp=2", "--global-batch": "3"}, ["global batch 3 does not divide"]),
        ({"--steps": "0"}, ["--steps must be at least 1"]),
        ({"--steps": "-5"}, ["--steps must be at least 1"]),
        ({"--steps": "many"}, ["--steps", "invalid int value"]),
        ({"--nproc": "0"}, ["--nproc must be at least 1"]),
        ({"--warmup": "-1"}, ["--warmup must be at least 0"]),
        ({"--global-batch": "0"}, ["--global-batch must be at least 1"]),
        ({"--memory-limit": "-2"}, ["--memory-limit must be positive"]),
        ({"--memory-limit": "nan"}, ["--memory-limit"]),
        ({"--timeout": "0"}, ["--timeout"]),
        ({"--timeout": "nan"}, ["--timeout"]),
        ({"--seed": "-1"}, ["--seed"]),
        ({"--seed": str(2**70)}, ["--seed"]),
        ({"--device": "tpu"}, ["invalid choice: 'tpu'", "cpu", "cuda"]),
        ({"--profile": "{missing}"}, ["cannot be read"]),
        ({"--profile": "{profile_next}"}, [f"profile format version {PROFILE_FORMAT_VERSION + 1}",
                                         f"reads version {PROFILE_FORMAT_VERSION}"]),
        ({"--profile": "{profile}"}, ["is of model synthetic"]),
    ],
}


def _ids(cases: dict[str, list]) -> list:
    out = []
    for command, table in cases.items():
        for overrides, words in table:
            label = ",".join(f"{k}={v}" for k, v in overrides.items())[:60]
            out.append(pytest.param(command, overrides, words, id=f"{command}:{label}"))
    return out


@pytest.mark.parametrize(("command", "overrides", "words"), _ids(CASES))
def test_bad_input_is_one_line_exit_2(command: str, overrides: dict, words: list[str],
                                      files: dict[str, str], capsys) -> None:
    base = BASES.get(command, [command])
    check_one_line_error(_argv(base, overrides, files), [w.format(**files) for w in words],
                         capsys)


@pytest.mark.parametrize("command", ["inspect", "estimate", "profile"])
def test_the_bases_are_valid(command: str, files: dict[str, str], capsys) -> None:
    """The cases above differ from these in the one option they change."""
    assert main(_argv(BASES[command], {}, files)) == 0, capsys.readouterr().err


def test_unknown_command_lists_the_commands(capsys) -> None:
    check_one_line_error(["deploy"], ["invalid choice: 'deploy'", "inspect", "search", "run"],
                         capsys)


def test_a_newline_in_the_input_stays_on_one_line(capsys) -> None:
    check_one_line_error(["inspect", "--model", "gpt\nfoo"], ["unknown model"], capsys)


def test_debug_shows_the_traceback(files: dict[str, str]) -> None:
    from autoplan.errors import AutoplanError

    with pytest.raises(AutoplanError, match="unknown model"):
        main(["--debug", "inspect", "--model", "bert-large"])
