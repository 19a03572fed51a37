"""A GPT-2/GPT-3 decoder in the plain style of nanoGPT: pre-LayerNorm blocks, learned
positions, GELU MLP, output head tied to the token embedding (Radford 2019; Brown 2020).

Shapes: B batch, S sequence, H hidden, N heads, D head dim, F ffn, V vocab.
q, k and v are separate Linear layers so that tensor parallelism can split them by heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["init_weights", "GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    ffn: int = 0
    """MLP width; 0 means 4 * hidden (the GPT-3 choice)."""
    dropout: float = 0.0
    """Off by default so that parallel runs can be compared with one process exactly."""

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases (Radford 2019, nanoGPT)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.heads, cfg.hidden // cfg.heads  # tp divides n_head
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds N / tp of them.
        q = self.q(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, N, S, D)
        k = self.k(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, S, -1)  # (B, S, H)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn_size)
        self.proj = nn.Linear(cfg.ffn_size, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        if not self.wte.weight.is_meta:  # meta tensors hold no values to initialise
            self.apply(init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, S = idx.shape
        pos = torch.arange(S, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, S, H)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, S, V)
