"""Bench: prototype layer + teacher softmax + DINO cross-entropy fused (logits never stored), fwd + bwd.

As the presets call it: the teacher has its own (EMA) prototypes, and the weight norm (g = 1) is the op's."""

import torch

OP = "dino_head_loss"
BACKWARD = True
KERNEL_MODULES = ("dino_head_loss",)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"S": 4, "T": 2, "B": 8, "K": 8192, "D": 256}]
    return [{"S": 10, "T": 2, "B": 32, "K": 65536, "D": 256}, {"S": 10, "T": 2, "B": 64, "K": 65536, "D": 256}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    S, T, B, K, D = shape["S"], shape["T"], shape["B"], shape["K"], shape["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(S, B, D, generator=g).to(device, dtype).requires_grad_(True)
    teacher = torch.randn(T, B, D, generator=g).to(device, dtype)
    weight_v = (0.02 * torch.randn(K, D, generator=g)).to(device, dtype).requires_grad_(True)
    center = (0.1 * torch.randn(K, generator=g)).to(device)
    center_high = (0.1 * torch.randn(K, generator=g)).to(device)
    high_weight = (torch.rand(T * B, generator=g) < 0.3).float().to(device)
    teacher_weight_v = (0.02 * torch.randn(K, D, generator=g)).to(device, dtype)
    return student, teacher, weight_v, center, center_high, high_weight, 0.04, 0.1, 0.8, None, teacher_weight_v


def kernel():
    from terrafm_kernels.dino_head_loss import dino_head_loss

    return dino_head_loss


def reference(*args):
    from terrafm_kernels import reference as spec

    return spec.dino_head_loss(*args)


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.dino_head_loss import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes, teacher_weight=True)
