"""Bench: DINOv2's class-token DINO loss step (centred teacher, local + global crops), forward + backward:
the terrafm_kernels.dino.DINOLoss drop-in against DINOv2's eager math, at its ViT-L per-GPU shapes."""

import torch

from .. import dinov2_eager

OP = "dinov2_dino_loss"
BACKWARD = True
KERNEL_MODULES = ("dino_teacher", "dino_student_ce")
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "local": 4, "K": 8192}]
    return [{"B": 64, "local": 8, "K": 65536}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    B, n_local, K = shape["B"], shape["local"], shape["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    student_local = torch.randn(n_local * B, K, generator=g).to(device, dtype).requires_grad_(True)
    student_global = torch.randn(2 * B, K, generator=g).to(device, dtype).requires_grad_(True)
    teacher_logits = torch.randn(2 * B, K, generator=g).to(device, dtype)
    center = (0.1 * torch.randn(1, K, generator=g)).to(device)
    return student_local, student_global, teacher_logits, center, n_local


def kernel():
    from terrafm_kernels.dino import DINOLoss

    def dino_step_loss(student_local, student_global, teacher_logits, center, n_local, teacher_temp=0.07):
        loss = DINOLoss(center.shape[-1], backend="triton").to(center.device)
        loss.center.copy_(center)
        probs = loss.softmax_center_teacher(teacher_logits, teacher_temp).view(2, -1, center.shape[-1])
        return loss(student_local.chunk(n_local), probs) + loss([student_global], [probs.flatten(0, 1)])

    return dino_step_loss


reference = dinov2_eager.dino_step_loss


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels import dino_student_ce, dino_teacher

    B, n_local, K = shape["B"], shape["local"], shape["K"]
    parts = [dino_teacher.roofline_cost(R=2 * B, K=K, dtype_bytes=dtype_bytes)]
    parts += [dino_student_ce.roofline_cost(R=B, K=K, T=2, dtype_bytes=dtype_bytes)] * n_local
    parts += [dino_student_ce.roofline_cost(R=2 * B, K=K, T=1, dtype_bytes=dtype_bytes)]
    return {key: sum(p[key] for p in parts) for key in ("flops", "bytes")}
