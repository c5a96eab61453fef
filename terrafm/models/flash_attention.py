"""The `attention` op's flash-attn backend (CUDA; imported only when the registry chooses it).

flash-attn takes fp16/bf16 only: fp32 activations (train.precision=fp32) go through SDPA instead,
a plain dtype branch between two implementations resolved when this module was loaded.
"""

import torch
from flash_attn import flash_attn_qkvpacked_func

from terrafm.models.attention import sdpa_attention


def flash_attention(qkv: torch.Tensor) -> torch.Tensor:
    """(B, N, 3, H, d) packed q, k, v -> (B, N, H, d)."""
    if qkv.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_qkvpacked_func(qkv)
    return sdpa_attention(qkv)
