"""Small modules whose forwards do what pipeline stubs used to break, for the pipeline tests
(tests/executor/test_pipeline_real.py) and `module:` specs: a forward that reads attributes
of units another stage owns, one that passes a mask (by keyword) to every block, and one
with parameters of its own outside every layer (a class token, as in ViTs)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LooseParams", "MaskedBlocks", "SubmoduleReader", "build_loose_params",
           "build_masked_blocks", "build_submodule_reader"]

FEATURES = 16
INPUTS = 8
OUTPUTS = 4
TOKENS = 5


class _Embed(nn.Module):
    """A unit with a sub-module, as transformers' ViTEmbeddings has patch_embeddings.projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(INPUTS, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.fc = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.fc(self.norm(x)))
        return x + (h if mask is None else h * mask)


class SubmoduleReader(nn.Module):
    """Reads, in its forward, a parameter's dtype inside the first unit (as transformers' ViT
    does) and the shape of the head's weight: a later stage reads the first, an earlier one
    the second, each owned by the other stage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = _Embed()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embed.proj.weight.dtype)
        width = self.head.weight.shape[1]  # FEATURES
        h = self.embed(x)
        for block in self.blocks:
            h = block(h[..., :width])
        return self.head(h)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, INPUTS),)


class MaskedBlocks(nn.Module):
    """forward(x, mask): every block takes the mask (by keyword), on every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(INPUTS, FEATURES)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, mask=mask)
        return self.head(h)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, INPUTS), torch.ones(batch_size, FEATURES))


class LooseParams(nn.Module):
    """A class token and a position table on the model itself, used before the blocks, and
    a scale used after them: parameters outside every unit, used on the first and the last
    pipeline stage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(INPUTS, FEATURES)
        self.cls_token = nn.Parameter(torch.randn(1, 1, FEATURES) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS + 1, FEATURES) * 0.1)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.scale = nn.Parameter(torch.ones(FEATURES))
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (batch, TOKENS, FEATURES)
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(h[:, 0] * self.scale)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, TOKENS, INPUTS),)


def build_loose_params() -> nn.Module:
    """The `module:tests.executor.pipeline_models:build_loose_params` factory."""
    return LooseParams()


def build_submodule_reader() -> nn.Module:
    """The `module:tests.executor.pipeline_models:build_submodule_reader` factory."""
    return SubmoduleReader()


def build_masked_blocks() -> nn.Module:
    """The `module:tests.executor.pipeline_models:build_masked_blocks` factory."""
    return MaskedBlocks()
