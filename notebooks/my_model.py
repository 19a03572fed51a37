"""The quickstart's "own model": a small MLP-Mixer-style regressor, written as a user would
write one, with nothing autoplan-specific except `example_inputs` (what `module:` specs need
to build synthetic batches).

`autoplan run --model module:my_model:build` (or RunOptions(model=...)) imports this file by
its module name, so run from this folder or put it on PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import nn

TOKENS = 32
FEATURES = 24
WIDTH = 256
OUTPUTS = 8


class Block(nn.Module):
    """Pre-norm residual MLP: Linear up, GELU, Linear down (a column/row pair for TP)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Head(nn.Module):
    """Mean over tokens, then a Linear to the outputs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=1))


class Regressor(nn.Module):
    """(batch, TOKENS, FEATURES) -> (batch, OUTPUTS): embed, blocks, pool, head."""

    tokens_per_sample = TOKENS
    """Read by autoplan for per-token figures (optional)."""

    def __init__(self, depth: int = 6, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = Head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        # On the module's device: autoplan builds the model on the meta device for analysis
        # and calls this to make inputs that match it.
        device = self.embed.weight.device
        return (torch.randn(batch_size, TOKENS, FEATURES, device=device),)


def build() -> nn.Module:
    return Regressor()
