"""A small CIFAR ResNet (He et al. 2016, section 4.2: 3 stages of BasicBlocks, 3x32x32 input,
10 classes) with BatchNorm, whose running statistics are buffers that training updates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "build_resnet"]

WIDTHS = (8, 16, 32)
"""Channels of the three stages (the paper's 16, 32, 64 halved)."""


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv stem, two BasicBlocks per stage, global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.layer1 = self._stage(WIDTHS[0], WIDTHS[0], 1)
        self.layer2 = self._stage(WIDTHS[0], WIDTHS[1], 2)
        self.layer3 = self._stage(WIDTHS[1], WIDTHS[2], 2)
        self.linear = nn.Linear(WIDTHS[2], num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """CIFAR-size images (batch, 3, 32, 32)."""
        return (torch.randn(batch_size, 3, 32, 32),)


def build_resnet() -> nn.Module:
    """The `module:tests.zoo.resnet:build_resnet` factory."""
    return CifarResNet()
