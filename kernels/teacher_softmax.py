"""Dual-centering teacher softmax with the batch statistics of both centre updates: two kernels, no partials.

Math (reference.teacher_softmax): for teacher logits t (R, K), centres c, c_h (K,),
    probs = softmax((t - alpha c - (1 - alpha) c_h) / temperature)        (R, K) fp32
    logit_sum = sum_r t[r],  high_logit_sum = sum_r high_weight[r] t[r]    (K,) fp32
The caller all-reduces the two sums once per step and feeds them to DualCenteringSoftmax.update.

Kernels: both run one program per chunk of BLOCK_K prototype columns over all R rows, so each
program owns its columns' statistics outright (no partials to write and reduce). The stats kernel
writes, per row and chunk, the chunk's max m and sum of exp(x - m) (R x chunks x 8 bytes) and the
complete column sums of t and high_weight * t; torch combines the rows' chunk statistics (tiny,
deterministic). The probs kernel re-reads the logits and writes exp(x - max) / sum. The logits are
centred and divided by the temperature in the same order as the reference (t - alpha c -
(1 - alpha) c_h, then / tau): with tiny temperatures the exponent is in the hundreds and a rescaled
exp2 form was measured 7x further from the fp64 oracle than PyTorch (hypothesis case R=9, K=195,
alpha=0). No atomics: results are bitwise reproducible for a fixed shape, which exact resume needs.

Cost per call (e = bytes per logit; counts at the production shape in efficiency()):
    useful FLOPs ~ 11 R K (centre 2, scale, max, shift, exp, sum, normalise, three for the column sums)
    executed FLOPs ~ 16 R K (the probs kernel recomputes the centred exponent: 6 per element)
    minimum HBM bytes = R K e (read logits) + 4 R K (write probs) + 8 K (read centres) + 8 K (stats)
    moved = 2 R K e + 4 R K + 16 K + 16 R (K / BLOCK_K): the second read of the logits (recompute
    instead of storing unnormalised exponentials, which would cost 8 R K) is the one overhead:
    1.33x the minimum for 16-bit logits, 1.5x for fp32. Grid: K / BLOCK_K programs (256 at
    K = 65536), enough for every SM of an H100 whatever R is.
"""


from functools import partial

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, check_alpha, check_positive, check_tensor, hbm_bytes, interpreted, pad

# H100/A100 config: the op is bandwidth bound. A (BLOCK_R, BLOCK_K) = (8, 256) tile over 4 warps is 16
# elements per thread per load; BLOCK_K = 256 gives K / 256 = 256 programs at K = 65536 (2 per SM of
# an H100, 2.4 per SM of an A100) for any number of rows (see compile_specs and kernels.compile_report).
GPU_BLOCK_R = 8
GPU_BLOCK_K = 256
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_R = 4
INTERPRETER_BLOCK_K = 64


@triton.jit
def _centred(logits_ptr, center_ptr, center_high_ptr, rows, row_mask, cols, col_mask, K, temperature, alpha):
    """(t (BLOCK_R, BLOCK_K) fp32, x = (t - alpha c - (1 - alpha) c_h) / tau with -inf in masked columns)."""
    t = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    c = alpha * tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    c_high = (1.0 - alpha) * tl.load(center_high_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    x = tl.where(col_mask[None, :], (t - c[None, :] - c_high[None, :]) / temperature, float("-inf"))
    return t, x


@triton.jit
def _stats_kernel(
    logits_ptr, center_ptr, center_high_ptr, high_weight_ptr, row_stats_ptr, logit_sum_ptr, high_sum_ptr,
    R, K, temperature, alpha,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per column chunk: each row's chunk max and sum of exp -> row_stats (2, R, chunks); the chunk's
    column sums of t and high_weight * t over all rows -> logit_sum, high_sum (K,)."""
    chunk = tl.program_id(0)
    chunks = tl.num_programs(0)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    logit_sum = tl.zeros([BLOCK_K], tl.float32)
    high_sum = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        t, x = _centred(logits_ptr, center_ptr, center_high_ptr, rows, row_mask, cols, col_mask, K, temperature,
                        alpha)
        m = tl.max(x, axis=1)
        tl.store(row_stats_ptr + rows * chunks + chunk, m, mask=row_mask)
        tl.store(row_stats_ptr + (R + rows) * chunks + chunk, tl.sum(tl.exp(x - m[:, None]), axis=1), mask=row_mask)
        high_weight = tl.load(high_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        logit_sum += tl.sum(t, axis=0)  # masked rows load t = 0
        high_sum += tl.sum(t * high_weight[:, None], axis=0)
    tl.store(logit_sum_ptr + cols, logit_sum, mask=col_mask)
    tl.store(high_sum_ptr + cols, high_sum, mask=col_mask)


@triton.jit
def _probs_kernel(
    logits_ptr, center_ptr, center_high_ptr, row_max_ptr, row_inv_sum_ptr, probs_ptr,
    R, K, temperature, alpha,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per column chunk: probs = exp(x - row max) / row sum for all rows."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        _, x = _centred(logits_ptr, center_ptr, center_high_ptr, rows, row_mask, cols, col_mask, K, temperature,
                        alpha)
        row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
        inv_sum = tl.load(row_inv_sum_ptr + rows, mask=row_mask, other=0.0)
        p = tl.exp(x - row_max[:, None]) * inv_sum[:, None]
        tl.store(probs_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], p,
                 mask=row_mask[:, None] & col_mask[None, :])


def launch_plan(R: int, K: int, interpreter: bool = False) -> dict:
    """Tiles and grid of both kernels: the one place the launcher and efficiency() read them."""
    block_r, block_k = (INTERPRETER_BLOCK_R, INTERPRETER_BLOCK_K) if interpreter else (GPU_BLOCK_R, GPU_BLOCK_K)
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "grid": (triton.cdiv(K, block_k),)}


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
    plan = launch_plan(R, K, interpreted(teacher_logits))
    chunks = plan["grid"][0]
    tiles = {"BLOCK_R": plan["BLOCK_R"], "BLOCK_K": plan["BLOCK_K"], "num_warps": GPU_NUM_WARPS}
    device = teacher_logits.device
    row_stats = torch.empty((2, R, chunks), dtype=torch.float32, device=device)
    logit_sum = torch.empty(K, dtype=torch.float32, device=device)
    high_sum = torch.empty(K, dtype=torch.float32, device=device)
    _stats_kernel[plan["grid"]](teacher_logits, center, center_high, high_weight, row_stats, logit_sum, high_sum,
                                R, K, temperature, alpha, **tiles)
    m, s = row_stats
    row_max = m.max(dim=1).values
    row_inv_sum = 1.0 / (s * torch.exp(m - row_max[:, None])).sum(dim=1)
    probs = torch.empty((R, K), dtype=torch.float32, device=device)
    _probs_kernel[plan["grid"]](teacher_logits, center, center_high, row_max, row_inv_sum, probs, R, K, temperature,
                                alpha, **tiles)
    return probs, logit_sum, high_sum


@_teacher_softmax_op.register_fake
def _(teacher_logits, center, center_high, high_weight, temperature, alpha):
    R, K = teacher_logits.shape
    new = teacher_logits.new_empty
    return new((R, K), dtype=torch.float32), new((K,), dtype=torch.float32), new((K,), dtype=torch.float32)


def roofline_cost(R: int, K: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Useful FLOPs and minimum HBM bytes of one call: R teacher rows, K prototypes, dtype_bytes per logit."""
    return {"flops": 11 * R * K, "bytes": R * K * dtype_bytes + 4 * R * K + 16 * K}


# The presets' call (vitb_h100, per GPU): 2 global views x 64 samples = 128 teacher rows, K = 65536.
PRODUCTION_SHAPE = {"R": 128, "K": 65536}


def efficiency(kernel: str, R: int, K: int, dtype_bytes: int, sms: int, concurrent: int, l2_bytes: int) -> dict:
    """Counts of the whole op (stats + probs kernels, and torch's combine of the row statistics) from
    launch_plan's tiles and grid, the same for both kernels' rows (docs/kernels.md, "Efficiency counts")."""
    plan = launch_plan(R, K)
    br, bk, chunks, e = plan["BLOCK_R"], plan["BLOCK_K"], plan["grid"][0], dtype_bytes
    padded = pad(R, br) * chunks * bk
    cols = lambda c: min(bk, K - c * bk)  # noqa: E731
    stats = {"logits": R * K * e, "centres": 8 * K, "row_stats": 8 * R * chunks, "sums": 8 * K, "high_weight": 4 * R}
    stats_touch = lambda c, _y, _z: [("logits", c, R * cols(c) * e), ("centres", c, 8 * cols(c)),  # noqa: E731
                                     ("row_stats", c, 8 * R), ("sums", c, 8 * cols(c)), ("high_weight", 0, 4 * R)]
    probs = {"logits": R * K * e, "centres": 8 * K, "row": 8 * R, "probs": 4 * R * K}
    probs_touch = lambda c, _y, _z: [("logits", c, R * cols(c) * e), ("centres", c, 8 * cols(c)),  # noqa: E731
                                     ("row", 0, 8 * R), ("probs", c, 4 * R * cols(c))]
    moved = (hbm_bytes(plan["grid"], stats_touch, stats, concurrent, l2_bytes) + 8 * R * chunks + 8 * R
             + hbm_bytes(plan["grid"], probs_touch, probs, concurrent, l2_bytes))
    floor = roofline_cost(R, K, e)
    return {"useful_flops": floor["flops"], "executed_flops": 16 * padded, "min_bytes": floor["bytes"],
            "moved_bytes": moved, "flop_kind": "fp32"}


def compile_specs() -> list[dict]:
    """Every shipped configuration (logit dtype x kernel) for the AOT compile report."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        common = {"constexprs": {"BLOCK_R": GPU_BLOCK_R, "BLOCK_K": GPU_BLOCK_K}, "num_warps": GPU_NUM_WARPS,
                  "num_stages": 3, "uses_dot": False,
                  "efficiency": partial(efficiency, "op", **PRODUCTION_SHAPE, dtype_bytes=dtype.itemsize)}
        scalars = {"R": "i32", "K": "i32", "temperature": "fp32", "alpha": "fp32"}
        specs.append({
            **common, "name": f"teacher_softmax_stats_{name}", "fn": _stats_kernel,
            "signature": {"logits_ptr": ptr, "center_ptr": "*fp32", "center_high_ptr": "*fp32",
                          "high_weight_ptr": "*fp32", "row_stats_ptr": "*fp32", "logit_sum_ptr": "*fp32",
                          "high_sum_ptr": "*fp32", **scalars},
        })
        specs.append({
            **common, "name": f"teacher_softmax_probs_{name}", "fn": _probs_kernel,
            "signature": {"logits_ptr": ptr, "center_ptr": "*fp32", "center_high_ptr": "*fp32",
                          "row_max_ptr": "*fp32", "row_inv_sum_ptr": "*fp32", "probs_ptr": "*fp32", **scalars},
        })
    return specs
