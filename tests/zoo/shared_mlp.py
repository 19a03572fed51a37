"""A residual MLP whose blocks all call ONE shared nn.Linear (a parameter owned by no single
block): every block adds its own projection of the shared layer's output."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SharedLinearMLP", "build_shared_mlp"]

FEATURES = 32
BLOCKS = 3
OUTPUTS = 8


class SharedBlock(nn.Module):
    """norm -> the shared Linear -> tanh -> a block-owned Linear, added back to the input."""

    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.shared = shared
        self.out = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.shared(self.norm(x))))


class SharedLinearMLP(nn.Module):
    """stem Linear, BLOCKS residual blocks sharing one Linear, a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, FEATURES)
        shared = nn.Linear(FEATURES, FEATURES)
        self.blocks = nn.ModuleList(SharedBlock(shared) for _ in range(BLOCKS))
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Feature vectors (batch, 16)."""
        return (torch.randn(batch_size, 16),)


def build_shared_mlp() -> nn.Module:
    """The `module:tests.zoo.shared_mlp:build_shared_mlp` factory."""
    return SharedLinearMLP()
