"""Student soft-target cross-entropy with per-row weights, forward and backward fused: the student side of
DINOv2's DINO loss (view pairs) and iBOT loss (masked patch tokens).

Math (reference.weighted_soft_cross_entropy): student logits x (R, K), teacher targets P (T, R, K) (T
teacher views, each paired with every student row), row weights w (R,), student temperature tau.
With Q = sum_t P[t] (R, K) and n = sum_k Q (R,):
    loss         = -sum_r w[r] sum_t P[t, r] . log_softmax(x[r] / tau)
                 =  sum_r w[r] (n[r] lse(x[r] / tau) - Q[r] . x[r] / tau)
    d loss / d x = w[r] (n[r] softmax(x[r] / tau) - Q[r]) / tau
    d loss / d w = each row's loss (the targets are constant: teacher outputs)
DINOv2's DINOLoss.forward is one call per student view with w = 1 / R (the mean over samples) and its
T teacher views; iBOTPatchLoss.forward_masked is T = 1 and w = masks_weight / number of images.

Kernel: programs over (row block, K split). Forward keeps an online logsumexp (log2 units), Q . (x - running
max) and n per row (dino_cross_entropy's lse_step), summing the T targets in registers, and writes these four
statistics per split; torch combines the splits (tiny, deterministic). Backward re-streams x and P and writes
the gradient. The saved state is 4 floats per row (3 for the logits' gradient, the row's loss for the
weights'): no (R, K) fp32 log-probabilities, products or gradients in fp32.

Cost per call (e = bytes per student logit, targets fp32):
    forward  FLOPs ~ (8 + 2 T) R K,  minimum HBM bytes = R K e + 4 T R K
    backward FLOPs ~ (6 + 2 T) R K,  minimum HBM bytes = 2 R K e + 4 T R K
DINOv2's eager loss also writes and re-reads the fp32 log-softmax (R, K), the product with each
teacher view, and their gradients: ~(6 + 4 T) x 4 R K bytes more per step, and 4 R K (1 + T) of
activation memory held for backward.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import (
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_contiguous,
    check_positive,
    check_tensor,
    hbm_bytes,
    interpreted,
    launch_kernel,
    no_second_derivative,
    num_splits,
    op_name,
    pad,
    scalar_input,
    sm_count,
)
from .dino_cross_entropy import combine_splits, lse_step

# H100/A100 config: bandwidth bound. A (4, 512) tile over 4 warps is 16 elements per thread for x and
# for the running target sum. K is split so that row blocks x splits covers ~4 programs per SM, which
# the class-token rows (16-128 per view per GPU) need; iBOT's thousands of rows need no split.
GPU_BLOCK_R = 4
GPU_BLOCK_K = 512
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_R = 4
INTERPRETER_BLOCK_K = 4096


@triton.jit
def _load_tile(student_ptr, targets_ptr, rows, row_mask, cols, col_mask, R, K, T):
    """x (BLOCK_R, BLOCK_K) fp32 and Q = sum_t P[t] over the tile, fp32."""
    offset = rows.to(tl.int64)[:, None] * K + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(student_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    q = tl.zeros(x.shape, tl.float32)
    for t in range(0, T):
        t_offset = (t * R + rows).to(tl.int64)[:, None] * K + cols[None, :]
        q += tl.load(targets_ptr + t_offset, mask=mask, other=0.0).to(tl.float32)
    return x, q


@triton.jit
def _student_ce_fwd_kernel(
    student_ptr, targets_ptr, partial_ptr, R, K, T, K_PER_SPLIT, scale,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    k_end = tl.minimum(split * K_PER_SPLIT + K_PER_SPLIT, K)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    qx = tl.zeros([BLOCK_R], tl.float32)
    n = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        x, q = _load_tile(student_ptr, targets_ptr, rows, row_mask, cols, col_mask, R, K, T)
        m, row_sum, qx, n = lse_step(x, q, col_mask, m, row_sum, qx, n, scale)
    out = partial_ptr + rows * splits + split
    stride = R * splits
    tl.store(out, m, mask=row_mask)
    tl.store(out + stride, row_sum, mask=row_mask)
    tl.store(out + 2 * stride, qx, mask=row_mask)
    tl.store(out + 3 * stride, n, mask=row_mask)


@triton.jit
def _student_ce_bwd_kernel(
    student_ptr, targets_ptr, row_max_ptr, log2_sum_ptr, coef_ptr, grad_loss_ptr, grad_ptr,
    R, K, T, K_PER_SPLIT, scale, inv_temperature,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    split = tl.program_id(1)
    k_end = tl.minimum(split * K_PER_SPLIT + K_PER_SPLIT, K)
    row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    log2_sum = tl.load(log2_sum_ptr + rows, mask=row_mask, other=0.0)
    # coef = (w, w n) per row; the upstream gradient is read on device: no host sync
    g = tl.load(grad_loss_ptr).to(tl.float32) * inv_temperature
    w = tl.load(coef_ptr + rows, mask=row_mask, other=0.0) * g
    wn = tl.load(coef_ptr + R + rows, mask=row_mask, other=0.0) * g
    for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        x, q = _load_tile(student_ptr, targets_ptr, rows, row_mask, cols, col_mask, R, K, T)
        softmax = tl.exp2((x - row_max[:, None]) * scale - log2_sum[:, None])
        grad = softmax * wn[:, None] - q * w[:, None]
        offset = rows.to(tl.int64)[:, None] * K + cols[None, :]
        tl.store(grad_ptr + offset, grad.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def launch_plan(R: int, K: int, sms: int, interpreter: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, K splits, K per split): grid (R / BLOCK_R, splits) for both kernels; the one
    place the launcher and efficiency() read them."""
    block_r, block_k = (INTERPRETER_BLOCK_R, INTERPRETER_BLOCK_K) if interpreter else (GPU_BLOCK_R, GPU_BLOCK_K)
    splits, per_split = num_splits(K, triton.cdiv(R, block_r), block_k, 4 * sms)
    return block_r, block_k, splits, per_split


def _launch_shape(student_logits: torch.Tensor) -> tuple[int, int, int, int]:
    R, K = student_logits.shape
    return launch_plan(R, K, sm_count(student_logits.device), interpreted(student_logits))


def _launch_forward(student_logits, targets, row_weight, student_temperature):
    """(loss, row_max, log2_sum, coef, rows_loss): the scalar loss, what the logits' gradient needs (3 floats per
    row) and each row's unweighted loss (the row weights' gradient)."""
    R, K = student_logits.shape
    T = targets.shape[0]
    block_r, block_k, splits, per_split = _launch_shape(student_logits)
    scale = math.log2(math.e) / student_temperature
    partial = torch.empty((4, R, splits), dtype=torch.float32, device=student_logits.device)
    launch_kernel(
        _student_ce_fwd_kernel, (triton.cdiv(R, block_r), splits),
        student_logits, targets, partial, R, K, T, per_split, scale,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=GPU_NUM_WARPS,
    )
    m, row_sum, qx, n = partial
    row_max, log2_sum, qx, n = combine_splits(m, row_sum, qx, n, scale)
    rows_loss = n * log2_sum * math.log(2.0) - qx / student_temperature
    loss = (row_weight * rows_loss).sum()
    return loss, row_max.contiguous(), log2_sum.contiguous(), torch.stack([row_weight, row_weight * n]), rows_loss


def _launch_backward(grad_loss, student_logits, targets, row_max, log2_sum, coef, student_temperature):
    R, K = student_logits.shape
    block_r, block_k, splits, per_split = _launch_shape(student_logits)
    grad = torch.empty_like(student_logits)
    launch_kernel(
        _student_ce_bwd_kernel, (triton.cdiv(R, block_r), splits),
        student_logits, targets, row_max, log2_sum, coef, grad_loss.float().contiguous(), grad,
        R, K, targets.shape[0], per_split, math.log2(math.e) / student_temperature, 1.0 / student_temperature,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=GPU_NUM_WARPS,
    )
    return grad


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes), and a
# second backward through them raises instead of treating the gradient as a constant.
@torch.library.custom_op(op_name("weighted_soft_cross_entropy"), mutates_args=())
def _student_ce_op(student_logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                   student_temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor]:
    return _launch_forward(student_logits, targets, row_weight, student_temperature.item())


@_student_ce_op.register_fake
def _(student_logits, targets, row_weight, student_temperature):
    R = student_logits.shape[0]
    new = student_logits.new_empty
    return (new((), dtype=torch.float32), new((R,), dtype=torch.float32), new((R,), dtype=torch.float32),
            new((2, R), dtype=torch.float32), new((R,), dtype=torch.float32))


@torch.library.custom_op(op_name("weighted_soft_cross_entropy_backward"), mutates_args=())
def _student_ce_backward_op(grad_loss: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                            row_max: torch.Tensor, log2_sum: torch.Tensor, coef: torch.Tensor,
                            student_temperature: torch.Tensor) -> torch.Tensor:
    return _launch_backward(grad_loss, student_logits, targets, row_max, log2_sum, coef, student_temperature.item())


@_student_ce_backward_op.register_fake
def _(grad_loss, student_logits, targets, row_max, log2_sum, coef, student_temperature):
    return torch.empty_like(student_logits)


@torch.library.custom_op(op_name("weighted_soft_cross_entropy_rows_loss"), mutates_args=())
def _rows_loss_op(rows_loss: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Each row's loss, the row weights' gradient, tied to the logits it depends on: a second backward through that
    gradient then refuses by name (no_second_derivative) instead of taking it as constant in the logits."""
    return rows_loss.clone()


@_rows_loss_op.register_fake
def _(rows_loss, student_logits):
    return torch.empty_like(rows_loss)


def _setup_context(ctx, inputs, output):
    student_logits, targets, _row_weight, student_temperature = inputs
    _, row_max, log2_sum, coef, rows_loss = output
    ctx.save_for_backward(student_logits, targets, row_max, log2_sum, coef, rows_loss)
    ctx.mark_non_differentiable(row_max, log2_sum, coef, rows_loss)
    ctx.student_temperature = student_temperature


def _backward(ctx, grad_loss, *_grad_stats):
    """The logits' gradient from the kernel; the row weights' is each row's loss (the loss is linear in them)."""
    *saved, rows_loss = ctx.saved_tensors
    grad = _student_ce_backward_op(grad_loss, *saved, ctx.student_temperature) if ctx.needs_input_grad[0] else None
    grad_row_weight = grad_loss.float() * _rows_loss_op(rows_loss, saved[0]) if ctx.needs_input_grad[2] else None
    return grad, None, grad_row_weight, None


_student_ce_op.register_autograd(_backward, setup_context=_setup_context)
no_second_derivative(_student_ce_backward_op, "weighted_soft_cross_entropy")
no_second_derivative(_rows_loss_op, "weighted_soft_cross_entropy")


def validate(student_logits, targets, row_weight, student_temperature) -> None:
    """A clear error for any input the kernel cannot take, before anything is launched (the torch backend's
    checks too: modules, dino.py)."""
    check_tensor("student_logits", student_logits, 2)
    device = student_logits.device
    check_tensor("teacher targets", targets, 3, device)
    check_tensor("row weights", row_weight, 1, device)
    R, K = student_logits.shape
    if targets.shape[1:] != (R, K) or targets.shape[0] == 0:
        raise ValueError(f"teacher targets (T, R, K) = {tuple(targets.shape)} must pair with student_logits "
                         f"(R, K) = {(R, K)}: the same rows and prototypes, at least one teacher view")
    if row_weight.shape[0] != R:
        raise ValueError(f"row weights have {row_weight.shape[0]} entries but student_logits has R={R} rows")
    if R == 0 or K == 0:
        raise ValueError(f"student_logits must be non-empty (R, K), got shape {(R, K)}")
    check_positive("student_temp", student_temperature)
    check_contiguous(student_logits=student_logits, **{"teacher targets": targets, "row weights": row_weight})


def weighted_soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                                student_temperature: float) -> torch.Tensor:
    """Fused reference.weighted_soft_cross_entropy: scalar fp32 loss, differentiable in student_logits and
    row_weight; the targets are constant (teacher outputs).

    student_logits (R, K) fp32/fp16/bf16; targets (T, R, K) teacher probabilities (fp32 from the teacher
    kernels); row_weight (R,); contiguous, one device.
    """
    validate(student_logits, targets, row_weight, student_temperature)
    return _student_ce_op(student_logits, targets.detach(), row_weight.float().contiguous(),
                          scalar_input(student_temperature))[0]


def roofline_cost(R: int, K: int, T: int = 1, dtype_bytes: int = 2, backward: bool = True) -> dict[str, int]:
    """Minimum cost of forward (+ backward): R student rows, T teacher views (fp32), K prototypes."""
    flops = (8 + 2 * T) * R * K
    nbytes = R * K * dtype_bytes + 4 * T * R * K
    if backward:
        flops += (6 + 2 * T) * R * K
        nbytes += 2 * R * K * dtype_bytes + 4 * T * R * K
    return {"flops": flops, "bytes": nbytes}


# DINOv2's DINOLoss call (one per student view): 64 samples per GPU against 2 teacher views, K = 65536.
PRODUCTION_SHAPE = {"R": 64, "K": 65536, "T": 2}


def efficiency(kernel: str, R: int, K: int, T: int, dtype_bytes: int, sms: int, concurrent: int,
               l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of the "forward" or "backward" kernel from
    launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts")."""
    block_r, block_k, splits, per_split = launch_plan(R, K, sms)
    e, forward = dtype_bytes, kernel == "forward"
    rows = lambda m: min(block_r, R - m * block_r)  # noqa: E731
    cols = lambda j: min(per_split, K - j * per_split)  # noqa: E731
    executed = pad(R, block_r) * splits * pad(per_split, block_k) * ((8 if forward else 6) + 2 * T)
    sizes = {"x": R * K * e, "p": T * R * K * 4, "grad": R * K * e, "stats": 16 * R * splits}

    def touches(m, j, _):
        out = [("x", (m, j), rows(m) * cols(j) * e), ("p", (m, j), T * rows(m) * cols(j) * 4)]
        return out + ([("stats", (m, j), 16 * rows(m))] if forward else [("grad", (m, j), rows(m) * cols(j) * e)])
    moved = hbm_bytes((triton.cdiv(R, block_r), splits), touches, sizes, concurrent, l2_bytes)
    both, fwd = roofline_cost(R, K, T, e, backward=True), roofline_cost(R, K, T, e, backward=False)
    floor = fwd if forward else {k: both[k] - fwd[k] for k in both}
    # per program and column step: BLOCK_R student rows' logits and their T target rows
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved + (16 * R * splits if forward else 0), "flop_kind": "fp32",
            "programs": triton.cdiv(R, block_r) * splits, "step_bytes": block_r * block_k * (e + 4 * T)}


# Integers that are multiples of 16 at the presets' shapes (R = S x B = 640 / 320 rows, K = 65536, K per split a
# multiple of BLOCK_K); T (teacher views) is not. The compile report compiles the variant the JIT builds.
MULTIPLES_OF_16 = ("R", "K", "K_PER_SPLIT")


def compile_specs() -> list[dict]:
    """Every shipped configuration (student dtype x forward/backward) for the AOT compile report."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        common = {"constexprs": {"BLOCK_R": GPU_BLOCK_R, "BLOCK_K": GPU_BLOCK_K}, "num_warps": GPU_NUM_WARPS,
                  "num_stages": 3, "uses_dot": False}
        counts = lambda kernel, e=dtype.itemsize: at_presets(  # noqa: E731
            efficiency, lambda samples: PRODUCTION_SHAPE, kernel=kernel, dtype_bytes=e)  # DINOv2's call on any GPU
        specs.append({
            "name": f"dino_student_ce_fwd_{name}", "fn": _student_ce_fwd_kernel, "efficiency": counts("forward"),
            "signature": {"student_ptr": ptr, "targets_ptr": "*fp32", "partial_ptr": "*fp32", "R": "i32",
                          "K": "i32", "T": "i32", "K_PER_SPLIT": "i32", "scale": "fp32"},
            **common,
        })
        specs.append({
            "name": f"dino_student_ce_bwd_{name}", "fn": _student_ce_bwd_kernel, "efficiency": counts("backward"),
            "signature": {"student_ptr": ptr, "targets_ptr": "*fp32", "row_max_ptr": "*fp32",
                          "log2_sum_ptr": "*fp32", "coef_ptr": "*fp32", "grad_loss_ptr": "*fp32",
                          "grad_ptr": ptr, "R": "i32", "K": "i32", "T": "i32", "K_PER_SPLIT": "i32",
                          "scale": "fp32", "inv_temperature": "fp32"},
            **common,
        })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
