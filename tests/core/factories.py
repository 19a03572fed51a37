"""Small non-transformer models that tests load through `module:` specs and the Python API."""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class SmallResNet(nn.Sequential):
    """stem conv, three residual blocks, pooling and a classifier, as one Sequential."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), ResBlock(8), ResBlock(8), ResBlock(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, 3, 16, 16),)


class EncoderDecoder(nn.Module):
    """Two stacks of repeated MLP blocks: both must be split into blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.bridge = nn.Linear(16, 32)
        self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = block(x)
        x = self.bridge(x)
        for block in self.decoder:
            x = block(x)
        return x


def build_resnet() -> nn.Module:
    return SmallResNet()


def build_without_inputs() -> nn.Module:
    return nn.Linear(2, 2)


def build_not_a_module() -> int:
    return 3


def build_that_raises() -> nn.Module:
    raise RuntimeError("CUDA out of memory while building\nsecond line of the message")
