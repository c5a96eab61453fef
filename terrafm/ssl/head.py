"""DINO projection head: MLP -> bottleneck -> L2 normalisation -> weight-normalised prototypes.

The weight normalisation is written out (a `weight_v` parameter normalised per row in forward) instead
of `torch.nn.utils.weight_norm`, whose hooks FSDP2 and DCP do not handle: here the parameter is a plain
tensor that shards and checkpoints like any other.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrototypeLayer(nn.Module):
    """Weight-normalised linear layer without bias: (R, bottleneck) -> (R, K) logits.

    logits = normalize(x) @ (g * v / ||v||_row)^T. DINO freezes g at 1 (`learn_norm=False`), so every
    prototype is a unit vector and a logit is a cosine similarity in [-1, 1].
    """

    def __init__(self, in_dim: int, num_prototypes: int, learn_norm: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(num_prototypes, in_dim))
        self.weight_g = nn.Parameter(torch.ones(num_prototypes, 1)) if learn_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        if self.weight_g is not None:
            nn.init.ones_(self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight_v, dim=1)
        if self.weight_g is not None:
            w = w * self.weight_g
        return F.normalize(x, dim=-1) @ w.t()


class DINOHead(nn.Module):
    """3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, then K prototypes (65536 by default).

    Input (R, D) backbone cls features; output (R, K) logits before any temperature.
    FLOPs per row: 2 * (D*H + H*H + H*bottleneck + bottleneck*K).
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        learn_prototype_norm: bool = False,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = PrototypeLayer(bottleneck_dim, num_prototypes, learn_prototype_norm)
        self.mlp.apply(self._init_linear)
        self.flops_per_row = head_flops(in_dim, hidden_dim, bottleneck_dim, num_prototypes, num_layers)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor, head_loss: Callable | None = None):
        """(R, D) -> (R, K) logits; with head_loss, head_loss(bottleneck (R, bottleneck_dim), last_layer) instead.

        head_loss replaces the prototype layer (the fused dino_head_loss path) and runs here, inside the
        head's forward, where FSDP2 has gathered the layer's parameters and hooks their gradients.
        """
        bottleneck = self.mlp(features)
        return self.last_layer(bottleneck) if head_loss is None else head_loss(bottleneck, self.last_layer)


def head_flops(in_dim: int, hidden: int, bottleneck: int, prototypes: int, layers: int) -> float:
    """Forward FLOPs of one feature vector through a DINO head: MLP to the bottleneck, then the prototypes."""
    dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck, prototypes]
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True)))
