"""DINOv2 teacher targets: centred softmax and numerically stable Sinkhorn-Knopp, one kernel family.

Math (reference.centered_softmax, reference.sinkhorn_knopp): for teacher logits t (R, K), temperature
tau, a centre c (K,) subtracted before the division (DINOv2's centering) and a log-domain prototype
potential a (K,) added after it (Sinkhorn-Knopp), y = (t - c) / tau + a. Three modes:
    MODE_SOFTMAX  out (R, K) fp32 = softmax_k(y)
    MODE_COLUMN   (K,) = per-prototype sums over all rows of softmax_k(y)
    MODE_COLMAX   (2, K) = per-prototype max of y over all rows, and the sum of exp(y - max)
DINOv2's sinkhorn_knopp_teacher divides exp(t / tau) alternately by its prototype sums (over all B
samples on all ranks, then / K) and its sample sums (then / B), and finally multiplies by B. Every
sample normalisation turns each row into a softmax over prototypes, so only the prototype potentials a
have to be carried, in log domain (no exp(t / tau), which overflows fp32 once t / tau > 88):
    a = -logsumexp_rows(t / tau)                               COLMAX + all-reduce (max, then sum)
    a <- a - log(sum_rows softmax_k(t / tau + a))                      COLUMN + all-reduce (sum), n - 1 times
    out = softmax_k(t / tau + a)                                       SOFTMAX
Where DINOv2 stays finite the results agree to fp32 rounding; where it overflows this stays finite.
(DINOv2's divisions by B and K scale all entries alike, so they drop out of a before the softmax.)
The column sums after the first iteration lie in [1 / K, B], so they need no running max.

Kernels: MODE_SOFTMAX runs one program per BLOCK_R rows: pass 1 streams K chunks with an online max
and rescaled sum, pass 2 recomputes y and writes the probabilities. The column modes run one program
per chunk of BLOCK_K prototypes over all rows, so each program owns its columns' results outright
(no partial rows to read-modify-write and reduce, whatever R is): MODE_COLMAX is one online pass;
MODE_COLUMN first writes each row's chunk max and sum of exp (R x chunks x 8 bytes, combined by
torch), then sums the softmax down its columns. No atomics: deterministic. Nothing of size (R, K)
is allocated besides the output.

Cost per call (e = bytes per logit): MODE_SOFTMAX moves 2 R K e + 4 R K bytes (the second read of
the logits instead of an unnormalised temporary); MODE_COLUMN 2 R K e + 16 R K / BLOCK_K + 4 K;
MODE_COLMAX R K e + 8 K. Sinkhorn-Knopp with n iterations: (2 n + 1) R K e + 4 R K, against DINOv2's
eager ~(4 + 6 n) passes of 4 R K bytes (exp, sums, in-place divisions) and a full fp32 copy of the
logits.
"""

from functools import partial

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, check_positive, check_tensor, hbm_bytes, interpreted, pad, sm_count
from .reference import sinkhorn_first_shift

MODE_SOFTMAX, MODE_COLUMN, MODE_COLMAX = 0, 1, 2

# H100/A100 config: bandwidth bound. A (BLOCK_R, 512) tile over 4 warps is 4-32 fp32 elements per
# thread. The softmax takes BLOCK_R = 1 to keep all SMs busy for class-token rows (2 x 16-128 per
# GPU) and 8 rows per block for the thousands of masked patch rows of iBOT, with 256-prototype chunks
# (a (8, 512) tile spilled on sm_90 in the fp16/bf16 softmax at 4 and at 8 warps).
GPU_BLOCK_K = {1: 512, 8: 256}  # by BLOCK_R
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_K = 4096
# Column modes: (BLOCK_R, BLOCK_K) tiles of one prototype chunk, stepping down the rows.
GPU_COLUMN_BLOCKS = (8, 256)
INTERPRETER_COLUMN_BLOCKS = (16, 256)


@triton.jit
def _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask, temperature,
                  HAS_CENTER: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """y = (t - c) / tau + a for a (BLOCK_R, BLOCK_K) tile, fp32; -inf in masked columns."""
    t = tl.load(logits_ptr + row_offset + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                other=0.0).to(tl.float32)
    if HAS_CENTER:
        t = t - tl.load(center_ptr + cols, mask=col_mask, other=0.0)[None, :]
    y = t / temperature
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    return tl.where(col_mask[None, :], y, float("-inf"))


@triton.jit
def _softmax_kernel(
    logits_ptr, center_ptr, shift_ptr, out_ptr, R, K, temperature,
    HAS_CENTER: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """MODE_SOFTMAX: softmax_k(y) of one block of BLOCK_R rows, two passes over K."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_offset = rows.to(tl.int64)[:, None] * K
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        y = _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask, temperature,
                          HAS_CENTER, HAS_SHIFT)
        m_new = tl.maximum(m, tl.max(y, axis=1))
        row_sum = row_sum * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[:, None]), axis=1)
        m = m_new
    inv_sum = 1.0 / row_sum
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        y = _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask, temperature,
                          HAS_CENTER, HAS_SHIFT)
        p = tl.exp(y - m[:, None]) * inv_sum[:, None]
        tl.store(out_ptr + row_offset + cols[None, :], p, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _row_stats_kernel(
    logits_ptr, shift_ptr, stats_ptr, R, K, temperature,
    HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """MODE_COLUMN, step 1: per chunk of prototypes, every row's chunk max of y and sum of exp(y - max)
    -> stats (2, R, chunks)."""
    chunk = tl.program_id(0)
    chunks = tl.num_programs(0)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        y = _centred_tile(logits_ptr, logits_ptr, shift_ptr, rows.to(tl.int64)[:, None] * K, row_mask, cols,
                          col_mask, temperature, False, HAS_SHIFT)
        m = tl.max(y, axis=1)
        tl.store(stats_ptr + rows * chunks + chunk, m, mask=row_mask)
        tl.store(stats_ptr + (R + rows) * chunks + chunk, tl.sum(tl.exp(y - m[:, None]), axis=1), mask=row_mask)


@triton.jit
def _column_kernel(
    logits_ptr, shift_ptr, row_max_ptr, row_inv_sum_ptr, out_ptr, R, K, temperature,
    COLMAX: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per chunk of prototypes, over all rows: MODE_COLUMN's column sums of softmax_k(y) (from the rows'
    max and 1 / sum) -> out (K,), or MODE_COLMAX's column max of y and sum of exp(y - max) -> out (2, K)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    col_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        y = _centred_tile(logits_ptr, logits_ptr, shift_ptr, rows.to(tl.int64)[:, None] * K, row_mask, cols,
                          col_mask, temperature, False, HAS_SHIFT)
        y = tl.where(row_mask[:, None], y, float("-inf"))
        if COLMAX:
            m_new = tl.maximum(col_max, tl.max(y, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked columns: keep exp finite
            col_sum = col_sum * tl.exp(col_max - m_safe) + tl.sum(tl.exp(y - m_safe[None, :]), axis=0)
            col_max = m_new
        else:
            row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
            inv_sum = tl.load(row_inv_sum_ptr + rows, mask=row_mask, other=0.0)
            col_sum += tl.sum(tl.exp(y - row_max[:, None]) * inv_sum[:, None], axis=0)
    if COLMAX:
        tl.store(out_ptr + cols, col_max, mask=col_mask)
        tl.store(out_ptr + K + cols, col_sum, mask=col_mask)
    else:
        tl.store(out_ptr + cols, col_sum, mask=col_mask)


def launch_plan(mode: int, R: int, K: int, sms: int, interpreter: bool = False) -> dict:
    """BLOCK_R, BLOCK_K and the grid of one mode: the one place the launcher and efficiency() read them.
    MODE_SOFTMAX: one program per BLOCK_R rows (BLOCK_R = 1 keeps every SM busy for the 32-256 class-token
    rows per GPU); column modes: one program per BLOCK_K prototypes (256 programs at K = 65536)."""
    if mode == MODE_SOFTMAX:
        block_r = 1 if R <= 2 * sms else 8
        block_k = INTERPRETER_BLOCK_K if interpreter else GPU_BLOCK_K[block_r]
        return {"BLOCK_R": block_r, "BLOCK_K": block_k, "grid": (triton.cdiv(R, block_r),)}
    block_r, block_k = INTERPRETER_COLUMN_BLOCKS if interpreter else GPU_COLUMN_BLOCKS
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "grid": (triton.cdiv(K, block_k),)}


def _launch(mode: int, logits: torch.Tensor, temperature: float, center=None, shift=None) -> torch.Tensor:
    """Run one mode over logits (R, K); returns probs (R, K), or the column statistics: (K,) for
    MODE_COLUMN, (max (K,), sum (K,)) stacked as (2, K) for MODE_COLMAX."""
    R, K = logits.shape
    device = logits.device
    plan = launch_plan(mode, R, K, sm_count(device), interpreted(logits))
    tiles = {"BLOCK_R": plan["BLOCK_R"], "BLOCK_K": plan["BLOCK_K"], "num_warps": GPU_NUM_WARPS}
    shift_arg = logits if shift is None else shift
    if mode == MODE_SOFTMAX:
        out = torch.empty((R, K), dtype=torch.float32, device=device)
        _softmax_kernel[plan["grid"]](logits, logits if center is None else center, shift_arg, out, R, K,
                                      float(temperature), HAS_CENTER=center is not None,
                                      HAS_SHIFT=shift is not None, **tiles)
        return out
    if mode == MODE_COLMAX:
        out = torch.empty((2, K), dtype=torch.float32, device=device)
        _column_kernel[plan["grid"]](logits, shift_arg, out, out, out, R, K, float(temperature), COLMAX=True,
                                     HAS_SHIFT=shift is not None, **tiles)
        return out
    stats = torch.empty((2, R, plan["grid"][0]), dtype=torch.float32, device=device)
    _row_stats_kernel[plan["grid"]](logits, shift_arg, stats, R, K, float(temperature), HAS_SHIFT=shift is not None,
                                    **tiles)
    m, s = stats
    row_max = m.max(dim=1).values
    row_inv_sum = 1.0 / (s * torch.exp(m - row_max[:, None])).sum(dim=1)
    out = torch.empty(K, dtype=torch.float32, device=device)
    _column_kernel[plan["grid"]](logits, shift_arg, row_max, row_inv_sum, out, R, K, float(temperature),
                                 COLMAX=False, HAS_SHIFT=shift is not None, **tiles)
    return out


def _validate(teacher_logits: torch.Tensor, temperature: float) -> None:
    check_tensor("teacher_logits", teacher_logits, 2)
    if teacher_logits.numel() == 0:
        raise ValueError(f"teacher_logits must be non-empty (R, K), got shape {tuple(teacher_logits.shape)}")
    check_positive("teacher_temp", temperature)


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((teacher_logits - center) / temperature) over the last dim, fp32 (reference.centered_softmax).

    teacher_logits (..., K) fp32/fp16/bf16; center with K elements (DINOv2's (1, K) or (1, 1, K) buffer).
    """
    K = teacher_logits.shape[-1]
    if center.numel() != K:
        raise ValueError(f"center has {center.numel()} elements but teacher_logits has K={K} prototypes "
                         f"(shape {tuple(teacher_logits.shape)})")
    logits = teacher_logits.reshape(-1, K)
    _validate(logits, temperature)
    center = center.detach().reshape(K).float().contiguous()
    check_tensor("center", center, 1, logits.device)
    return _launch(MODE_SOFTMAX, logits.detach(), temperature, center=center).reshape(teacher_logits.shape)


def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3,
                   all_reduce=None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets, computed in log domain (reference.sinkhorn_knopp).

    teacher_logits (R, K) fp32/fp16/bf16, this rank's rows. all_reduce(tensor, op) with op "max" or
    "sum" reduces in place over ranks (None: one process). Returns fp32 (R, K) rows summing to 1.
    DINOv2's sample count B (R x world size, or iBOT's n_masked_patches_tensor) only scales whole
    columns that the next normalisation divides out, so it does not enter.
    """
    _validate(teacher_logits, temperature)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1 (DINOv2 uses 3), got {n_iterations}")
    logits = teacher_logits.detach()
    shift = sinkhorn_first_shift(*_launch(MODE_COLMAX, logits, temperature), all_reduce)
    for _ in range(n_iterations - 1):
        mass = _launch(MODE_COLUMN, logits, temperature, shift=shift.contiguous())
        if all_reduce is not None:
            all_reduce(mass, "sum")
        shift = shift - torch.log(mass)
    return _launch(MODE_SOFTMAX, logits, temperature, shift=shift.contiguous())


def roofline_cost(R: int, K: int, dtype_bytes: int = 2, n_iterations: int = 0) -> dict[str, int]:
    """Minimum cost of the centred softmax (n_iterations=0) or of Sinkhorn-Knopp with n_iterations:
    R teacher rows, K prototypes, dtype_bytes per logit."""
    reads = 1 if n_iterations == 0 else 2 * n_iterations + 1
    return {"flops": (6 + 4 * n_iterations) * R * K, "bytes": reads * R * K * dtype_bytes + 4 * R * K + 8 * K}


# DINOv2's calls per GPU: the class-token teacher (2 global views x 64 samples = 128 rows, softmax BLOCK_R = 1) and
# iBOT's masked patch tokens (about 8192 rows, BLOCK_R = 8), K = 65536 prototypes.
PRODUCTION_ROWS = {1: 128, 8: 8192}
PRODUCTION_K = 65536


def efficiency(mode: int, R: int, K: int, dtype_bytes: int, sms: int, concurrent: int, l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one mode (both kernels of MODE_COLUMN
    together) from launch_plan's tiles and grid (docs/kernels.md, "Efficiency counts"). Useful: one
    read of the logits and one pass of the math (softmax: 7 ops per element; column sum: 7; column
    logsumexp: 5); the softmax and MODE_COLUMN recompute y in a second pass (11 and 11 ops)."""
    plan = launch_plan(mode, R, K, sms)
    block_r, block_k, programs, e = plan["BLOCK_R"], plan["BLOCK_K"], plan["grid"][0], dtype_bytes
    padded = pad(R, block_r) * pad(K, block_k)
    if mode == MODE_SOFTMAX:  # program b: a block of rows, all K, read twice (once per wave), probs written
        rows = lambda b: min(block_r, R - b * block_r)  # noqa: E731
        sizes = {"logits": R * K * e, "probs": 4 * R * K, "vectors": 8 * K}
        touches = lambda b, _y, _z: [("vectors", 0, 8 * K), ("logits", b, rows(b) * K * e),  # noqa: E731
                                     ("probs", b, 4 * rows(b) * K)]
        moved = hbm_bytes(plan["grid"], touches, sizes, concurrent, l2_bytes)
        floor, executed = {"flops": 7 * R * K, "bytes": R * K * e + 4 * R * K + 8 * K}, 11 * padded
    else:  # program c: a chunk of columns over all rows; MODE_COLUMN reads it twice (two launches)
        cols = lambda c: min(block_k, K - c * block_k)  # noqa: E731
        sizes = {"logits": R * K * e, "vectors": 8 * K, "out": 8 * K, "rows": 16 * R * programs}
        touches = lambda c, _y, _z: [("logits", c, R * cols(c) * e), ("vectors", c, 4 * cols(c)),  # noqa: E731
                                     ("out", c, 8 * cols(c)), ("rows", c, 8 * R)]
        moved = hbm_bytes(plan["grid"], touches, sizes, concurrent, l2_bytes)
        if mode == MODE_COLUMN:  # + the row statistics pass, its (2, R, chunks) round trip and 8 R row values
            moved += R * K * e + 4 * K + 16 * R * programs + 16 * R
            floor, executed = {"flops": 7 * R * K, "bytes": R * K * e + 8 * K}, 11 * padded
        else:
            floor, executed = {"flops": 5 * R * K, "bytes": R * K * e + 12 * K}, 5 * padded
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved, "flop_kind": "fp32"}


def compile_specs() -> list[dict]:
    """Every shipped configuration (logit dtype x kernel x BLOCK_R) for the AOT compile report."""
    specs = []
    common = {"num_warps": GPU_NUM_WARPS, "num_stages": 3, "uses_dot": False}
    column_r, column_k = GPU_COLUMN_BLOCKS
    for dtype, ptr in TRITON_DTYPE.items():
        name = str(dtype).removeprefix("torch.")
        counts = lambda mode, rows, e=dtype.itemsize: partial(  # noqa: E731
            efficiency, mode, rows, PRODUCTION_K, dtype_bytes=e)
        scalars = {"R": "i32", "K": "i32", "temperature": "fp32"}
        for tag, has_center, has_shift in (("centered_softmax", True, False), ("sk_softmax", False, True)):
            for block_r in (1, 8):
                specs.append({
                    **common, "name": f"dino_teacher_{tag}_{name}_r{block_r}", "fn": _softmax_kernel,
                    "signature": {"logits_ptr": ptr, "center_ptr": "*fp32" if has_center else ptr,
                                  "shift_ptr": "*fp32" if has_shift else ptr, "out_ptr": "*fp32", **scalars},
                    "constexprs": {"HAS_CENTER": has_center, "HAS_SHIFT": has_shift, "BLOCK_R": block_r,
                                   "BLOCK_K": GPU_BLOCK_K[block_r]},
                    "efficiency": counts(MODE_SOFTMAX, PRODUCTION_ROWS[block_r]),
                })
        for rows in sorted(set(PRODUCTION_ROWS.values())):
            column = {"BLOCK_R": column_r, "BLOCK_K": column_k}
            specs.append({
                **common, "name": f"dino_teacher_sk_row_stats_{name}_{rows}rows", "fn": _row_stats_kernel,
                "signature": {"logits_ptr": ptr, "shift_ptr": "*fp32", "stats_ptr": "*fp32", **scalars},
                "constexprs": {"HAS_SHIFT": True, **column}, "efficiency": counts(MODE_COLUMN, rows),
            })
            for tag, colmax in (("sk_column", False), ("sk_colmax", True)):
                specs.append({
                    **common, "name": f"dino_teacher_{tag}_{name}_{rows}rows", "fn": _column_kernel,
                    "signature": {"logits_ptr": ptr, "shift_ptr": ptr if colmax else "*fp32",
                                  "row_max_ptr": "*fp32", "row_inv_sum_ptr": "*fp32", "out_ptr": "*fp32",
                                  **scalars},
                    "constexprs": {"COLMAX": colmax, "HAS_SHIFT": not colmax, **column},
                    "efficiency": counts(MODE_COLMAX if colmax else MODE_COLUMN, rows),
                })
    return specs
