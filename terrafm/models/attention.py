"""The `attention` op's SDPA backend: softmax(q k^T / sqrt(d)) v over packed qkv.

torch's scaled_dot_product_attention picks flash / memory-efficient / math kernels itself on the
device; it runs everywhere and traces into torch.compile graphs.
"""

import torch
import torch.nn.functional as F


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, d) packed q, k, v -> (B, N, H, d)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
