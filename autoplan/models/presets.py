"""Named model shapes, each with the publication it comes from."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    family: str
    options: dict[str, int]
    source: str


_GPT3 = "Brown et al. 2020, Table 2.1"
_MEGATRON = "Narayanan et al. 2021, Table 1"
_KORTHIKANTI = "Korthikanti et al. 2022, Table 3"
_LLAMA3 = "Dubey et al. 2024 (Llama 3), Table 3"
# Megatron pads GPT-2's 50,257-token vocabulary to 51,200 (a multiple of 128 * tp).
_GPT_VOCAB = 51200
_LLAMA3_VOCAB = 128256


def _gpt(layers: int, hidden: int, heads: int, seq: int = 2048) -> dict[str, int]:
    return dict(layers=layers, hidden=hidden, heads=heads, seq=seq, vocab=_GPT_VOCAB)


def _llama(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, int]:
    # Every Llama 3 size uses 8 kv heads and an 8K context in pre-training.
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=8, ffn=ffn, seq=8192,
                vocab=_LLAMA3_VOCAB)


PRESETS: dict[str, Preset] = {
    "gpt-tiny": Preset("gpt", dict(layers=2, hidden=64, heads=4, seq=32, vocab=256), "tests"),
    "gpt-small-test": Preset("gpt", dict(layers=4, hidden=128, heads=4, seq=64, vocab=512),
                             "tests"),
    "llama-tiny": Preset("llama", dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=176,
                                       seq=32, vocab=256), "tests"),
    "gpt3-1.7b": Preset("gpt", _gpt(24, 2304, 24), _MEGATRON),
    "gpt3-6.7b": Preset("gpt", _gpt(32, 4096, 32), _GPT3),
    # The paper prints d_model 5140 for 13B; with 40 heads of 128 it is 5120.
    "gpt3-13b": Preset("gpt", _gpt(40, 5120, 40), _GPT3 + " (d_model 5120, see note)"),
    "gpt3-175b": Preset("gpt", _gpt(96, 12288, 96), _GPT3),
    "gpt-22b": Preset("gpt", _gpt(48, 6144, 64), _KORTHIKANTI),
    "gpt-530b": Preset("gpt", _gpt(105, 20480, 128), _KORTHIKANTI),
    "gpt-1t": Preset("gpt", _gpt(128, 25600, 160), _KORTHIKANTI),
    "llama3-8b": Preset("llama", _llama(32, 4096, 32, 14336), _LLAMA3),
    "llama3-70b": Preset("llama", _llama(80, 8192, 64, 28672), _LLAMA3),
    "llama3-405b": Preset("llama", _llama(126, 16384, 128, 53248), _LLAMA3),
}
