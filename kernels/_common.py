"""Helpers shared by the kernels: input validation (errors name the argument and what would be
right) and the launch-time choices that differ between compiled kernels and the Triton interpreter.
"""

import os

import torch

# The one place TRITON_INTERPRET is read (terrafm.backends asks here too). Triton reads it when a
# kernel is decorated, at import, so it is read once at import: setting it later changes nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def interpreted(tensor: torch.Tensor) -> bool:
    """True when the kernel runs in the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return tensor.device.type == "cpu" or INTERPRET


def check_tensor(name: str, x: torch.Tensor, ndim: int, device: torch.device | None = None,
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise a ValueError/TypeError naming `name` unless x is a contiguous float tensor of ndim dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}; move it there")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {x.stride()}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be on a cuda device (or cpu under TRITON_INTERPRET=1), got {x.device}")
    if x.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{name} is on the cpu: the Triton kernels need cuda tensors, or TRITON_INTERPRET=1 "
                         "set before triton is imported (tests); on cpu use the op registry's torch backend")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (weight of the plain centre), got {alpha}")


def num_splits(K: int, programs: int, block_k: int, target_programs: int) -> tuple[int, int]:
    """Split K so that programs * splits reaches target_programs; returns (splits, K per split).

    K per split is a multiple of block_k and every split is non-empty.
    """
    wanted = max(1, min(_cdiv(target_programs, max(programs, 1)), _cdiv(K, block_k)))
    per_split = _cdiv(_cdiv(K, wanted), block_k) * block_k
    return _cdiv(K, per_split), per_split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
