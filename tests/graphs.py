"""A synthetic layer graph for tests that need a model without tracing one: identical
blocks whose figures are round numbers."""

from __future__ import annotations

from autoplan.graph import LayerGraph, LayerNode


def synthetic_block(i: int) -> LayerNode:
    # 1 GB of saved activations per sample, 100 MB of input: checkpointing saves 90%
    return LayerNode(name=f"layers.{i}", kind="block", module_type="Synthetic", signature="b",
                     params=50_000_000, shared_params=0, param_bytes=100_000_000,
                     fwd_flops=2e12, bwd_flops=4e12, act_bytes=10**9, act_bytes_fixed=0,
                     input_bytes=10**8, output_bytes=10**8, output_shape=(1, 8, 8),
                     fwd_io_bytes=4 * 10**9, bwd_io_bytes=8 * 10**9)


def synthetic_graph(layers: int = 8, name: str = "synthetic") -> LayerGraph:
    return LayerGraph(name, "bfloat16", "flash", 1024,
                      tuple(synthetic_block(i) for i in range(layers)), ())
