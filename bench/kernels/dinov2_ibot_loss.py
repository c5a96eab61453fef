"""Bench: DINOv2's iBOT masked patch-token loss step (centred teacher, forward_masked), forward + backward:
the terrafm_kernels.dino.iBOTPatchLoss drop-in against DINOv2's eager math, at its ViT-L per-GPU shapes."""

import torch

from .. import dinov2_eager

OP = "dinov2_ibot_loss"
BACKWARD = True
KERNEL_MODULES = ("dino_teacher", "dino_student_ce")
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"M": 256, "images": 16, "K": 8192}]
    return [{"M": dinov2_eager.VIT_L["masked"], "images": 2 * dinov2_eager.VIT_L["B"], "K": 65536}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    M, images, K = shape["M"], shape["images"], shape["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_(True)
    teacher = torch.randn(M, K, generator=g).to(device, dtype)
    center = (0.1 * torch.randn(1, 1, K, generator=g)).to(device)
    masks_weight = (torch.rand(M, generator=g) / 20).to(device)
    return student, teacher, center, masks_weight, images


def kernel():
    from terrafm_kernels.dino import iBOTPatchLoss

    def ibot_step_loss(student_masked, teacher_masked, center, masks_weight, n_images, teacher_temp=0.07):
        loss = iBOTPatchLoss(center.shape[-1], backend="triton").to(center.device)
        loss.center.copy_(center)
        probs = loss.softmax_center_teacher(teacher_masked, teacher_temp)
        masks = torch.zeros(n_images, 1, dtype=torch.bool, device=center.device)  # forward_masked reads its rows
        return loss.forward_masked(student_masked, probs, masks, masks_weight=masks_weight)

    return ibot_step_loss


reference = dinov2_eager.ibot_step_loss


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels import dino_student_ce, dino_teacher

    teacher = dino_teacher.roofline_cost(R=shape["M"], K=shape["K"], dtype_bytes=dtype_bytes)
    student = dino_student_ce.roofline_cost(R=shape["M"], K=shape["K"], T=1, dtype_bytes=dtype_bytes)
    return {key: teacher[key] + student[key] for key in ("flops", "bytes")}
