"""Model ingestion: spec strings and presets to nn.Modules (built on meta for analysis)."""

from autoplan.models.build import (
    DTYPES,
    BuiltModel,
    build_model,
    default_loss,
    lm_loss,
    sum_loss,
)
from autoplan.models.gpt import GPT, GPTConfig
from autoplan.models.llama import Llama, LlamaConfig
from autoplan.models.presets import PRESETS, Preset
from autoplan.models.spec import FAMILIES, ModelSpec, parse_model_spec

__all__ = [
    "DTYPES", "BuiltModel", "build_model", "default_loss", "lm_loss", "sum_loss", "GPT",
    "GPTConfig", "Llama", "LlamaConfig", "PRESETS", "Preset", "FAMILIES", "ModelSpec",
    "parse_model_spec",
]
