"""A small non-transformer module for executor tests: residual MLP blocks on feature vectors,
whose Linear pairs tensor parallelism can split (fc1 by columns, fc2 by rows)."""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 16
HIDDEN = 64
OUTPUTS = 4


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """stem Linear, three residual MLP blocks, a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, FEATURES)
        self.blocks = nn.ModuleList(MLPBlock() for _ in range(3))
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, 8),)


def build_residual_mlp() -> nn.Module:
    return ResidualMLP()
