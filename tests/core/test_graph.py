"""LayerGraph extraction from the zoo, an HF config and modules that are not transformers."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from torch import nn

from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.models import build_model
from autoplan.replay import replay_plan
from autoplan.tracing import layer_graph, layer_graph_of_built
from autoplan.units import find_units
from tests.core.factories import EncoderDecoder, SmallResNet


def _kinds(graph: LayerGraph) -> list[str]:
    return [n.kind for n in graph.nodes]


def test_gpt_graph_units_kinds_and_chain() -> None:
    graph = layer_graph_of_built(build_model("gpt-small-test"))
    assert graph.names == ["wte", "wpe", "h.0", "h.1", "h.2", "h.3", "ln_f", "lm_head", "loss"]
    assert _kinds(graph) == ["embedding"] * 2 + ["block"] * 4 + ["norm", "head", "loss"]
    assert len({graph[f"h.{i}"].signature for i in range(4)}) == 1
    assert graph["wte"].signature != graph["h.0"].signature
    # The head's weight is the embedding's: owned once, shared by the head.
    assert graph["lm_head"].params == 0 and graph["lm_head"].shared_params == 512 * 128
    module = build_model("gpt-small-test").module
    assert graph.params == sum(p.numel() for p in module.parameters())
    assert nx.is_directed_acyclic_graph(graph.digraph)
    assert list(nx.topological_sort(graph.digraph))[-1] == "loss"
    hidden_bytes = 64 * 128 * 2  # seq x hidden x bf16 per sample
    assert graph.digraph.edges["h.0", "h.1"]["bytes"] == hidden_bytes
    assert graph["h.0"].input_bytes == hidden_bytes == graph["h.0"].output_bytes


def test_position_table_is_fixed_not_per_sample() -> None:
    graph = layer_graph_of_built(build_model("gpt-small-test"))
    wpe = graph["wpe"]
    assert wpe.output_bytes == 0 and wpe.output_shape == (64, 128)  # (S, H): no batch dim
    assert wpe.act_bytes == 0 and wpe.act_bytes_fixed == 64 * 8  # int64 positions


def test_saved_bytes_and_flops_of_a_known_mlp() -> None:
    # Linear(4, 8) -> ReLU -> Linear(8, 2) in fp32, one sample:
    #   fc1 saves its input (4 floats); ReLU, glue after fc1, saves its output (8 floats);
    #   fc2 saves its input, the same storage, so it adds nothing.
    #   fc1's input needs no gradient, so its backward is the weight gradient only.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    graph = layer_graph(model, (torch.zeros(5, 4),), dtype=torch.float32)
    assert graph.names == ["0", "2", "loss"]
    fc1, fc2 = graph["0"], graph["2"]
    assert (fc1.act_bytes, fc2.act_bytes) == (4 * 4 + 8 * 4, 0)
    assert (fc1.fwd_flops, fc1.bwd_flops) == (2 * 4 * 8, 2 * 4 * 8)
    assert (fc2.fwd_flops, fc2.bwd_flops) == (2 * 8 * 2, 2 * 2 * 8 * 2)
    assert graph.digraph.edges["0", "2"]["bytes"] == 8 * 4


def test_flash_attention_keeps_no_score_matrix() -> None:
    built = build_model("gpt:layers=2,hidden=64,heads=4,seq=256,vocab=128")
    flash = layer_graph_of_built(built, attention="flash")["h.0"]
    math = layer_graph_of_built(built, attention="math")["h.0"]
    scores = 4 * 256 * 256 * 4  # heads x S x S probabilities in fp32 (math path upcasts)
    assert math.act_bytes - flash.act_bytes >= scores
    assert flash.fwd_flops == math.fwd_flops


def test_non_transformer_resnet_from_a_factory_spec() -> None:
    graph = layer_graph_of_built(build_model("module:tests.core.factories:build_resnet"))
    assert graph.names == ["0", "1", "2", "3", "4", "5", "6", "loss"]
    assert _kinds(graph)[1:4] == ["block"] * 3
    assert graph["0"].kind == "other" and graph["6"].kind == "head"
    assert graph["1"].signature == graph["3"].signature
    conv = 2 * (8 * 8 * 9) * 16 * 16  # one 3x3 conv, 8 -> 8 channels, 16x16 pixels
    assert graph["1"].fwd_flops == 2 * conv
    assert graph["1"].output_shape == (1, 8, 16, 16)


def test_every_repeated_stack_is_split_into_blocks() -> None:
    units = find_units(EncoderDecoder())
    names = [u for u, _ in units]
    assert names == ["encoder.0", "encoder.1", "encoder.2", "bridge", "decoder.0", "decoder.1"]
    assert [b for _, b in units] == [True, True, True, False, True, True]
    graph = layer_graph(EncoderDecoder(), (torch.zeros(2, 16),), dtype=torch.float32)
    assert graph.names == [*names, "loss"]


def test_module_without_repeats_and_a_bare_layer() -> None:
    assert find_units(nn.Linear(3, 3)) == [("", False)]
    graph = layer_graph(nn.Linear(3, 3), (torch.zeros(1, 3),))
    assert graph.names == ["", "loss"] and graph[""].params == 12


def test_original_module_is_untouched() -> None:
    model = SmallResNet()
    before = [p.clone() for p in model.parameters()]
    layer_graph(model, model.example_inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_hf_llama_from_config(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 256, "max_position_embeddings": 32}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    built = build_model(f"hf:{path}")
    graph = layer_graph_of_built(built)
    blocks = [n for n in graph.nodes if n.kind == "block"]
    assert [n.name for n in blocks] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert graph.names[0] == "model.embed_tokens" and graph.nodes[0].kind == "embedding"
    assert graph["model.norm"].kind == "norm" and graph["lm_head"].kind == "head"
    assert graph.params == sum(p.numel() for p in built.module.parameters())
    assert graph.tokens_per_sample == 32
    ours = layer_graph_of_built(build_model(
        "llama:layers=3,hidden=64,heads=4,kv_heads=2,ffn=128,seq=32,vocab=256"))
    # The same architecture in our zoo costs the same matmul FLOPs per block.
    assert blocks[0].fwd_flops == ours["layers.0"].fwd_flops
    assert isinstance(built.module, transformers.PreTrainedModel)


def test_graph_json_round_trip(tmp_path) -> None:
    graph = layer_graph_of_built(build_model("llama-tiny"))
    path = tmp_path / "graph.json"
    graph.save(path)
    again = LayerGraph.load(path)
    assert again == graph and again.structural_hash == graph.structural_hash
    data = json.loads(path.read_text())
    data["version"] = 99
    with pytest.raises(AutoplanError, match="version 99"):
        LayerGraph.from_dict(data)


def test_unknown_attention_mode_is_refused() -> None:
    with pytest.raises(AutoplanError, match="attention"):
        layer_graph_of_built(build_model("gpt-tiny"), attention="fast")


@pytest.mark.parametrize("spec", ["gpt-small-test", "llama-tiny",
                                  "module:tests.core.factories:build_resnet"])
def test_replayed_blocks_give_the_graph_of_a_full_trace(spec: str) -> None:
    built = build_model(spec)
    fast = layer_graph_of_built(built)
    full = layer_graph(built.module, built.example_inputs, built.loss_fn, name=spec,
                       tokens_per_sample=built.tokens_per_sample, replay=False)
    assert fast == full


class _Windowed(nn.Module):
    """Identical weights, a setting that differs: each block must be traced itself."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x[:, : self.window]).repeat(1, 16 // self.window, 1)


def test_blocks_with_other_settings_are_not_replayed() -> None:
    model = nn.Sequential(_Windowed(16), _Windowed(4), _Windowed(16))
    assert replay_plan(model, ["0", "1", "2"]) == {"2": "0"}
    graph = layer_graph(model, (torch.zeros(2, 16, 8),), dtype=torch.float32)
    assert graph["1"].fwd_flops == graph["0"].fwd_flops / 4
    assert graph["2"].fwd_flops == graph["0"].fwd_flops


class _Reshaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        x = self.blocks[1](x.view(x.shape[0], 2, 4, 8))  # other input shapes than blocks[0]
        return self.blocks[2](x.flatten(1, 2))


def test_a_block_fed_other_shapes_falls_back_to_a_full_trace() -> None:
    model = _Reshaping()
    example = (torch.zeros(2, 8, 8),)
    assert layer_graph(model, example) == layer_graph(model, example, replay=False)


def test_tracing_leaves_a_meta_model_as_it_was() -> None:
    built = build_model("gpt-tiny", dtype=torch.bfloat16)  # already meta: traced in place
    layer_graph_of_built(built)
    assert all(p.grad is None for p in built.module.parameters())
    assert all(type(block).__name__ == "Block" for block in built.module.h)  # replays undone


class _ListCalled(nn.Module):
    """Calls its blocks through a plain list, so swapping the ModuleList's entries misses."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.order = list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.order:
            x = block(x)
        return x


def test_blocks_called_around_their_container_are_traced_for_real() -> None:
    model = _ListCalled()
    graph = layer_graph(model, (torch.zeros(2, 8),))
    assert graph.names == ["blocks.0", "blocks.1", "blocks.2", "loss"]
    assert graph == layer_graph(model, (torch.zeros(2, 8),), replay=False)


def test_a_model_returning_no_tensor_is_a_clear_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> tuple:
            return (3, "x")

    with pytest.raises(AutoplanError, match="returned no tensor"):
        layer_graph(Odd(), (torch.zeros(1, 2),))


def test_structural_hash_does_not_depend_on_string_hashing() -> None:
    """Plans and profiles name the hash; another process must compute the same one."""
    import os
    import subprocess
    import sys

    code = ("from autoplan.tracing import trace_spec; "
            "print(trace_spec('gpt-tiny', dtype='fp32').structural_hash)")
    hashes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
              for seed in ("1", "2")}  # these two order {"wte", "wpe"} differently
    assert len(hashes) == 1, hashes
