"""Bench: adaptive cross-attention fusion (T patch positions x M modality tokens of width A), fwd + bwd."""

import torch

from terrafm_kernels import reference as _reference

OP = "fusion"
BACKWARD = True
KERNEL_MODULES = ("fusion",)
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)
NUM_HEADS = 16


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"T": 512, "M": 2, "A": 576, "Q": 5}]
    # the presets' typical calls per GPU: one fused global view, 196 patches of 64 (vitb_h100) / 32 (vitl_h100)
    # samples (two global views share a call only when they draw the same sensors)
    return [{"T": 64 * 196, "M": 2, "A": 2304, "Q": 5},   # ViT-B, two sensors fused
            {"T": 64 * 196, "M": 3, "A": 2304, "Q": 5},   # ViT-B, all three sensors
            {"T": 32 * 196, "M": 3, "A": 3072, "Q": 5}]   # ViT-L


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    T, M, A, Q = shape["T"], shape["M"], shape["A"], shape["Q"]
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return make(T, M, A), make(T, M, A), make(Q, A), make(A), NUM_HEADS


def kernel():
    from terrafm_kernels.fusion import cross_attention_fusion

    def loss(*args):
        return cross_attention_fusion(*args).float().square().mean()

    return loss


def reference(*args):
    return _reference.cross_attention_fusion(*args).float().square().mean()


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.fusion import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes, backward=True)
