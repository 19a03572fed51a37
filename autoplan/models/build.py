"""Turn a ModelSpec into a module plus what it takes to run it: inputs and a loss.

Every model reaches the rest of autoplan with positional tensor inputs (tracing, profiling,
the executor and its one-process reference all call module(*inputs)). A model that takes
keyword inputs (an encoder-decoder's decoder_input_ids, a factory whose example_inputs
returns a dict) gets a forward that takes them positionally (positional_inputs).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from autoplan.errors import AutoplanError, first_line
from autoplan.models.gpt import GPT, GPTConfig
from autoplan.models.llama import Llama
from autoplan.models.spec import ModelSpec, parse_model_spec

__all__ = ["DTYPES", "BuiltModel", "as_positional", "build_model", "default_loss", "lm_loss",
           "positional_inputs", "sum_loss", "token_loss"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The dtype names the CLI takes."""

InputsFn = Callable[[int], tuple[torch.Tensor, ...]]
LossFn = Callable[[Any, tuple[torch.Tensor, ...]], torch.Tensor]
TargetsFn = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


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
    token_targets: TargetsFn | None = None
    """inputs -> the integer targets of a token model (the next tokens of a causal LM, the
    tokens themselves for an encoder); None: the output is regressed on (`autoplan run`)."""
    kind: str = "module"
    """What the inputs were made for: "causal-lm", "encoder", "encoder-decoder", "vision",
    or "module" (a factory's own example_inputs)."""


def build_model(spec: ModelSpec | str, device: str | torch.device = "meta",
                dtype: torch.dtype | None = None) -> BuiltModel:
    """Build the module of a spec on `device` (meta by default: shapes only, no memory).

    Raises:
        AutoplanError: when an hf config or a factory cannot be loaded, or an hf config is
            of a kind autoplan cannot make inputs for.
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    with torch.device(device):
        if spec.family == "hf":
            built = _build_hf(spec, device)
        elif spec.family == "module":
            return _build_factory(spec, device, dtype)
        else:
            cls = GPT if isinstance(spec.config, GPTConfig) else Llama
            seq, inputs = spec.config.seq, _token_inputs(spec.config.vocab, spec.config.seq, device)
            built = BuiltModel(spec, cls(spec.config), inputs, lm_loss, seq, next_tokens,
                               "causal-lm")
    if dtype is not None:
        built = _with_module(built, built.module.to(dtype))
    return built


def _with_module(built: BuiltModel, module: nn.Module) -> BuiltModel:
    return BuiltModel(built.spec, module, built.example_inputs, built.loss_fn,
                      built.tokens_per_sample, built.token_targets, built.kind)


def _token_inputs(vocab: int, seq: int, device: str | torch.device, count: int = 1) -> InputsFn:
    """`count` tensors of random token ids (batch, seq): input_ids (and decoder_input_ids)."""
    return lambda batch: tuple(torch.randint(vocab, (batch, seq), device=device)
                               for _ in range(count))


def next_tokens(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A causal LM's targets: the ids of its last input (a decoder's) shifted by one."""
    return inputs[-1].roll(-1, dims=1)


def same_tokens(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """An encoder's targets: its input ids (a masked-LM objective with nothing masked)."""
    return inputs[0]


def lm_loss(output: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross entropy of logits (B, S, V) against the ids of the last input (a
    causal LM's input_ids, an encoder-decoder's decoder_input_ids) shifted by one."""
    return token_loss(output, next_tokens(inputs))


def _encoder_loss(output: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross entropy of an encoder's logits (B, S, V) against its own input ids."""
    return token_loss(output, same_tokens(inputs))


def token_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of logits (B, S, V) (or output.logits) against token ids (B, S)."""
    logits = getattr(output, "logits", output)
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


# ------------------------------------------------------------------------------ hf: configs


def _build_hf(spec: ModelSpec, device: str | torch.device) -> BuiltModel:
    """The transformers model of a config, with inputs made from the config: token ids for a
    causal LM or an encoder, token ids and decoder ids for an encoder-decoder, pixel values
    for a vision model."""
    config = _hf_config(spec)
    kind = _hf_kind(config)
    if kind == "vision":
        return _build_hf_vision(spec, config, device)
    module = _hf_module(spec, config, kind)
    seq = spec.seq or getattr(config, "max_position_embeddings", None) \
        or getattr(config, "n_positions", None)
    if seq is None:
        raise AutoplanError(f"hf config '{spec.source}' ({config.model_type}) sets no "
                            f"max_position_embeddings; give the sequence length: "
                            f"hf:{spec.source},seq=N")
    if kind == "encoder-decoder":
        module = positional_inputs(module, ("input_ids", "decoder_input_ids"))
        return BuiltModel(spec, module, _token_inputs(config.vocab_size, seq, device, 2),
                          lm_loss, seq, next_tokens, kind)
    if kind == "encoder":
        return BuiltModel(spec, module, _token_inputs(config.vocab_size, seq, device),
                          _encoder_loss, seq, same_tokens, kind)
    return BuiltModel(spec, module, _token_inputs(config.vocab_size, seq, device), lm_loss,
                      seq, next_tokens, kind)


def _hf_config(spec: ModelSpec) -> Any:
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
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AutoplanError(f"hf config '{spec.source}' cannot be read: {err}") from None
    config._attn_implementation = "sdpa"
    return config


def _hf_kind(config: Any) -> str:
    """Which inputs the config's model takes (see BuiltModel.kind)."""
    from transformers.models.auto import modeling_auto

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "vocab_size", None) is None and hasattr(config, "image_size"):
        return "vision"
    if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES \
            and not getattr(config, "is_decoder", False):
        return "encoder"  # BERT and its kin are also in the causal-LM table, as decoders
    if getattr(config, "vocab_size", None) is None:
        return "unknown"
    return "causal-lm"


_HF_CLASSES = {"causal-lm": "AutoModelForCausalLM", "encoder": "AutoModelForMaskedLM",
               "encoder-decoder": "AutoModelForSeq2SeqLM",
               "vision": "AutoModelForImageClassification"}


def _hf_module(spec: ModelSpec, config: Any, kind: str) -> nn.Module:
    """The model with its head (the logits the loss needs), from the config alone.

    Raises:
        AutoplanError: for a config of no kind above, or one its auto class does not know.
    """
    import transformers

    if kind == "unknown":
        raise AutoplanError(
            f"hf config '{spec.source}' ({config.model_type}) has neither a vocab_size (a "
            "language model) nor an image_size (a vision model); wrap the model in a "
            "module:package.module:factory whose example_inputs(batch) makes its inputs")
    try:
        return getattr(transformers, _HF_CLASSES[kind]).from_config(config)
    except ValueError as err:
        raise AutoplanError(f"hf config '{spec.source}' ({config.model_type}, {kind}): "
                            f"{_HF_CLASSES[kind]} has no model for it ({first_line(err)}); "
                            "wrap it in a module: factory") from None


def _build_hf_vision(spec: ModelSpec, config: Any, device: str | torch.device) -> BuiltModel:
    """A vision model takes pixel values (batch, num_channels, height, width) of its
    image_size; its logits are regressed on (`autoplan run`), summed when traced."""
    if spec.seq is not None:
        raise AutoplanError(f"hf config '{spec.source}' is a vision model ({config.model_type})"
                            ": it takes no seq (--seq or ,seq=N); its inputs are images of "
                            "the config's image_size")
    module = _hf_module(spec, config, "vision")
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(config, "num_channels", 3)
    module = positional_inputs(module, (module.main_input_name,))

    def pixels(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, channels, height, width, device=device),)

    return BuiltModel(spec, module, pixels, sum_loss, None, None, "vision")


# ------------------------------------------------------------------------------ keyword inputs


def positional_inputs(module: nn.Module, names: tuple[str, ...], first: int = 0,
                      fixed: dict[str, Any] | None = None) -> nn.Module:
    """`module`, made to take its keyword inputs `names` positionally after its `first`
    positional ones, with `fixed` (non-tensor keyword values) always passed.

    Everything downstream calls module(*inputs) with a tuple of tensors; this keeps that one
    calling convention for models that need keywords. The module's class is swapped for a
    subclass of the same name whose forward maps the positions to the keywords, so its
    parameters, FQNs, hooks and deep copies (pipeline chunks) are those of the original.
    Nothing changes when the names are already the first positional parameters.
    """
    fixed = dict(fixed or {})
    positional = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not fixed and list(names) == positional[first:first + len(names)]:
        return module
    base = type(module)
    count = len(names)

    def forward(self: nn.Module, *args: Any) -> Any:
        if len(args) != first + count:
            raise TypeError(f"{base.__name__} takes {first + count} inputs here ("
                            f"{first} positional, then {', '.join(names)}), got {len(args)}")
        keywords = dict(zip(names, args[first:], strict=True))
        return base.forward(self, *args[:first], **keywords, **fixed)

    attributes = {"forward": forward, "__module__": base.__module__,
                  "__qualname__": base.__qualname__, "autoplan_input_names": names}
    module.__class__ = type(base.__name__, (base,), attributes)
    return module


def _split_inputs(example: Any) -> tuple[tuple, dict[str, Any]]:
    """A factory's example inputs as (positional, keyword): a tensor, a tuple or list of
    positional inputs, a dict of keyword inputs, or a pair (tuple, dict) of both."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) \
            and isinstance(example[0], tuple | list):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, tuple | list):
        return tuple(example), {}
    return (example,), {}


def _check_keywords(source: str, keywords: dict[str, Any]) -> None:
    bad = [k for k in keywords if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise AutoplanError(f"{source}: example_inputs gave keyword names {bad[:3]} that are "
                            "not identifiers; a dict of inputs maps forward's argument names "
                            "to tensors")


# ------------------------------------------------------------------------------ module: factories


def _build_factory(spec: ModelSpec, device: str | torch.device,
                   dtype: torch.dtype | None) -> BuiltModel:
    """Import exactly the module the user named and call its factory; nothing is evaluated.

    The module's example_inputs(batch) returns its inputs with the batch in dim 0: a tensor,
    a tuple of positional inputs, a dict of keyword inputs, or a pair (tuple, dict). Keyword
    tensors are passed by name (positional_inputs); keyword values that are not tensors
    (flags such as use_cache=False) are fixed at those of example_inputs(1).
    """
    module_name, _, factory_name = spec.source.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except Exception as err:  # noqa: BLE001 - user code: any failure is bad input, one line
        raise AutoplanError(f"model spec '{spec.text}': cannot import {spec.source}: "
                            f"{first_line(err)}") from None
    try:
        module = factory()
    except Exception as err:  # noqa: BLE001 - the user's factory failed, not autoplan
        raise AutoplanError(f"model factory {spec.source} raised {first_line(err)}") from None
    if not isinstance(module, nn.Module):
        raise AutoplanError(f"{spec.source} returned {type(module).__name__}, not an nn.Module")
    make_inputs = getattr(module, "example_inputs", None)
    if not callable(make_inputs):
        raise AutoplanError(
            f"{spec.source} returned {type(module).__name__} without an example_inputs(batch_size)"
            " method; add one so that autoplan can trace it"
        )
    module, inputs = as_positional(module, make_inputs, device, spec.source)
    if dtype is not None:
        module = module.to(dtype)
    return BuiltModel(spec, module, inputs, sum_loss, getattr(module, "tokens_per_sample", None))


def as_positional(module: nn.Module, make_inputs: Callable[[int], Any],
                  device: str | torch.device | None = None,
                  source: str = "example_inputs") -> tuple[nn.Module, InputsFn]:
    """`module` and batch size -> positional tensor inputs, from a function that returns its
    inputs in any of the forms _build_factory documents (tensor, tuple, dict of keyword
    inputs, (tuple, dict)). Keyword tensors go through positional_inputs; other keyword
    values are fixed at those of make_inputs(1).

    Args:
        device: where the inputs are moved (None: where make_inputs made them).
        source: how error messages name the model.

    Raises:
        AutoplanError: on keyword names that are not identifiers, or keyword tensors that
            change with the batch size.
    """
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        args, keywords = _split_inputs(make_inputs(1))
    _check_keywords(source, keywords)
    names = tuple(k for k, v in keywords.items() if isinstance(v, torch.Tensor))
    fixed = {k: v for k, v in keywords.items() if not isinstance(v, torch.Tensor)}
    module = positional_inputs(module, names, len(args), fixed)

    def inputs(batch: int) -> Any:
        args, keywords = _split_inputs(make_inputs(batch))
        if sorted(k for k, v in keywords.items() if isinstance(v, torch.Tensor)) != sorted(names):
            raise AutoplanError(f"{source}: example_inputs({batch}) gave keyword tensors "
                                f"{sorted(keywords)}, example_inputs(1) gave {sorted(names)}")
        flat = (*args, *(keywords[name] for name in names))
        if device is None:
            return flat
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, flat)

    return module, inputs


def sum_loss(output: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Stand-in loss for modules without one: the sum of the first output tensor,
    which sends a gradient to every output element."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise AutoplanError(f"the model returned no tensor ({type(output).__name__}); "
                            "give a loss function")
    return tensors[0].float().sum()
