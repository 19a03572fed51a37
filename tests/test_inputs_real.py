"""Issue 16: inputs for models that are not token LMs (hf vision, encoder and encoder-decoder
configs; factories with keyword inputs), `run --verify` that tells the truth (dropout off in
both runs, the criterion stated, BatchNorm's per-rank statistics named), and the CLI's small
traps (--seq beside a spec's seq, a profile of another dtype)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoplan.app.cli import main
from autoplan.app.run import _batch_norm_notes
from autoplan.errors import AutoplanError
from autoplan.executor.verify import DropoutOff, batch_norm_layers
from autoplan.models import build_model
from autoplan.models.spec import spec_with_seq
from autoplan.plan import uniform_plan
from autoplan.tracing import layer_graph_of_built
from tests.test_bad_input import check_one_line_error
from tests.zoo import ZOO

transformers = pytest.importorskip("transformers")

RUN_TIMEOUT_S = 300


def _autoplan(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (its run workers are real gloo ranks)."""
    return subprocess.run([sys.executable, "-m", "autoplan", *args], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, env=dict(os.environ))


# ------------------------------------------------------------------ hf: inputs from the config


def test_a_vision_config_gets_pixel_values_of_its_image_size() -> None:
    built = build_model(ZOO["vit"].spec, device="cpu")
    (pixels,) = built.example_inputs(3)
    assert built.kind == "vision" and pixels.shape == (3, 3, 32, 32)
    assert pixels.is_floating_point() and built.token_targets is None
    out = built.module(pixels)
    assert built.loss_fn(out, (pixels,)).isfinite()
    graph = layer_graph_of_built(build_model(ZOO["vit"].spec))
    assert [n.kind for n in graph.nodes].count("block") == 2


def test_an_encoder_decoder_gets_decoder_inputs_and_a_decoder_loss() -> None:
    built = build_model(ZOO["t5"].spec, device="cpu")  # seq=32: T5 has no position table
    ids, decoder_ids = built.example_inputs(2)
    assert built.kind == "encoder-decoder" and ids.shape == decoder_ids.shape == (2, 32)
    out = built.module(ids, decoder_ids)
    assert out.logits.shape == (2, 32, 128)
    assert torch.equal(built.token_targets((ids, decoder_ids)), decoder_ids.roll(-1, dims=1))
    assert built.loss_fn(out, (ids, decoder_ids)).isfinite()
    layer_graph_of_built(build_model(ZOO["t5"].spec))  # traces on meta, both inputs given


def test_a_t5_config_without_seq_is_refused_naming_what_to_pass() -> None:
    path = ZOO["t5"].spec.removeprefix("hf:").split(",")[0]
    with pytest.raises(AutoplanError, match=r"sets no max_position_embeddings.*,seq=N"):
        build_model(f"hf:{path}")


def test_an_encoder_predicts_its_own_tokens() -> None:
    built = build_model(ZOO["bert"].spec, device="cpu")
    (ids,) = built.example_inputs(2)
    assert built.kind == "encoder"
    assert type(built.module).__name__ == "BertForMaskedLM"  # not a causal LM head
    assert torch.equal(built.token_targets((ids,)), ids)
    assert built.loss_fn(built.module(ids), (ids,)).isfinite()


def test_causal_lms_keep_next_token_inputs() -> None:
    built = build_model(ZOO["gpt2"].spec, device="cpu")
    (ids,) = built.example_inputs(2)
    assert built.kind == "causal-lm" and not ids.is_floating_point()
    assert torch.equal(built.token_targets((ids,)), ids.roll(-1, dims=1))


def test_a_config_of_no_known_kind_is_refused_in_one_line(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "resnet.json"  # a vision backbone with no image_size and no vocab
    path.write_text(json.dumps({"model_type": "resnet", "hidden_sizes": [8, 16],
                                "depths": [1, 1], "embedding_size": 8}))
    with pytest.raises(AutoplanError, match="module:package.module:factory") as err:
        build_model(f"hf:{path}")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ module: keyword inputs


class _Masked(nn.Module):
    """forward(x, *, mask, scale): a positional input, a keyword tensor and a keyword flag."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, scale: float) -> torch.Tensor:
        x = self.fc(x * mask) * scale
        for block in self.blocks:
            x = x + block(x)
        return x

    def example_inputs(self, batch: int) -> tuple:
        return (torch.randn(batch, 6),), {"mask": torch.ones(batch, 6), "scale": 0.5}


def build_masked() -> nn.Module:
    """`module:tests.test_inputs_real:build_masked`: inputs as (args, kwargs)."""
    return _Masked()


@pytest.mark.parametrize("spec", ["module:tests.test_inputs_real:build_masked",
                                  ZOO["kwargs_mlp"].spec])
def test_keyword_inputs_reach_forward_by_name(spec: str) -> None:
    torch.manual_seed(0)
    built = build_model(spec, device="cpu")
    inputs = built.example_inputs(3)
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 3 for t in inputs)
    args, kwargs = _split(built.module.example_inputs(3))
    expected = type(built.module).__mro__[1].forward(built.module, *args, **kwargs)
    names = type(built.module).autoplan_input_names  # the keyword tensors, in order
    assert set(names) == {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    assert torch.equal(built.module(*args, *(kwargs[n] for n in names)), expected)
    chunk = copy.deepcopy(built.module)  # as a pipeline stage copies it
    assert torch.equal(chunk(*args, *(kwargs[n] for n in names)), expected)
    graph = layer_graph_of_built(build_model(spec))
    assert sum(n.params for n in graph.nodes) == sum(p.numel() for p in
                                                     built.module.parameters())


def _split(example: object) -> tuple[tuple, dict]:
    """(positional, keyword) inputs of an example, whichever form it takes here."""
    return ((), dict(example)) if isinstance(example, dict) else example


# ------------------------------------------------------------------ --verify: dropout, BatchNorm


class _Dropping(nn.Module):
    """Dropout three ways: a module, F.dropout with a config's probability read at call time
    (as transformers attention does) and scaled_dot_product_attention's dropout_p."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"attention_dropout": 0.3})()
        self.drop = nn.Dropout(0.2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.proj(x))
        x = F.dropout(x, p=self.config.attention_dropout, training=self.training)
        q = x.view(x.shape[0], 1, 2, 4)
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.4)


def test_dropout_off_catches_every_way_to_drop() -> None:
    torch.manual_seed(0)
    model, x = _Dropping(), torch.randn(4, 8)
    with DropoutOff() as off:
        first, second = model(x), model(x)
    model.eval()
    plain = F.scaled_dot_product_attention(*(model.proj(x).view(4, 1, 2, 4),) * 3)
    assert torch.equal(first, second) and torch.allclose(first, plain, atol=1e-6)
    assert off.seen == {"dropout": 0.3, "scaled_dot_product_attention": 0.4}
    assert "dropout turned off in both runs" in off.summary()
    model.train()
    assert not torch.equal(model(x), model(x))  # outside, dropout is the model's own again


def test_dropout_settings_stay_off_for_recomputation_outside_the_mode() -> None:
    """Activation checkpointing recomputes a block in backward, where the function mode may
    not be active: the model's own dropout settings must be 0 too."""
    torch.manual_seed(0)
    built = build_model(ZOO["gpt2_dropout"].spec, device="cpu")
    with DropoutOff(built.module) as off:
        pass
    assert {"attn_pdrop", "resid_pdrop", "nn.Dropout"} <= set(off.seen)
    (ids,) = built.example_inputs(2)
    assert built.module.training
    assert torch.equal(built.module(ids).logits, built.module(ids).logits)


def _resnet_plan(spec: str, dp_of_blocks: int) -> tuple[nn.Module, object]:
    built = build_model(spec, device="cpu")
    graph = layer_graph_of_built(build_model(spec))
    plan = uniform_plan("dp=4", graph, 4, 8)
    layers = [lp.model_copy(update={"dp": dp_of_blocks, "tp": 4 // dp_of_blocks})
              if lp.name.startswith("layer") else lp for lp in plan.layers]
    return built.module, plan.model_copy(update={"layers": layers})


def test_batch_norm_statistics_are_named_when_slices_differ() -> None:
    spec = ZOO["resnet"].spec
    module, plan = _resnet_plan(spec, 2)  # blocks at dp 2 see twice the samples of dp 4
    assert len(batch_norm_layers(module)) > 4
    (note,) = _batch_norm_notes(module, plan)
    here = plan.global_batch // (plan.num_micro_batches * 2)
    assert "per-rank batch statistics" in note and f"layer1.0.bn1 ({here})" in note
    assert f"{here // 2} in the reference" in note
    assert "bn1 (" not in note.split("layer1.0.bn1")[0]  # the stem's bn1 keeps dp 4
    module, plan = _resnet_plan(spec, 4)
    (note,) = _batch_norm_notes(module, plan)
    assert "do not explain" in note


# ------------------------------------------------------------------ real runs against one process


@pytest.mark.slow
def test_verify_turns_stock_dropout_off_and_states_its_criterion() -> None:
    out = _autoplan("run", "--model", ZOO["gpt2_dropout"].spec, "--plan", "dp=2", "--steps",
                    "3", "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches the one-process reference" in out.stdout
    assert "dropout turned off in both runs" in out.stdout and "p=0.1" in out.stdout
    assert "criterion: losses and step-1 gradients within 1e-05" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "kwargs_mlp", "bert"])
def test_non_lm_inputs_train_in_two_ranks_as_in_one(name: str) -> None:
    out = _autoplan("run", "--model", ZOO[name].spec, "--plan", "dp=2", "--steps", "3",
                    "--verify", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] and data["world_size"] == 2 and data["max_rel_grad_diff"] < 1e-5
    assert any(note.startswith("criterion:") for note in data["notes"])


# ------------------------------------------------------------------ CLI traps


def test_seq_beside_the_same_seq_in_the_spec_is_accepted(capsys) -> None:
    assert spec_with_seq("gpt-tiny:seq=64", 64) == "gpt-tiny:seq=64"
    assert spec_with_seq("gpt-tiny", 64) == "gpt-tiny:seq=64"
    assert spec_with_seq("hf:c.json", 8) == "hf:c.json,seq=8"
    assert main(["search", "--model", "gpt-tiny:seq=64", "--seq", "64", "--cluster",
                 "h100-sxm:gpus=4", "--global-batch", "4", "--json"]) == 0
    assert "given twice" not in capsys.readouterr().err


def test_a_profile_of_another_dtype_says_which_dtype_to_pass(tmp_path, capsys) -> None:  # noqa: ANN001
    profile = str(tmp_path / "fp32")
    assert main(["profile", "--model", "gpt-tiny", "--mode", "analytic", "--cluster",
                 "h100-sxm:gpus=4", "--dtype", "fp32", "-o", profile]) == 0
    search = ["search", "--model", "gpt-tiny", "--cluster", "h100-sxm:gpus=4",
              "--global-batch", "4", "--profile", profile, "--json"]
    check_one_line_error(search, ["made in fp32", "traces the model in bf16",
                                  "give --dtype fp32"], capsys)
    assert main([*search, "--dtype", "fp32"]) == 0
