"""Vision-token adapters: what turns the vision encoder's tokens into joint-encoder inputs.

Parameter names follow the official EDJE checkpoint so a released state dict loads as is.
"""
from __future__ import annotations

import torch
from torch import nn


class AdapterMLP(nn.Module):
    """fc1 -> activation -> fc2 (the residual MLP inside the compression block)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenCompressor(nn.Module):
    """Compress n vision tokens to m learned-query tokens of the language model's width.

    One cross-attention block: m learnable queries attend over key/value projections of the
    vision tokens, a pre-norm residual MLP refines them, and a linear maps D_v -> D_lm.
    """

    def __init__(self, d_vision: int, d_lm: int, n_queries: int, n_heads: int, d_mlp: int,
                 eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, n_queries, d_vision) * d_vision**-0.5)
        self.key = nn.Linear(d_vision, d_vision)
        self.value = nn.Linear(d_vision, d_vision)
        self.attention = nn.MultiheadAttention(d_vision, n_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d_vision, eps=eps)
        self.mlp = AdapterMLP(d_vision, d_mlp)
        self.projection = nn.Linear(d_vision, d_lm)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, D_v) vision tokens -> (B, m, D_lm) tokens for the joint encoder."""
        b = vision_tokens.shape[0]
        k = self.key(vision_tokens)  # (B, n, D_v)
        v = self.value(vision_tokens)  # (B, n, D_v)
        q = self.query.expand(b, -1, -1)  # (B, m, D_v)
        a, _ = self.attention(q, k, v, need_weights=False)  # (B, m, D_v)
        h = a + self.mlp(self.layernorm(a))  # (B, m, D_v)
        return self.projection(h)  # (B, m, D_lm)


def local_projector(d_vision: int, d_lm: int, d_mlp: int) -> nn.Sequential:
    """The uncompressed ("local") variant: a per-token MLP D_v -> d_mlp -> D_lm.

    A Sequential so its parameters are named ``0.*`` and ``2.*`` as in the official layout.
    """
    return nn.Sequential(nn.Linear(d_vision, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_lm))
