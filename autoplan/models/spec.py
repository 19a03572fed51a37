"""Model spec strings (see DESIGN.md, "Model spec grammar") parsed into a frozen ModelSpec."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from autoplan.errors import AutoplanError
from autoplan.models.gpt import GPTConfig
from autoplan.models.llama import LlamaConfig
from autoplan.models.presets import PRESETS
from autoplan.specs import parse_float, parse_int, parse_kv, shown

__all__ = ["ModelSpec", "parse_model_spec", "spec_with_seq", "FAMILIES"]

_CONFIGS = {"gpt": GPTConfig, "llama": LlamaConfig}
FAMILIES = ("gpt", "llama", "hf", "module")


@dataclass(frozen=True)
class ModelSpec:
    """What to plan for: a built-in family with its config, an HF config file or a factory."""

    text: str
    """The spec as the user gave it (also what a Plan records)."""
    family: str
    config: GPTConfig | LlamaConfig | None = None
    source: str = ""
    """hf: the config.json path; module: "package.module:factory"."""
    seq: int | None = None
    """Tokens per sample where the family has them (hf: overrides max_position_embeddings)."""


def parse_model_spec(text: str) -> ModelSpec:
    """Parse `gpt:...`, `llama:...`, a preset name (optionally `preset:key=value`),
    `hf:path/config.json[,seq=N]` or `module:package.module:factory`.

    Raises:
        AutoplanError: naming the bad part and the valid choices.
    """
    text = text.strip()
    head, _, rest = text.partition(":")
    if head in PRESETS:
        preset = PRESETS[head]
        return _family_spec(text, preset.family, {**_as_text(preset.options), **_kv(head, rest)})
    if head in _CONFIGS:
        return _family_spec(text, head, _kv(head, rest))
    if head == "hf":
        return _hf_spec(text, rest)
    if head == "module":
        return _module_spec(text, rest)
    raise AutoplanError(
        f"unknown model '{head}'; give a preset ({', '.join(PRESETS)}) or a family "
        f"({', '.join(FAMILIES)}), e.g. gpt:layers=24,hidden=2304,heads=24,seq=2048,vocab=51200"
    )


def spec_with_seq(text: str, seq: int) -> str:
    """The spec `text` with a sequence length given beside it (the CLI's --seq): unchanged
    when it already says that seq, else with `seq=N` added.

    Raises:
        AutoplanError: when the spec says another seq (naming both), or is of a family
            that takes no seq (module: factories, whose example_inputs set the length).
    """
    text = text.strip()
    head, _, rest = text.partition(":")
    if head == "module":
        raise AutoplanError(f"--seq {seq}: a module: spec takes no seq (its factory's "
                            "example_inputs set the input length); leave --seq out")
    if head == "hf":
        typed = parse_kv(rest.partition(",")[2], f"model spec '{text}'", ["seq"])
    elif head in PRESETS or head in _CONFIGS:
        typed = _kv(head, rest)
    else:
        parse_model_spec(text)  # raises, naming the valid models
        typed = {}
    if "seq" not in typed:
        return f"{text}{',' if ':' in text else ':'}seq={seq}"
    if parse_int(typed["seq"], f"model spec '{text}': seq") != seq:
        raise AutoplanError(f"--seq {seq} and the model spec's seq={typed['seq']} differ; "
                            "give the sequence length once")
    return text


def _as_text(options: dict[str, int]) -> dict[str, str]:
    return {k: str(v) for k, v in options.items()}


def _kv(family: str, rest: str) -> dict[str, str]:
    cls = _CONFIGS[family] if family in _CONFIGS else _CONFIGS[PRESETS[family].family]
    return parse_kv(rest, f"model spec '{family}'", [f.name for f in fields(cls)])


def _family_spec(text: str, family: str, options: dict[str, str]) -> ModelSpec:
    cls = _CONFIGS[family]
    required = [f.name for f in fields(cls) if f.default is MISSING]
    missing = [name for name in required if name not in options]
    if missing:
        raise AutoplanError(f"model spec '{text}': missing {', '.join(missing)}")
    values: dict[str, object] = {}
    for f in fields(cls):
        if f.name in options:
            parse = parse_float if f.type == "float" else parse_int
            minimum = 0 if f.name in ("dropout", "ffn", "norm_eps") else 1
            values[f.name] = parse(options[f.name], f"model spec '{text}': {f.name}", minimum)
    config = cls(**values)
    _check_shapes(text, config)
    return ModelSpec(text=text, family=family, config=config, seq=config.seq)


def _check_shapes(text: str, cfg: GPTConfig | LlamaConfig) -> None:
    if cfg.hidden % cfg.heads:
        raise AutoplanError(
            f"model spec '{text}': hidden {cfg.hidden} is not divisible by heads {cfg.heads}"
        )
    if isinstance(cfg, LlamaConfig) and cfg.heads % cfg.kv_heads:
        raise AutoplanError(
            f"model spec '{text}': heads {cfg.heads} is not divisible by kv_heads {cfg.kv_heads}"
        )
    if isinstance(cfg, LlamaConfig) and (cfg.hidden // cfg.heads) % 2:
        raise AutoplanError(f"model spec '{text}': rotary embeddings need an even head dim")
    if isinstance(cfg, GPTConfig) and not 0.0 <= cfg.dropout < 1.0:
        raise AutoplanError(f"model spec '{text}': dropout must be in [0, 1), got {cfg.dropout}")


def _hf_spec(text: str, rest: str) -> ModelSpec:
    path, _, options = rest.partition(",")
    seq = parse_kv(options, f"model spec '{text}'", ["seq"]).get("seq")
    if not path:
        raise AutoplanError("model spec 'hf:' needs a path to a config.json, e.g. hf:cfg.json")
    if not Path(path).is_file():
        raise AutoplanError(f"model spec '{text}': no such file '{path}'")
    return ModelSpec(text=text, family="hf", source=path,
                     seq=parse_int(seq, f"model spec '{text}': seq") if seq else None)


def _module_spec(text: str, rest: str) -> ModelSpec:
    rest, comma, options = rest.partition(",")
    if comma:
        raise AutoplanError(f"model spec '{text}': a module: spec takes no options such as "
                            f"'{shown(options, 20)}' (its factory's example_inputs set the "
                            "inputs, seq included); give module:package.module:factory")
    module, sep, factory = rest.partition(":")
    if not sep or not module or not factory.isidentifier():
        raise AutoplanError(
            f"model spec '{text}' must be module:package.module:factory, "
            "e.g. module:mypkg.nets:build"
        )
    if not all(part.isidentifier() for part in module.split(".")):
        raise AutoplanError(f"model spec '{text}': '{module}' is not a dotted module name")
    return ModelSpec(text=text, family="module", source=rest)

