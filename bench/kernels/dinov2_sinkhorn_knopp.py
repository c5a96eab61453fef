"""Bench: DINOv2's Sinkhorn-Knopp teacher (3 iterations), forward only: the log-domain kernel of
terrafm_kernels.dino against DINOv2's eager exp / divide loop, for class tokens and iBOT's masked patches."""

import torch

from .. import dinov2_eager

OP = "dinov2_sinkhorn_knopp"
BACKWARD = False
KERNEL_MODULES = ("dino_teacher",)
PEAK = "tflops_fp32"  # no tensor-core dots: its FLOPs run on the FMA units (bench/roofline.py)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"R": 128, "K": 8192}]
    return [{"R": 2 * dinov2_eager.VIT_L["B"], "K": 65536}, {"R": dinov2_eager.VIT_L["masked"], "K": 65536}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(shape["R"], shape["K"], generator=g).to(device, dtype), 0.07


def kernel():
    from terrafm_kernels.dino_teacher import sinkhorn_knopp

    return sinkhorn_knopp


reference = dinov2_eager.sinkhorn_knopp


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.dino_teacher import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes, n_iterations=3)
