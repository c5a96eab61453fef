"""Bench: DINO student cross-entropy over (teacher, student) view pairs, forward + backward."""

import torch

from terrafm_kernels import reference as _reference

OP = "dino_cross_entropy"
BACKWARD = True
KERNEL_MODULES = ("dino_cross_entropy",)
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"S": 4, "T": 2, "B": 8, "K": 8192}]
    return [{"S": 10, "T": 2, "B": 32, "K": 65536}, {"S": 10, "T": 2, "B": 64, "K": 65536}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    S, T, B, K = shape["S"], shape["T"], shape["B"], shape["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(S, B, K, generator=g).to(device, dtype).requires_grad_(True)
    teacher_probs = torch.softmax(torch.randn(T, B, K, generator=g) / 0.04, dim=-1).to(device)
    return student, teacher_probs, 0.1


def kernel():
    from terrafm_kernels.dino_cross_entropy import dino_cross_entropy

    return dino_cross_entropy


reference = _reference.dino_cross_entropy


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.dino_cross_entropy import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes)
