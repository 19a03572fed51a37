"""A model whose forward takes keyword inputs (features and a mask), the way many user models
and transformers models are called; example_inputs returns a dict of them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KeywordMLP", "build_kwargs_mlp"]

FEATURES = 32


class KeywordBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 2 * FEATURES)
        self.fc2 = nn.Linear(2 * FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class KeywordMLP(nn.Module):
    """forward(*, features, mask): blocks over masked feature vectors, a 4-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, FEATURES)
        self.blocks = nn.ModuleList(KeywordBlock() for _ in range(3))
        self.head = nn.Linear(FEATURES, 4)

    def forward(self, *, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.stem(features * mask)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def example_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Keyword inputs: features (batch, 16) and a 0/1 mask of the same shape."""
        return {"features": torch.randn(batch_size, 16),
                "mask": (torch.rand(batch_size, 16) > 0.1).float()}


def build_kwargs_mlp() -> nn.Module:
    """The `module:tests.zoo.kwargs_mlp:build_kwargs_mlp` factory."""
    return KeywordMLP()
