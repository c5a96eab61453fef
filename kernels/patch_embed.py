"""Fused patch embedding: patchify + GEMM + bias + modality embedding (+ position embedding).

Math (reference.patch_embed): x (B, C, H, W), weight (E, C, p, p) (a Conv2d weight), bias (E,),
modality_embed (E,), pos_embed (N, E); with M = B N patch rows and Kd = C p p:
    out[m, e] = sum_k X[m, k] W[e, k] + bias[e] + modality_embed[e] + pos_embed[m % N, e]
where X[m, k] is pixel (c, i, j) = divmod of k of patch m, gathered straight from x by pointer
arithmetic inside the kernel: no unfolded (M, Kd) copy of the image is ever written.

Backward: grad_weight = G^T X gathers the patches again (one more read of x, no unfold) and sums the
columns of the G tiles it loads (the bias and modality gradients); grad_x = G W is scattered back to
pixels (patches do not overlap, so a pure write); the position gradient, a sum over the batch, is
torch's (one read of G).

W and G, the plain 2-D operands, are read through tensor descriptors: TMA on sm_90, masked loads
(triton's rewrite) below it and in the interpreter, so every device runs this same code.

Cost per forward call (e = bytes per element of x / out):
    FLOPs = 2 M Kd E
    minimum HBM bytes = e (B C H W + M E) + e E Kd + 4 E (bias, embed) [+ e N E with pos_embed]
The weight is re-read once per row block (M / BLOCK_M times), from L2 when it fits there: 16-bit W
at the presets' shape (14 MB) does; fp32 W (28 MB) is over half of an L2, so the forward takes W in
L2-sized E slices (reading x once per slice) and grad_input in KD slices (reading G once per slice), one
slice after the other in one launch (docs/kernels.md, "Efficiency counts"). At ViT-B sizes (M = 256 x 196,
Kd = 12 x 256, E = 2304) the GEMM is compute bound (~110 FLOPs per byte).
"""


import torch
import triton
import triton.language as tl

from ._common import (
    PRESET_SAMPLES,
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_interpreted_dot_dtype,
    check_patch_grid,
    check_tensor,
    descriptor_operand,
    hbm_bytes,
    interpreted,
    launch_kernel,
    no_second_derivative,
    op_name,
    pad,
)
from .gpus import GPUS

# Tile configs, from the compile report (python -m terrafm_kernels.compile_report) and the roofline.
# Forward and grad_input, fp16/bf16 on H100 (sm_90) and A100 (sm_80): 128 x 128 output tiles,
# BLOCK_K = 32, 8 warps, 3 stages: wgmma / mma, no spills; the forward takes 109-128 registers, grad_input
# 42-92 (32-bit gather addresses: 64-bit ones took 199-255). fp32 inputs run one tf32 product of rounded
# operands per dot (_dot_precision) when torch allows tf32 for cuDNN convolutions (its default).
# The fp32 forward takes 64 x 64 x 16 tiles, 2 stages: 80 registers, 6 CTAs per SM. Its W is over
# W_SLICE_BYTES, so it takes W in two E slices (launch_plan), reading x once per slice less the rows the seam's
# wave shares: 1.42x the floor on A100, 1.46x on H100, where W read once per wave was 1.76-1.87x.
GPU_CONFIGS = {
    2: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
}
# grad_input in fp32 writes 64 x 64 (M x KD) tiles, stepping E 32 at a time: 91-128 registers, 4-5 CTAs per SM
# on sm_90 and sm_80, no spills. A wave then covers whole row blocks of its W slice (below) more evenly
# than with 64 x 32 tiles (1.50x on A100 with those, 1.44x with these, both global views in one call; 1.32x at
# the per-view call).
GRAD_INPUT_CONFIGS = {
    2: GPU_CONFIGS[2],
    4: {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
}
# The forward and grad_input read all of W (E, KD) in every wave unless W fits in half of L2, where the wave
# model keeps it for the whole launch. fp32 W at the presets' shape is 28 MB, over half of either L2 (20 MB
# A100, 25 MB H100): both then take W in slices of at most W_SLICE_BYTES (half the smallest L2 in
# terrafm_kernels.gpus), one slice after the other on grid axis 2, so each slice crosses HBM once and x (the
# forward) or G (grad_input) once per slice: grad_input G twice instead of W ~25-40 times (4.6-6.9x ->
# 1.32-1.39x). The odd slices walk the row blocks backwards: the wave at the seam of two slices runs both on the
# same rows, which cross HBM once for the two. 16-bit W (14 MB) is one slice.
W_SLICE_BYTES = min(gpu["l2"] for gpu in GPUS.values()) // 2
# grad_weight reduces over all M = B N rows, so its bytes depend on how much of the (E, KD) output one
# wave covers: every wave streams the G and x columns of its tiles over all M (docs/kernels.md). 128 x
# 128 (E x KD) tiles at 2 CTAs per SM make a wave cover 12-15 of the 24 KD block rows at the presets'
# shape: G crosses HBM twice and x once (1.41-1.43x; 128 x 32 tiles re-read G in each of 7-14 waves).
# BLOCK_M is the reduction step: 32 spills 8 bytes on sm_90 in fp16/bf16, and 8 warps take 162-180
# registers (1 CTA per SM). With KD block 0's column sum of G (COL_SUM, the training call): fp16/bf16 168-214
# registers, 2-3 CTAs per SM, no spills (1.35-1.39x). fp32 takes the same tiles: 233-246 registers, 2 CTAs per SM,
# no spills (1.35x on sm_80, 1.41x on sm_90). Its 128 x 64 tiles took 151 registers on sm_80 with the sum (123
# without), 3 CTAs per SM, so a wave covered 18 of the 48 KD blocks and G crossed HBM three times (1.71x).
GRAD_WEIGHT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
# The interpreter pays per op, not per element, so it gets wide K tiles (fewer loop trips: at 128 the patch
# embeddings of tests/train/test_compile.py's eager step took 45 s, at 256 18 s); the test shapes are still ragged
# against these tiles (KD 588 and 832: 3 and 4 blocks, the last one short).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}


@triton.jit
def _patch_offsets(rows, cols, N, GW, C, H, W, P: tl.constexpr):
    """Element offsets of patch rows x (c, i, j) columns in a contiguous (B, C, H, W) image.

    32-bit: validate() refuses images of 2**31 elements or more, and 64-bit per-element addresses
    of the gathered tile are what filled the register file."""
    b = rows // N
    n = rows % N
    row_base = b * C * H * W + (n // GW) * P * W + (n % GW) * P
    c = cols // (P * P)
    ij = cols % (P * P)
    col_off = c * H * W + (ij // P) * W + (ij % P)
    return row_base[:, None] + col_off[None, :]


@triton.jit
def _dot_operand(t, DOT_PRECISION: tl.constexpr):
    """An fp32 tile rounded to tf32 (10-bit mantissa, to nearest, ties away) for a "tf32" dot, as cuDNN's
    convolutions round theirs; the tensor core alone drops the low bits (truncation: 2.5-2.7x cuDNN's error
    on an H200, over the 2x rule). NaN passes as is (the carry would reach the sign); 16-bit tiles pass."""
    if DOT_PRECISION == "tf32" and t.dtype == tl.float32:
        bits = t.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        t = tl.where(t == t, rounded, t)
    return t


@triton.jit
def _slice_block():
    """(block along the sliced axis, row block) of program (i, m, s) of a grid (blocks per slice, row blocks,
    slices): block s x blocks per slice + i; the odd slices walk the row blocks backwards, so the first wave of a
    slice shares the rows of the last wave of the slice before it (launch_plan)."""
    s = tl.program_id(2)
    m = tl.program_id(1)
    m = tl.where(s % 2 == 1, tl.num_programs(1) - 1 - m, m)
    return s * tl.num_programs(0) + tl.program_id(0), m


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, embed_ptr, pos_ptr, out_ptr,
    M, E, KD, N, GW, C, H, W, W_STRIDE,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EMBED: tl.constexpr, HAS_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (M, E) = X W^T + bias + embed (+ pos); W (E, KD) rows W_STRIDE apart, read by tensor descriptor.
    Program (n, m, s) computes E block n of W slice s for row block m (_slice_block)."""
    n_block, m_block = _slice_block()
    e0 = n_block * BLOCK_N
    cols_e = e0 + tl.arange(0, BLOCK_N)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    e_mask = cols_e < E
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, KD], strides=[W_STRIDE, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.where(e0 < E, KD, 0), BLOCK_K):  # a spare program of a short last slice: no steps
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + _patch_offsets(rows, ks, N, GW, C, H, W, P),
                    mask=row_mask[:, None] & (ks < KD)[None, :], other=0.0)
        w = w_desc.load([e0, k0])  # (BLOCK_N, BLOCK_K), zero outside W
        acc = tl.dot(_dot_operand(a, DOT_PRECISION), _dot_operand(w, DOT_PRECISION).T, acc,
                     input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_EMBED:
        acc += tl.load(embed_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & e_mask[None, :]
    if HAS_POS:
        n = rows % N
        acc += tl.load(pos_ptr + n.to(tl.int64)[:, None] * E + cols_e[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * E + cols_e[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    x_ptr, g_ptr, gw_ptr, col_sum_ptr,
    M, E, KD, N, GW, C, H, W, G_STRIDE,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, COL_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight (E, KD) = G^T X, computed as its transpose X^T (KD x M) @ G (M x E) so that G, read by
    tensor descriptor (rows G_STRIDE apart), feeds the dot as it lands; X^T is gathered from x again.
    fp32 accumulation, stored once in grad_weight's dtype (the weight's). With COL_SUM the programs of KD block 0
    also sum their G columns over all M into col_sum (E,) fp32, the bias and modality gradients, from the G tiles
    they load anyway: torch's column sum read all of G once more."""
    e0 = tl.program_id(0) * BLOCK_N
    cols_e = e0 + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < KD
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, E], strides=[G_STRIDE, 1], block_shape=[BLOCK_M, BLOCK_N])
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    col = tl.zeros((BLOCK_N,), dtype=tl.float32)
    summing = COL_SUM and tl.program_id(1) == 0
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        g = g_desc.load([m0, e0])  # (BLOCK_M, BLOCK_N), zero outside G
        a_t = tl.load(x_ptr + _patch_offsets(rows, ks, N, GW, C, H, W, P).T,
                      mask=k_mask[:, None] & (rows < M)[None, :], other=0.0)
        acc = tl.dot(_dot_operand(a_t.to(g.dtype), DOT_PRECISION), _dot_operand(g, DOT_PRECISION), acc,
                     input_precision=DOT_PRECISION)
        if summing:
            col += tl.sum(g.to(tl.float32), axis=0)
    tl.store(gw_ptr + cols_e.to(tl.int64)[None, :] * KD + ks[:, None], acc.to(gw_ptr.dtype.element_ty),
             mask=k_mask[:, None] & (cols_e < E)[None, :])
    if summing:
        tl.store(col_sum_ptr + cols_e, col, mask=cols_e < E)


@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, gx_ptr,
    M, E, KD, N, GW, C, H, W, G_STRIDE, W_STRIDE,
    P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x = scatter(G (M x E) @ W (E x KD)) to pixels; every pixel is written exactly once. G and W are read
    by tensor descriptors (rows G_STRIDE / W_STRIDE apart). Program (k, m, s) computes KD block k of W slice s
    for row block m (_slice_block)."""
    k_block, m_block = _slice_block()
    k0 = k_block * BLOCK_K
    m0 = m_block * BLOCK_M
    ks = k0 + tl.arange(0, BLOCK_K)
    rows = m0 + tl.arange(0, BLOCK_M)
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, E], strides=[G_STRIDE, 1], block_shape=[BLOCK_M, BLOCK_N])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, KD], strides=[W_STRIDE, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, tl.where(k0 < KD, E, 0), BLOCK_N):  # a spare program of a short last slice: no steps
        g = g_desc.load([m0, e0])  # (BLOCK_M, BLOCK_N)
        w = w_desc.load([e0, k0])  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(_dot_operand(g, DOT_PRECISION), _dot_operand(w.to(g.dtype), DOT_PRECISION), acc,
                     input_precision=DOT_PRECISION)
    tl.store(gx_ptr + _patch_offsets(rows, ks, N, GW, C, H, W, P), acc.to(gx_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (ks < KD)[None, :])


def launch_plan(M: int, E: int, KD: int, dtype_bytes: int, interpreter: bool = False) -> dict:
    """Tiles and grid of each kernel ("forward", "grad_weight", "grad_input"): the one place the
    launchers and efficiency() read them.

    Grid axis 0 runs fastest. The forward walks the E blocks of one row block together and
    grad_input the KD blocks of one row block, so the programs that gather the same patches (or
    read the same rows of G) run in the same wave and those bytes come from HBM once. grad_weight
    walks the E blocks of one KD block together: a wave covers whole rows of the (E, KD) output, so
    it reads all of G once and x only for its own KD blocks. The forward and grad_input take W in slices
    of at most W_SLICE_BYTES (E slices for the forward, KD slices for grad_input), one slice after the
    other along grid axis 2, so each slice stays in L2 while it is used (slice_blocks maps a program to
    its block and row block).
    """
    cfg = INTERPRETER_CONFIG if interpreter else GPU_CONFIGS[dtype_bytes]
    gw_cfg = INTERPRETER_CONFIG if interpreter else GRAD_WEIGHT_CONFIG
    gi_cfg = INTERPRETER_CONFIG if interpreter else GRAD_INPUT_CONFIGS[dtype_bytes]
    cdiv = triton.cdiv

    def sliced(blocks: int, block_bytes: int, rows: int) -> tuple[int, int, int]:
        """The grid (blocks per slice, row blocks, slices): as few slices as keep each within W_SLICE_BYTES."""
        slices = cdiv(blocks * block_bytes, W_SLICE_BYTES)
        while cdiv(blocks, slices) * block_bytes > W_SLICE_BYTES and slices < blocks:
            slices += 1
        per_slice = cdiv(blocks, slices)
        return per_slice, rows, cdiv(blocks, per_slice)
    return {
        "forward": {**cfg, "grid": sliced(cdiv(E, cfg["BLOCK_N"]), cfg["BLOCK_N"] * KD * dtype_bytes,
                                          cdiv(M, cfg["BLOCK_M"]))},
        "grad_weight": {**gw_cfg, "grid": (cdiv(E, gw_cfg["BLOCK_N"]), cdiv(KD, gw_cfg["BLOCK_K"]))},
        "grad_input": {**gi_cfg, "grid": sliced(cdiv(KD, gi_cfg["BLOCK_K"]), E * gi_cfg["BLOCK_K"] * dtype_bytes,
                                                cdiv(M, gi_cfg["BLOCK_M"]))},
    }


def slice_blocks(grid: tuple[int, int, int], i: int, m: int, s: int) -> tuple[int, int]:
    """_slice_block in Python, for efficiency(): (block along the sliced axis, row block) of program (i, m, s)."""
    return s * grid[0] + i, grid[1] - 1 - m if s % 2 else m


def _plan(x: torch.Tensor, geo: dict, kernel: str) -> dict:
    return launch_plan(geo["M"], geo["E"], geo["KD"], x.element_size(), interpreted(x))[kernel]


def _tiles(cfg: dict) -> dict:
    """The launch keywords of a plan entry (its tiles, warps and stages)."""
    return {k: v for k, v in cfg.items() if k != "grid"}


def tf32_allowed() -> bool:
    """Whether torch lets cuDNN convolutions take tf32 operands (its default): the kernel's fp32 dots follow the
    same switch as nn.Conv2d. The per-op setting (torch.backends.cudnn.conv.fp32_precision) where it is set,
    else the legacy torch.backends.cudnn.allow_tf32, which raises once the two APIs are mixed."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", "none")
    return precision == "tf32" if precision in ("tf32", "ieee") else bool(torch.backends.cudnn.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots: one tf32 product of operands rounded to tf32 (_dot_operand, as cuDNN rounds them) where
    tf32_allowed(), else IEEE FMA. 16-bit dots take their operands as they are."""
    if dtype != torch.float32:
        return "tf32"  # the default; ignored for 16-bit operands
    return "tf32" if tf32_allowed() else "ieee"


def validate(x, weight, bias, modality_embed=None, pos_embed=None) -> None:
    """Raise a clear error for any input the kernel cannot take, before anything is launched.

    x and weight need not be contiguous (the launcher copies them)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must be a Conv2d weight (E, C, p, p), got {getattr(weight, 'shape', None)}")
    E, C, p, _ = weight.shape
    B, Cx, H, W = x.shape
    if min(E, C, p) == 0:
        raise ValueError(f"weight (E, C, p, p) = {tuple(weight.shape)} needs at least one output channel E, input "
                         "channel C and patch pixel p")
    if Cx != C:
        raise ValueError(f"x has {Cx} channels but weight expects C={C} (weight shape {tuple(weight.shape)})")
    check_patch_grid(H, W, p)
    check_tensor("x", x, 4)
    check_interpreted_dot_dtype("x", x)
    check_tensor("weight", weight, 4, x.device)
    if bias is not None:
        check_tensor("bias", bias, 1, x.device, shape=(E,))
    N = (H // p) * (W // p)
    for name, value, shapes in (("modality_embed", modality_embed, ((E,), (1, E), (1, 1, E))),
                                ("pos_embed", pos_embed, ((N, E), (1, N, E)))):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)} for weight "
                             f"{tuple(weight.shape)} and a {H}x{W} input, got {tuple(value.shape)}")
        check_tensor(name, value.reshape(shapes[0]), len(shapes[0]), x.device)
    if x.numel() >= 2**31 or B * (H // p) * (W // p) * E >= 2**31:
        raise ValueError("patch_embed: inputs or outputs of 2**31 elements or more are not supported; split the batch")


def _geometry(x: torch.Tensor, weight: torch.Tensor) -> dict:
    B, C, H, W = x.shape
    E, _, p, _ = weight.shape
    gh, gw = H // p, W // p
    return dict(M=B * gh * gw, E=E, KD=C * p * p, N=gh * gw, GW=gw, C=C, H=H, W=W)


def _launch_forward(x, weight, bias, modality_embed, pos_embed) -> torch.Tensor:
    geo = _geometry(x, weight)
    cfg = _plan(x, geo, "forward")
    p = weight.shape[-1]
    w = descriptor_operand(weight.to(x.dtype).reshape(geo["E"], geo["KD"]))
    out = torch.empty((geo["M"], geo["E"]), dtype=x.dtype, device=x.device)
    dummy = out
    x = x.contiguous()
    bias = dummy if bias is None else bias.contiguous()
    embed = dummy if modality_embed is None else modality_embed.reshape(-1).contiguous()
    pos = dummy if pos_embed is None else pos_embed.reshape(-1, geo["E"]).contiguous()
    launch_kernel(
        _forward_kernel, cfg["grid"], x, w, bias, embed, pos, out, *geo.values(), w.stride(0), P=p,
        HAS_BIAS=bias is not dummy, HAS_EMBED=embed is not dummy, HAS_POS=pos is not dummy,
        DOT_PRECISION=_dot_precision(x.dtype), **_tiles(cfg),
    )
    return out.view(x.shape[0], geo["N"], geo["E"])


def _launch_backward(grad_out, x, weight, need_x: bool, need_weight: bool, need_col_sum: bool):
    """(grad_x, grad_weight, col_sum): col_sum (E,) fp32 is G summed over its rows (the bias and modality
    gradients); an empty tensor for what is not needed. The column sum comes with grad_weight's G reads when that
    runs, else from torch."""
    x = x.contiguous()
    geo = _geometry(x, weight)
    p = weight.shape[-1]
    g = descriptor_operand(grad_out.reshape(geo["M"], geo["E"]).to(x.dtype))
    common = dict(P=p, DOT_PRECISION=_dot_precision(x.dtype))
    grad_x, grad_w, col_sum = x.new_empty(0), weight.new_empty(0), g.new_empty(0, dtype=torch.float32)
    if need_col_sum:
        col_sum = g.new_empty(geo["E"], dtype=torch.float32)
    if need_weight:
        cfg = _plan(x, geo, "grad_weight")
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        launch_kernel(_grad_weight_kernel, cfg["grid"], x, g, grad_w, col_sum if need_col_sum else grad_w,
                      *geo.values(), g.stride(0), **common, COL_SUM=need_col_sum, **_tiles(cfg))
    elif need_col_sum:
        col_sum = grad_out.reshape(-1, geo["E"]).float().sum(0)
    if need_x:
        cfg = _plan(x, geo, "grad_input")
        w = descriptor_operand(weight.to(x.dtype).reshape(geo["E"], geo["KD"]))
        grad_x = torch.empty_like(x)
        launch_kernel(_grad_input_kernel, cfg["grid"], g, w, grad_x, *geo.values(), g.stride(0), w.stride(0),
                      **common, **_tiles(cfg))
    return grad_x, grad_w, col_sum


# torch custom ops: opaque to torch.compile (0 graph breaks; the fake functions give output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op(op_name("patch_embed"), mutates_args=())
def _patch_embed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    modality_embed: torch.Tensor | None, pos_embed: torch.Tensor | None) -> torch.Tensor:
    return _launch_forward(x, weight, bias, modality_embed, pos_embed)


@_patch_embed_op.register_fake
def _(x, weight, bias, modality_embed, pos_embed):
    p = weight.shape[-1]
    return x.new_empty((x.shape[0], (x.shape[2] // p) * (x.shape[3] // p), weight.shape[0]))


@torch.library.custom_op(op_name("patch_embed_backward"), mutates_args=())
def _patch_embed_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                             need_weight: bool, need_col_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, x, weight, need_x, need_weight, need_col_sum)


@_patch_embed_backward_op.register_fake
def _(grad_out, x, weight, need_x, need_weight, need_col_sum):
    # contiguous, as the launcher returns them: empty_like kept a channels_last x's or weight's strides, and inductor
    # then failed the first backward of a channels_last model (expected stride 16 == 1)
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0),
            grad_out.new_empty(weight.shape[0] if need_col_sum else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, modality_embed, pos_embed = inputs
    ctx.save_for_backward(x, weight)
    ctx.has = (bias is not None, modality_embed is not None, pos_embed is not None)
    ctx.shapes = (None if modality_embed is None else modality_embed.shape,
                  None if pos_embed is None else pos_embed.shape)


def _backward(ctx, grad_out):
    """grad_x, grad_weight and the column sum of G (the bias and modality gradients) from the kernels; the
    position gradient is torch's sum over the batch."""
    x, weight = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    has_bias, has_embed, has_pos = ctx.has
    need_bias = has_bias and ctx.needs_input_grad[2]
    need_embed = has_embed and ctx.needs_input_grad[3]
    gx, gw, col_sum = _patch_embed_backward_op(grad_out, x, weight, need_x, need_weight, need_bias or need_embed)
    grad_bias = col_sum if need_bias else None
    grad_embed = col_sum.reshape(ctx.shapes[0]) if need_embed else None
    grad_pos = None
    if has_pos and ctx.needs_input_grad[4]:
        grad_pos = grad_out.float().sum(0).reshape(ctx.shapes[1])
    return gx if need_x else None, gw if need_weight else None, grad_bias, grad_embed, grad_pos


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)
no_second_derivative(_patch_embed_backward_op, "patch_embed")


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    modality_embed: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused reference.patch_embed: (B, C, H, W) -> (B, N, E) in x's dtype, fp32 accumulation.

    Gradients flow to x (only when it requires grad), weight, bias, modality_embed and pos_embed.
    Under torch.autocast every input is cast to the autocast dtype first, as nn.Conv2d's are.
    The `terrafm::patch_embed` custom op: torch.compile(fullgraph=True) takes it without a graph break.
    """
    validate(x, weight, bias, modality_embed, pos_embed)
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, modality_embed, pos_embed = (
            None if t is None else t.to(dtype) for t in (x, weight, bias, modality_embed, pos_embed))
        check_interpreted_dot_dtype("x (as torch.autocast casts it)", x)  # cpu autocast's default is bf16
    return _patch_embed_op(x, weight, bias, modality_embed, pos_embed)


def roofline_cost(B: int, C: int, H: int, W: int, E: int, p: int, dtype_bytes: int = 2,
                  pos_embed: bool = False, backward: bool = False, grad_input: bool = True) -> dict:
    """Useful FLOPs and minimum HBM bytes of the forward (+ backward: grad_weight = G^T X and, with grad_input,
    grad_x = G W, each reading G and one operand and writing its result) for one call. A ViT's patch embedding
    takes images, which need no gradient: grad_input=False is the training call."""
    M, KD = B * (H // p) * (W // p), C * p * p
    e = dtype_bytes
    moved = e * (B * C * H * W + M * E + E * KD) + 8 * E + (e * (M // B) * E if pos_embed else 0)
    flops = 2 * M * KD * E
    if backward:
        passes = 2 if grad_input else 1
        flops += passes * 2 * M * KD * E
        moved += passes * e * (B * C * H * W + M * E + E * KD)
    return {"flops": flops, "bytes": moved}


def production_shape(samples: dict) -> dict:
    """The presets' typical call (ViT-B, per GPU): one global crop of 224 px of every sample, Sentinel-2's 12 bands,
    patch 16, E = attn_dim = 3 x 768 (terrafm/models/patch_embed.py); forward and backward. A batch's views draw
    their sensors one by one (data.views.choose_modalities) and the model embeds views with the same sensors and size
    in one call: both global crops of a sensor share a call only when they draw the same sensors (1 in 6)."""
    return {"B": samples["base"], "C": 12, "H": 224, "W": 224, "E": 2304, "p": 16}


PRODUCTION_SHAPE = production_shape(PRESET_SAMPLES[90])  # vitb_h100's


def efficiency(kernel: str, B: int, C: int, H: int, W: int, E: int, p: int, dtype_bytes: int, sms: int,
               concurrent: int, l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one kernel ("forward", "grad_weight",
    "grad_input") from launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts")."""
    M, KD, e = B * (H // p) * (W // p), C * p * p, dtype_bytes
    plan = launch_plan(M, E, KD, e)[kernel]
    bm, bn, bk = plan["BLOCK_M"], plan["BLOCK_N"], plan["BLOCK_K"]
    x_bytes, g_bytes, w_bytes = B * C * H * W * e, M * E * e, E * KD * e
    rows = lambda m: min(bm, M - m * bm)  # noqa: E731
    cols = lambda n: min(bn, E - n * bn)  # noqa: E731
    ks = lambda k: min(bk, KD - k * bk)  # noqa: E731
    grid = plan["grid"]

    def slice_bytes(blocks: int, block_bytes) -> dict:
        """Each W slice as a tensor of its own to the wave model: it is in use only while its part of the grid runs."""
        return {f"w{s}": sum(block_bytes(b) for b in range(s * grid[0], min((s + 1) * grid[0], blocks)))
                for s in range(grid[2])}
    if kernel == "forward":  # program (n, m, s) gathers its rows x all KD, reads its W block, writes out
        def touches(i, m, s):
            n, m = slice_blocks(grid, i, m, s)
            if n * bn >= E:  # a spare program of a short last slice
                return []
            return [("x", m, rows(m) * KD * e), (f"w{s}", n, cols(n) * KD * e), ("out", (m, n), rows(m) * cols(n) * e)]
        sizes = {"x": x_bytes, "out": g_bytes, **slice_bytes(triton.cdiv(E, bn), lambda n: cols(n) * KD * e)}
        moved = hbm_bytes(grid, touches, sizes, concurrent, l2_bytes) + 2 * E * e  # bias, modality embed
        floor = x_bytes + w_bytes + g_bytes + 2 * E * e
    elif kernel == "grad_weight":  # program (n, k) streams G[:, n] and x[:, k] over all M, writes its W tile
        sizes = {"g": g_bytes, "x": x_bytes, "gw": w_bytes, "col_sum": 4 * E}  # and k = 0 the sum of G[:, n]
        touches = lambda n, k, _: [("g", n, M * cols(n) * e), ("x", k, M * ks(k) * e),  # noqa: E731
                                   ("gw", (n, k), cols(n) * ks(k) * e)] + [("col_sum", n, 4 * cols(n))] * (k == 0)
        moved = hbm_bytes(grid, touches, sizes, concurrent, l2_bytes)
        floor = g_bytes + x_bytes + w_bytes + 4 * E
    else:  # grad_input: program (k, m, s) reads G[m] and its W block over all E, scatters its pixels
        def touches(i, m, s):
            k, m = slice_blocks(grid, i, m, s)
            if k * bk >= KD:
                return []
            return [("g", m, rows(m) * E * e), (f"w{s}", k, E * ks(k) * e), ("gx", (m, k), rows(m) * ks(k) * e)]
        sizes = {"g": g_bytes, "gx": x_bytes, **slice_bytes(triton.cdiv(KD, bk), lambda k: E * ks(k) * e)}
        moved = hbm_bytes(grid, touches, sizes, concurrent, l2_bytes)
        floor = g_bytes + w_bytes + x_bytes
    return {"useful_flops": 2 * M * KD * E, "executed_flops": 2 * pad(M, bm) * pad(KD, bk) * pad(E, bn),
            "min_bytes": floor, "moved_bytes": moved,
            "flop_kind": "tensor" if e == 2 else "tf32" if _dot_precision(torch.float32) == "tf32" else "fp32"}


# Integers that are multiples of 16 at the presets' shapes (M = B x 196 or B x 36 tokens per view batch, E = 3 D,
# KD = 12 x 256 or 2 x 256, 224 / 96 px images, weight and gradient rows E or KD apart); N = 196, GW = 14 and C
# are not. The compile report compiles the variant the JIT builds with them.
MULTIPLES_OF_16 = ("M", "E", "KD", "H", "W", "W_STRIDE", "G_STRIDE")


def compile_specs() -> list[dict]:
    """Every shipped GPU configuration (dtype x kernel) for the AOT compile report."""
    specs = []
    geo = {"M": "i32", "E": "i32", "KD": "i32", "N": "i32", "GW": "i32", "C": "i32", "H": "i32", "W": "i32"}
    for dtype, ptr in TRITON_DTYPE.items():
        plan = launch_plan(1, 1, 1, dtype.itemsize)  # tiles only; efficiency() sizes the grid
        kernels = [
            ("fwd", "forward", _forward_kernel, ["x_ptr", "w_ptr", "bias_ptr", "embed_ptr", "pos_ptr", "out_ptr"],
             ["W_STRIDE"], {"HAS_BIAS": True, "HAS_EMBED": True, "HAS_POS": False}),
            ("grad_weight", "grad_weight", _grad_weight_kernel, ["x_ptr", "g_ptr", "gw_ptr"], ["G_STRIDE"],
             {"COL_SUM": True}),  # the training call: a bias and a modality embedding
            ("grad_input", "grad_input", _grad_input_kernel, ["g_ptr", "w_ptr", "gx_ptr"],
             ["G_STRIDE", "W_STRIDE"], {}),
        ]
        for short, kernel, fn, pointers, strides, flags in kernels:
            cfg = plan[kernel]
            specs.append({
                "name": f"patch_embed_{short}_{str(dtype).removeprefix('torch.')}", "fn": fn,
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "uses_dot": True,
                "efficiency": at_presets(efficiency, production_shape, kernel=kernel, dtype_bytes=dtype.itemsize),
                "signature": {**dict.fromkeys(pointers, ptr), **({"col_sum_ptr": "*fp32"} if "COL_SUM" in flags
                                                                 else {}), **geo, **dict.fromkeys(strides, "i32")},
                "constexprs": {"P": 16, "DOT_PRECISION": _dot_precision(dtype), **flags,
                               **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}},
            })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
