"""Bench: DINOv2's class-token DINO step from the bottleneck on (last layer + centred teacher + local and
global terms), forward + backward: DINOLoss.forward_fused (the logits never exist) against DINOv2's
eager head tail and loss, at its ViT-L per-GPU shapes (bottleneck 256, 65536 prototypes)."""

from types import SimpleNamespace

import torch

from .. import dinov2_eager

OP = "dinov2_dino_head_loss"
BACKWARD = True
KERNEL_MODULES = ("dino_head_loss",)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "local": 4, "K": 8192, "D": 256}]
    return [{"B": 64, "local": 8, "K": 65536, "D": 256}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    B, n_local, K, D = shape["B"], shape["local"], shape["K"], shape["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    student_global = torch.randn(2 * B, D, generator=g).to(device, dtype).requires_grad_(True)
    student_local = torch.randn(n_local * B, D, generator=g).to(device, dtype).requires_grad_(True)
    teacher_global = torch.randn(2 * B, D, generator=g).to(device, dtype)
    weight_v = (0.02 * torch.randn(K, D, generator=g)).to(device, dtype).requires_grad_(True)
    teacher_weight_v = (0.02 * torch.randn(K, D, generator=g)).to(device, dtype)
    center = (0.1 * torch.randn(1, K, generator=g)).to(device)
    return student_global, student_local, teacher_global, weight_v, teacher_weight_v, center, n_local


def kernel():
    from terrafm_kernels.dino import DINOLoss

    def dino_head_step_loss(student_global, student_local, teacher_global, weight_v, teacher_weight_v, center,
                            n_local, teacher_temp=0.07):
        loss = DINOLoss(center.shape[-1], backend="triton").to(center.device)
        loss.center.copy_(center)
        return loss.forward_fused(student_global, student_local, teacher_global,
                                  SimpleNamespace(weight_v=weight_v, weight_g=None),
                                  SimpleNamespace(weight_v=teacher_weight_v, weight_g=None), teacher_temp)

    return dino_head_step_loss


reference = dinov2_eager.dino_head_step_loss


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.dino_head_loss import roofline_cost

    return roofline_cost(S=2 + shape["local"], T=2, B=shape["B"], K=shape["K"], D=shape["D"],
                         dtype_bytes=dtype_bytes, teacher_weight=True)
