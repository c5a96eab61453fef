"""Fused adaptive cross-attention fusion over modality tokens (TerraFM Case N), forward and backward.

Math (reference.cross_attention_fusion): keys, values (T, M, A) for T patch positions and M
modalities, queries (Q, A), pool (A,), H heads of width d = A / H:
    a[t, h, q, :] = softmax_m(queries[q, h] . keys[t, m, h] / sqrt(d))
    z[t, q, h]    = sum_m a[t, h, q, m] values[t, m, h]
    w[t, :]       = softmax_q(z[t, q] . pool)
    out[t]        = sum_q w[t, q] z[t, q]                                     (T, A)
The kernels never form z (Q x d per head): by associativity
    z[t, q] . pool = sum_h sum_m a[t, h, q, m] r[t, h, m],   r[t, h, m] = values[t, m, h] . pool[h]
    out[t, h]      = sum_m c[t, h, m] values[t, m, h],       c[t, h, m] = sum_q w[t, q] a[t, h, q, m]
so per head the forward needs the scores (Q x M x d) and the M projections r (M x d) for the pooling
logits, then the M-term sum for the output. Each program takes BLOCK_P = 16 positions side by side
and walks the heads twice: first the scores, saving each head's attention (it is saved for backward
anyway), then, once w is known, the output, reading the values and the attention again (in registers the
attention capped the positions per program at 4). What a wave streams in between outgrows L2 at the
presets' shapes, so the second read crosses HBM: moved bytes ~1.45x the floor (efficiency()).
Saved for backward: w (T, Q), the attention (T, H, Q, M) and r (T, H, M), fp32 (29 MB at ViT-B's
shape: cheaper than re-reading the keys to recompute them).

Backward, with u[t, h, m] = dout[t, h] . values[t, m, h]:
    dw[q] = sum_h sum_m a u;  dl = w (dw - sum_q w dw);  da = w[q] u + dl[q] r
    ds = a (da - sum_m a da)   (the score gradient);  c as above;  dr[h, m] = sum_q dl[q] a[h, q, m]
    grad_keys[m] = scale sum_q ds[q, m] queries[q];   grad_queries[q] += scale sum_m ds[q, m] keys[m]
    grad_values[m] = c[m] dout + dr[m] pool;          grad_pool += sum_m dr[m] values[m]
Kernel 1 (per position, all heads in one (H, 16-column) tile) reads values, dout and the saved
attention and writes ds, c, dr (T, H, Q + 2, M); kernel 2 (per column chunk x head x block of 128
positions, BLOCK_P_HEAD = 8 at a time) writes grad_keys / grad_values for its columns and accumulates
grad_queries / grad_pool in registers, one fp32 partial per program, summed by torch afterwards
(deterministic, no atomics).

Tiles: the (Q x M x d) products run on one flattened lane axis i = q M + m (16 lanes at Q = 5,
M = 3, not (8, 4) = 32), as fp32 broadcast multiply-adds over column chunks (16 for fp32 data, exact for
d = 144 and 192; 32 for 16-bit data, exact in whole chunks plus one tail: forward_tile, HEAD_D_CHUNK_BY_BYTES);
per-query sums over the lanes are (Q x lanes) masked reductions (split lane pairs at M = 2). The tiles are
sized for Q x M <= 16 (the presets); larger Q x M (validate allows up to 64 x 16) is correct but
grows the lane tiles and their (Q x lanes) sums with it, so it runs slower per position.

Cost per forward call (e = bytes per element), the op's own arithmetic in this form:
    FLOPs ~ 2 T Q M A (scores) + 4 T M A (r and the output) + O(T H Q M)
    minimum HBM bytes = e (2 T M A + T A) + e (Q A + A)
Memory bound on H100/A100 (~3 FLOPs per byte), hence fp32 FMA, not tensor-core dots (which pad
the tiny Q and M to 16). Counts per kernel: efficiency().
"""

import math

import torch
import triton
import triton.language as tl

from ._common import (
    FUSION_MAX_MODALITIES,
    FUSION_MAX_QUERIES,
    PRESET_SAMPLES,
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_contiguous,
    check_size,
    check_tensor,
    hbm_bytes,
    interpreted,
    l2_serves_reread,
    launch_kernel,
    no_second_derivative,
    op_name,
    pad,
)

MAX_MODALITIES = FUSION_MAX_MODALITIES
MAX_QUERIES = FUSION_MAX_QUERIES
# Positions per backward program: 128 on a GPU keeps the grad_queries partials at
# T / 128 x Q x A fp32 (~24 MB for ViT-L at batch 256) with thousands of programs in flight;
# the interpreter pays per op, so it gets few positions per program.
GPU_BLOCK_T = 128
INTERPRETER_BLOCK_T = 4
# Positions side by side in one tile: more bytes in flight per load than one position's 3 x 16 columns; 2 under
# the interpreter so its tests cover the position masks. The forward takes 16 (its attention is read back from
# memory, not held in registers, so 16 positions fit at 3-4 programs per SM: 12 KiB of loads in flight on
# sm_90, where 4 positions with all heads' attention in registers gave 5.2), or 32 where its tile is
# forward_tile's narrow one; the head kernel steps 8 (8.8 KiB in flight where 4 gave 6.1): at 16 the compiler
# turns its sums over positions into mma.sync (tf32 for fp32 data), a precision no interpreter test can check.
GPU_BLOCK_P = 16
GPU_BLOCK_P_HEAD = 8
INTERPRETER_BLOCK_P = 2
# Loads are not pipelined through shared memory (no tl.dot): one stage, at launch and in the compile report.
NUM_STAGES = 1
# Warps and column chunk, from the compile report: the largest tiles are the forward's (16 positions, 16 lanes,
# 16 columns) at the presets' Q = 5, M = 3.
NUM_WARPS = 4
NUM_WARPS_BACKWARD_HEAD = 4
# Columns per step of the forward, by input bytes per element: 16-bit data takes 32 (ViT-B's 144 pads to 160:
# FLOPs 1.37x at three sensors), twice the bytes a step at 3-4 programs per SM, so the forward is not latency bound
# (18 KiB in flight on sm_90); fp32 keeps 16 (exact for 144 and 192; at 32 its forward spills on sm_90, and 16
# already moves 6 KiB a step). forward_tile narrows it where the padding would put FLOPs over bound.
D_CHUNK_BY_BYTES = {2: 32, 4: 16}
# Columns per program of the head backward, by input bytes per element: 16-bit data takes 32, twice the bytes a
# step at 4 programs per SM (14.0 KiB in flight of Little's law's 14.9 on sm_90); fp32 keeps 16. A head width that
# is not whole chunks ends in one TAIL_CHUNK program (D % HEAD_D_CHUNK to a power of 2: ViT-B's 16-bit 144 =
# 4 x 32 + 16; it padded to 160, FLOPs 1.65x at two sensors).
HEAD_D_CHUNK_BY_BYTES = {2: 32, 4: 16}
# The pool backward's chunk of all heads' columns: 32 (144 padded to 160 at ViT-B, FLOPs 1.30x) puts 2 KiB of
# 16-bit loads in each step, 24 KiB per SM at its 12 resident programs, where 16 gave 12 (Little's law: 14.9).
POOL_D_CHUNK = 32


@triton.jit
def _query_sum(x, lane_q, BLOCK_Q: tl.constexpr):
    """Per (position, lane), the sum of x (positions, lanes) over the lanes of its query (lane_q = lane // M)."""
    qs = tl.arange(0, BLOCK_Q)
    per_query = tl.sum(tl.where(lane_q[None, None, :] == qs[None, :, None], x[:, None, :], 0.0), axis=2)
    return tl.sum(tl.where(lane_q[None, :, None] == qs[None, None, :], per_query[:, None, :], 0.0), axis=2)


@triton.jit
def _query_max(x, lane_q, BLOCK_Q: tl.constexpr):
    """Per (position, lane), the max of x over the lanes of its query."""
    qs = tl.arange(0, BLOCK_Q)
    per_query = tl.max(tl.where(lane_q[None, None, :] == qs[None, :, None], x[:, None, :], float("-inf")), axis=2)
    return tl.max(tl.where(lane_q[None, :, None] == qs[None, None, :], per_query[:, None, :], float("-inf")), axis=2)


@triton.jit
def _lane_max(x, lane_q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PAIRED: tl.constexpr):
    """_query_max; PAIRED (M = 2: lanes 2q and 2q + 1 are query q's): the lanes split into the two sensors' halves,
    one elementwise max, joined back, where the masked form reduces every lane for every query."""
    if PAIRED:
        a, b = tl.split(tl.reshape(x, [BLOCK_P, BLOCK_Q, 2]))
        g = tl.maximum(a, b)
        return tl.reshape(tl.join(g, g), [BLOCK_P, BLOCK_Q * 2])
    return _query_max(x, lane_q, BLOCK_Q)


@triton.jit
def _lane_sum(x, lane_q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PAIRED: tl.constexpr):
    """_query_sum, PAIRED as in _lane_max."""
    if PAIRED:
        a, b = tl.split(tl.reshape(x, [BLOCK_P, BLOCK_Q, 2]))
        g = a + b
        return tl.reshape(tl.join(g, g), [BLOCK_P, BLOCK_Q * 2])
    return _query_sum(x, lane_q, BLOCK_Q)


@triton.jit
def _forward_kernel(k_ptr, v_ptr, q_ptr, pool_ptr, out_ptr, w_ptr, attn_ptr, vpool_ptr, T, M, Q, A, D, scale,
                    H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_QM: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr, PAIRED: tl.constexpr):
    """BLOCK_P positions: per head the scores on the lane axis and r = values . pool, then w, then the output
    (each head's attention read back from where it was saved for backward: L2, not registers)."""
    ts = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    t_ok = ts < T
    lanes = tl.arange(0, BLOCK_QM)
    lane_q, lane_m, lane_ok = lanes // M, lanes % M, lanes < Q * M
    ms = tl.arange(0, BLOCK_M)
    tokens = ts[:, None, None] * M * A
    tm_ok = t_ok[:, None, None] & (ms < M)[None, :, None]
    logit_terms = tl.zeros([BLOCK_P, BLOCK_QM], tl.float32)
    for h in range(H):
        s = tl.zeros([BLOCK_P, BLOCK_QM], tl.float32)
        r = tl.zeros([BLOCK_P, BLOCK_M], tl.float32)
        for c0 in range(0, D, D_CHUNK):
            c_ok = c0 + tl.arange(0, D_CHUNK) < D
            cs = h * D + c0 + tl.arange(0, D_CHUNK)
            qh = tl.load(q_ptr + lane_q[:, None] * A + cs[None, :], mask=lane_ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
            k = tl.load(k_ptr + tokens + lane_m[None, :, None] * A + cs[None, None, :],
                        mask=t_ok[:, None, None] & lane_ok[None, :, None] & c_ok[None, None, :],
                        other=0.0).to(tl.float32)
            s += tl.sum(qh[None, :, :] * k, axis=2)
            v = tl.load(v_ptr + tokens + ms[None, :, None] * A + cs[None, None, :],
                        mask=tm_ok & c_ok[None, None, :], other=0.0).to(tl.float32)
            pool = tl.load(pool_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
            r += tl.sum(v * pool[None, None, :], axis=2)
        s = tl.where(lane_ok[None, :], s * scale, float("-inf"))
        e = tl.exp(s - tl.where(lane_ok[None, :], _lane_max(s, lane_q, BLOCK_P, BLOCK_Q, BLOCK_M, PAIRED), 0.0))
        a = e / tl.where(lane_ok[None, :], _lane_sum(e, lane_q, BLOCK_P, BLOCK_Q, BLOCK_M, PAIRED), 1.0)  # pads: 0
        saved = ts[:, None] * H + h
        tl.store(attn_ptr + saved * Q * M + lanes[None, :], a, mask=t_ok[:, None] & lane_ok[None, :])
        tl.store(vpool_ptr + saved * M + ms[None, :], r, mask=t_ok[:, None] & (ms < M)[None, :])
        r_lane = tl.sum(tl.where(lane_m[None, :, None] == ms[None, None, :], r[:, None, :], 0.0), axis=2)
        logit_terms += a * r_lane
    logits = _lane_sum(logit_terms, lane_q, BLOCK_P, BLOCK_Q, BLOCK_M, PAIRED)  # each lane: its query's logit
    first = lane_ok & (lane_m == 0)  # one lane per query
    e = tl.exp(logits - tl.max(tl.where(first[None, :], logits, float("-inf")), axis=1)[:, None])
    w = tl.where(lane_ok[None, :], e / tl.sum(tl.where(first[None, :], e, 0.0), axis=1)[:, None], 0.0)
    tl.store(w_ptr + ts[:, None] * Q + lane_q[None, :], w, mask=t_ok[:, None] & first[None, :])
    tl.debug_barrier()  # the attention stored above is read back by other threads of this program
    for h in range(H):
        a = tl.load(attn_ptr + (ts[:, None] * H + h) * Q * M + lanes[None, :], mask=t_ok[:, None] & lane_ok[None, :],
                    other=0.0)
        weighted = w * a  # w[q] a[h, q, m]
        c = tl.sum(tl.where(lane_m[None, :, None] == ms[None, None, :], weighted[:, :, None], 0.0), axis=1)
        for c0 in range(0, D, D_CHUNK):
            c_ok = c0 + tl.arange(0, D_CHUNK) < D
            cs = h * D + c0 + tl.arange(0, D_CHUNK)
            v = tl.load(v_ptr + tokens + ms[None, :, None] * A + cs[None, None, :],
                        mask=tm_ok & c_ok[None, None, :], other=0.0).to(tl.float32)
            out = tl.sum(c[:, :, None] * v, axis=1)
            tl.store(out_ptr + ts[:, None] * A + cs[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _backward_pool_kernel(v_ptr, dout_ptr, w_ptr, attn_ptr, vpool_ptr, coef_ptr, M, Q, A, D,
                          H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                          POOL_D_CHUNK: tl.constexpr):
    """One position: u = dout . values (all heads at once), then the pooling softmax's backward and
    the per-head coefficients the head kernel needs, coef (T, H, Q + 2, M) = (ds, c, dr)."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    qs = tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    h_ok, q_ok, m_ok = hs < H, qs < Q, ms < M
    u = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)
    for m in range(M):
        um = tl.zeros([BLOCK_H], tl.float32)
        for c0 in range(0, D, POOL_D_CHUNK):
            c_ok = c0 + tl.arange(0, POOL_D_CHUNK) < D
            cols = hs[:, None] * D + c0 + tl.arange(0, POOL_D_CHUNK)[None, :]
            mask = h_ok[:, None] & c_ok[None, :]
            v = tl.load(v_ptr + (t * M + m) * A + cols, mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + t * A + cols, mask=mask, other=0.0).to(tl.float32)
            um += tl.sum(v * dout, axis=1)
        u = tl.where(ms[None, :] == m, um[:, None], u)
    saved = t * H + hs
    hm = h_ok[:, None] & m_ok[None, :]
    hqm = h_ok[:, None, None] & q_ok[None, :, None] & m_ok[None, None, :]
    a = tl.load(attn_ptr + (saved[:, None, None] * Q + qs[None, :, None]) * M + ms[None, None, :], mask=hqm,
                other=0.0)
    r = tl.load(vpool_ptr + saved[:, None] * M + ms[None, :], mask=hm, other=0.0)
    w = tl.load(w_ptr + t * Q + qs, mask=q_ok, other=0.0)
    dw = tl.sum(tl.sum(a * u[:, None, :], axis=2), axis=0)
    dl = w * (dw - tl.sum(w * dw, axis=0))
    da = w[None, :, None] * u[:, None, :] + dl[None, :, None] * r[:, None, :]
    ds = a * (da - tl.sum(a * da, axis=2)[:, :, None])
    coef = coef_ptr + saved * (Q + 2) * M
    tl.store(coef[:, None, None] + qs[None, :, None] * M + ms[None, None, :], ds, mask=hqm)
    tl.store(coef[:, None] + Q * M + ms[None, :], tl.sum(w[None, :, None] * a, axis=1), mask=hm)
    tl.store(coef[:, None] + (Q + 1) * M + ms[None, :], tl.sum(dl[None, :, None] * a, axis=1), mask=hm)


@triton.jit
def _head_chunk(k_ptr, v_ptr, q_ptr, pool_ptr, dout_ptr, coef_ptr, dk_ptr, dv_ptr, dq_partial_ptr, dpool_partial_ptr,
                T, M, Q, A, D, scale, c0, h, block, H: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_P_HEAD: tl.constexpr, BLOCK_QM: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr):
    """_backward_head_kernel's work on columns c0 .. c0 + CHUNK of head h."""
    lanes = tl.arange(0, BLOCK_QM)
    lane_q, lane_m, lane_ok = lanes // M, lanes % M, lanes < Q * M
    qs = tl.arange(0, BLOCK_Q)
    c_ok = c0 + tl.arange(0, CHUNK) < D
    cs = h * D + c0 + tl.arange(0, CHUNK)
    queries = tl.load(q_ptr + qs[:, None] * A + cs[None, :], mask=(qs < Q)[:, None] & c_ok[None, :],
                      other=0.0).to(tl.float32)
    pool = tl.load(pool_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_QM, CHUNK], tl.float32)
    dpool = tl.zeros([CHUNK], tl.float32)
    for i in range(0, BLOCK_T, BLOCK_P_HEAD):
        if block * BLOCK_T + i < T:  # the last block stops at T
            ts = block.to(tl.int64) * BLOCK_T + i + tl.arange(0, BLOCK_P_HEAD)
            t_ok = ts < T
            tc_ok = t_ok[:, None] & c_ok[None, :]
            coef = coef_ptr + (ts * H + h) * (Q + 2) * M
            ds = tl.load(coef[:, None] + lanes[None, :], mask=t_ok[:, None] & lane_ok[None, :], other=0.0)
            k = tl.load(k_ptr + ts[:, None, None] * M * A + lane_m[None, :, None] * A + cs[None, None, :],
                        mask=t_ok[:, None, None] & lane_ok[None, :, None] & c_ok[None, None, :],
                        other=0.0).to(tl.float32)
            dq += tl.sum(ds[:, :, None] * k, axis=0)
            dout = tl.load(dout_ptr + ts[:, None] * A + cs[None, :], mask=tc_ok, other=0.0).to(tl.float32)
            for m in range(M):
                ds_m = tl.load(coef[:, None] + qs[None, :] * M + m, mask=t_ok[:, None] & (qs < Q)[None, :], other=0.0)
                c = tl.load(coef + Q * M + m, mask=t_ok, other=0.0)
                dr = tl.load(coef + (Q + 1) * M + m, mask=t_ok, other=0.0)
                tok = (ts[:, None] * M + m) * A + cs[None, :]
                v = tl.load(v_ptr + tok, mask=tc_ok, other=0.0).to(tl.float32)
                dk = tl.sum(ds_m[:, :, None] * queries[None, :, :], axis=1) * scale
                dpool += tl.sum(dr[:, None] * v, axis=0)
                tl.store(dk_ptr + tok, dk.to(dk_ptr.dtype.element_ty), mask=tc_ok)
                tl.store(dv_ptr + tok, (c[:, None] * dout + dr[:, None] * pool[None, :]).to(dv_ptr.dtype.element_ty),
                         mask=tc_ok)
    dq = tl.sum(tl.where(lane_q[None, :, None] == qs[:, None, None], dq[None, :, :], 0.0), axis=1) * scale
    base = block.to(tl.int64) * Q * A
    tl.store(dq_partial_ptr + base + qs[:, None] * A + cs[None, :], dq, mask=(qs < Q)[:, None] & c_ok[None, :])
    tl.store(dpool_partial_ptr + block.to(tl.int64) * A + cs, dpool, mask=c_ok)


@triton.jit
def _backward_head_kernel(k_ptr, v_ptr, q_ptr, pool_ptr, dout_ptr, coef_ptr, dk_ptr, dv_ptr, dq_partial_ptr,
                          dpool_partial_ptr, T, M, Q, A, D, scale,
                          H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P_HEAD: tl.constexpr, BLOCK_QM: tl.constexpr,
                          BLOCK_Q: tl.constexpr, HEAD_D_CHUNK: tl.constexpr, TAIL_CHUNK: tl.constexpr):
    """Per (column chunk, head, block of BLOCK_T positions, BLOCK_P_HEAD at a time): grad keys/values of the chunk
    from the pool kernel's coefficients, and the block's grad queries/pool partials for it (grad queries
    accumulated on the lane axis, summed per query once per program). The last chunk of a head whose width is
    not whole chunks (TAIL_CHUNK > 0) is TAIL_CHUNK columns wide."""
    c0 = tl.program_id(0) * HEAD_D_CHUNK
    h = tl.program_id(1)
    block = tl.program_id(2)
    if TAIL_CHUNK == 0:
        _head_chunk(k_ptr, v_ptr, q_ptr, pool_ptr, dout_ptr, coef_ptr, dk_ptr, dv_ptr, dq_partial_ptr,
                    dpool_partial_ptr, T, M, Q, A, D, scale, c0, h, block, H, BLOCK_T, BLOCK_P_HEAD, BLOCK_QM,
                    BLOCK_Q, HEAD_D_CHUNK)
    elif c0 + HEAD_D_CHUNK <= D:
        _head_chunk(k_ptr, v_ptr, q_ptr, pool_ptr, dout_ptr, coef_ptr, dk_ptr, dv_ptr, dq_partial_ptr,
                    dpool_partial_ptr, T, M, Q, A, D, scale, c0, h, block, H, BLOCK_T, BLOCK_P_HEAD, BLOCK_QM,
                    BLOCK_Q, HEAD_D_CHUNK)
    else:
        _head_chunk(k_ptr, v_ptr, q_ptr, pool_ptr, dout_ptr, coef_ptr, dk_ptr, dv_ptr, dq_partial_ptr,
                    dpool_partial_ptr, T, M, Q, A, D, scale, c0, h, block, H, BLOCK_T, BLOCK_P_HEAD, BLOCK_QM,
                    BLOCK_Q, TAIL_CHUNK)


def forward_tile(D: int, dtype_bytes: int, paired: bool) -> tuple[int, int]:
    """(positions, columns) of a forward step on a GPU: 16 positions of D_CHUNK_BY_BYTES columns, except two paired
    sensors in 16-bit data with a head width that is not whole 32-column chunks (ViT-B's 144): their lanes are 10 of
    16 full, and padding the columns to 160 on top took FLOPs to 1.60x. There 32 positions of 16 columns load the
    same bytes a step, exactly (not for three sensors: their per-query sums at 32 positions take 255 registers, 2
    programs per SM, latency bound)."""
    d_chunk = D_CHUNK_BY_BYTES[dtype_bytes]
    if paired and D % d_chunk and D % (d_chunk // 2) == 0:
        return 2 * GPU_BLOCK_P, d_chunk // 2
    return GPU_BLOCK_P, d_chunk


def _blocks(M: int, Q: int, H: int, D: int, dtype_bytes: int) -> dict:
    """The tiles: the (Q, M) pairs on one lane axis padded to a power of 2 (16 at Q = 5, M = 3), Q, M
    and H padded to powers of 2 for the per-query / per-modality / all-heads tiles, the forward's step
    (forward_tile) and the head backward's column chunks (the last one TAIL_CHUNK wide, 0: none)."""
    block_qm, block_q, block_m = triton.next_power_of_2(Q * M), triton.next_power_of_2(Q), triton.next_power_of_2(M)
    # two fused sensors: lane 2q + m, so a per-query max or sum is one elementwise op on the lanes split in halves
    # (tl.split; a reshape-reduce spilled on sm_90), not a masked reduction of every lane per query
    paired = M == 2 and block_q * M == block_qm
    block_p, d_chunk = forward_tile(D, dtype_bytes, paired)
    head = HEAD_D_CHUNK_BY_BYTES[dtype_bytes]
    return {"BLOCK_QM": block_qm, "BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_H": triton.next_power_of_2(H),
            "BLOCK_P": block_p, "D_CHUNK": d_chunk, "HEAD_D_CHUNK": head,
            "TAIL_CHUNK": triton.next_power_of_2(D % head) if D % head else 0, "POOL_D_CHUNK": POOL_D_CHUNK,
            "PAIRED": paired}


def launch_plan(T: int, M: int, Q: int, A: int, H: int, dtype_bytes: int, interpreter: bool = False) -> dict:
    """Tiles and grids of the three kernels: the one place the launcher and efficiency() read them."""
    blocks = _blocks(M, Q, H, A // H, dtype_bytes)
    block_t = INTERPRETER_BLOCK_T if interpreter else GPU_BLOCK_T
    block_p = INTERPRETER_BLOCK_P if interpreter else blocks["BLOCK_P"]
    return {**blocks, "BLOCK_T": block_t, "BLOCK_P": block_p,
            "BLOCK_P_HEAD": INTERPRETER_BLOCK_P if interpreter else GPU_BLOCK_P_HEAD,
            "forward": (triton.cdiv(T, block_p),),
            "backward_pool": (T,),
            "backward_head": (triton.cdiv(A // H, blocks["HEAD_D_CHUNK"]), H, triton.cdiv(T, block_t))}


# The tile constexprs each kernel takes from launch_plan (launchers and compile_specs alike).
TILES = {"forward": ("BLOCK_P", "BLOCK_QM", "BLOCK_Q", "BLOCK_M", "D_CHUNK", "PAIRED"),
         "backward_pool": ("BLOCK_H", "BLOCK_Q", "BLOCK_M", "POOL_D_CHUNK"),
         "backward_head": ("BLOCK_T", "BLOCK_P_HEAD", "BLOCK_QM", "BLOCK_Q", "HEAD_D_CHUNK", "TAIL_CHUNK")}


def _tiles(plan: dict, kernel: str) -> dict:
    return {name: plan[name] for name in TILES[kernel]}


def validate(keys, values, queries, pool, num_heads) -> None:
    """Raise a clear error for any input the kernel cannot take, before anything is launched."""
    check_tensor("keys", keys, 3)
    for name, t, ndim in (("values", values, 3), ("queries", queries, 2), ("pool", pool, 1)):
        check_tensor(name, t, ndim, keys.device)
    T, M, A = keys.shape
    if A == 0:
        raise ValueError(f"keys (T, M, A) = {tuple(keys.shape)} must have a token width A >= 1")
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    if not 1 <= M <= MAX_MODALITIES:
        raise ValueError(f"the kernel fuses 1..{MAX_MODALITIES} modality tokens per position, got M={M}")
    if queries.shape[1] != A or pool.shape[0] != A:
        raise ValueError(f"queries (Q, {A}) and pool ({A},) must match the token width A={A}; "
                         f"got {tuple(queries.shape)} and {tuple(pool.shape)}")
    if not 1 <= queries.shape[0] <= MAX_QUERIES:
        raise ValueError(f"1..{MAX_QUERIES} queries supported, got {queries.shape[0]}")
    check_size("num_heads", num_heads)
    if A % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of the token width {A}, got {num_heads}")
    if keys.numel() >= 2**31:
        raise ValueError("cross_attention_fusion: inputs of 2**31 elements or more are not supported; split them")
    check_contiguous(keys=keys, values=values, queries=queries, pool=pool)


def _launch_forward(keys, values, queries, pool, num_heads):
    """(out (T, A), and saved for backward in fp32: w (T, Q), attention (T, H, Q, M), r (T, H, M))."""
    T, M, A = keys.shape
    H = num_heads
    Q, D = queries.shape[0], A // H
    plan = launch_plan(T, M, Q, A, H, keys.element_size(), interpreted(keys))
    out = torch.empty((T, A), dtype=keys.dtype, device=keys.device)
    w = torch.empty((T, Q), dtype=torch.float32, device=keys.device)
    attn = torch.empty((T, H, Q, M), dtype=torch.float32, device=keys.device)
    vpool = torch.empty((T, H, M), dtype=torch.float32, device=keys.device)
    launch_kernel(_forward_kernel, plan["forward"], keys, values, queries, pool, out, w, attn, vpool, T, M, Q, A, D,
                  1.0 / math.sqrt(D), H=H, **_tiles(plan, "forward"), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, w, attn, vpool


def _launch_backward(grad_out, keys, values, queries, pool, w, attn, vpool, num_heads):
    T, M, A = keys.shape
    H = num_heads
    Q, D = queries.shape[0], A // H
    plan = launch_plan(T, M, Q, A, H, keys.element_size(), interpreted(keys))
    dout = grad_out.contiguous()
    coef = torch.empty((T, H, Q + 2, M), dtype=torch.float32, device=keys.device)
    launch_kernel(_backward_pool_kernel, plan["backward_pool"], values, dout, w, attn, vpool, coef, M, Q, A, D, H=H,
                  **_tiles(plan, "backward_pool"), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    programs = plan["backward_head"][2]
    dk, dv = torch.empty_like(keys), torch.empty_like(values)
    dq_partial = torch.empty((programs, Q, A), dtype=torch.float32, device=keys.device)
    dpool_partial = torch.empty((programs, A), dtype=torch.float32, device=keys.device)
    launch_kernel(_backward_head_kernel, plan["backward_head"], keys, values, queries, pool, dout, coef, dk, dv,
                  dq_partial, dpool_partial, T, M, Q, A, D, 1.0 / math.sqrt(D), H=H, **_tiles(plan, "backward_head"),
                  num_warps=NUM_WARPS_BACKWARD_HEAD, num_stages=NUM_STAGES)
    return dk, dv, dq_partial.sum(0).to(queries.dtype), dpool_partial.sum(0).to(pool.dtype)


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op(op_name("cross_attention_fusion"), mutates_args=())
def _fusion_op(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, pool: torch.Tensor,
               num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(keys, values, queries, pool, num_heads)


@_fusion_op.register_fake
def _(keys, values, queries, pool, num_heads):
    T, M, A = keys.shape
    Q = queries.shape[0]
    saved = lambda *shape: keys.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return keys.new_empty((T, A)), saved(T, Q), saved(T, num_heads, Q, M), saved(T, num_heads, M)


@torch.library.custom_op(op_name("cross_attention_fusion_backward"), mutates_args=())
def _fusion_backward_op(grad_out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                        pool: torch.Tensor, w: torch.Tensor, attn: torch.Tensor, vpool: torch.Tensor,
                        num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, keys, values, queries, pool, w, attn, vpool, num_heads)


@_fusion_backward_op.register_fake
def _(grad_out, keys, values, queries, pool, w, attn, vpool, num_heads):
    return torch.empty_like(keys), torch.empty_like(values), torch.empty_like(queries), torch.empty_like(pool)


def _setup_context(ctx, inputs, output):
    keys, values, queries, pool, num_heads = inputs
    ctx.save_for_backward(keys, values, queries, pool, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, *_grad_saved):
    return _fusion_backward_op(grad_out, *ctx.saved_tensors, ctx.num_heads) + (None,)


_fusion_op.register_autograd(_backward, setup_context=_setup_context)
no_second_derivative(_fusion_backward_op, "cross_attention_fusion")


def cross_attention_fusion(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, pool: torch.Tensor,
                           num_heads: int) -> torch.Tensor:
    """Fused reference.cross_attention_fusion: (T, A) in keys' dtype, fp32 math inside.

    Gradients flow to keys, values, queries and pool. The `terrafm::cross_attention_fusion` custom
    op: torch.compile(fullgraph=True) takes it without a graph break.
    """
    validate(keys, values, queries, pool, num_heads)
    return _fusion_op(keys, values, queries, pool, num_heads)[0]


def roofline_cost(T: int, M: int, A: int, Q: int = 5, dtype_bytes: int = 2, backward: bool = False) -> dict:
    """Useful FLOPs (each product counted once, in the associative form of the module docstring, without
    the O(T H Q M) softmax terms) and minimum HBM bytes of forward (+ backward).

    Forward: scores 2 T Q M A, r and the output 2 T M A each. Backward: u 2 T M A, grad keys and grad
    queries 2 T Q M A each, grad values 3 T M A, grad pool 2 T M A; it reads keys, values and
    grad_out and writes the four gradients.
    """
    e = dtype_bytes
    flops = 2 * T * Q * M * A + 4 * T * M * A
    moved = e * (2 * T * M * A + T * A + Q * A + A)
    if backward:
        flops += 4 * T * Q * M * A + 7 * T * M * A
        moved += e * (4 * T * M * A + T * A + Q * A + A)
    return {"flops": flops, "bytes": moved}


def production_shapes(samples: dict) -> dict[str, dict]:
    """The presets' typical calls (per GPU: one fused global crop of every sample x 196 patches, Q = 5 queries,
    H = 16 heads, A = 3 D; ViT-B "b", ViT-L "l"): a fused view draws 2 or 3 of the 3 sensors, each half the time
    (data.views.modality_mix), so M = 3 (S2-L2A + S2-L1C + S1) and M = 2 (its own compiled tiles, BLOCK_M = 2) are
    both production shapes. The two global crops share a call only when they draw the same sensors."""
    return {"b": {"T": samples["base"] * 196, "M": 3, "Q": 5, "A": 2304, "H": 16},
            "l": {"T": samples["large"] * 196, "M": 3, "Q": 5, "A": 3072, "H": 16},
            "b_m2": {"T": samples["base"] * 196, "M": 2, "Q": 5, "A": 2304, "H": 16},
            "l_m2": {"T": samples["large"] * 196, "M": 2, "Q": 5, "A": 3072, "H": 16}}


PRODUCTION_SHAPES = production_shapes(PRESET_SAMPLES[90])  # vitb_h100's and vitl_h100's


def efficiency(kernel: str, T: int, M: int, Q: int, A: int, H: int, dtype_bytes: int, sms: int, concurrent: int,
               l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one kernel ("forward", "backward_pool",
    "backward_head") from launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts").

    Useful FLOPs are the op's products in the associative form (roofline_cost) plus its O(H Q M)
    softmax terms per position; executed FLOPs count every multiply and add of the padded tiles
    (lanes, Q, M, H padded to powers of 2; columns to whole chunks), the masked per-query / per-modality
    sums on the lane axis included. The floor is the op's own tensors: the saved attention and the
    coefficients between the backward kernels count as moved bytes only.
    """
    plan = launch_plan(T, M, Q, A, H, dtype_bytes)
    bqm, bq, bm, bh, bt, bp, hc = (plan[k] for k in ("BLOCK_QM", "BLOCK_Q", "BLOCK_M", "BLOCK_H", "BLOCK_T", "BLOCK_P",
                                                     "HEAD_D_CHUNK"))
    e, D = dtype_bytes, A // H
    dc = plan["D_CHUNK"]
    chunks = triton.cdiv(D, dc)  # the forward's steps per head
    cols = chunks * dc  # the head width in the forward's whole chunks
    # step_bytes below: a step's loads in flight, the mean over a head's chunks of the columns loaded (a masked
    # column loads nothing: a padded or tail chunk carries fewer bytes)
    head_chunks = plan["backward_head"][0]  # the head backward's programs per head, the last one TAIL_CHUNK wide
    head_cols = D // hc * hc + plan["TAIL_CHUNK"]  # the head width as the head backward's programs execute it
    tokens = T * M * A * e
    hqm, saved = H * Q * M, H * (Q * M + M) * 4  # saved per position: attention and r, fp32
    if kernel == "forward":
        useful = 2 * T * Q * M * A + 4 * T * M * A + T * (7 * hqm + 3 * Q)
        # per head: the chunked products, the lane softmax and logit terms, then c = sum_q w a (attention read back)
        # one per-query max or sum on the lanes: the masked form reduces all lanes per query, then broadcasts back
        # with a second masked sum; PAIRED is one elementwise op on half the lanes (the join back is a copy)
        per_query = bqm // 2 if plan["PAIRED"] else 2 * bq * bqm
        per_head = cols * (2 * bqm + 4 * bm) + 4 * bqm + 2 * per_query + bqm * bm + bqm + bqm * bm
        executed = plan["forward"][0] * bp * (H * per_head + per_query + 3 * bqm)
        sizes = {"k": tokens, "v": tokens, "out": T * A * e, "w": T * Q * 4, "saved": T * saved, "q": Q * A * e}

        # the output pass reads the values and the attention again, after the wave's first passes streamed their
        # keys, values and attention: from HBM at the presets' shapes (ViT-B bf16: 181 MB a wave)
        attention = H * Q * M * 4
        again = not l2_serves_reread(min(concurrent, plan["forward"][0]) * bp * (2 * M * A * e + attention), l2_bytes)

        def touches(p, _y, _z):
            n = min(bp, T - p * bp)  # positions of this program
            out = [("k", p, n * M * A * e), ("v", p, n * M * A * e), ("q", 0, Q * A * e), ("pool", 0, A * e),
                   ("out", p, n * A * e), ("w", p, n * Q * 4), ("saved", p, n * saved)]
            if again:
                out += [("v", (p, "output pass"), n * M * A * e), ("saved", (p, "output pass"), n * attention)]
            return out
        floor = 2 * tokens + T * A * e + Q * A * e + A * e
        step = 2 * bp * M * D * e // chunks  # keys and values of BLOCK_P positions' M tokens in one chunk
    elif kernel == "backward_pool":  # u = dout . values, then the pooling softmax's backward per head
        useful = 2 * T * M * A + T * (13 * hqm + 4 * Q)
        pool_chunks = triton.cdiv(D, plan["POOL_D_CHUNK"])
        pool_cols = pool_chunks * plan["POOL_D_CHUNK"]
        executed = T * (2 * M * bh * pool_cols + 13 * bh * bq * bm + 4 * bq)
        coef = H * (Q + 2) * M * 4
        sizes = {"v": tokens, "dout": T * A * e, "w": T * Q * 4, "saved": T * saved, "coef": T * coef}
        touches = lambda t, _y, _z: [("v", t, M * A * e), ("dout", t, A * e), ("w", t, Q * 4),  # noqa: E731
                                     ("saved", t, saved), ("coef", t, coef)]
        floor = tokens + T * A * e
        step = 2 * H * D * e // pool_chunks  # values and grad out of one position's heads in one chunk
    else:  # backward_head: per (column chunk, head, block of positions), coefficients from the pool kernel
        useful = 4 * T * Q * M * A + 6 * T * M * A + Q * A  # + the 1/sqrt(d) scale of grad keys / queries
        blocks = plan["backward_head"][2]
        per_position = 2 * bqm + M * (2 * bq + 1 + 3 + 2)  # per column
        stepped = sum(pad(min(bt, T - b * bt), plan["BLOCK_P_HEAD"]) for b in range(blocks))  # the last stops at T
        executed = head_cols * H * (stepped * per_position + blocks * (bq * bqm + bq))
        partials = blocks * (Q + 1) * A * 4
        coef_bytes = (Q + 2) * M * 4
        sizes = {"k": tokens, "v": tokens, "dk": tokens, "dv": tokens, "dout": T * A * e, "q": Q * A * e,
                 "partials": partials, "coef": T * H * coef_bytes}

        def touches(c, h, b):
            t = min(bt, T - b * bt)
            width = max(0, min(hc, D - c * hc))
            return [("k", (b, h, c), t * M * width * e), ("v", (b, h, c), t * M * width * e),
                    ("dout", (b, h, c), t * width * e), ("q", (h, c), Q * width * e), ("pool", (h, c), width * e),
                    ("coef", (b, h), t * coef_bytes), ("dk", (b, h, c), t * M * width * e),
                    ("dv", (b, h, c), t * M * width * e), ("partials", (b, h, c), (Q + 1) * width * 4)]
        floor = 4 * tokens + T * A * e + Q * A * e + A * e
        # a step of BLOCK_P_HEAD positions: their keys and grad out, and values per modality, in one chunk
        return {"useful_flops": useful, "executed_flops": executed, "min_bytes": floor, "flop_kind": "fp32",
                "moved_bytes": hbm_bytes(plan[kernel], touches, sizes, concurrent, l2_bytes) + partials,
                "programs": head_chunks * H * blocks,
                "step_bytes": (2 * M + 1) * plan["BLOCK_P_HEAD"] * D * e // head_chunks}
    programs = plan[kernel][0] if kernel == "forward" else T
    return {"useful_flops": useful, "executed_flops": executed, "min_bytes": floor, "flop_kind": "fp32",
            "moved_bytes": hbm_bytes(plan[kernel], touches, sizes, concurrent, l2_bytes), "programs": programs,
            "step_bytes": step}


# Integers that are multiples of 16 at the presets' shapes (T = B x 196 positions, A = 3 D, D = A / 16 heads: 144
# or 192); M (2-3 sensors) and Q (5 queries) are not. The compile report compiles the variant the JIT builds.
MULTIPLES_OF_16 = ("T", "A", "D")


def compile_specs() -> list[dict]:
    """Shipped GPU configurations: ViT-B (A = 2304, H = 16, d = 144) and ViT-L (A = 3072, d = 192), Q = 5,
    M = 3 and M = 2 (the same 16 lanes, BLOCK_M 4 or 2: two compiled variants)."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        for size in PRODUCTION_SHAPES:  # ViT-B and ViT-L share a compiled kernel per M, counted at each shape
            plan = launch_plan(**PRODUCTION_SHAPES[size], dtype_bytes=dtype.itemsize)
            counts = lambda kernel, size=size, e=dtype.itemsize: at_presets(  # noqa: E731
                efficiency, lambda samples, size=size: production_shapes(samples)[size], kernel=kernel, dtype_bytes=e)
            common = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES, "uses_dot": False}
            scalars = {"M": "i32", "Q": "i32", "A": "i32", "D": "i32"}
            specs.append({
                **common, "name": f"fusion_fwd_{name}_{size}", "fn": _forward_kernel, "efficiency": counts("forward"),
                "signature": {"k_ptr": ptr, "v_ptr": ptr, "q_ptr": ptr, "pool_ptr": ptr, "out_ptr": ptr,
                              "w_ptr": "*fp32", "attn_ptr": "*fp32", "vpool_ptr": "*fp32", "T": "i32", **scalars,
                              "scale": "fp32"},
                "constexprs": {"H": 16, **_tiles(plan, "forward")},
            })
            specs.append({
                **common, "name": f"fusion_bwd_pool_{name}_{size}", "fn": _backward_pool_kernel,
                "efficiency": counts("backward_pool"),
                "signature": {"v_ptr": ptr, "dout_ptr": ptr, "w_ptr": "*fp32", "attn_ptr": "*fp32",
                              "vpool_ptr": "*fp32", "coef_ptr": "*fp32", **scalars},
                "constexprs": {"H": 16, **_tiles(plan, "backward_pool")},
            })
            specs.append({
                **common, "num_warps": NUM_WARPS_BACKWARD_HEAD, "name": f"fusion_bwd_head_{name}_{size}",
                "fn": _backward_head_kernel, "efficiency": counts("backward_head"),
                "signature": {"k_ptr": ptr, "v_ptr": ptr, "q_ptr": ptr, "pool_ptr": ptr, "dout_ptr": ptr,
                              "coef_ptr": "*fp32", "dk_ptr": ptr, "dv_ptr": ptr, "dq_partial_ptr": "*fp32",
                              "dpool_partial_ptr": "*fp32", "T": "i32", **scalars, "scale": "fp32"},
                "constexprs": {"H": 16, **_tiles(plan, "backward_head")},
            })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
