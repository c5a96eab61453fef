"""Plain pre-norm ViT blocks in the published TerraFM / DINO layout (norm1, attn.qkv/proj, norm2, mlp.fc1/fc2).

The block knows nothing of distribution or SSL: FSDP, activation checkpointing and compile are
applied per block from outside (terrafm.train.parallelize). Attention runs the implementation the
op registry chose when the model was built (SDPA or flash-attn), held by the module.

Compile-safe by construction: every block runs the same code with the same Python constants, so one
compiled graph serves all of them. What differs per block (the stochastic-depth rate) is a buffer,
a tensor input of the graph, not a constant Dynamo would specialise and recompile on.
"""

from collections.abc import Callable

import torch
import torch.nn as nn

from terrafm.models.attention import sdpa_attention


def drop_path(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability `rate` (a 0-d tensor)."""
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
    return x * (mask / keep).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attention: Callable[[torch.Tensor], torch.Tensor] = sdpa_attention):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention = attention  # (B, N, 3, H, d) -> (B, N, H, d), from the op registry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        return self.proj(self.attention(qkv).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 as published.

    drop_path_rate=None builds a block without stochastic depth (a model whose rate is 0, the
    teacher); a float, even 0.0 for the first block of a student, makes it a non-persistent buffer
    (checkpoint keys unchanged), applied in training mode only.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float | None = None,
                 attention: Callable[[torch.Tensor], torch.Tensor] = sdpa_attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attention=attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_rate is not None
        if self.drop_path:
            if not 0.0 <= drop_path_rate < 1.0:
                raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
            self.register_buffer("drop_path_rate", torch.tensor(float(drop_path_rate)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_path and self.training:
            x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
