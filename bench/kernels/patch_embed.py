"""Bench: patchify + projection + bias (Conv2d with kernel == stride == p), forward."""

import torch

from terrafm_kernels import reference as _reference

OP = "patch_embed"
BACKWARD = False


def shapes(quick: bool) -> list[dict]:
    if quick:
        return [{"B": 8, "C": 12, "H": 96, "W": 96, "E": 384, "p": 16}]
    return [{"B": 64, "C": 12, "H": 224, "W": 224, "E": 768, "p": 16},
            {"B": 64, "C": 2, "H": 224, "W": 224, "E": 768, "p": 16},
            {"B": 32, "C": 12, "H": 224, "W": 224, "E": 1024, "p": 16}]


def inputs(shape: dict, device: str, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape["B"], shape["C"], shape["H"], shape["W"], generator=g).to(device, dtype)
    weight = (0.02 * torch.randn(shape["E"], shape["C"], shape["p"], shape["p"], generator=g)).to(device, dtype)
    bias = torch.zeros(shape["E"], device=device, dtype=dtype)
    return x, weight, bias


def kernel():
    from terrafm_kernels.patch_embed import patch_embed

    return patch_embed


reference = _reference.patch_embed


def cost(shape: dict) -> dict:
    from terrafm_kernels.patch_embed import roofline_cost

    return roofline_cost(**shape)
