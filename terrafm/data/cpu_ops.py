"""Thin torch wrappers over the C++ CPU kernels in terrafm._C (csrc/)."""

import torch


def normalize_bands(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """C++ twin of terrafm_kernels.reference.normalize_bands for one (C, H, W) uint16 tile."""
    from terrafm import _C

    if x.dtype != torch.uint16 or x.dim() != 3 or x.device.type != "cpu":
        raise ValueError(
            f"normalize_bands (cpp) takes a CPU (C, H, W) uint16 tile; got {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    out = torch.empty(x.shape, dtype=torch.float32)
    _C.normalize_u16(
        x.contiguous().numpy(), mean.float().contiguous().numpy(), std.float().contiguous().numpy(), out.numpy()
    )
    return out
