"""Bench: patchify + projection + bias (Conv2d with kernel == stride == p), forward and backward, at the
shapes the presets call it with: E = attn_dim = 3 x D, per GPU one view of every sample, a global crop (224 px) or a
local crop (96 px), Sentinel-2 (12 bands) and Sentinel-1 (2 bands). Each view draws its own sensors and the model
embeds views with the same sensors and size in one call, so one view is the typical call (two global views share
one in 1 of 6 steps). As in training, the images need no gradient: the backward is grad_weight and grad_bias only."""

import torch

from terrafm_kernels import reference as _reference

OP = "patch_embed"
BACKWARD = True
KERNEL_MODULES = ("patch_embed",)


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "C": 12, "H": 96, "W": 96, "E": 384, "p": 16}]
    return [{"B": 64, "C": 12, "H": 224, "W": 224, "E": 2304, "p": 16},   # ViT-B (vitb_h100), a global view
            {"B": 64, "C": 12, "H": 96, "W": 96, "E": 2304, "p": 16},     # ViT-B, a local view
            {"B": 64, "C": 2, "H": 224, "W": 224, "E": 2304, "p": 16},    # ViT-B, Sentinel-1
            {"B": 32, "C": 12, "H": 224, "W": 224, "E": 3072, "p": 16}]   # ViT-L (vitl_h100), a global view


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape["B"], shape["C"], shape["H"], shape["W"], generator=g).to(device, dtype)
    weight = (0.02 * torch.randn(shape["E"], shape["C"], shape["p"], shape["p"], generator=g)).to(device, dtype)
    bias = torch.zeros(shape["E"], device=device, dtype=dtype, requires_grad=True)
    return x, weight.requires_grad_(), bias


def kernel():
    from terrafm_kernels.patch_embed import patch_embed

    def loss(*args):
        return patch_embed(*args).float().square().mean()

    return loss


def reference(*args):
    return _reference.patch_embed(*args).float().square().mean()


def cost(shape: dict, dtype_bytes: int = 2) -> dict:
    from terrafm_kernels.patch_embed import roofline_cost

    return roofline_cost(**shape, dtype_bytes=dtype_bytes, backward=True, grad_input=False)
