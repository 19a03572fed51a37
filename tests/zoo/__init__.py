"""A zoo of tiny models whose architecture nobody here wrote: transformers architectures built
from configs (configs/*.json, read by `hf:` specs) and `module:` factories in the style of
nanoGPT, timm and torchvision. Tests and benchmarks/compatibility.py iterate ZOO.

Specs are relative to the repository root (run from there, as pytest and the CLI do)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIGS", "ZOO", "ZooModel", "zoo_model"]

CONFIGS = Path(__file__).parent / "configs"
"""The hf config JSON files ({"model_type": ..., config fields}), as `_build_hf` reads them."""


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: the spec that autoplan takes and what kind of model it is."""

    name: str
    spec: str
    """hf:tests/zoo/configs/<name>.json or module:tests.zoo.<file>:<factory>."""
    kind: str
    """causal-lm, encoder, enc-dec, vision, moe, mlp, cnn."""
    description: str


def _hf(name: str, kind: str, description: str, seq: int | None = None) -> ZooModel:
    spec = f"hf:tests/zoo/configs/{name}.json" + (f",seq={seq}" if seq else "")
    return ZooModel(name, spec, kind, description)


def _module(name: str, factory: str, kind: str, description: str) -> ZooModel:
    return ZooModel(name, f"module:tests.zoo.{factory}", kind, description)


_ENTRIES = (
    _hf("gpt2", "causal-lm", "GPT-2 (Conv1D projections, tied head)"),
    _hf("gpt2_dropout", "causal-lm", "GPT-2 with the stock dropout 0.1 (--verify must cope)"),
    _hf("llama", "causal-lm", "Llama (GQA 4 heads / 2 kv heads, RoPE, SwiGLU)"),
    _hf("mistral", "causal-lm", "Mistral (GQA, sliding window 16)"),
    _hf("qwen2", "causal-lm", "Qwen2 (GQA, qkv bias, tied head)"),
    _hf("gpt_neox", "causal-lm", "GPT-NeoX (fused query_key_value, parallel residual)"),
    _hf("phi", "causal-lm", "Phi (partial rotary, parallel attention and MLP)"),
    _hf("bert", "encoder", "BERT encoder (built as BertLMHeadModel by AutoModelForCausalLM)"),
    _hf("t5", "enc-dec", "T5 encoder-decoder (relative position buckets, no position table)",
        seq=32),
    _hf("bart", "enc-dec", "BART encoder-decoder (AutoModelForCausalLM builds its decoder)"),
    _hf("vit", "vision", "ViT (pixel_values 3x32x32, patch 8)"),
    _hf("mixtral", "moe", "Mixtral mixture of experts (4 experts, top 2)"),
    _module("nanogpt", "nanogpt:build_nanogpt", "causal-lm",
            "nanoGPT GPT (fused c_attn split in forward, tied wte/lm_head, (logits, loss))"),
    _module("shared_mlp", "shared_mlp:build_shared_mlp", "mlp",
            "residual MLP whose blocks all call one shared Linear"),
    _module("resnet", "resnet:build_resnet", "cnn",
            "CIFAR ResNet (BasicBlock, BatchNorm, 3x32x32, 10 classes)"),
    _module("timm_vit", "vit:build_vit", "vision",
            "timm-style ViT (Conv2d patch embed, cls token, fused qkv)"),
    _module("kwargs_mlp", "kwargs_mlp:build_kwargs_mlp", "mlp",
            "MLP whose forward takes keyword inputs (example_inputs returns a dict)"),
)

ZOO: dict[str, ZooModel] = {m.name: m for m in _ENTRIES}
"""name -> entry, in the order tables list them."""


def zoo_model(name: str) -> ZooModel:
    """The entry called `name`.

    Raises:
        KeyError: naming the known models when there is none of that name.
    """
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model '{name}'; known: {', '.join(ZOO)}") from None
