"""DINO head prototype layer fused with the dual-centering teacher softmax and the student cross-entropy.

Math (reference.dino_head_loss): h = normalize(features), W = g v / ||v|| the weight-normalised prototypes
(K, D) (g = 1 when weight_g is None), logits z = h W^T; teacher probs
P = softmax((z_t - alpha c - (1 - alpha) c_h) / tau_t) (no gradient); loss = dino_cross_entropy(z_s, P, tau_s);
also the centre statistics of teacher_softmax.
The (rows, K) logits are never materialised: with A[t] = P[t] W_s (teacher probs projected back
to D), n[s] = #{t != s} (each teacher row sums to 1), Bs[s] = softmax(z_s / tau_s) W_s and
c = 1 / (pairs B):
    loss       = c sum_{t != s} ( lse(z_s / tau_s) - A[t] . h_s / tau_s )
    dL / dh_s  = c / tau_s ( n[s] Bs[s] - sum_{t != s} A[t] )                       (R_s, D)
    G = dL / dW_s = c / tau_s ( softmax_s^T (n h_s) - P^T Hbar ),  Hbar[t] = sum_{s != t} h_s   (K, D)
Nor is W: the kernels take v (K, D) and g (K,) and apply the norm per prototype, W_k = s_k v_k with
s_k = g_k r_k, r_k = 1 / ||v_k||, so z = (h v^T) s (a scale per logit column) and p W = (p s) v (a scale per
probability column before the projection); through W's chain rule
    dL / dv_k  = s_k ( G_k - (G_k . v_k) r_k^2 v_k ),      dL / dg_k = (G_k . v_k) r_k
Gradients then flow through the features' normalisation by autograd.

Kernels (logit tiles computed with tl.dot once per pass, never stored; full-width D = 256 fp32
accumulators next to the logit tile; 16-bit h, v and X tiles come by tensor descriptor, TMA copies on
sm_90 and masked loads below it and in the interpreter, the same code; fp32's FMA dots take pointer loads):
    _softmax_project_kernel  rows x K-split, flash-attention style: running max and sum of exp per row
                             and softmax(z) @ W_proj rescaled as the max grows, in one pass (A and the
                             teacher's centre statistics; Bs and lse for the student). A first loop over
                             the split writes r = 1 / ||v|| of its prototypes to the program's row of a
                             scratch (K-vector per program; the student's row 0 is saved as r_s); the fp32
                             student computes them in its GEMM loop instead (LaunchPlan.norm_in_loop)
    _grad_weight_kernel      K block: G = softmax_s^T (n h_s) - P^T Hbar over the student's then the teacher's
                             rows in one fp32 accumulator, then dL / dv_s and dL / dg_s from G and the block's
                             v_s tile (its epilogue), written once in v's and fp32
Forward runs project(student) (r_s), project(teacher) (r_t; projects onto W_s with r_s); backward
grad_weight (dL/dh_s is a (R_s, D) combination of the saved A and Bs): 2 passes over K per side, 3 launches.
All reductions are per-program partials summed by torch: no atomics, deterministic.

Cost per call (R_s = S B, R_t = T B rows, D bottleneck, e bytes per element of h and v):
    useful FLOPs (those of the unfused path's GEMMs, what roofline_cost reports):
             forward 2 K D (R_t + R_s), backward 4 K D R_s
    executed FLOPs (one D block up to D = 256; a wider D is split into D blocks in the project kernels,
             each recomputing the logit tile): forward 4 K D (R_t + R_s), backward 4 K D (R_s + R_t), all on
             tensor cores: 1.50x the useful FLOPs at the presets' 128 teacher / 640 student rows (the forward
             computes Bs, which the unfused path's backward GEMM does; the backward recomputes the logits).
             The weight norm adds 2 K D per row block of a project launch (sums of squares) and ~5 K D in
             grad_weight's epilogue on CUDA cores, uncounted like the softmax's exponentials
             (per-kernel counts and roofline times: efficiency() and the compile report)
    min HBM  forward (R_s + R_t) D e + K D e (+ K D e for a separate teacher v) + 24 K (centres and centre
             sums, g read and 1 / ||v|| written) (+ 16 K for a separate teacher's g and norms)
             backward adds 2 K D e (read v, write dL/dv) + 4 R_s D + 4 K (dL/dg)
    Each pass streams v once per BLOCK_M rows (L2 serves the repeats for R <= a few hundred rows); the
    norm loop reads the program's split of v once more, just before its GEMM loop reads it: from L2 while a
    wave's v fits there (16-bit), from HBM for the fp32 teacher's (the fp32 student has no norm loop).
Weight norm traffic saved: torch formed W = g v / ||v|| in fp32 and cast it for both sides, and its autograd
ran the normalisation's backward on (K, D) fp32 tensors: at the presets' shape (bf16 v, g = None) 806 MB
forward and 1613 MB backward of torch's own reads and writes (~720 us of HBM time on an H100, six times the
three launches' ~122 us), counted op by op from the previous code by a dispatch mode; now 0 (fp32 v with
bf16 features still pays the cast of v to the features' dtype: 201 MB forward, 101 MB backward; with fp16
features torch also scales v to unit rows first, as fp16's range needs: more passes over the fp32 v, uncounted).
Why not Liger's chunked design (logits chunk by GEMM, softmax gradient in place, grad_input and
grad_weight GEMMs per chunk): it executes 1x the FLOPs, but at the presets' shape (bf16, one 640-row
chunk, its best case) the student logits cross HBM 5 times (GEMM write, read + gradient write in place,
two GEMM reads: 5 R_s K e = 419 MB), the teacher logits / probabilities 4 times (67 MB), W 3 times and
the weight gradient once (134 MB): ~620 MB, ~185 us of HBM time on an H100 against ~122 us predicted
for these three launches (compute bound at 1.5x), and it materialises the 84 MB of logits this op avoids.
Memory saved against the unfused path: the (R_s + R_t) x K logits, probabilities, log-probabilities
and their gradients (at K = 65536, 2 + 10 views x 64 samples = 768 rows: 201 MB per fp32 tensor) and the
normalised W are never allocated; the extra memory is the fp32 (splits, R, D) partials (~8 MB on an H100),
the (programs, K) fp32 norm scratch (~2.6 MB) and the saved (R_s, D) Bs.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    PRESET_SAMPLES,
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_alpha,
    check_contiguous,
    check_head_loss_shapes,
    check_interpreted_dot_dtype,
    check_positive,
    check_tensor,
    descriptor_operand,
    hbm_bytes,
    interpreted,
    l2_serves_reread,
    launch_kernel,
    no_second_derivative,
    op_name,
    pad,
    scalar_input,
    sm_count,
)

# H100/A100 configs for D = 256 (the DINO bottleneck), chosen from the compile report (regs/spills
# per config are listed in docs/kernels-loss.md). Each kernel holds the full-width (rows, D) or
# (prototypes, D) fp32 accumulator next to the logit tile, so it computes each logit tile once
# (BLOCK_DO = 256 = D: one output D block; a wider D is split into D blocks, a grid axis, at the price
# of recomputing the logit tile per block; grad_weight always holds the full width, which its weight-norm
# epilogue needs). 16-bit operands use 64-row x 32-prototype logit tiles (mma/wgmma sized) with 8 warps:
# 136-192 registers at D = 256 (MULTIPLES_OF_16), no spills; 64-prototype tiles spill in the variant other
# widths run. fp32 operands take exact IEEE dots (FMA, no tensor cores): 16 x 16 tiles with 4 warps and one
# stage avoid spills there; fp32 is the exact path, bf16 the fast one.
MAX_D = 512  # widest feature the kernels take (one or two BLOCK_DO blocks of 256 columns)
CONFIGS = {
    "16bit": {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_DO": 256, "PROJECT_CTAS_PER_SM": 1, "num_warps": 8,
              "num_stages": 2},
    "fp32": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_DO": 256, "PROJECT_CTAS_PER_SM": 2, "num_warps": 4,
             "num_stages": 1},
}
INTERPRETER_BLOCK = 16
NORM_CHUNK = 32  # columns per slice of the weight norm's sum of squares (32 x 32 values for 256 threads)


@triton.jit
def _dot(a, b, DOT_IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: exact IEEE FMA for fp32 operands, tensor cores for 16-bit ones."""
    if DOT_IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _operand(ptr, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """A (rows, cols) operand, rows `stride` elements apart, read in (BLOCK_R, BLOCK_C) tiles: a tensor descriptor
    when TMA (TMA copies on sm_90, masked loads below it and in the interpreter), else its pointer."""
    if TMA:
        op = tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C])
    else:
        op = ptr
    return op


@triton.jit
def _tile(op, r0, c0, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile at (r0, c0) of an _operand, zero outside its (rows, cols)."""
    if TMA:
        tile = op.load([r0, c0])
    else:
        r = r0 + tl.arange(0, BLOCK_R)
        c = c0 + tl.arange(0, BLOCK_C)
        tile = tl.load(op + r[:, None] * stride + c[None, :], mask=(r < rows)[:, None] & (c < cols)[None, :],
                       other=0.0)
    return tile


@triton.jit
def _inverse_norms(v_ptr, cols, col_mask, D, D_STRIDE, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   NORM_CHUNK: tl.constexpr):
    """1 / ||v_k|| (fp32, 1 where masked) for the prototypes cols of v (K, D), rows D_STRIDE apart, read in
    (BLOCK_K, NORM_CHUNK) slices: few registers."""
    sumsq = tl.zeros([BLOCK_K], tl.float32)
    for c in tl.static_range(0, BLOCK_D, NORM_CHUNK):
        dims = c + tl.arange(0, NORM_CHUNK)
        x = tl.load(v_ptr + cols[:, None] * D_STRIDE + dims[None, :],
                    mask=col_mask[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt_rn(tl.where(col_mask, sumsq, 1.0))


@triton.jit
def _store_inverse_norms(out_ptr, v_ptr, k_start, k_end, D, D_STRIDE, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         NORM_CHUNK: tl.constexpr):
    """out[k] = 1 / ||v_k|| for the prototypes k_start <= k < k_end of v, in a loop apart from the GEMM loop."""
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        tl.store(out_ptr + cols, _inverse_norms(v_ptr, cols, col_mask, D, D_STRIDE, BLOCK_K, BLOCK_D, NORM_CHUNK),
                 mask=col_mask)


@triton.jit
def _blended_center(center_ptr, center_high_ptr, cols, col_mask, alpha):
    """alpha c + (1 - alpha) c_h for the prototypes cols, fp32."""
    c = tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    c_high = tl.load(center_high_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return alpha * c + (1.0 - alpha) * c_high


@triton.jit
def _softmax_project_kernel(
    h_ptr, v_logit_ptr, v_proj_ptr, g_logit_ptr, g_proj_ptr, rnorm_proj_ptr, rnorm_ptr, center_ptr,
    center_high_ptr, high_weight_ptr, stats_ptr, out_ptr, column_ptr,
    R, K, D, D_STRIDE, K_PER_SPLIT, scale, alpha,
    CENTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_IEEE: tl.constexpr, TMA: tl.constexpr, NORM_CHUNK: tl.constexpr,
    NORM_IN_LOOP: tl.constexpr,
):
    """Per (output D block, row block, K split), in one pass as flash attention does: the running max m of
    z, the sum l of exp2((z - m) scale) and acc = sum of exp2((z - m) scale) W_proj[:, dblock], both
    rescaled whenever m grows -> stats (2, splits, R), out (splits, R, D) (torch combines the splits);
    with CENTER also the column sums of raw and high_weight-weighted logits -> column (blocks, 2, K).

    Weight norm folded in: W = s v with s_k = g_k / ||v_k||, so z = (h v^T) s and p W_proj = (p s_proj) v_proj.
    A first loop writes 1 / ||v_k|| of the split's logit prototypes to this program's row of rnorm (D blocks x
    row blocks, K); the GEMM loop reads them back. NORM_IN_LOOP (LaunchPlan.norm_in_loop) takes them in the GEMM
    loop instead, from slices of each v tile it just loaded (L1 / L2 hits), so v streams from HBM once. s_proj is s
    for the student (v_proj = v_logit), g_proj rnorm_proj (the student's norms) for the teacher (CENTER). h, v_logit,
    v_proj: rows D_STRIDE apart."""
    pid_d = tl.program_id(0)  # fastest: the D blocks sharing a W split run in one wave (W read once)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    d0 = pid_d * BLOCK_DO
    out_dims = d0 + tl.arange(0, BLOCK_DO)
    out_mask = out_dims < D
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    rnorm_ptr += (pid_m * tl.num_programs(0) + pid_d).to(tl.int64) * K
    if not NORM_IN_LOOP:
        _store_inverse_norms(rnorm_ptr, v_logit_ptr, k_start, k_end, D, D_STRIDE, BLOCK_K, BLOCK_D, NORM_CHUNK)
        tl.debug_barrier()  # the GEMM loop's threads read what other threads of this program wrote
    h_op = _operand(h_ptr, R, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA)
    v_op = _operand(v_logit_ptr, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA)
    vp_op = _operand(v_proj_ptr, K, D, D_STRIDE, BLOCK_K, BLOCK_DO, TMA)
    if CENTER:
        high_weight = tl.load(high_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    h = _tile(h_op, m0, 0, R, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA)  # stays on chip for the whole loop
    for k0 in range(k_start, k_end, BLOCK_K):  # K_PER_SPLIT is whole tiles: none straddles a split
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        v = _tile(v_op, k0, 0, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA)
        if NORM_IN_LOOP:  # slices of the tile just loaded: L1 / L2 hits
            rnorm = _inverse_norms(v_logit_ptr, cols, col_mask, D, D_STRIDE, BLOCK_K, BLOCK_D, NORM_CHUNK)
            tl.store(rnorm_ptr + cols, rnorm, mask=col_mask)
        else:
            rnorm = tl.load(rnorm_ptr + cols, mask=col_mask, other=0.0)
        s = tl.load(g_logit_ptr + cols, mask=col_mask, other=0.0) * rnorm
        z = _dot(h, tl.trans(v), DOT_IEEE) * s[None, :]
        if CENTER:
            if pid_d == 0:
                # masked rows have h = 0, so their raw logits are 0 and add nothing to the column sums
                column = column_ptr + pid_m.to(tl.int64) * 2 * K
                tl.store(column + cols, tl.sum(z, axis=0), mask=col_mask)
                tl.store(column + K + cols, tl.sum(z * high_weight[:, None], axis=0), mask=col_mask)
            z = z - _blended_center(center_ptr, center_high_ptr, cols, col_mask, alpha)[None, :]
            s_proj = tl.load(g_proj_ptr + cols, mask=col_mask, other=0.0) * tl.load(rnorm_proj_ptr + cols,
                                                                                     mask=col_mask, other=0.0)
        else:
            s_proj = s
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        rescale = tl.exp2((m - m_new) * scale)
        p = tl.exp2((z - m_new[:, None]) * scale)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        m = m_new
        vp = _tile(vp_op, k0, d0, K, D, D_STRIDE, BLOCK_K, BLOCK_DO, TMA)
        acc = acc * rescale[:, None] + _dot((p * s_proj[None, :]).to(vp.dtype), vp, DOT_IEEE)
    split_rows = split.to(tl.int64) * R + rows
    tl.store(out_ptr + split_rows[:, None] * D + out_dims[None, :], acc,
             mask=row_mask[:, None] & out_mask[None, :])
    stats = stats_ptr + split_rows
    splits = tl.num_programs(2)
    tl.store(stats, m, mask=row_mask & (pid_d == 0))
    tl.store(stats + splits * R, row_sum, mask=row_mask & (pid_d == 0))


@triton.jit
def _add_t_project(acc, h_op, v_op, x_op, s, center_ptr, center_high_ptr, row_max_ptr, log2_sum_ptr, R, K, D,
                   D_STRIDE, k0, cols, col_mask, scale, alpha, CENTER: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr, TMA: tl.constexpr):
    """acc + softmax(z)[:, cols]^T @ X over all R rows (z = (h v[cols]^T) s, centred if CENTER)."""
    for r0 in range(0, R, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < R
        h = _tile(h_op, r0, 0, R, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA)
        v = _tile(v_op, k0, 0, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA)
        z = _dot(h, tl.trans(v), DOT_IEEE) * s[None, :]
        if CENTER:
            z = z - _blended_center(center_ptr, center_high_ptr, cols, col_mask, alpha)[None, :]
        row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
        log2_sum = tl.load(log2_sum_ptr + rows, mask=row_mask, other=0.0)
        p = tl.exp2((z - row_max[:, None]) * scale - log2_sum[:, None])
        p = tl.where(col_mask[None, :] & row_mask[:, None], p, 0.0)
        x = _tile(x_op, r0, 0, R, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA)
        acc += _dot(tl.trans(p.to(x.dtype)), x, DOT_IEEE)
    return acc


@triton.jit
def _grad_weight_kernel(
    hs_ptr, vs_ptr, xs_ptr, s_max_ptr, s_log2_sum_ptr, ht_ptr, vt_ptr, xt_ptr, t_max_ptr, t_log2_sum_ptr,
    gs_ptr, rnorm_s_ptr, gt_ptr, rnorm_t_ptr, center_ptr, center_high_ptr, grad_loss_ptr, out_ptr, grad_g_ptr,
    R_s, R_t, K, D, D_STRIDE, scale_s, scale_t, alpha, coef,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr, TMA: tl.constexpr,
):
    """Per K block: G = dL/dW_s[cols] = grad_loss coef (softmax_s^T X_s + P^T X_t) over the full width D, both
    terms in one fp32 accumulator (X_s = n h_s, X_t = -Hbar), then through the weight norm W = s v,
    s = g r, r = 1 / ||v||:  dL/dv = s (G - (G . v) r^2 v) -> out in v's dtype,  dL/dg = (G . v) r -> grad_g.
    The (rows, D) operands have rows D_STRIDE apart."""
    k0 = tl.program_id(0) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    dims = tl.arange(0, BLOCK_D)
    vs_op = _operand(vs_ptr, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA)
    r_s = tl.load(rnorm_s_ptr + cols, mask=col_mask, other=0.0)
    s_s = tl.load(gs_ptr + cols, mask=col_mask, other=0.0) * r_s
    s_t = tl.load(gt_ptr + cols, mask=col_mask, other=0.0) * tl.load(rnorm_t_ptr + cols, mask=col_mask, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    acc = _add_t_project(acc, _operand(hs_ptr, R_s, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA), vs_op,
                         _operand(xs_ptr, R_s, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA), s_s, center_ptr, center_high_ptr,
                         s_max_ptr, s_log2_sum_ptr, R_s, K, D, D_STRIDE, k0, cols, col_mask, scale_s, alpha, False,
                         BLOCK_M, BLOCK_K, BLOCK_D, DOT_IEEE, TMA)
    acc = _add_t_project(acc, _operand(ht_ptr, R_t, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA),
                         _operand(vt_ptr, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA),
                         _operand(xt_ptr, R_t, D, D_STRIDE, BLOCK_M, BLOCK_D, TMA), s_t, center_ptr, center_high_ptr,
                         t_max_ptr, t_log2_sum_ptr, R_t, K, D, D_STRIDE, k0, cols, col_mask, scale_t, alpha, True,
                         BLOCK_M, BLOCK_K, BLOCK_D, DOT_IEEE, TMA)
    acc = acc * (coef * tl.load(grad_loss_ptr).to(tl.float32))  # read on device: no host sync
    v = _tile(vs_op, k0, 0, K, D, D_STRIDE, BLOCK_K, BLOCK_D, TMA).to(tl.float32)
    g_dot_v = tl.sum(acc * v, axis=1)
    grad_v = s_s[:, None] * (acc - (g_dot_v * r_s * r_s)[:, None] * v)
    tl.store(out_ptr + cols[:, None] * D + dims[None, :], grad_v.to(out_ptr.dtype.element_ty),
             mask=col_mask[:, None] & (dims < D)[None, :])
    tl.store(grad_g_ptr + cols, g_dot_v * r_s, mask=col_mask)


class LaunchPlan:
    """Block sizes, K splits and grids of every kernel (small blocks in the interpreter, mma-sized on GPUs):
    the one place the launcher and efficiency() read them."""

    def __init__(self, K: int, D: int, fp32: bool, interpreter: bool, sms: int):
        config = CONFIGS["fp32" if fp32 else "16bit"]
        if interpreter:
            config = {**config, "BLOCK_M": INTERPRETER_BLOCK, "BLOCK_K": INTERPRETER_BLOCK,
                      "BLOCK_DO": INTERPRETER_BLOCK}
        self.config = config
        self.block_m, self.block_k = config["BLOCK_M"], config["BLOCK_K"]
        self.block_d = max(16, triton.next_power_of_2(D))
        self.dot_ieee = fp32
        # 16-bit operands come by tensor descriptor (TMA on sm_90); fp32's FMA dots take them from registers,
        # and their descriptor loads spill on sm_90 (1.8-2.8 KB of stack)
        self.tma = not fp32
        # grad_weight holds (BLOCK_K, D) fp32 next to its tiles: past D = 256 half the prototypes per program keep
        # the 16-bit config within shared memory at D = 512 (150 / 232 KB on sm_80 / sm_90, no spills)
        self.grad_weight_block_k = max(16, self.block_k * 256 // max(self.block_d, 256))
        self.norm_chunk = min(NORM_CHUNK, self.block_d)
        # the project kernels run in one wave (their occupancy from the compile report): every extra K split
        # adds an fp32 (R, D) partial, which at 2 waves of the student's 640 rows outweighs W itself
        self.project_target = config["PROJECT_CTAS_PER_SM"] * sms
        self.K, self.D = K, D

    @classmethod
    def for_tensor(cls, h: torch.Tensor, K: int, D: int) -> "LaunchPlan":
        return cls(K, D, h.dtype == torch.float32, interpreted(h), sm_count(h.device))

    def d_blocks(self) -> tuple[int, int]:
        """(BLOCK_DO, number of output D blocks) of the project kernels: 1 block up to D = 256."""
        block_do = min(self.block_d, self.config["BLOCK_DO"])
        return block_do, triton.cdiv(self.D, block_do)

    def norm_in_loop(self, centred: bool) -> bool:
        """Whether the project kernel takes its norms in its GEMM loop (slices of each v tile it just loaded) rather
        than in a loop of its own first, which streams v once more: fp32's student, whose v (67 MB at the presets'
        shape) outgrows L2, within 128 registers and no spills. The fp32 teacher spills with it (its centring); the
        16-bit student compiles with it (no spills, more shared memory) but its v fits L2, so it would save no HBM
        bytes, and no GPU has timed the two."""
        return self.dot_ieee and not centred

    def meta(self, **extra):
        return {**dict(BLOCK_M=self.block_m, BLOCK_K=self.block_k, BLOCK_D=self.block_d, DOT_IEEE=self.dot_ieee,
                       TMA=self.tma, num_warps=self.config["num_warps"], num_stages=self.config["num_stages"]),
                **extra}

    def project_grid(self, R: int) -> tuple[tuple[int, int, int], int, int, int]:
        """(grid (D blocks, row blocks, K splits), BLOCK_DO, K splits, K per split) of the project kernel."""
        block_do, d_blocks = self.d_blocks()
        blocks = triton.cdiv(R, self.block_m)
        wanted = max(1, min(self.project_target // (blocks * d_blocks), triton.cdiv(self.K, self.block_k)))
        per_split = triton.cdiv(triton.cdiv(self.K, wanted), self.block_k) * self.block_k
        splits = triton.cdiv(self.K, per_split)
        return (d_blocks, blocks, splits), block_do, splits, per_split

    def grad_weight_grid(self) -> tuple[int]:
        """Grid (K blocks,) of the grad_weight kernel: each program holds its prototypes' full width D (the
        weight norm's G . v needs every column), BLOCK_D = 256 at the DINO bottleneck."""
        return (triton.cdiv(self.K, self.grad_weight_block_k),)


def _softmax_project(launch, h, v_logit, v_proj, g_logit, g_proj, rnorm_proj, center, center_high, high_weight,
                     scale, alpha, centred):
    """(row_max, log2_sum) of the (centred) logits z = (h v_logit^T) g_logit / ||v_logit|| per row, softmax(z) @
    W_proj (R, D) fp32 (W_proj = v_proj g_logit / ||v_proj||, or g_proj rnorm_proj when centred), 1 / ||v_logit||
    (K,), and the centre statistics (2, K) if centred, from one pass over K. h and v descriptor operands."""
    R = h.shape[0]
    grid, block_do, splits, per_split = launch.project_grid(R)
    stats = torch.empty((2, splits, R), dtype=torch.float32, device=h.device)
    out = torch.empty((splits, R, launch.D), dtype=torch.float32, device=h.device)
    column = torch.empty((grid[1], 2, launch.K) if centred else (1,), dtype=torch.float32, device=h.device)
    # a row per (D block, row block), each filled by its K splits' disjoint ranges, so every row holds all K norms
    rnorm = torch.empty((grid[0] * grid[1], launch.K), dtype=torch.float32, device=h.device)
    launch_kernel(
        _softmax_project_kernel, grid, h, v_logit, v_proj, g_logit, g_proj, rnorm_proj, rnorm, center, center_high,
        high_weight, stats, out, column, R, launch.K, launch.D, h.stride(0), per_split, scale, alpha,
        **launch.meta(CENTER=centred, BLOCK_DO=block_do, NORM_CHUNK=launch.norm_chunk,
                      NORM_IN_LOOP=launch.norm_in_loop(centred)),
    )
    m, row_sum = stats
    row_max = m.max(dim=0).values
    weight = torch.exp2((m - row_max) * scale)  # each split's share, relative to the row's max
    total = (row_sum * weight).sum(dim=0)
    share = weight / total  # (splits, R)
    if not launch.dot_ieee:  # 16-bit operands: one batched GEMV per row (R, 1, splits) @ (R, splits, D) reads the
        # scratch once; tf32 where torch's matmul precision allows it, a 2^-11 rounding under the operands' 2^-8
        projected = torch.bmm(share.T.unsqueeze(1), out.transpose(0, 1)).squeeze(1)
    else:  # fp32 operands take IEEE dots: scaled in place and summed, exact (the scratch crosses HBM three times)
        projected = out.mul_(share.unsqueeze(-1)).sum(dim=0)
    # row 0's norms are saved for the backward: a copy of K floats, so the scratch is freed now
    return row_max, torch.log2(total), projected, rnorm[0].clone(), column.sum(dim=0) if centred else None


def _grad_weight(launch, hs, vs, gs, rnorm_s, xs, s_max, s_log2_sum, ht, vt, gt, rnorm_t, xt, t_max, t_log2_sum,
                 center, center_high, grad_loss, coef, scale_s, scale_t, alpha):
    """G = grad_loss coef (softmax_s^T xs + P^T xt) (K, D) through the weight norm: (dL/dv (K, D) in vs's dtype,
    dL/dg (K,) fp32). hs, vs, ht, vt are descriptor operands (rows hs.stride(0) apart)."""
    K, D = launch.K, launch.D
    out = torch.empty((K, D), dtype=vs.dtype, device=vs.device)
    grad_g = torch.empty(K, dtype=torch.float32, device=vs.device)
    launch_kernel(
        _grad_weight_kernel, launch.grad_weight_grid(), hs, vs, descriptor_operand(xs.to(hs.dtype)), s_max,
        s_log2_sum, ht, vt, descriptor_operand(xt.to(ht.dtype)), t_max, t_log2_sum, gs, rnorm_s, gt, rnorm_t, center,
        center_high, grad_loss.float().contiguous(), out, grad_g, hs.shape[0], ht.shape[0], K, D, hs.stride(0),
        scale_s, scale_t, alpha, coef, **launch.meta(BLOCK_K=launch.grad_weight_block_k),
    )
    return out, grad_g


def _pairs(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) float: 1 where teacher view t and student view s differ."""
    return (torch.arange(T, device=device).unsqueeze(1) != torch.arange(S, device=device).unsqueeze(0)).float()


def _launch_forward(hs, vs, gs, ht, vt, gt, center, center_high, high_weight, S, T, B, tau_t, tau_s, alpha):
    """(loss, logit_sum, high_logit_sum) and what backward needs (t_max, t_log2_sum, s_max, s_log2_sum,
    A = P W_s (T, B, D), Bs = softmax_s W_s (S * B, D), 1 / ||v_s||, 1 / ||v_t|| (K,)): one pass over K per
    side. The student's pass goes first: the teacher projects onto W_s with the student's norms."""
    launch = LaunchPlan.for_tensor(hs, vs.shape[0], vs.shape[1])
    scale_t, scale_s = math.log2(math.e) / tau_t, math.log2(math.e) / tau_s
    hs_d, vs_d, ht_d, vt_d = (descriptor_operand(x) for x in (hs, vs, ht, vt))
    s_max, s_log2_sum, Bs, rnorm_s, _ = _softmax_project(launch, hs_d, vs_d, vs_d, gs, gs, gs, center, center_high,
                                                         high_weight, scale_s, alpha, False)
    t_max, t_log2_sum, A, rnorm_t, column = _softmax_project(launch, ht_d, vt_d, vs_d, gt, gs, rnorm_s, center,
                                                             center_high, high_weight, scale_t, alpha, True)
    A = A.reshape(T, B, -1)
    pair = _pairs(T, S, hs.device)
    pairs = T * S - min(S, T)
    lse = (s_max / tau_s + s_log2_sum * math.log(2.0)).reshape(S, B)
    hs3 = hs.float().reshape(S, B, -1)
    cross = torch.einsum("tbd,sbd->tsb", A, hs3)
    per_pair = lse.unsqueeze(0) - cross / tau_s  # (T, S, B); each teacher row's probabilities sum to 1
    loss = (pair.unsqueeze(-1) * per_pair).sum() / (pairs * B)
    return loss, column[0].clone(), column[1].clone(), t_max, t_log2_sum, s_max, s_log2_sum, A, Bs, rnorm_s, rnorm_t


def _launch_backward(grad_loss, hs, vs, gs, ht, vt, gt, center, center_high, t_max, t_log2_sum, s_max, s_log2_sum,
                     A, Bs, rnorm_s, rnorm_t, S, T, B, tau_t, tau_s, alpha, weight_grad=True):
    """(grad_hs, grad_vs, grad_gs): dL/dh_s from the forward's A and Bs, dL/dv_s and dL/dg_s from one pass over
    K; without weight_grad (frozen prototypes) that pass is skipped and the two come back empty."""
    launch = LaunchPlan.for_tensor(hs, vs.shape[0], vs.shape[1])
    scale_t, scale_s = math.log2(math.e) / tau_t, math.log2(math.e) / tau_s
    pair = _pairs(T, S, hs.device)
    pairs = T * S - min(S, T)
    coef = grad_loss.float() / (pairs * B * tau_s)
    n = pair.sum(dim=0).reshape(S, 1, 1)  # teacher views paired with each student view
    grad_hs = coef * (n * Bs.reshape(S, B, -1) - torch.einsum("ts,tbd->sbd", pair, A))
    if not weight_grad:
        return grad_hs.reshape(S * B, -1).to(hs.dtype), vs.new_empty(0), gs.new_empty(0)
    hs3 = hs.float().reshape(S, B, -1)
    h_bar = torch.einsum("ts,sbd->tbd", pair, hs3).reshape(T * B, -1)
    hs_d, vs_d, ht_d, vt_d = (descriptor_operand(x) for x in (hs, vs, ht, vt))
    grad_vs, grad_gs = _grad_weight(launch, hs_d, vs_d, gs, rnorm_s, (n * hs3).reshape(S * B, -1), s_max, s_log2_sum,
                                    ht_d, vt_d, gt, rnorm_t, -h_bar, t_max, t_log2_sum, center, center_high,
                                    grad_loss, 1.0 / (pairs * B * tau_s), scale_s, scale_t, alpha)
    return grad_hs.reshape(S * B, -1).to(hs.dtype), grad_vs, grad_gs


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes),
# so the same graph runs the compiled kernels on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op(op_name("dino_head_loss"), mutates_args=())
def _head_loss_op(hs: torch.Tensor, vs: torch.Tensor, gs: torch.Tensor, ht: torch.Tensor, vt: torch.Tensor,
                  gt: torch.Tensor, center: torch.Tensor, center_high: torch.Tensor, high_weight: torch.Tensor, S: int,
                  T: int, B: int, tau_t: torch.Tensor, tau_s: torch.Tensor, alpha: float) -> tuple[
                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(hs, vs, gs, ht, vt, gt, center, center_high, high_weight, S, T, B, tau_t.item(),
                           tau_s.item(), alpha)


@_head_loss_op.register_fake
def _(hs, vs, gs, ht, vt, gt, center, center_high, high_weight, S, T, B, tau_t, tau_s, alpha):
    K, D = vs.shape
    f32 = dict(dtype=torch.float32)
    new = hs.new_empty
    return (new((), **f32), new((K,), **f32), new((K,), **f32), new((T * B,), **f32), new((T * B,), **f32),
            new((S * B,), **f32), new((S * B,), **f32), new((T, B, D), **f32), new((S * B, D), **f32),
            new((K,), **f32), new((K,), **f32))


@torch.library.custom_op(op_name("dino_head_loss_backward"), mutates_args=())
def _head_loss_backward_op(grad_loss: torch.Tensor, hs: torch.Tensor, vs: torch.Tensor, gs: torch.Tensor,
                           ht: torch.Tensor, vt: torch.Tensor, gt: torch.Tensor, center: torch.Tensor,
                           center_high: torch.Tensor, t_max: torch.Tensor, t_log2_sum: torch.Tensor,
                           s_max: torch.Tensor, s_log2_sum: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor,
                           rnorm_s: torch.Tensor, rnorm_t: torch.Tensor, S: int, T: int, B: int,
                           tau_t: torch.Tensor, tau_s: torch.Tensor, alpha: float,
                           weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_loss, hs, vs, gs, ht, vt, gt, center, center_high, t_max, t_log2_sum, s_max,
                            s_log2_sum, A, Bs, rnorm_s, rnorm_t, S, T, B, tau_t.item(), tau_s.item(), alpha,
                            weight_grad)


@_head_loss_backward_op.register_fake
def _(grad_loss, hs, vs, gs, ht, vt, gt, center, center_high, t_max, t_log2_sum, s_max, s_log2_sum, A, Bs, rnorm_s,
      rnorm_t, S, T, B, tau_t, tau_s, alpha, weight_grad):
    if not weight_grad:
        return torch.empty_like(hs), vs.new_empty(0), gs.new_empty(0)
    return torch.empty_like(hs), torch.empty_like(vs), torch.empty_like(gs)


def _setup_context(ctx, inputs, output):
    hs, vs, gs, ht, vt, gt, center, center_high, _high_weight, S, T, B, tau_t, tau_s, alpha = inputs
    _, logit_sum, high_logit_sum, *stats = output
    ctx.save_for_backward(hs, vs, gs, ht, vt, gt, center, center_high, *stats)
    ctx.mark_non_differentiable(logit_sum, high_logit_sum, *stats)
    ctx.meta = (S, T, B, tau_t, tau_s, alpha)


def _backward(ctx, grad_loss, *_grad_rest):
    # frozen prototypes (v and g need no gradient: DINO's first epoch, a probe on a fixed head) skip the
    # grad_weight pass, the backward's only pass over K (dL/dh_s comes from the forward's A and Bs)
    weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_hs, grad_vs, grad_gs = _head_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.meta, weight_grad)
    if not weight_grad:
        grad_vs = grad_gs = None
    return (grad_hs, grad_vs, grad_gs) + (None,) * 12


_head_loss_op.register_autograd(_backward, setup_context=_setup_context)
no_second_derivative(_head_loss_backward_op, "dino_head_loss")


def _weight_norm_operands(weight_v, weight_g, dtype):
    """(v (K, D) in the features' dtype, g (K,) fp32) of a weight-normalised prototype layer W = g v / ||v||;
    g = 1 (DINO's frozen norm) when weight_g is None. The kernels apply the norm: no (K, D) W is formed.

    Wider prototypes cast to fp16 (fp32 parameters under autocast) are first scaled to unit rows in their own dtype,
    which leaves W unchanged: cast as they were, rows past fp16's 65504 became inf (the loss NaN) and rows under its
    normal range lost their digits. bf16 has fp32's range: its cast stays a plain one."""
    K = weight_v.shape[0]
    g = torch.ones(K, dtype=torch.float32, device=weight_v.device) if weight_g is None else weight_g.reshape(K)
    if dtype == torch.float16 and weight_v.dtype != dtype:
        weight_v = weight_v / weight_v.norm(dim=1, keepdim=True)
    return weight_v.to(dtype).contiguous(), g.float().contiguous()


def _validate(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
              teacher_temperature, student_temperature, alpha, teacher_weight_v, teacher_weight_g):
    check_tensor("student_features", student_features, 3)
    device = student_features.device
    check_tensor("teacher_features", teacher_features, 3, device)
    check_tensor("weight_v", weight_v, 2, device)
    check_interpreted_dot_dtype("student_features", student_features)  # the dots' dtype: v and h are cast to it
    if teacher_weight_v is not None:
        check_tensor("teacher_weight_v", teacher_weight_v, 2, device)
    check_head_loss_shapes(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
                           teacher_weight_v, teacher_weight_g)
    for name, g in (("weight_g", weight_g), ("teacher_weight_g", teacher_weight_g)):
        if g is not None:
            check_tensor(name, g, 2, device)
    S, B, D = student_features.shape
    T = teacher_features.shape[0]
    K = weight_v.shape[0]
    if D > MAX_D:
        raise ValueError(f"feature width D={D} > {MAX_D} is not supported (the DINO bottleneck is 256)")
    if max(K, S * B, T * B) * D >= 2**31:
        raise ValueError(f"K * D = {K * D} and rows * D must stay below 2**31 (32-bit kernel offsets)")
    for name, x in (("center", center), ("center_high", center_high), ("high_weight", high_weight)):
        check_tensor(name, x, 1, device)
    check_positive("teacher_temperature", teacher_temperature)
    check_positive("student_temperature", student_temperature)
    check_alpha(alpha)
    check_contiguous(student_features=student_features, teacher_features=teacher_features, weight_v=weight_v,
                     teacher_weight_v=teacher_weight_v, center=center, center_high=center_high,
                     high_weight=high_weight)


def validate(student_features, teacher_features, weight_v, center, center_high, high_weight,
             teacher_temperature, student_temperature, alpha, weight_g=None, teacher_weight_v=None,
             teacher_weight_g=None) -> None:
    """dino_head_loss's input checks, in its argument order (also its torch backend's: modules, dino.py)."""
    _validate(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
              teacher_temperature, student_temperature, alpha, teacher_weight_v, teacher_weight_g)


def dino_head_loss(student_features, teacher_features, weight_v, center, center_high, high_weight,
                   teacher_temperature, student_temperature, alpha, weight_g=None, teacher_weight_v=None,
                   teacher_weight_g=None):
    """Fused DINO head last layer + dual-centering teacher softmax + student cross-entropy.

    student_features (S, B, D), teacher_features (T, B, D) (bottleneck outputs, not yet normalised),
    weight_v (K, D) and optional weight_g (K, 1) of the student's prototype layer; the teacher's own
    (EMA) teacher_weight_v / teacher_weight_g, or the student's when None. center, center_high (K,);
    high_weight (T*B,) in teacher_features.reshape(T*B, D) row order.
    Returns (loss, logit_sum (K,), high_logit_sum (K,)); loss is differentiable in student_features,
    weight_v and weight_g; the teacher side is treated as constant. fp32 and fp16/bf16 inputs (dots in
    the input dtype with fp32 accumulation; fp32 uses exact IEEE dots). The kernels apply the weight norm
    to v cast to the features' dtype (a no-op for the presets' bf16 parameters); in fp16 the probabilities
    scaled by g / ||v|| must stay below 65504 (||v|| above 1.5e-5 at g = 1). The `terrafm::dino_head_loss`
    custom op: torch.compile(fullgraph=True) takes it without a graph break.
    """
    _validate(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
              teacher_temperature, student_temperature, alpha, teacher_weight_v, teacher_weight_g)
    S, B, D = student_features.shape
    T = teacher_features.shape[0]
    dtype = student_features.dtype
    hs = F.normalize(student_features.reshape(S * B, D).float(), dim=-1).to(dtype).contiguous()
    vs, gs = _weight_norm_operands(weight_v, weight_g, dtype)
    with torch.no_grad():
        ht = F.normalize(teacher_features.reshape(T * B, D).float(), dim=-1).to(dtype).contiguous()
        if teacher_weight_v is None:
            vt, gt = vs.detach(), gs.detach()
        else:
            vt, gt = _weight_norm_operands(teacher_weight_v, teacher_weight_g, dtype)
    out = _head_loss_op(hs, vs, gs, ht, vt, gt, center.float().contiguous(), center_high.float().contiguous(),
                        high_weight.float().contiguous(), S, T, B, scalar_input(teacher_temperature),
                        scalar_input(student_temperature), float(alpha))
    return out[:3]


def roofline_cost(S: int, T: int, B: int, K: int, D: int = 256, dtype_bytes: int = 2,
                  backward: bool = True, teacher_weight: bool = False) -> dict[str, int]:
    """Useful FLOPs and minimum HBM bytes of forward (+ backward): S student / T teacher views of B
    samples, K prototypes, D bottleneck width, dtype_bytes per feature/weight element; the teacher has its
    own prototypes (v, g) with teacher_weight, else shares the student's. FLOPs are the unfused path's GEMMs
    (the kernels execute more, see module doc)."""
    rs, rt = S * B, T * B
    flops = 2 * K * D * (rt + rs)
    nbytes = (rs + rt) * D * dtype_bytes + K * D * dtype_bytes + 24 * K
    if teacher_weight:
        nbytes += K * D * dtype_bytes + 16 * K
    if backward:
        flops += 4 * K * D * rs
        nbytes += 2 * K * D * dtype_bytes + rs * D * 4 + 4 * K
    return {"flops": flops, "bytes": nbytes}


def production_shape(samples: dict) -> dict:
    """The presets' call with ssl.fused_head_loss (ViT-B, per GPU; off by default): 2 global + 8 local student views
    and 2 teacher views of the samples, K = 65536 prototypes, the 256-wide bottleneck; the teacher has its own
    (EMA) prototypes."""
    return {"S": 10, "T": 2, "B": samples["base"], "K": 65536, "D": 256}


PRODUCTION_SHAPE = production_shape(PRESET_SAMPLES[90])  # vitb_h100's: 64 samples


def efficiency(kernel: str, centred: bool, S: int, T: int, B: int, K: int, D: int, dtype_bytes: int, sms: int,
               concurrent: int, l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one kernel ("project" on the teacher
    (centred) or student rows, "grad_weight" on both), from LaunchPlan's tiles and grids (docs/kernels.md,
    "Efficiency counts"). Useful FLOPs are the kernel's own GEMMs: the logits and the projection for
    project, the projection for grad_weight, whose recomputed logit tiles are executed, not useful."""
    plan = LaunchPlan(K, D, dtype_bytes == 4, False, sms)
    if kernel == "grad_weight":
        return _grad_weight_efficiency(plan, S * B, T * B, dtype_bytes, concurrent, l2_bytes)
    if kernel != "project":
        raise ValueError(f"unknown kernel {kernel!r}: project or grad_weight")
    R, e = (T * B if centred else S * B), dtype_bytes
    bm, bk = plan.block_m, plan.block_k
    grid, block_do, splits, per_split = plan.project_grid(R)
    d_blocks, blocks = grid[0], grid[1]
    rows = lambda m: min(bm, R - m * bm)  # noqa: E731
    cols = lambda j: min(per_split, K - j * per_split)  # noqa: E731
    # each split's loop stops at its last column, so only its last tile is padded; each D block
    # computes the logit tile and its share of the projection
    k_tiles = sum(pad(cols(j), bk) for j in range(splits))
    executed = d_blocks * 2 * pad(R, bm) * k_tiles * (plan.block_d + block_do)
    w_bytes, h_bytes = K * D * e, R * D * e
    # the teacher projects its probabilities onto the student's prototypes: a second (K, D) tensor
    w_proj = "w_student" if centred else "w"
    acc, stats = 4 * D * splits * R, 8 * splits * R  # the (splits, R, D) and (2, splits, R) fp32 partials
    partials = acc + stats
    # the weight norm: each program reads its split of v once more (its norm loop, just before its GEMM loop reads
    # the same tiles) and g, and writes 1 / ||v|| to its own row of the rnorm scratch, which its GEMM loop reads
    # back; the teacher also reads the student's g and 1 / ||v|| for its projection. Between a tile's two reads the
    # wave's norm loops stream their splits of v: fp32 v at the presets' shape (67 MB) misses L2, 16-bit (34 MB) not
    wave_splits = min(splits, triton.cdiv(concurrent, d_blocks * blocks))
    reread = not plan.norm_in_loop(centred) and not l2_serves_reread(min(K, wave_splits * per_split) * D * e, l2_bytes)
    norms = ["g", "rnorm"] + (["g_student", "rnorm_student"] if centred else [])
    sizes = {"h": h_bytes, "w": w_bytes, "w_student": w_bytes, "out": partials, "column": 8 * K * blocks,
             "centres": 8 * K, "high_weight": 4 * R, **dict.fromkeys(norms, 4 * K), "rnorm": 4 * K * blocks * d_blocks}

    def touches(d, m, j):
        out = [("h", m, rows(m) * D * e), ("w", j, cols(j) * D * e),
               (w_proj, (j, d) if centred else j, cols(j) * (block_do if centred else D) * e),
               ("out", (m, j, d), rows(m) * (4 * block_do + 8)), ("g", j, 4 * cols(j)),
               ("rnorm", (m, j, d), 4 * cols(j))]
        if centred:
            out += [("column", (m, j), 8 * cols(j)), ("centres", j, 8 * cols(j)), ("high_weight", m, 4 * rows(m)),
                    ("g_student", j, 4 * cols(j)), ("rnorm_student", j, 4 * cols(j))]
        if reread:
            out.append(("w", (j, "norm loop"), cols(j) * D * e))
        return out
    # torch combines the splits into (R, D): 16-bit, one bmm reads the accumulators once; fp32, scaled in place (read,
    # written) and summed (read again). The stats are read twice (max, then the shares) into the row max and
    # log-sum; the column partials are summed
    extra = (3 if plan.dot_ieee else 1) * acc + 2 * stats + 4 * R * D + 8 * R + (8 * K * (blocks + 1) if centred else 0)
    floor = (h_bytes + w_bytes * (2 if centred else 1) + 4 * R * D + 8 * R + (16 * K + 4 * R if centred else 0)
             + 4 * K * len(norms))
    return {"useful_flops": 4 * R * K * D, "executed_flops": executed, "min_bytes": floor,
            "moved_bytes": hbm_bytes(grid, touches, sizes, concurrent, l2_bytes) + extra,
            "flop_kind": "fp32" if dtype_bytes == 4 else "tensor"}


def _grad_weight_efficiency(plan: LaunchPlan, rs: int, rt: int, e: int, concurrent: int, l2_bytes: int) -> dict:
    """efficiency() of the grad_weight kernel: program (K block) walks the student's rs rows with v_s, then the
    teacher's rt rows with v_t, and writes its full-width (K block, D) of dL/dv_s and its dL/dg_s once (the
    weight norm's epilogue re-reads its v_s tile, from L2, and does ~4 K D fp32 FLOPs, not counted)."""
    K, D, bm, bk = plan.K, plan.D, plan.block_m, plan.grad_weight_block_k
    grid = plan.grad_weight_grid()
    executed = 2 * (pad(rs, bm) + pad(rt, bm)) * pad(K, bk) * 2 * plan.block_d
    sizes = {"hs": rs * D * e, "ht": rt * D * e, "xs": rs * D * e, "xt": rt * D * e, "ws": K * D * e,
             "wt": K * D * e, "out": K * D * e, "centres": 8 * K, "stats": 8 * (rs + rt), "norms": 16 * K,
             "grad_g": 4 * K}
    ks = lambda k: min(bk, K - k * bk)  # noqa: E731

    def touches(k, _, __):
        return [("hs", 0, sizes["hs"]), ("ht", 0, sizes["ht"]), ("stats", 0, sizes["stats"]),
                ("ws", k, ks(k) * D * e), ("wt", k, ks(k) * D * e), ("centres", k, 8 * ks(k)),
                ("norms", k, 16 * ks(k)), ("xs", 0, sizes["xs"]), ("xt", 0, sizes["xt"]),
                ("out", k, ks(k) * D * e), ("grad_g", k, 4 * ks(k))]
    return {"useful_flops": 2 * (rs + rt) * K * D, "executed_flops": executed, "min_bytes": sum(sizes.values()),
            "moved_bytes": hbm_bytes(grid, touches, sizes, concurrent, l2_bytes),
            "flop_kind": "fp32" if e == 4 else "tensor"}


# Integers that are multiples of 16 at the production shape: R (128 / 640 rows), K, D and K_PER_SPLIT (a multiple
# of BLOCK_K). With them and the aligned pointers the (rows, D) and (prototypes, D) loads are vector loads without
# per-element 64-bit addresses (the unspecialized variant, which only widths that are not a multiple of 16 run,
# needs 255 registers and spills in the 16-bit teacher project (600-720 B) and grad_weight on sm_90 (176 B):
# slower, still correct).
MULTIPLES_OF_16 = ("R", "R_s", "R_t", "K", "D", "D_STRIDE", "K_PER_SPLIT")


def compile_specs() -> list[dict]:
    """Every shipped configuration (operand dtype x kernel, x centred for stats and project) for the AOT report.

    BLOCK_D = 256 is the DINO bottleneck; other widths compile on first use with the same tiles."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        fp32 = dtype == torch.float32
        name = str(dtype).removeprefix("torch.")
        config = CONFIGS["fp32" if fp32 else "16bit"]
        blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_K": config["BLOCK_K"], "BLOCK_D": 256,
                  "DOT_IEEE": fp32, "TMA": not fp32}
        # uses_dot means tensor-core dots (mma on sm_80, wgmma on sm_90): the fp32 configs' exact IEEE
        # dots compile to FMA loops, so the compile report must not expect mma from them
        common = {"num_warps": config["num_warps"], "num_stages": config["num_stages"], "uses_dot": not fp32}
        for centred in (False, True):
            tag = "teacher" if centred else "student"
            counts = lambda kernel, c=centred, e=dtype.itemsize: at_presets(  # noqa: E731
                efficiency, production_shape, kernel=kernel, centred=c, dtype_bytes=e)
            specs.append({
                "name": f"head_softmax_project_{tag}_{name}", "fn": _softmax_project_kernel,
                "signature": {"h_ptr": ptr, "v_logit_ptr": ptr, "v_proj_ptr": ptr, "g_logit_ptr": "*fp32",
                              "g_proj_ptr": "*fp32", "rnorm_proj_ptr": "*fp32", "rnorm_ptr": "*fp32",
                              "center_ptr": "*fp32", "center_high_ptr": "*fp32", "high_weight_ptr": "*fp32",
                              "stats_ptr": "*fp32", "out_ptr": "*fp32", "column_ptr": "*fp32", "R": "i32", "K": "i32",
                              "D": "i32", "D_STRIDE": "i32", "K_PER_SPLIT": "i32", "scale": "fp32", "alpha": "fp32"},
                "constexprs": {**blocks, "CENTER": centred, "BLOCK_DO": config["BLOCK_DO"], "NORM_CHUNK": NORM_CHUNK,
                               "NORM_IN_LOOP": fp32 and not centred},
                **common,
                "efficiency": counts("project"),
            })
        specs.append({
            "name": f"head_grad_weight_{name}", "fn": _grad_weight_kernel,
            "signature": {"hs_ptr": ptr, "vs_ptr": ptr, "xs_ptr": ptr, "s_max_ptr": "*fp32", "s_log2_sum_ptr": "*fp32",
                          "ht_ptr": ptr, "vt_ptr": ptr, "xt_ptr": ptr, "t_max_ptr": "*fp32",
                          "t_log2_sum_ptr": "*fp32", "gs_ptr": "*fp32", "rnorm_s_ptr": "*fp32", "gt_ptr": "*fp32",
                          "rnorm_t_ptr": "*fp32", "center_ptr": "*fp32", "center_high_ptr": "*fp32",
                          "grad_loss_ptr": "*fp32", "out_ptr": ptr, "grad_g_ptr": "*fp32", "R_s": "i32", "R_t": "i32",
                          "K": "i32", "D": "i32", "D_STRIDE": "i32", "scale_s": "fp32", "scale_t": "fp32",
                          "alpha": "fp32", "coef": "fp32"},
            "constexprs": blocks, **common,
            "efficiency": at_presets(efficiency, production_shape, kernel="grad_weight", centred=False,
                                     dtype_bytes=dtype.itemsize),
        })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
