"""Turn a ModelSpec into a module plus what it takes to run it: inputs and a loss."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from autoplan.errors import AutoplanError
from autoplan.models.gpt import GPT, GPTConfig
from autoplan.models.llama import Llama
from autoplan.models.spec import ModelSpec, parse_model_spec

__all__ = ["DTYPES", "BuiltModel", "build_model", "default_loss", "lm_loss", "sum_loss"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The dtype names the CLI takes."""

InputsFn = Callable[[int], tuple[torch.Tensor, ...]]
LossFn = Callable[[Any, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass(frozen=True)
class BuiltModel:
    """A module with a way to make a batch of synthetic inputs and a scalar loss."""

    spec: ModelSpec
    module: nn.Module
    example_inputs: InputsFn
    """batch size -> positional inputs on the module's device."""
    loss_fn: LossFn
    """(module output, inputs) -> scalar loss."""
    tokens_per_sample: int | None


def build_model(spec: ModelSpec | str, device: str | torch.device = "meta",
                dtype: torch.dtype | None = None) -> BuiltModel:
    """Build the module of a spec on `device` (meta by default: shapes only, no memory).

    Raises:
        AutoplanError: when an hf config or a factory cannot be loaded.
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    with torch.device(device):
        if spec.family in ("gpt", "llama"):
            cls = GPT if isinstance(spec.config, GPTConfig) else Llama
            module: nn.Module = cls(spec.config)
            vocab, seq = spec.config.vocab, spec.config.seq
        elif spec.family == "hf":
            module, vocab, seq = _build_hf(spec)
        else:
            return _build_factory(spec, device, dtype)
    if dtype is not None:
        module = module.to(dtype)
    return BuiltModel(spec, module, _token_inputs(vocab, seq, device), lm_loss, seq)


def _token_inputs(vocab: int, seq: int, device: str | torch.device) -> InputsFn:
    return lambda batch: (torch.randint(vocab, (batch, seq), device=device),)


def lm_loss(output: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross entropy of logits (B, S, V) against the input ids shifted by one."""
    logits = getattr(output, "logits", output)
    targets = inputs[0].roll(-1, dims=1)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The loss for (output, targets) when none is given (autoplan.auto, autoplan run):
    cross entropy of the output's last dim (or its .logits) against integer targets, else the
    mean squared error of its first tensor against float ones."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        logits = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)
    if logits is None:
        raise AutoplanError(f"the model returned no tensor ({type(output).__name__}); give "
                            "a loss function")
    if targets.is_floating_point():
        return F.mse_loss(logits.float(), targets.float())
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def _build_hf(spec: ModelSpec) -> tuple[nn.Module, int, int]:
    try:
        import transformers
    except ImportError:
        raise AutoplanError("hf: specs need transformers: pip install 'autoplan[hf]'") from None
    try:
        with open(spec.source) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("it holds no JSON object")
        config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (OSError, ValueError, KeyError) as err:
        raise AutoplanError(f"hf config '{spec.source}' cannot be read: {err}") from None
    config._attn_implementation = "sdpa"
    try:
        module = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        module = transformers.AutoModel.from_config(config)
    seq = spec.seq or getattr(config, "max_position_embeddings", None)
    if seq is None:
        raise AutoplanError(f"hf config '{spec.source}' has no max_position_embeddings; add ,seq=N")
    return module, config.vocab_size, seq


def _build_factory(spec: ModelSpec, device: str | torch.device,
                   dtype: torch.dtype | None) -> BuiltModel:
    """Import exactly the module the user named and call its factory; nothing is evaluated."""
    module_name, _, factory_name = spec.source.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise AutoplanError(
            f"model spec '{spec.text}': cannot import {spec.source}: {err}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise AutoplanError(f"{spec.source} returned {type(module).__name__}, not an nn.Module")
    make_inputs = getattr(module, "example_inputs", None)
    if not callable(make_inputs):
        raise AutoplanError(
            f"{spec.source} returned {type(module).__name__} without an example_inputs(batch_size)"
            " method; add one so that autoplan can trace it"
        )
    if dtype is not None:
        module = module.to(dtype)

    def inputs(batch: int) -> Any:  # where the module is, whatever device the user made them on
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                        make_inputs(batch))

    return BuiltModel(spec, module, inputs, sum_loss, getattr(module, "tokens_per_sample", None))


def sum_loss(output: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Stand-in loss for modules without one: the sum of the first output tensor,
    which sends a gradient to every output element."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise AutoplanError(f"the model returned no tensor ({type(output).__name__}); "
                            "give a loss function")
    return tensors[0].float().sum()
