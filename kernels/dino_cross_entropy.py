"""Student DINO cross-entropy over (teacher view, student view) pairs, forward and backward fused.

Math (reference.dino_cross_entropy): student logits x (S, B, K), teacher probs P (T, B, K), the T
teacher views being the first T student views, tau the student temperature, pairs = #{(t, s): t != s},
c = 1 / (pairs B). For a student row (s, b) let Q = sum_{t != s} P[t, b] (K,) and n = sum_k Q[k]:
    loss      = c sum_{s, b} ( n lse(x[s, b] / tau) - Q . x[s, b] / tau )
    d loss / d x[s, b] = c (n softmax(x[s, b] / tau) - Q) / tau
(n = number of paired teacher views when the probabilities sum to 1; the kernel uses the exact sum.)

Kernel: programs over (b, K split). A program holds all S views of one sample as two tiles, the
first BLOCK_S_HI views (the largest power of 2 <= S) and the rest padded to BLOCK_S_LO (a power of 2,
0 for none): S = 10 runs 8 + 2 rows, where one 16-row tile ran 16. Both tiles come from one load of
the sample's teacher rows, so each teacher row is read once per sample, and one sum over t serves
every view: Q = sum_t P[t] - P[s] costs one subtraction per element.
Forward keeps an online logsumexp (log2 units) plus Q . (x - running max) and n per row and writes these four
partial statistics per split; torch combines the splits (tiny, deterministic) into the loss and the
per-row lse and n that backward needs. Backward re-streams x and P and writes the gradient. No
(rows, K) fp32 log-probabilities are stored: the saved state is 3 floats per student row.

Cost per call (e = bytes per student logit, S B rows, K prototypes, T teacher views):
    forward  FLOPs ~ (8 S + 2 T) B K,  minimum HBM bytes = S B K e + 4 T B K
    backward FLOPs ~ (6 S + 2 T) B K,  minimum HBM bytes = 2 S B K e + 4 T B K
Both kernels move exactly their minimum plus O(S B splits) partials: nothing of size (S B K) in fp32.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import (
    PRESET_SAMPLES,
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

# H100/A100 config: bandwidth bound, sized by Little's law (the compile report's in-flight check). BLOCK_K 256
# with 4 warps: the presets' (8 + 2, 256) tiles, 7 KB of 16-bit logits and fp32 targets a column step. Compile
# report (the variant the JIT builds at the presets' shapes, sm_80 / sm_90): 96-128 registers, no spills, 4-5
# programs per SM, 28-60 KB in flight per SM (the (8 + 2, 128) tiles at 8 warps before: 3 programs, 10.5 KB,
# under the H100's ~15 KB). K is split so that B x splits covers ~4 programs per SM.
GPU_BLOCK_K = 256
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_K = 32


@triton.jit
def _load_views(student_ptr, teacher_ptr, b, first, cols, col_mask, S, T, B, K, ROWS: tl.constexpr):
    """x (ROWS, BLOCK_K) fp32 and P (zero where a view has no teacher row) for views first.. of sample b."""
    views = first + tl.arange(0, ROWS)
    offset = (views.to(tl.int64) * B + b)[:, None] * K + cols[None, :]
    s_mask = (views < S)[:, None] & col_mask[None, :]
    t_mask = ((views < T) & (views < S))[:, None] & col_mask[None, :]
    x = tl.load(student_ptr + offset, mask=s_mask, other=0.0).to(tl.float32)
    p = tl.load(teacher_ptr + offset, mask=t_mask, other=0.0).to(tl.float32)
    return x, p


@triton.jit
def _teacher_only_sum(teacher_ptr, b, cols, col_mask, S, T, B, K):
    """sum of the teacher rows t >= S (teacher views with no student view: none when T <= S)."""
    total = tl.zeros(cols.shape, tl.float32)
    for t in range(S, T):
        total += tl.load(teacher_ptr + (t * B + b).to(tl.int64) * K + cols, mask=col_mask, other=0.0)
    return total


@triton.jit
def _load_tiles(student_ptr, teacher_ptr, b, cols, col_mask, S, T, B, K, BLOCK_S_HI: tl.constexpr,
                BLOCK_S_LO: tl.constexpr):
    """One column block of both view tiles and the teacher sum over every view: (x_hi, p_hi, x_lo, p_lo, total).
    Without a second tile (BLOCK_S_LO = 0) x_lo, p_lo repeat the first tile; the kernels then never read them."""
    x_hi, p_hi = _load_views(student_ptr, teacher_ptr, b, 0, cols, col_mask, S, T, B, K, BLOCK_S_HI)
    total = tl.sum(p_hi, axis=0) + _teacher_only_sum(teacher_ptr, b, cols, col_mask, S, T, B, K)
    if BLOCK_S_LO > 0:
        x_lo, p_lo = _load_views(student_ptr, teacher_ptr, b, BLOCK_S_HI, cols, col_mask, S, T, B, K, BLOCK_S_LO)
        total += tl.sum(p_lo, axis=0)
    else:
        x_lo, p_lo = x_hi, p_hi
    return x_hi, p_hi, x_lo, p_lo, total


@triton.jit
def lse_step(x, q, col_mask, m, row_sum, qx, n, scale):
    """One BLOCK_K step of the per-row online logsumexp (log2 units), n and Q . (x - ref), ref the running max (0
    while it is -inf), the dot moved with ref as it grows. Q . x itself lost the loss to rounding: n m - Q . x cancels
    at the logits' scale (equal fp16 logits of 6e4 at tau 1e-4: 4.9 off, the reference 1e-7)."""
    m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], x, float("-inf")), axis=1))
    ref = tl.where(m == float("-inf"), 0.0, m)
    ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = x - ref_new[:, None]  # masked columns: x = 0 and q = 0
    exps = tl.where(col_mask[None, :], tl.exp2(d * scale), 0.0)
    row_sum = row_sum * tl.exp2((m - ref_new) * scale) + tl.sum(exps, axis=1)
    return m_new, row_sum, qx + n * (ref - ref_new) + tl.sum(q * d, axis=1), n + tl.sum(q, axis=1)


@triton.jit
def _store_stats(partial_ptr, b, split, splits, first, S, B, m, row_sum, qx, n, ROWS: tl.constexpr):
    views = first + tl.arange(0, ROWS)
    out = partial_ptr + (views * B + b) * splits + split
    stride = S * B * splits
    mask = views < S
    tl.store(out, m, mask=mask)
    tl.store(out + stride, row_sum, mask=mask)
    tl.store(out + 2 * stride, qx, mask=mask)
    tl.store(out + 3 * stride, n, mask=mask)


@triton.jit
def _dino_ce_fwd_kernel(
    student_ptr, teacher_ptr, partial_ptr,
    S, T, B, K, K_PER_SPLIT, scale,
    BLOCK_S_HI: tl.constexpr, BLOCK_S_LO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    k_end = tl.minimum(split * K_PER_SPLIT + K_PER_SPLIT, K)
    m_hi = tl.full([BLOCK_S_HI], float("-inf"), tl.float32)
    sum_hi = tl.zeros([BLOCK_S_HI], tl.float32)
    qx_hi = tl.zeros([BLOCK_S_HI], tl.float32)
    n_hi = tl.zeros([BLOCK_S_HI], tl.float32)
    if BLOCK_S_LO > 0:
        m_lo = tl.full([BLOCK_S_LO], float("-inf"), tl.float32)
        sum_lo = tl.zeros([BLOCK_S_LO], tl.float32)
        qx_lo = tl.zeros([BLOCK_S_LO], tl.float32)
        n_lo = tl.zeros([BLOCK_S_LO], tl.float32)
    for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        x_hi, p_hi, x_lo, p_lo, total = _load_tiles(student_ptr, teacher_ptr, b, cols, col_mask, S, T, B, K,
                                                    BLOCK_S_HI, BLOCK_S_LO)
        if BLOCK_S_LO > 0:
            m_lo, sum_lo, qx_lo, n_lo = lse_step(x_lo, total[None, :] - p_lo, col_mask, m_lo, sum_lo, qx_lo,
                                                  n_lo, scale)
        m_hi, sum_hi, qx_hi, n_hi = lse_step(x_hi, total[None, :] - p_hi, col_mask, m_hi, sum_hi, qx_hi, n_hi,
                                              scale)
    _store_stats(partial_ptr, b, split, splits, 0, S, B, m_hi, sum_hi, qx_hi, n_hi, BLOCK_S_HI)
    if BLOCK_S_LO > 0:
        _store_stats(partial_ptr, b, split, splits, BLOCK_S_HI, S, B, m_lo, sum_lo, qx_lo, n_lo, BLOCK_S_LO)


@triton.jit
def _load_row_stats(row_max_ptr, log2_sum_ptr, n_ptr, b, first, S, B, ROWS: tl.constexpr):
    views = first + tl.arange(0, ROWS)
    mask = views < S
    row_max = tl.load(row_max_ptr + views * B + b, mask=mask, other=0.0)
    log2_sum = tl.load(log2_sum_ptr + views * B + b, mask=mask, other=0.0)
    n = tl.load(n_ptr + views * B + b, mask=mask, other=0.0)
    return row_max, log2_sum, n


@triton.jit
def _store_grad(grad_ptr, x, q, row_max, log2_sum, n, scale, grad_scale, b, first, cols, col_mask, S, B, K,
                ROWS: tl.constexpr):
    """grad = c (n softmax(x / tau) - Q) / tau for views first.. of sample b (grad_scale = c / tau)."""
    softmax = tl.exp2((x - row_max[:, None]) * scale - log2_sum[:, None])
    grad = (softmax * n[:, None] - q) * grad_scale
    views = first + tl.arange(0, ROWS)
    offset = (views.to(tl.int64) * B + b)[:, None] * K + cols[None, :]
    tl.store(grad_ptr + offset, grad.to(grad_ptr.dtype.element_ty), mask=(views < S)[:, None] & col_mask[None, :])


@triton.jit
def _dino_ce_bwd_kernel(
    student_ptr, teacher_ptr, row_max_ptr, log2_sum_ptr, n_ptr, grad_loss_ptr, grad_ptr,
    S, T, B, K, K_PER_SPLIT, scale, grad_scale,
    BLOCK_S_HI: tl.constexpr, BLOCK_S_LO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    k_end = tl.minimum(split * K_PER_SPLIT + K_PER_SPLIT, K)
    max_hi, log2_sum_hi, n_hi = _load_row_stats(row_max_ptr, log2_sum_ptr, n_ptr, b, 0, S, B, BLOCK_S_HI)
    if BLOCK_S_LO > 0:
        max_lo, log2_sum_lo, n_lo = _load_row_stats(row_max_ptr, log2_sum_ptr, n_ptr, b, BLOCK_S_HI, S, B,
                                                    BLOCK_S_LO)
    grad_scale = grad_scale * tl.load(grad_loss_ptr).to(tl.float32)  # read on device: no host sync
    for k0 in range(split * K_PER_SPLIT, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        x_hi, p_hi, x_lo, p_lo, total = _load_tiles(student_ptr, teacher_ptr, b, cols, col_mask, S, T, B, K,
                                                    BLOCK_S_HI, BLOCK_S_LO)
        if BLOCK_S_LO > 0:
            _store_grad(grad_ptr, x_lo, total[None, :] - p_lo, max_lo, log2_sum_lo, n_lo, scale, grad_scale, b,
                        BLOCK_S_HI, cols, col_mask, S, B, K, BLOCK_S_LO)
        _store_grad(grad_ptr, x_hi, total[None, :] - p_hi, max_hi, log2_sum_hi, n_hi, scale, grad_scale, b, 0,
                    cols, col_mask, S, B, K, BLOCK_S_HI)


def view_tiles(S: int) -> tuple[int, int]:
    """(BLOCK_S_HI, BLOCK_S_LO): the largest power of 2 <= S views, and the rest padded to a power of 2
    (0: no second tile). S = 10 -> (8, 2): 10 rows executed, where one (16, BLOCK_K) tile ran 16."""
    hi = 1 << (S.bit_length() - 1)
    return hi, (triton.next_power_of_2(S - hi) if S > hi else 0)


def launch_plan(S: int, B: int, K: int, sms: int, interpreter: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_S_HI, BLOCK_S_LO, BLOCK_K, K splits, K per split): grid (B, splits) for both kernels; the
    one place the launcher and efficiency() read them."""
    block_k = INTERPRETER_BLOCK_K if interpreter else GPU_BLOCK_K
    splits, per_split = num_splits(K, B, block_k, 4 * sms)
    return *view_tiles(S), block_k, splits, per_split


def _launch_shape(student_logits: torch.Tensor) -> tuple[int, int, int, int, int]:
    S, B, K = student_logits.shape
    return launch_plan(S, B, K, sm_count(student_logits.device), interpreted(student_logits))


def combine_splits(m, row_sum, qx, n, scale):
    """Per row, from the K splits' statistics (..., splits): the row max, log2 sum_k exp2((x - max) scale), Q . (x -
    max) and n. m is the running max of the raw logits, so the exponents (x - m) scale and the dot carry no rounding
    from the logits' absolute scale; each split's dot is moved from its own max to the row's."""
    row_max = m.max(dim=-1).values
    log2_sum = torch.log2((row_sum * torch.exp2((m - row_max.unsqueeze(-1)) * scale)).sum(dim=-1))
    ref = torch.where(m == float("-inf"), 0.0, m)
    row_ref = torch.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, log2_sum, (qx + n * (ref - row_ref.unsqueeze(-1))).sum(dim=-1), n.sum(dim=-1)


def _launch_forward(student_logits, teacher_probs, student_temperature):
    """(loss, row_max, log2_sum, n): the scalar loss and the per-row (S, B) statistics backward needs."""
    S, B, K = student_logits.shape
    T = teacher_probs.shape[0]
    block_s_hi, block_s_lo, block_k, splits, per_split = _launch_shape(student_logits)
    scale = math.log2(math.e) / student_temperature
    partial = torch.empty((4, S, B, splits), dtype=torch.float32, device=student_logits.device)
    launch_kernel(
        _dino_ce_fwd_kernel, (B, splits),
        student_logits, teacher_probs, partial, S, T, B, K, per_split, scale,
        BLOCK_S_HI=block_s_hi, BLOCK_S_LO=block_s_lo, BLOCK_K=block_k, num_warps=GPU_NUM_WARPS,
    )
    m, row_sum, qx, n = partial
    row_max, log2_sum, qx, n = combine_splits(m, row_sum, qx, n, scale)
    pairs = T * S - min(S, T)
    rows_loss = n * log2_sum * math.log(2.0) - qx / student_temperature
    loss = rows_loss.sum() / (pairs * B)
    return loss, row_max.contiguous(), log2_sum.contiguous(), n.contiguous()


def _launch_backward(grad_loss, student_logits, teacher_probs, row_max, log2_sum, n, student_temperature):
    S, B, K = student_logits.shape
    T = teacher_probs.shape[0]
    block_s_hi, block_s_lo, block_k, splits, per_split = _launch_shape(student_logits)
    tau = student_temperature
    pairs = T * S - min(S, T)
    grad = torch.empty_like(student_logits)
    launch_kernel(
        _dino_ce_bwd_kernel, (B, splits),
        student_logits, teacher_probs, row_max, log2_sum, n, grad_loss.float().contiguous(), grad,
        S, T, B, K, per_split, math.log2(math.e) / tau, 1.0 / (pairs * B * tau),
        BLOCK_S_HI=block_s_hi, BLOCK_S_LO=block_s_lo, BLOCK_K=block_k, num_warps=GPU_NUM_WARPS,
    )
    return grad


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op(op_name("dino_cross_entropy"), mutates_args=())
def _dino_ce_op(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                student_temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(student_logits, teacher_probs, student_temperature.item())


@_dino_ce_op.register_fake
def _(student_logits, teacher_probs, student_temperature):
    S, B, _ = student_logits.shape
    new = student_logits.new_empty
    return (new((), dtype=torch.float32),) + tuple(new((S, B), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op(op_name("dino_cross_entropy_backward"), mutates_args=())
def _dino_ce_backward_op(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                         row_max: torch.Tensor, log2_sum: torch.Tensor, n: torch.Tensor,
                         student_temperature: torch.Tensor) -> torch.Tensor:
    return _launch_backward(grad_loss, student_logits, teacher_probs, row_max, log2_sum, n,
                            student_temperature.item())


@_dino_ce_backward_op.register_fake
def _(grad_loss, student_logits, teacher_probs, row_max, log2_sum, n, student_temperature):
    return torch.empty_like(student_logits)


def _setup_context(ctx, inputs, output):
    student_logits, teacher_probs, student_temperature = inputs
    _, row_max, log2_sum, n = output
    ctx.save_for_backward(student_logits, teacher_probs, row_max, log2_sum, n)
    ctx.mark_non_differentiable(row_max, log2_sum, n)
    ctx.student_temperature = student_temperature


def _backward(ctx, grad_loss, *_grad_stats):
    student_logits, teacher_probs, row_max, log2_sum, n = ctx.saved_tensors
    grad = _dino_ce_backward_op(grad_loss, student_logits, teacher_probs, row_max, log2_sum, n,
                                ctx.student_temperature)
    return grad, None, None


_dino_ce_op.register_autograd(_backward, setup_context=_setup_context)
no_second_derivative(_dino_ce_backward_op, "dino_cross_entropy")


def validate(student_logits, teacher_probs, student_temperature) -> None:
    """A clear error for any input the kernel cannot take, before anything is launched (the torch backend's
    checks too: modules, dino.py)."""
    check_tensor("student_logits", student_logits, 3)
    check_tensor("teacher_probs", teacher_probs, 3, student_logits.device)
    S, B, K = student_logits.shape
    T, Bt, Kt = teacher_probs.shape
    if (Bt, Kt) != (B, K):
        raise ValueError(f"teacher_probs (T, B, K) = {tuple(teacher_probs.shape)} must match student_logits "
                         f"(S, B, K) = {tuple(student_logits.shape)} in B and K")
    if B == 0 or K == 0 or S == 0 or T == 0:
        raise ValueError(f"empty inputs: student_logits {tuple(student_logits.shape)}, teacher_probs "
                         f"{tuple(teacher_probs.shape)}")
    if T * S - min(S, T) == 0:
        raise ValueError(f"dino_cross_entropy needs at least one pair of different views; got S={S}, T={T}")
    if S > 16:
        raise ValueError(f"at most 16 student views are supported (a sample's view tiles hold 16 rows), got S={S}")
    check_positive("student_temperature", student_temperature)
    check_contiguous(student_logits=student_logits, teacher_probs=teacher_probs)


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       student_temperature: float) -> torch.Tensor:
    """Fused reference.dino_cross_entropy: scalar fp32 loss; differentiable in student_logits only.

    student_logits (S, B, K) fp32/fp16/bf16, teacher_probs (T, B, K) (fp32 from teacher_softmax),
    contiguous, same device; S <= 16. The `terrafm::dino_cross_entropy` custom op: torch.compile
    (fullgraph=True) takes it without a graph break.
    """
    validate(student_logits, teacher_probs, student_temperature)
    return _dino_ce_op(student_logits, teacher_probs.detach(), scalar_input(student_temperature))[0]


def roofline_cost(S: int, T: int, B: int, K: int, dtype_bytes: int = 2,
                  backward: bool = True) -> dict[str, int]:
    """Minimum cost of forward (+ backward when backward=True) for S student views, T teacher views,
    B samples, K prototypes and dtype_bytes per student logit (teacher probs are fp32)."""
    flops = (8 * S + 2 * T) * B * K
    nbytes = S * B * K * dtype_bytes + 4 * T * B * K
    if backward:
        flops += (6 * S + 2 * T) * B * K
        nbytes += 2 * S * B * K * dtype_bytes + 4 * T * B * K
    return {"flops": flops, "bytes": nbytes}


def production_shape(samples: dict) -> dict:
    """The presets' call (ViT-B, per GPU): 2 global + 8 local student views, 2 teacher views of the samples."""
    return {"S": 10, "T": 2, "B": samples["base"], "K": 65536}


PRODUCTION_SHAPE = production_shape(PRESET_SAMPLES[90])  # vitb_h100's: 64 samples


def efficiency(kernel: str, S: int, T: int, B: int, K: int, dtype_bytes: int, sms: int, concurrent: int,
               l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of the "forward" or "backward" kernel from
    launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts"). The two view tiles hold
    BLOCK_S_HI + BLOCK_S_LO >= S rows: padded rows execute the math but load nothing. Per tile element
    and column step: 8 / 6 ops of the op (online lse, Q.x, n / softmax, gradient), 1 to add P into the
    one teacher sum every view reuses and 1 for Q = sum - P[s]; teacher rows t >= S add 1 each."""
    block_s_hi, block_s_lo, block_k, splits, per_split = launch_plan(S, B, K, sms)
    e = dtype_bytes
    cols = lambda j: min(per_split, K - j * per_split)  # noqa: E731
    forward = kernel == "forward"
    per_element = 10 if forward else 8
    per_column = (block_s_hi + block_s_lo) * per_element + max(0, T - S)
    executed = B * sum(pad(cols(j), block_k) for j in range(splits)) * per_column
    sizes = {"x": S * B * K * e, "p": T * B * K * 4, "grad": S * B * K * e, "stats": 16 * S * B * splits}

    def touches(b, j, _):
        out = [("x", (b, j), S * cols(j) * e), ("p", (b, j), T * cols(j) * 4)]
        return out + ([("stats", (b, j), 16 * S)] if forward else [("grad", (b, j), S * cols(j) * e)])
    moved = hbm_bytes((B, splits), touches, sizes, concurrent, l2_bytes)
    floor = roofline_cost(S, T, B, K, e, backward=not forward)
    if not forward:
        floor = {k: v - roofline_cost(S, T, B, K, e, backward=False)[k] for k, v in floor.items()}
    # per program and column step: the S student rows' BLOCK_K logits and the T teacher rows' probabilities
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved + (16 * S * B * splits if forward else 0), "flop_kind": "fp32",
            "programs": B * splits, "step_bytes": (S * e + T * 4) * block_k}


# Integers that are multiples of 16 at the presets' shapes (B = 64 / 32 samples, K = 65536, K per split a
# multiple of BLOCK_K); S and T (views) are not. The compile report compiles the variant the JIT builds.
MULTIPLES_OF_16 = ("B", "K", "K_PER_SPLIT")


def compile_specs() -> list[dict]:
    """Every shipped configuration (student dtype x forward/backward) for the AOT compile report."""
    specs = []
    block_s_hi, block_s_lo = view_tiles(PRODUCTION_SHAPE["S"])
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        common = {"constexprs": {"BLOCK_S_HI": block_s_hi, "BLOCK_S_LO": block_s_lo, "BLOCK_K": GPU_BLOCK_K},
                  "num_warps": GPU_NUM_WARPS, "num_stages": 3, "uses_dot": False}
        counts = lambda kernel, e=dtype.itemsize: at_presets(  # noqa: E731
            efficiency, production_shape, kernel=kernel, dtype_bytes=e)
        specs.append({
            "name": f"dino_ce_fwd_{name}", "fn": _dino_ce_fwd_kernel, "efficiency": counts("forward"),
            "signature": {"student_ptr": ptr, "teacher_ptr": "*fp32", "partial_ptr": "*fp32", "S": "i32",
                          "T": "i32", "B": "i32", "K": "i32", "K_PER_SPLIT": "i32", "scale": "fp32"},
            **common,
        })
        specs.append({
            "name": f"dino_ce_bwd_{name}", "fn": _dino_ce_bwd_kernel, "efficiency": counts("backward"),
            "signature": {"student_ptr": ptr, "teacher_ptr": "*fp32", "row_max_ptr": "*fp32",
                          "log2_sum_ptr": "*fp32", "n_ptr": "*fp32", "grad_loss_ptr": "*fp32",
                          "grad_ptr": ptr, "S": "i32", "T": "i32", "B": "i32", "K": "i32",
                          "K_PER_SPLIT": "i32", "scale": "fp32", "grad_scale": "fp32"},
            **common,
        })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
