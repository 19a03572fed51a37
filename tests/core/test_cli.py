"""The command line: commands, output shapes, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoplan.app.cli import main
from autoplan.graph import LayerGraph
from autoplan.plan import load_plan

COMMANDS = ["profile", "search", "estimate", "run", "validate", "plot", "export", "inspect",
            "models"]


def _autoplan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoplan", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_command() -> None:
    out = _autoplan("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_the_cli_offers_every_trainer_and_starts_without_the_plan_model() -> None:
    from autoplan.app import cli
    from autoplan.trainers import TRAINERS

    assert cli._TRAINERS == tuple(TRAINERS)
    code = ("import sys; from autoplan.app.cli import _parser; _parser(); "
            "print('autoplan.plan' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_bad_model_is_one_line_exit_2_without_traceback() -> None:
    out = _autoplan("inspect", "--model", "gpt:layers=2,hidden=10,heads=3,seq=4,vocab=8")
    assert out.returncode == 2
    assert out.stderr.strip() == ("autoplan inspect: error: model spec "
                                  "'gpt:layers=2,hidden=10,heads=3,seq=4,vocab=8': "
                                  "hidden 10 is not divisible by heads 3")
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err


def test_inspect_json(capsys) -> None:
    assert main(["inspect", "--model", "gpt-small-test", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == sum(layer["params"] for layer in data["layers"])
    assert data["flops_per_token"] == pytest.approx(
        sum(layer["flops_per_token"] for layer in data["layers"]))
    assert [layer["kind"] for layer in data["layers"]].count("block") == 4
    assert {"name", "kind", "params", "flops_per_token", "act_bytes_per_token",
            "output_shape"} <= set(data["layers"][0])


def test_inspect_table_groups_repeated_blocks(capsys) -> None:
    assert main(["inspect", "--model", "gpt-small-test"]) == 0
    out = capsys.readouterr().out
    assert "h.0 .. h.3" in out and "total" in out and "867K" in out


def test_inspect_checks_and_writes_a_plan(tmp_path, capsys) -> None:
    args = ["inspect", "--model", "llama-tiny", "--plan", "tp=2,pp=2,ckpt=full",
            "--world-size", "8", "--global-batch", "16", "-o", str(tmp_path)]
    assert main(args) == 0
    assert "plan: 8 devices, pp 2" in capsys.readouterr().out
    graph = LayerGraph.load(tmp_path / "graph.json")
    plan = load_plan(str(tmp_path / "plan.json"))
    assert plan.model_hash == graph.structural_hash and plan.layers[1].checkpoint == "full"
    # The written plan is read back and checked against the model, with no shorthand context.
    assert main(["inspect", "--model", "llama-tiny", "--plan", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["inspect", "--model", "gpt-tiny", "--plan", str(tmp_path / "plan.json")]) == 2
    assert "plan is for model llama-tiny" in capsys.readouterr().err


def test_inspect_refuses_tp_that_does_not_divide_heads(capsys) -> None:
    args = ["inspect", "--model", "llama-tiny", "--plan", "tp=4", "--world-size", "4",
            "--global-batch", "4"]
    assert main(args) == 2
    assert "layer layers.0: tp 4 does not divide 2 of the sizes it splits (2, 4, 32, 64, 176" \
        in capsys.readouterr().err


def test_models_json_lists_presets(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"gpt3-1.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b", "llama3-8b", "llama3-70b",
            "llama3-405b", "gpt-tiny", "llama-tiny"} <= set(rows)
    assert rows["llama3-8b"]["params"] == 8_030_261_248


def test_inspecting_and_profiling_llama3_405b_stays_under_2_gb(tmp_path) -> None:
    # Memory, not time, is asserted here (time is noisy; benchmarks/inspect_speed.py and
    # benchmarks/results/resources.md measure it). The 2 GB bound is issue 9's. An analytic
    # profile traces the model first, so one process covers both.
    code = ("import resource, sys; from autoplan.app.cli import main; rc = main(['profile', "
            f"'--model', 'llama3-405b', '--mode', 'analytic', '--cluster', "
            f"'h100-sxm:nodes=16', '-o', {str(tmp_path)!r}]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    peak_kib = int(out.stderr.strip().splitlines()[-1])
    assert peak_kib * 1024 < 2e9
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["model"] == "llama3-405b" and profile["mode"] == "analytic"


def test_unwritable_output_is_one_line(capsys) -> None:
    assert main(["inspect", "--model", "gpt-tiny", "-o", "/proc/autoplan-cannot-write"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoplan inspect: error:") and len(err.splitlines()) == 1
