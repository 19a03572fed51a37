"""Model specs, presets and the zoo's modules."""

from __future__ import annotations

import pytest
import torch

from autoplan.errors import AutoplanError
from autoplan.models import GPTConfig, LlamaConfig, build_model, parse_model_spec
from autoplan.tracing import layer_graph_of_built

# Published sizes: GPT-3 175B as Megatron counts it (Narayanan et al. 2021, Table 1);
# Llama 3 from Meta's model cards (8.03B, 70.55B, 405.9B).
PUBLISHED_PARAMS = {
    "gpt3-175b": 174.6e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3-405b": 405.9e9,
}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights once


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_publications(name: str) -> None:
    module = build_model(name).module
    assert all(p.is_meta for p in module.parameters())
    assert abs(_params(module) / PUBLISHED_PARAMS[name] - 1) < 0.005


@pytest.mark.parametrize(("hidden", "seq"), [(256, 128), (512, 2048), (2304, 2048)])
def test_gpt_block_flops_match_closed_form(hidden: int, seq: int) -> None:
    # Narayanan et al. 2021, eq. 3: a GPT layer does 24 h^2 (1 + s / (6h)) FLOPs per token
    # forward (matmuls, attention not halved for causality); training is about 3x that.
    spec = f"gpt:layers=2,hidden={hidden},heads=4,seq={seq},vocab=512"
    graph = layer_graph_of_built(build_model(spec))
    block = next(n for n in graph.nodes if n.kind == "block")
    closed_form = 24 * hidden**2 * (1 + seq / (6 * hidden))
    assert abs(block.fwd_flops / seq / closed_form - 1) < 0.03
    # Backward is measured: twice the matmuls (input and weight gradients) plus the flash
    # attention backward, which does 5 of the forward's 2 S x S matmuls (2.5x).
    expected_bwd = 2 * 24 * hidden**2 + 2.5 * 4 * hidden * seq
    assert abs(block.bwd_flops / seq / expected_bwd - 1) < 0.03


def test_spec_families_and_presets() -> None:
    spec = parse_model_spec("gpt:layers=24,hidden=2304,heads=24,seq=2048,vocab=51200")
    assert spec.family == "gpt" and spec.config == GPTConfig(24, 2304, 24, 2048, 51200)
    llama = parse_model_spec("llama:layers=2,hidden=64,heads=4,kv_heads=2,ffn=128,seq=16,vocab=99")
    assert isinstance(llama.config, LlamaConfig) and llama.config.kv_heads == 2
    override = parse_model_spec("llama3-8b:seq=4096,layers=2")
    assert override.config.seq == 4096 and override.config.layers == 2
    assert override.config.hidden == 4096


@pytest.mark.parametrize(("text", "message"), [
    ("bert-large", "unknown model 'bert-large'"),
    ("gpt:layers=2,hidden=64,heads=4,seq=8", "missing vocab"),
    ("gpt:layers=2,hidden=64,heads=5,seq=8,vocab=10", "not divisible by heads"),
    ("gpt:layers=two,hidden=64,heads=4,seq=8,vocab=10", "layers must be an integer"),
    ("gpt:layers=0,hidden=64,heads=4,seq=8,vocab=10", "at least 1"),
    ("gpt:layers=2,hidden=64,heads=4,seq=8,vocab=10,depth=3", "unknown key 'depth'"),
    ("llama:layers=2,hidden=64,heads=4,kv_heads=3,ffn=8,seq=8,vocab=10", "kv_heads"),
    ("llama3-8b:heads", "is not key=value"),
    ("hf:", "needs a path"),
    ("hf:/no/such/config.json", "no such file"),
    ("module:os.path", "module:package.module:factory"),
    ("module:os;rm:x", "dotted module name"),
])
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(AutoplanError, match=message):
        parse_model_spec(text)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_tiny_models_train_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    built = build_model(name, device="cpu")
    inputs = built.example_inputs(2)
    loss = built.loss_fn(built.module(*inputs), inputs)
    loss.backward()
    vocab = built.spec.config.vocab
    assert abs(loss.item() - torch.log(torch.tensor(float(vocab))).item()) < 1.0
    assert all(p.grad is not None for p in built.module.parameters())


def test_factory_spec_imports_only_what_is_named() -> None:
    built = build_model("module:tests.core.factories:build_resnet")
    assert type(built.module).__name__ == "SmallResNet"
    with pytest.raises(AutoplanError, match="example_inputs"):
        build_model("module:tests.core.factories:build_without_inputs")
    with pytest.raises(AutoplanError, match="not an nn.Module"):
        build_model("module:tests.core.factories:build_not_a_module")
    with pytest.raises(AutoplanError, match="cannot import"):
        build_model("module:tests.core.no_such_module:build")


def test_a_factory_module_gets_its_inputs_where_it_is_built() -> None:
    """A user's example_inputs may make CPU tensors; the meta-built module needs meta ones
    (measured profiling of a module: spec failed on this)."""
    built = build_model("module:tests.core.factories:build_resnet")
    assert all(t.device.type == "meta" for t in built.example_inputs(2))
