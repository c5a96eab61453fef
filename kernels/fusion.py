"""Fused adaptive cross-attention fusion over modality tokens (TerraFM Case N), forward and backward.

Math (reference.cross_attention_fusion): keys, values (T, M, A) for T patch positions and M
modalities, queries (Q, A), pool (A,), H heads of width d = A / H:
    a[t, h, q, :] = softmax_m(queries[q, h] . keys[t, m, h] / sqrt(d))
    z[t, q, h]    = sum_m a[t, h, q, m] values[t, m, h]
    w[t, :]       = softmax_q(z[t, q] . pool)
    out[t]        = sum_q w[t, q] z[t, q]                                     (T, A)
The pooling weights need every head before any output can be written, so the forward kernel
walks the heads twice per position (logits, then outputs), recomputing the tiny (Q x M) attention
instead of storing z (a (T, Q, A) tensor). Saved for backward: w (T, Q) only.

Backward: kernel 1 (per position) recomputes z to get dl = dsoftmax(w, z . dout) and saves each
head's attention a (T, H, Q, M) and dout . values[m], pool . values[m] (T, H, 2, M), from which
dz . values[m] = w[q] (dout . values[m]) + dl[q] (pool . values[m]); kernel 2 (per column chunk x
head x block of positions) reads them (no whole-head score recompute), writes grad_keys /
grad_values for its columns and accumulates grad_queries / grad_pool in registers, one fp32
partial per program, summed by torch afterwards (deterministic, no atomics). No (T, M, A) temporary
is created besides the gradients themselves.

Cost per forward call (e = bytes per element):
    FLOPs ~ 2 x 4 T Q M A (scores and weighted sum, twice) + 4 T Q A (pooling)
    minimum HBM bytes = e (2 T M A + T A) + e (Q A + A)
That is ~4 Q / (3 e) FLOPs per byte (M = 2-3): memory bound on H100/A100, so the small per-head
products are fp32 broadcast multiply-adds (exact, any input dtype) on (Q, M) padded to powers of 2,
not tensor-core dots (which pad Q and M to 16). Counts per kernel: efficiency().
"""

import math
from functools import partial

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, check_tensor, hbm_bytes, interpreted

MAX_MODALITIES = 16
MAX_QUERIES = 64
# Positions per backward program: 128 on a GPU keeps the grad_queries partials at
# T / 128 x Q x A fp32 (~24 MB for ViT-L at batch 256) with thousands of programs in flight;
# the interpreter pays per op, so it gets few positions per program.
GPU_BLOCK_T = 128
INTERPRETER_BLOCK_T = 4
# Warps and chunks, from the compile report: the per-head products are (BLOCK_Q, BLOCK_M, D_CHUNK)
# = (8, 4, 32) fp32 broadcast tiles at the presets' Q = 5, M = 3: 1024 elements, 8 per thread over 4
# warps. At 8 warps ptxas held the forward and pool kernels to 32 registers and spilled 16 bytes on
# sm_90. (The earlier (16, 16, 256) tl.dot tiles needed 8 warps and up to 238 registers, and the
# head backward spilled at full head width, hence its grid over D_CHUNK column chunks.)
NUM_WARPS = 4
NUM_WARPS_BACKWARD_HEAD = 4
D_CHUNK = 32


@triton.jit
def _attention(k_ptr, q_ptr, row, h, M, Q, A, D, scale,
               BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr):
    """Attention (BLOCK_Q, BLOCK_M) of the Q queries over the M modality tokens of one position, head h:
    the scores are accumulated over the head's D / D_CHUNK column chunks (no padding to a power of 2)."""
    qs = tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    m_ok = (ms < M) & (row >= 0)
    s = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)
    for c0 in range(0, D, D_CHUNK):
        cs = c0 + tl.arange(0, D_CHUNK)
        c_ok = cs < D
        k = tl.load(k_ptr + row.to(tl.int64) * M * A + ms[:, None] * A + h * D + cs[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        qh = tl.load(q_ptr + qs[:, None] * A + h * D + cs[None, :], mask=(qs < Q)[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        s += tl.sum(qh[:, None, :] * k[None, :, :], axis=2)
    s = tl.where((ms < M)[None, :], s * scale, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _z_chunk(v_ptr, a, row, h, c0, M, A, D, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr):
    """z = a @ values for columns c0..c0+D_CHUNK of head h at one position: (BLOCK_Q, D_CHUNK) fp32."""
    ms = tl.arange(0, BLOCK_M)
    cs = c0 + tl.arange(0, D_CHUNK)
    v = tl.load(v_ptr + row.to(tl.int64) * M * A + ms[:, None] * A + h * D + cs[None, :],
                mask=((ms < M) & (row >= 0))[:, None] & (cs < D)[None, :], other=0.0).to(tl.float32)
    return tl.sum(a[:, :, None] * v[None, :, :], axis=1)


@triton.jit
def _forward_kernel(k_ptr, v_ptr, q_ptr, pool_ptr, out_ptr, w_ptr, M, Q, A, D, scale,
                    H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr):
    row = tl.program_id(0)
    qs = tl.arange(0, BLOCK_Q)
    logits = tl.zeros([BLOCK_Q], tl.float32)
    for h in range(H):
        a = _attention(k_ptr, q_ptr, row, h, M, Q, A, D, scale, BLOCK_Q, BLOCK_M, D_CHUNK)
        for c0 in range(0, D, D_CHUNK):
            cs = c0 + tl.arange(0, D_CHUNK)
            z = _z_chunk(v_ptr, a, row, h, c0, M, A, D, BLOCK_M, D_CHUNK)
            pool = tl.load(pool_ptr + h * D + cs, mask=cs < D, other=0.0).to(tl.float32)
            logits += tl.sum(z * pool[None, :], axis=1)
    logits = tl.where(qs < Q, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    w = e / tl.sum(e, axis=0)
    tl.store(w_ptr + row.to(tl.int64) * Q + qs, w, mask=qs < Q)
    for h in range(H):
        a = _attention(k_ptr, q_ptr, row, h, M, Q, A, D, scale, BLOCK_Q, BLOCK_M, D_CHUNK)
        for c0 in range(0, D, D_CHUNK):
            cs = c0 + tl.arange(0, D_CHUNK)
            out = tl.sum(w[:, None] * _z_chunk(v_ptr, a, row, h, c0, M, A, D, BLOCK_M, D_CHUNK), axis=0)
            tl.store(out_ptr + row.to(tl.int64) * A + h * D + cs, out.to(out_ptr.dtype.element_ty), mask=cs < D)


@triton.jit
def _backward_pool_kernel(k_ptr, v_ptr, q_ptr, pool_ptr, w_ptr, dout_ptr, dl_ptr, attn_ptr, vproj_ptr,
                          M, Q, A, D, scale,
                          H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr):
    """dl[t] = w * (dw - sum(w dw)) with dw[q] = z[t, q] . dout[t]: the pooling softmax's backward.

    Also saves, per head, what the head backward needs for the attention gradient without recomputing
    the scores: attn (T, H, Q, M) and vproj (T, H, 2, M) = (dout . values[m], pool . values[m]), since
    dz . values[m] = w[q] (dout . values[m]) + dl[q] (pool . values[m])."""
    row = tl.program_id(0)
    qs = tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    dw = tl.zeros([BLOCK_Q], tl.float32)
    for h in range(H):
        a = _attention(k_ptr, q_ptr, row, h, M, Q, A, D, scale, BLOCK_Q, BLOCK_M, D_CHUNK)
        saved = row.to(tl.int64) * H + h
        tl.store(attn_ptr + (saved * Q + qs[:, None]) * M + ms[None, :], a, mask=(qs < Q)[:, None] & (ms < M)[None, :])
        u = tl.zeros([BLOCK_M], tl.float32)
        r = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, D, D_CHUNK):
            cs = c0 + tl.arange(0, D_CHUNK)
            v = tl.load(v_ptr + row.to(tl.int64) * M * A + ms[:, None] * A + h * D + cs[None, :],
                        mask=(ms < M)[:, None] & (cs < D)[None, :], other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + row.to(tl.int64) * A + h * D + cs, mask=cs < D, other=0.0).to(tl.float32)
            pool = tl.load(pool_ptr + h * D + cs, mask=cs < D, other=0.0).to(tl.float32)
            z = tl.sum(a[:, :, None] * v[None, :, :], axis=1)
            dw += tl.sum(z * dout[None, :], axis=1)
            u += tl.sum(v * dout[None, :], axis=1)
            r += tl.sum(v * pool[None, :], axis=1)
        tl.store(vproj_ptr + saved * 2 * M + ms, u, mask=ms < M)
        tl.store(vproj_ptr + (saved * 2 + 1) * M + ms, r, mask=ms < M)
    w = tl.load(w_ptr + row.to(tl.int64) * Q + qs, mask=qs < Q, other=0.0)
    dl = w * (dw - tl.sum(w * dw, axis=0))
    tl.store(dl_ptr + row.to(tl.int64) * Q + qs, dl, mask=qs < Q)


@triton.jit
def _load_chunk(k_ptr, v_ptr, q_ptr, dout_ptr, pool_ptr, w, dl, t, T, h, c0, M, Q, A, D,
                BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr):
    """Columns c0..c0+D_CHUNK of head h at position t: keys, values, queries and dz = w dout + dl pool."""
    qs = tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    cs = c0 + tl.arange(0, D_CHUNK)
    c_ok = cs < D
    m_ok = (ms < M) & (t < T)
    tok = t.to(tl.int64) * M * A + ms[:, None] * A + h * D + cs[None, :]
    k = tl.load(k_ptr + tok, mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + tok, mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    qh = tl.load(q_ptr + qs[:, None] * A + h * D + cs[None, :], mask=(qs < Q)[:, None] & c_ok[None, :],
                 other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + t.to(tl.int64) * A + h * D + cs, mask=c_ok & (t < T), other=0.0).to(tl.float32)
    pool = tl.load(pool_ptr + h * D + cs, mask=c_ok, other=0.0).to(tl.float32)
    dz = w[:, None] * dout[None, :] + dl[:, None] * pool[None, :]
    return k, v, qh, dz


@triton.jit
def _backward_head_kernel(k_ptr, v_ptr, q_ptr, pool_ptr, w_ptr, dl_ptr, dout_ptr, attn_ptr, vproj_ptr, dk_ptr,
                          dv_ptr, dq_partial_ptr, dpool_partial_ptr, T, M, Q, A, D, scale,
                          H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                          D_CHUNK: tl.constexpr):
    """Per (column chunk, head, block of positions): grad keys/values of the chunk, and the block's
    grad queries/pool partials for it. The attention and its gradient come from what the pool kernel
    saved (attn, vproj), so no program recomputes the whole-head scores; the grid stops at D."""
    c0 = tl.program_id(0) * D_CHUNK
    h = tl.program_id(1)
    block = tl.program_id(2)
    qs = tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    cs = c0 + tl.arange(0, D_CHUNK)
    c_ok = cs < D
    dq = tl.zeros([BLOCK_Q, D_CHUNK], tl.float32)
    dpool = tl.zeros([D_CHUNK], tl.float32)
    for i in range(BLOCK_T):
        t = block * BLOCK_T + i
        q_ok = (qs < Q) & (t < T)
        w = tl.load(w_ptr + t.to(tl.int64) * Q + qs, mask=q_ok, other=0.0)
        dl = tl.load(dl_ptr + t.to(tl.int64) * Q + qs, mask=q_ok, other=0.0)
        saved = t.to(tl.int64) * H + h
        m_ok = (ms < M) & (t < T)
        a = tl.load(attn_ptr + (saved * Q + qs[:, None]) * M + ms[None, :], mask=q_ok[:, None] & m_ok[None, :],
                    other=0.0)
        u = tl.load(vproj_ptr + saved * 2 * M + ms, mask=m_ok, other=0.0)
        r = tl.load(vproj_ptr + (saved * 2 + 1) * M + ms, mask=m_ok, other=0.0)
        da = w[:, None] * u[None, :] + dl[:, None] * r[None, :]  # dz . values[m]
        dscore = a * (da - tl.sum(a * da, axis=1)[:, None])
        k, v, qh, dz = _load_chunk(k_ptr, v_ptr, q_ptr, dout_ptr, pool_ptr, w, dl, t, T, h, c0, M, Q, A, D,
                                   BLOCK_Q, BLOCK_M, D_CHUNK)
        dpool += tl.sum(dl[:, None] * tl.sum(a[:, :, None] * v[None, :, :], axis=1), axis=0)
        dv = tl.sum(a[:, :, None] * dz[:, None, :], axis=0)
        dk = tl.sum(dscore[:, :, None] * qh[:, None, :], axis=0) * scale
        dq += tl.sum(dscore[:, :, None] * k[None, :, :], axis=1) * scale
        tok = t.to(tl.int64) * M * A + ms[:, None] * A + h * D + cs[None, :]
        mask = ((ms < M) & (t < T))[:, None] & c_ok[None, :]
        tl.store(dk_ptr + tok, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + tok, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    base = block.to(tl.int64) * Q * A
    tl.store(dq_partial_ptr + base + qs[:, None] * A + h * D + cs[None, :], dq,
             mask=(qs < Q)[:, None] & c_ok[None, :])
    tl.store(dpool_partial_ptr + block.to(tl.int64) * A + h * D + cs, dpool, mask=c_ok)


def _blocks(M: int, Q: int) -> dict:
    """The (Q, M, column) product tiles: Q and M padded only to a power of 2 (the products are
    broadcast multiply-adds, not tl.dot, which would pad both to 16); columns in chunks of up to
    D_CHUNK, fewer when Q x M is large so a product tile stays at 1024 elements."""
    block_q, block_m = triton.next_power_of_2(Q), triton.next_power_of_2(M)
    return {"BLOCK_Q": block_q, "BLOCK_M": block_m, "D_CHUNK": max(4, min(D_CHUNK, 1024 // (block_q * block_m)))}


def launch_plan(T: int, M: int, Q: int, A: int, H: int, interpreter: bool = False) -> dict:
    """Tiles and grids of the three kernels: the one place the launcher and efficiency() read them."""
    blocks = _blocks(M, Q)
    block_t = INTERPRETER_BLOCK_T if interpreter else GPU_BLOCK_T
    return {**blocks, "BLOCK_T": block_t, "forward": (T,), "backward_pool": (T,),
            "backward_head": (triton.cdiv(A // H, blocks["D_CHUNK"]), H, triton.cdiv(T, block_t))}


def validate(keys, values, queries, pool, num_heads) -> None:
    """Raise a clear error for any input the kernel cannot take, before anything is launched."""
    check_tensor("keys", keys, 3)
    for name, t, ndim in (("values", values, 3), ("queries", queries, 2), ("pool", pool, 1)):
        check_tensor(name, t, ndim, keys.device)
    T, M, A = keys.shape
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    if not 1 <= M <= MAX_MODALITIES:
        raise ValueError(f"the kernel fuses 1..{MAX_MODALITIES} modality tokens per position, got M={M}")
    if queries.shape[1] != A or pool.shape[0] != A:
        raise ValueError(f"queries (Q, {A}) and pool ({A},) must match the token width A={A}; "
                         f"got {tuple(queries.shape)} and {tuple(pool.shape)}")
    if not 1 <= queries.shape[0] <= MAX_QUERIES:
        raise ValueError(f"1..{MAX_QUERIES} queries supported, got {queries.shape[0]}")
    if not isinstance(num_heads, int) or num_heads < 1 or A % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of the token width {A}, got {num_heads}")
    if keys.numel() >= 2**31:
        raise ValueError("cross_attention_fusion: inputs of 2**31 elements or more are not supported; split them")


def _launch_forward(keys, values, queries, pool, num_heads):
    """(out (T, A), w (T, Q) fp32 pooling weights saved for backward)."""
    T, M, A = keys.shape
    Q, D = queries.shape[0], A // num_heads
    plan = launch_plan(T, M, Q, A, num_heads, interpreted(keys))
    scale = 1.0 / math.sqrt(D)
    out = torch.empty((T, A), dtype=keys.dtype, device=keys.device)
    w = torch.empty((T, Q), dtype=torch.float32, device=keys.device)
    _forward_kernel[plan["forward"]](keys, values, queries, pool, out, w, M, Q, A, D, scale, H=num_heads,
                                     **_blocks(M, Q), num_warps=NUM_WARPS)
    return out, w


def _launch_backward(grad_out, keys, values, queries, pool, w, num_heads):
    T, M, A = keys.shape
    H = num_heads
    Q, D = queries.shape[0], A // H
    scale = 1.0 / math.sqrt(D)
    blocks = _blocks(M, Q)
    plan = launch_plan(T, M, Q, A, H, interpreted(keys))
    dout = grad_out.contiguous()
    dl = torch.empty((T, Q), dtype=torch.float32, device=keys.device)
    attn = torch.empty((T, H, Q, M), dtype=torch.float32, device=keys.device)
    vproj = torch.empty((T, H, 2, M), dtype=torch.float32, device=keys.device)
    _backward_pool_kernel[plan["backward_pool"]](keys, values, queries, pool, w, dout, dl, attn, vproj, M, Q, A, D,
                                                 scale, H=H, **blocks, num_warps=NUM_WARPS)
    block_t = plan["BLOCK_T"]
    programs = plan["backward_head"][2]
    dk, dv = torch.empty_like(keys), torch.empty_like(values)
    dq_partial = torch.empty((programs, Q, A), dtype=torch.float32, device=keys.device)
    dpool_partial = torch.empty((programs, A), dtype=torch.float32, device=keys.device)
    _backward_head_kernel[plan["backward_head"]](
        keys, values, queries, pool, w, dl, dout, attn, vproj, dk, dv, dq_partial, dpool_partial, T, M, Q, A, D,
        scale, H=H, BLOCK_T=block_t, **blocks, num_warps=NUM_WARPS_BACKWARD_HEAD)
    dq = dq_partial.sum(0).to(queries.dtype)
    dpool = dpool_partial.sum(0).to(pool.dtype)
    return dk, dv, dq, dpool


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op("terrafm::cross_attention_fusion", mutates_args=())
def _fusion_op(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, pool: torch.Tensor,
               num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(keys, values, queries, pool, num_heads)


@_fusion_op.register_fake
def _(keys, values, queries, pool, num_heads):
    T, _, A = keys.shape
    return keys.new_empty((T, A)), keys.new_empty((T, queries.shape[0]), dtype=torch.float32)


@torch.library.custom_op("terrafm::cross_attention_fusion_backward", mutates_args=())
def _fusion_backward_op(grad_out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                        pool: torch.Tensor, w: torch.Tensor,
                        num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, keys, values, queries, pool, w, num_heads)


@_fusion_backward_op.register_fake
def _(grad_out, keys, values, queries, pool, w, num_heads):
    return torch.empty_like(keys), torch.empty_like(values), torch.empty_like(queries), torch.empty_like(pool)


def _setup_context(ctx, inputs, output):
    keys, values, queries, pool, num_heads = inputs
    ctx.save_for_backward(keys, values, queries, pool, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, _grad_w):
    keys, values, queries, pool, w = ctx.saved_tensors
    return _fusion_backward_op(grad_out, keys, values, queries, pool, w, ctx.num_heads) + (None,)


_fusion_op.register_autograd(_backward, setup_context=_setup_context)


def cross_attention_fusion(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, pool: torch.Tensor,
                           num_heads: int) -> torch.Tensor:
    """Fused reference.cross_attention_fusion: (T, A) in keys' dtype, fp32 math inside.

    Gradients flow to keys, values, queries and pool. The `terrafm::cross_attention_fusion` custom
    op: torch.compile(fullgraph=True) takes it without a graph break.
    """
    validate(keys, values, queries, pool, num_heads)
    return _fusion_op(keys, values, queries, pool, num_heads)[0]


def roofline_cost(T: int, M: int, A: int, Q: int = 5, dtype_bytes: int = 2, backward: bool = False) -> dict:
    """Useful FLOPs (each product counted once) and minimum HBM bytes of forward (+ backward).

    Backward reads keys, values and grad_out and writes the four gradients: about twice the forward's
    products (grad values, grad scores, grad keys, grad queries).
    """
    e = dtype_bytes
    flops = 4 * T * Q * M * A + 4 * T * Q * A
    moved = e * (2 * T * M * A + T * A + Q * A + A)
    if backward:
        flops += 8 * T * Q * M * A + 4 * T * Q * A
        moved += e * (4 * T * M * A + T * A + Q * A + A)
    return {"flops": flops, "bytes": moved}


# The presets' calls (per GPU, 64 (ViT-B, vitb_h100) / 32 (ViT-L, vitl_h100) samples x 2 global crops x
# 196 patches, S2-L2A + S2-L1C + S1 fused: M = 3, Q = 5 queries, H = 16 heads, A = 3 D).
PRODUCTION_SHAPES = {"b": {"T": 25088, "M": 3, "Q": 5, "A": 2304, "H": 16},
                     "l": {"T": 12544, "M": 3, "Q": 5, "A": 3072, "H": 16}}


def efficiency(kernel: str, T: int, M: int, Q: int, A: int, H: int, dtype_bytes: int, sms: int, concurrent: int,
               l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one kernel ("forward", "backward_pool",
    "backward_head") from launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts").

    Useful FLOPs are the products the op needs once (roofline_cost); the per-head tiles are padded to
    (BLOCK_Q, BLOCK_M, D_CHUNK) and the forward walks the heads twice, the pool backward recomputes z.
    """
    plan = launch_plan(T, M, Q, A, H)
    bq, bm, bt, dc = plan["BLOCK_Q"], plan["BLOCK_M"], plan["BLOCK_T"], plan["D_CHUNK"]
    chunks = plan["backward_head"][0]  # D / dc column chunks per head
    e, D = dtype_bytes, A // H
    tokens = T * M * A * e
    chunk = 2 * bq * bm * dc  # one padded (Q x M x dc) product
    if kernel == "forward":  # per position: 2 walks x H heads x chunks x (scores + z + pool logits / output)
        useful = 4 * T * Q * M * A + 4 * T * Q * A
        executed = T * H * 2 * chunks * (2 * chunk + 2 * bq * dc)
        sizes = {"k": tokens, "v": tokens, "out": T * A * e, "w": T * Q * 4, "q": Q * A * e}
        touches = lambda t, _y, _z: [("k", t, M * A * e), ("v", t, M * A * e), ("q", 0, Q * A * e),  # noqa: E731
                                     ("out", t, A * e), ("w", t, Q * 4)]
        floor = 2 * tokens + T * A * e + Q * A * e + A * e
    elif kernel == "backward_pool":  # recomputes z to get dw = z . dout; saves attn and vproj for the head kernel
        useful = 4 * T * Q * A
        executed = T * H * chunks * (2 * chunk + 2 * bq * dc + 4 * bm * dc)
        saved = H * (Q * M + 2 * M) * 4
        sizes = {"k": tokens, "v": tokens, "dout": T * A * e, "w": T * Q * 4, "dl": T * Q * 4, "q": Q * A * e,
                 "saved": T * saved}
        touches = lambda t, _y, _z: [("k", t, M * A * e), ("v", t, M * A * e), ("q", 0, Q * A * e),  # noqa: E731
                                     ("dout", t, A * e), ("w", t, Q * 4), ("dl", t, Q * 4), ("saved", t, saved)]
        floor = 2 * tokens + T * A * e + 8 * T * Q
    else:  # backward_head: per (column chunk, head, block of positions), attention from the pool kernel
        useful = 8 * T * Q * M * A
        blocks = plan["backward_head"][2]
        executed = chunks * H * blocks * bt * 4 * chunk
        partials = blocks * (Q + 1) * A * 4
        sizes = {"k": tokens, "v": tokens, "dk": tokens, "dv": tokens, "dout": T * A * e, "w": T * Q * 4,
                 "dl": T * Q * 4, "q": Q * A * e, "partials": partials, "saved": T * H * (Q * M + 2 * M) * 4}

        def touches(c, h, b):
            t = min(bt, T - b * bt)
            cols = max(0, min(dc, D - c * dc))
            return [("k", (b, h, c), t * M * cols * e), ("v", (b, h, c), t * M * cols * e),
                    ("dout", (b, h, c), t * cols * e), ("q", h, Q * D * e), ("w", b, t * Q * 4),
                    ("dl", b, t * Q * 4), ("saved", (b, h), t * (Q * M + 2 * M) * 4),
                    ("dk", (b, h, c), t * M * cols * e), ("dv", (b, h, c), t * M * cols * e),
                    ("partials", (b, h, c), (Q + 1) * cols * 4)]
        floor = 4 * tokens + T * A * e + 8 * T * Q + Q * A * e
        return {"useful_flops": useful, "executed_flops": executed, "min_bytes": floor, "flop_kind": "fp32",
                "moved_bytes": hbm_bytes(plan[kernel], touches, sizes, concurrent, l2_bytes) + partials}
    return {"useful_flops": useful, "executed_flops": executed, "min_bytes": floor, "flop_kind": "fp32",
            "moved_bytes": hbm_bytes(plan[kernel], touches, sizes, concurrent, l2_bytes)}


def compile_specs() -> list[dict]:
    """Shipped GPU configurations: ViT-B (A = 2304, H = 16, d = 144) and ViT-L (A = 3072, d = 192), M <= 4."""
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        for size in PRODUCTION_SHAPES:  # the same compiled kernels, counted at ViT-B's and ViT-L's shapes
            blocks = _blocks(4, 5)
            counts = lambda kernel, size=size, e=dtype.itemsize: partial(  # noqa: E731
                efficiency, kernel, **PRODUCTION_SHAPES[size], dtype_bytes=e)
            common = {"num_warps": NUM_WARPS, "num_stages": 1, "uses_dot": False}
            head = {**common, "num_warps": NUM_WARPS_BACKWARD_HEAD}
            scalars = {"M": "i32", "Q": "i32", "A": "i32", "D": "i32", "scale": "fp32"}
            specs.append({
                **common, "name": f"fusion_fwd_{name}_{size}", "fn": _forward_kernel, "efficiency": counts("forward"),
                "signature": {"k_ptr": ptr, "v_ptr": ptr, "q_ptr": ptr, "pool_ptr": ptr, "out_ptr": ptr,
                              "w_ptr": "*fp32", **scalars},
                "constexprs": {"H": 16, **blocks},
            })
            specs.append({
                **common, "name": f"fusion_bwd_pool_{name}_{size}", "fn": _backward_pool_kernel,
                "efficiency": counts("backward_pool"),
                "signature": {"k_ptr": ptr, "v_ptr": ptr, "q_ptr": ptr, "pool_ptr": ptr, "w_ptr": "*fp32",
                              "dout_ptr": ptr, "dl_ptr": "*fp32", "attn_ptr": "*fp32", "vproj_ptr": "*fp32",
                              **scalars},
                "constexprs": {"H": 16, **blocks},
            })
            specs.append({
                **head, "name": f"fusion_bwd_head_{name}_{size}", "fn": _backward_head_kernel,
                "efficiency": counts("backward_head"),
                "signature": {"k_ptr": ptr, "v_ptr": ptr, "q_ptr": ptr, "pool_ptr": ptr, "w_ptr": "*fp32",
                              "dl_ptr": "*fp32", "dout_ptr": ptr, "attn_ptr": "*fp32", "vproj_ptr": "*fp32",
                              "dk_ptr": ptr, "dv_ptr": ptr, "dq_partial_ptr": "*fp32", "dpool_partial_ptr": "*fp32",
                              "T": "i32", **scalars},
                "constexprs": {"H": 16, "BLOCK_T": GPU_BLOCK_T, **blocks},
            })
    return specs
