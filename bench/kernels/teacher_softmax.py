"""Bench: dual-centering teacher softmax (R teacher rows, K prototypes), forward only (no gradient)."""

import torch

from terrafm_kernels import reference as _reference

OP = "teacher_softmax"
BACKWARD = False
KERNEL_MODULES = ("teacher_softmax",)
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"R": 128, "K": 8192}]
    return [{"R": 128, "K": 65536}, {"R": 512, "K": 65536}, {"R": 1024, "K": 131072}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    R, K = shape["R"], shape["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(R, K, generator=g).to(device, dtype)
    center = (0.1 * torch.randn(K, generator=g)).to(device)
    center_high = (0.1 * torch.randn(K, generator=g)).to(device)
    high_weight = (torch.rand(R, generator=g) < 0.3).float().to(device)
    return logits, center, center_high, high_weight, 0.04, 0.8


def kernel():
    from terrafm_kernels.teacher_softmax import teacher_softmax

    return teacher_softmax


reference = _reference.teacher_softmax


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.teacher_softmax import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes)
