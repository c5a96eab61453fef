"""Dual-centering teacher softmax with the batch statistics of both centre updates, in one launch.

Math (reference.teacher_softmax): for teacher logits t (R, K), centres c, c_h (K,),
    probs = softmax((t - alpha c - (1 - alpha) c_h) / temperature)        (R, K) fp32
    logit_sum = sum_r t[r],  high_logit_sum = sum_r high_weight[r] t[r]    (K,) fp32
The caller all-reduces the two sums once per step and feeds them to DualCenteringSoftmax.update.

Kernel: one program per block of BLOCK_R rows. Pass 1 streams the rows over K chunks keeping the
online-softmax state (running max m, rescaled sum) and writes
the block's column sums of t and high_weight * t (partial statistics). Pass 2 re-reads the chunks
and writes exp(x - m) / sum. The logits are centred and divided by the temperature in the same
order as the reference (t - alpha c - (1 - alpha) c_h, then / tau): with tiny temperatures the
exponent is in the hundreds and a rescaled exp2 form was measured 7x further from the fp64 oracle
than PyTorch (hypothesis case R=9, K=195, alpha=0). Centre statistics are per-block partial sums
(ceil(R / BLOCK_R), 2, K) reduced by torch.sum afterwards: no atomics, so results are bitwise
reproducible for a fixed shape, which exact resume needs.

Cost per call (e = bytes per logit, P = ceil(R / BLOCK_R)):
    FLOPs ~ 8 R K (centre, divide, max, exp twice, sum, normalise, two column sums)
    minimum HBM bytes = R K e (read logits) + 4 R K (write probs) + 8 K (read centres) + 8 K (stats)
    this kernel moves 2 R K e + 4 R K + 16 P K + 8 K: the second read of the logits (recompute
    instead of storing unnormalised exponentials) and the partial statistics (16 P K, written and
    read back by the reduction) are the overheads; at R = 256, K = 65536, BLOCK_R = 4, fp16 logits
    that is 1.42x the minimum. No (R, K) temporary besides the output is allocated.
"""


import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, check_alpha, check_positive, check_tensor, interpreted, sm_count

# H100/A100 config: the op is bandwidth bound (8 FLOPs per 6-8 bytes). 4 warps over a (BLOCK_R,
# 1024) tile give 8-32 elements per thread per load, enough bytes in flight per SM without spills
# (see compile_specs and kernels.compile_report). BLOCK_R = 1 keeps all SMs busy for the usual
# per-GPU teacher batch (2 global views x 16-128 samples = 32-256 rows < 2 x 132 SMs); BLOCK_R = 4
# quarters the partial-statistics traffic once there are enough rows.
GPU_BLOCK_K = 1024
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_K = 64


@triton.jit
def _teacher_softmax_kernel(
    logits_ptr, center_ptr, center_high_ptr, high_weight_ptr, probs_ptr, partial_ptr,
    R, K, temperature, alpha,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    high_weight = tl.load(high_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    row_offset = rows.to(tl.int64)[:, None] * K
    partial = partial_ptr + pid.to(tl.int64) * 2 * K
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        t = tl.load(logits_ptr + row_offset + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c = alpha * tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        c_high = (1.0 - alpha) * tl.load(center_high_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = tl.where(col_mask[None, :], (t - c[None, :] - c_high[None, :]) / temperature, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        row_sum = row_sum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        tl.store(partial + cols, tl.sum(t, axis=0), mask=col_mask)
        tl.store(partial + K + cols, tl.sum(t * high_weight[:, None], axis=0), mask=col_mask)
    inv_sum = 1.0 / row_sum
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        t = tl.load(logits_ptr + row_offset + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c = alpha * tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        c_high = (1.0 - alpha) * tl.load(center_high_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = (t - c[None, :] - c_high[None, :]) / temperature
        p = tl.exp(x - m[:, None]) * inv_sum[:, None]
        tl.store(probs_ptr + row_offset + cols[None, :], p, mask=mask)


def _block_r(R: int, device: torch.device) -> int:
    return 1 if R <= 2 * sm_count(device) else 4


def _validate(teacher_logits, center, center_high, high_weight, temperature, alpha) -> None:
    check_tensor("teacher_logits", teacher_logits, 2)
    device = teacher_logits.device
    R, K = teacher_logits.shape
    if R == 0 or K == 0:
        raise ValueError(f"teacher_logits must be non-empty (R, K), got shape {tuple(teacher_logits.shape)}")
    for name, x in (("center", center), ("center_high", center_high)):
        check_tensor(name, x, 1, device)
        if x.shape[0] != K:
            raise ValueError(f"{name} has {x.shape[0]} entries but teacher_logits has K={K} prototypes")
    check_tensor("high_weight", high_weight, 1, device)
    if high_weight.shape[0] != R:
        raise ValueError(f"high_weight has {high_weight.shape[0]} entries but teacher_logits has R={R} rows")
    check_positive("temperature", temperature)
    check_alpha(alpha)


def teacher_softmax(
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    center_high: torch.Tensor,
    high_weight: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused reference.teacher_softmax: (probs (R, K) fp32, logit_sum (K,) fp32, high_logit_sum (K,) fp32).

    teacher_logits (R, K) fp32/fp16/bf16; center, center_high (K,); high_weight (R,); all contiguous
    on one device. No gradient flows (the teacher is not trained by backprop).
    """
    _validate(teacher_logits, center, center_high, high_weight, temperature, alpha)
    return _teacher_softmax_op(teacher_logits.detach(), center.detach(), center_high.detach(), high_weight.detach(),
                               float(temperature), float(alpha))


# A torch custom op: opaque to torch.compile (0 graph breaks; the fake function gives output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op("terrafm::teacher_softmax", mutates_args=())
def _teacher_softmax_op(teacher_logits: torch.Tensor, center: torch.Tensor, center_high: torch.Tensor,
                        high_weight: torch.Tensor, temperature: float,
                        alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    R, K = teacher_logits.shape
    block_r = _block_r(R, teacher_logits.device)
    block_k = INTERPRETER_BLOCK_K if interpreted(teacher_logits) else GPU_BLOCK_K
    programs = triton.cdiv(R, block_r)
    probs = torch.empty((R, K), dtype=torch.float32, device=teacher_logits.device)
    partial = torch.empty((programs, 2, K), dtype=torch.float32, device=teacher_logits.device)
    _teacher_softmax_kernel[(programs,)](
        teacher_logits, center, center_high, high_weight, probs, partial, R, K, temperature, alpha,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=GPU_NUM_WARPS,
    )
    stats = partial.sum(dim=0)
    return probs, stats[0].clone(), stats[1].clone()


@_teacher_softmax_op.register_fake
def _(teacher_logits, center, center_high, high_weight, temperature, alpha):
    R, K = teacher_logits.shape
    new = teacher_logits.new_empty
    return new((R, K), dtype=torch.float32), new((K,), dtype=torch.float32), new((K,), dtype=torch.float32)


def roofline_cost(R: int, K: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Minimum cost of one call: R teacher rows, K prototypes, dtype_bytes per logit (4/2)."""
    return {"flops": 8 * R * K, "bytes": R * K * dtype_bytes + 4 * R * K + 16 * K}


def compile_specs() -> list[dict]:
    """Every shipped configuration (logit dtype x BLOCK_R) for the AOT compile report."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        for block_r in (1, 4):
            specs.append({
                "name": f"teacher_softmax_{str(dtype).removeprefix('torch.')}_r{block_r}",
                "fn": _teacher_softmax_kernel,
                "signature": {
                    "logits_ptr": ptr, "center_ptr": "*fp32", "center_high_ptr": "*fp32",
                    "high_weight_ptr": "*fp32", "probs_ptr": "*fp32", "partial_ptr": "*fp32",
                    "R": "i32", "K": "i32", "temperature": "fp32", "alpha": "fp32",
                },
                "constexprs": {"BLOCK_R": block_r, "BLOCK_K": GPU_BLOCK_K},
                "num_warps": GPU_NUM_WARPS,
                "num_stages": 3,
                "uses_dot": False,
            })
    return specs
