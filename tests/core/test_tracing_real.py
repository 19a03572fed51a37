"""Tracing and layer copies on models nobody here wrote (tests/zoo): every buffer of a layer
copied off the meta model has the real model's values, captured layer calls carry no KV
cache, BatchNorm models trace at a batch BatchNorm accepts, and a failed trace names its
real cause."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import autoplan.tracing as tracing
from autoplan.errors import AutoplanError
from autoplan.meta_state import prepare_for_timing
from autoplan.models import build_model
from autoplan.profiler.compute import MeasureSettings, capture_unit_calls, materialize
from autoplan.profiler.measure import measure_layers
from autoplan.tracing import layer_graph, layer_graph_of_built, meta_copy, trace_batch
from tests.zoo import zoo_model

WITH_BUFFERS = ("bert", "llama", "gpt_neox", "bart", "mixtral", "resnet")
"""Zoo models with buffers: BERT's position and token type ids (integers), RoPE's inv_freq,
BatchNorm's running statistics and batch count, BART's final_logits_bias."""


def _real(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(zoo_model(name).spec, device="cpu").module
    for module in model.modules():  # running statistics other than their initial values
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_()
            module.num_batches_tracked.fill_(7)
    return model


def _assert_same_buffers(copy: nn.Module, real: nn.Module) -> None:
    copied = dict(copy.named_buffers(remove_duplicate=False))
    assert copied, "the model has buffers"
    for name, buffer in real.named_buffers(remove_duplicate=False):
        assert torch.equal(copied[name], buffer.to(copied[name].dtype)), name


@pytest.mark.parametrize("name", WITH_BUFFERS)
def test_a_layer_copied_off_the_meta_copy_has_the_real_buffers(name: str) -> None:
    real = _real(name)
    meta = meta_copy(real, torch.float32)
    assert all(b.is_meta for b in meta.buffers())
    _assert_same_buffers(materialize(meta, "cpu", torch.float32), real)


@pytest.mark.parametrize("name", ["bert", "llama", "resnet"])
def test_a_spec_built_on_meta_gets_its_buffers_rebuilt(name: str) -> None:
    spec = zoo_model(name).spec
    built = build_model(spec)
    prepare_for_timing(built.module, built.spec)
    rebuilt = materialize(built.module, "cpu", torch.float32)
    _assert_same_buffers(rebuilt, build_model(spec, device="cpu").module)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layers_are_captured_without_a_kv_cache_and_timed(name: str) -> None:
    """GPT-2 passes its cache positionally, Llama by keyword: either would carry meta
    tensors (and a growing cache) into the timed layer."""
    built = build_model(zoo_model(name).spec, dtype=torch.float32)
    graph = layer_graph_of_built(built, torch.float32)
    for call in capture_unit_calls(built, graph).values():
        leaves = [*call.one[0], *call.two[0]]
        assert not any(type(v).__name__.endswith("Cache") for v in leaves), call.name
    settings = MeasureSettings(micro_batches=(1, 2), tps=(1,), repeats=1, warmup=0)
    layers = measure_layers(built, graph, settings)
    assert all(p.fwd_s > 0 and p.bwd_s > 0 for layer in layers for p in layer.points)


# ------------------------------------------------------------------------------ BatchNorm


class NormMLP(nn.Module):
    """Blocks of Linear + BatchNorm1d: at batch 1 BatchNorm sees one value per channel."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8) if norm else nn.Identity(), nn.ReLU())
            for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_batchnorm_that_refuses_one_sample_is_traced_at_two_per_sample() -> None:
    graph = layer_graph(NormMLP(), (torch.randn(4, 8),), dtype=torch.float32)
    plain = layer_graph(NormMLP(norm=False), (torch.randn(4, 8),), dtype=torch.float32)
    for node, without in zip(graph.nodes, plain.nodes, strict=True):
        assert node.fwd_flops == without.fwd_flops  # 2 * 8 * 8 per block and sample
        assert node.output_shape == without.output_shape  # one sample
    block = graph.nodes[0]
    # per sample: the Linear's input (8 floats) and BatchNorm's input and output (ReLU's
    # saved output); fixed: BatchNorm's per-channel mean and inverse std (8 floats each)
    assert (block.act_bytes, block.act_bytes_fixed) == (3 * 8 * 4, 2 * 8 * 4)
    assert trace_batch(NormMLP()) == 2 and trace_batch(NormMLP().eval()) == 1
    assert trace_batch(NormMLP(norm=False)) == 1


def test_a_resnet_traced_at_two_matches_its_trace_at_one() -> None:
    """The zoo ResNet also runs at batch 1: the figures of both traces agree, except that
    BatchNorm's statistics count once per step instead of once per sample."""
    model = build_model(zoo_model("resnet").spec).module
    inputs = (torch.randn(3, 3, 32, 32),)
    at_two = layer_graph(model, inputs, dtype=torch.float32)
    with mock.patch.object(tracing, "trace_batch", lambda _: 1):
        at_one = layer_graph(model, inputs, dtype=torch.float32)
    for two, one in zip(at_two.nodes, at_one.nodes, strict=True):
        assert (two.fwd_flops, two.bwd_flops, two.output_shape, two.output_bytes) == \
            (one.fwd_flops, one.bwd_flops, one.output_shape, one.output_bytes), two.name
        assert two.act_bytes + two.act_bytes_fixed == one.act_bytes + one.act_bytes_fixed
    assert at_two.edges == at_one.edges
    assert sum(n.act_bytes_fixed for n in at_two.nodes) > 0


# ------------------------------------------------------------------------------ errors


class _Broken(nn.Module):
    def __init__(self, reads_values: bool) -> None:
        super().__init__()
        self.reads_values = reads_values
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == 1 and self.reads_values and x.sum() > 0:
                x = x * 2
            elif index == 1 and not self.reads_values:
                x = x[:, :3] @ torch.ones(4, 2)
        return x


def test_a_failed_trace_names_the_real_cause_and_where() -> None:
    with pytest.raises(AutoplanError) as shapes:
        layer_graph(_Broken(reads_values=False), (torch.randn(4, 8),))
    message = str(shapes.value)
    assert "after blocks.1" in message and "same reduction dim" in message
    assert "meta" not in message and "\n" not in message
    with pytest.raises(AutoplanError, match="reads tensor values after blocks.1 .*: "
                       "RuntimeError: Tensor.item"):
        layer_graph(_Broken(reads_values=True), (torch.randn(4, 8),))


class _RoutedExperts(nn.Module):
    """A mixture of experts whose router picks each token's expert by value (torch.where):
    on meta tensors no expert can be found, so it must be refused, never priced without
    its experts."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.top_k = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = torch.where(choice == index)[0]
            out = out.index_add(0, rows, expert(x[rows]))
        return x + out


def test_a_value_routed_mixture_of_experts_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), _RoutedExperts(), _RoutedExperts(), nn.Linear(8, 2))
    with pytest.raises(AutoplanError) as refused:
        layer_graph(model, (torch.randn(4, 8),))
    message = str(refused.value)
    assert "reads tensor values in 1 " in message and "nonzero" in message
    assert "\n" not in message


def test_units_owning_other_parameters_are_signed_apart() -> None:
    # All blocks call one shared Linear: the first owns it, the others share it. Equal
    # structure, unequal cost: a signature promises equal cost, so the owner stands apart.
    graph = layer_graph_of_built(build_model(zoo_model("shared_mlp").spec))
    blocks = [n for n in graph.nodes if n.name.startswith("blocks.")]
    assert [n.shared_params > 0 for n in blocks] == [False, True, True]
    assert blocks[0].signature != blocks[1].signature == blocks[2].signature
    assert len({n.signature for n in graph.nodes}) == len(graph.nodes) - 1


@pytest.mark.parametrize(("name", "whole", "gathered"), [
    ("llama", 6, 2), ("mistral", 6, 2), ("qwen2", 6, 2), ("bert", 4, 2), ("phi", 2, 1)])
def test_a_block_records_the_hidden_states_tensor_parallelism_saves_whole(
        name: str, whole: int, gathered: int) -> None:
    """LayerNode.tp_whole_act_bytes, in hidden states (the block's output) per sample: a
    Llama-style block saves its input, its RMSNorms' x * rsqrt(mean(x^2)) and outputs and
    the residual sum whole on every TP rank (6, where Korthikanti et al. count 5); BERT its
    input, its post-attention sum and LayerNorm output, and the MLP's sum (4); Phi one
    LayerNorm feeding attention and MLP side by side (2). Of those, the inputs of
    column-wise Linears stay whole under sequence parallelism (one per group)."""
    graph = layer_graph_of_built(build_model(zoo_model(name).spec), torch.float32, "flash")
    block = next(n for n in graph.nodes if n.kind == "block")
    assert round(block.tp_whole_act_bytes / block.output_bytes) == whole
    assert block.tp_gathered_act_bytes == gathered * block.output_bytes


def test_grouped_query_attention_keeps_its_key_and_value_heads_only() -> None:
    """Flash attention over 2 key/value heads for 8 query heads saves the 2 heads' keys and
    values, as torch's kernels do (tracing._GroupedFlash), not copies repeated to 8 heads:
    a block with 8 key/value heads saves 6 heads more of each, 2 x seq x 6 x head_dim x 4
    bytes per sample (fp32), and nothing else changes."""
    acts = {kv: layer_graph_of_built(build_model(
        f"llama:layers=1,hidden=256,heads=8,kv_heads={kv},ffn=512,seq=64,vocab=512"),
        torch.float32, "flash").nodes[1].act_bytes for kv in (2, 8)}
    assert acts[8] - acts[2] == 2 * 64 * 6 * 32 * 4


def test_hidden_states_as_wide_as_the_sequence_are_not_attention_scores() -> None:
    """At hidden = seq (llama3-70b at sequence 8192), a (1, S, S) hidden state or its (S, S)
    view is no S x S attention tensor: under flash attention a block keeps none."""
    graph = layer_graph_of_built(build_model(
        "llama:layers=1,hidden=64,heads=4,kv_heads=2,ffn=128,seq=64,vocab=512"),
        torch.float32, "flash")
    assert graph.nodes[1].attn_act_bytes == 0
