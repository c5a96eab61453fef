"""Bench: ViT self-attention softmax(q k^T / sqrt(d)) v, as computed by hand (eager) vs torch SDPA vs flash-attn.

This is what accelerate_vit's attention swap buys a host that computes attention manually.
"""

import math

import torch
import torch.nn.functional as F

OP = "attention"
BACKWARD = False
KERNEL_MODULES = ()  # torch's SDPA: no Triton kernel of ours


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 4, "H": 6, "N": 197, "d": 64}]
    return [{"B": 64, "H": 12, "N": 197, "d": 64}, {"B": 32, "H": 16, "N": 197, "d": 64},
            {"B": 16, "H": 12, "N": 785, "d": 64}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    return tuple(torch.randn(shape["B"], shape["H"], shape["N"], shape["d"], generator=g).to(device, dtype)
                 for _ in range(3))


def kernel():
    raise ImportError("terrafm ships no attention kernel; the accelerated paths are torch SDPA and flash-attn")


def reference(q, k, v):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def extra_providers() -> dict:
    from terrafm import backends

    flash = backends.flash_attn()
    return {"sdpa": (F.scaled_dot_product_attention, ""),
            "flash_attn": (_flash, "") if flash.usable else (None, f"flash-attn: {flash.detail}")}


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    B, H, N, d = shape["B"], shape["H"], shape["N"], shape["d"]
    return {"flops": 4 * B * H * N * N * d, "bytes": 4 * B * H * N * d * dtype_bytes}
