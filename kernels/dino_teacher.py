"""DINOv2 teacher targets: centred softmax and numerically stable Sinkhorn-Knopp, one kernel family.

Math (reference.centered_softmax, reference.sinkhorn_knopp): for teacher logits t (R, K), temperature
tau, a centre c (K,) subtracted before the division (DINOv2's centering) and a log-domain prototype
potential a (K,) added after it (Sinkhorn-Knopp), y = (t - c) / tau + a. One kernel, three modes:
    MODE_SOFTMAX  out (R, K) fp32 = softmax_k(y)
    MODE_COLUMN   partial (P, K) = per-prototype sums over the program's rows of softmax_k(y)
    MODE_COLMAX   partial (P, 2, K) = per-prototype running max of y over the program's rows, and the
                  sum of exp(y - max)
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

Kernel: MODE_SOFTMAX runs one program per BLOCK_R rows: pass 1 streams K chunks with an online max
and rescaled sum, pass 2 recomputes y and writes the probabilities. The column modes run at most
4 x SMs programs, each striding over row blocks and accumulating into its own row of the partials
(read-modify-write, no atomics: deterministic), which torch reduces. Nothing of size (R, K) is
allocated besides the output.

Cost per call (e = bytes per logit): MODE_SOFTMAX moves 2 R K e + 4 R K bytes (the second read of
the logits instead of an unnormalised temporary); MODE_COLUMN 2 R K e + 8 P K; MODE_COLMAX R K e +
16 P K. Sinkhorn-Knopp with n iterations: (2 n + 1) R K e + 4 R K, against DINOv2's eager ~(4 + 6 n)
passes of 4 R K bytes (exp, sums, in-place divisions) and a full fp32 copy of the logits.
"""

from functools import partial

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, check_positive, check_tensor, hbm_bytes, interpreted, pad, sm_count
from .reference import sinkhorn_first_shift

MODE_SOFTMAX, MODE_COLUMN, MODE_COLMAX = 0, 1, 2

# H100/A100 config: bandwidth bound. A (BLOCK_R, 512) tile over 4 warps is 4-32 fp32 elements per
# thread. BLOCK_R = 1 keeps all SMs busy for class-token rows (2 x 16-128 per GPU); 8 rows per block
# for the thousands of masked patch rows of iBOT, so the column partials' read-modify-write is an
# eighth of the logit traffic, with 256-prototype chunks (a (8, 512) tile spilled on sm_90 in the
# fp16/bf16 softmax at 4 and at 8 warps).
GPU_BLOCK_K = {1: 512, 8: 256}  # by BLOCK_R
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_K = 4096


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
def _teacher_kernel(
    logits_ptr, center_ptr, shift_ptr, out_ptr, R, K, temperature,
    MODE: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    # MODE_SOFTMAX: one row block per program; column modes: this program's row of the partials
    # (the mode constants are literals here: jit code reads no Python globals)
    partial = out_ptr + pid.to(tl.int64) * (2 if MODE == 2 else 1) * K
    for block in range(pid, tl.cdiv(R, BLOCK_R), programs):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        row_offset = rows.to(tl.int64)[:, None] * K
        if MODE == 2:  # MODE_COLMAX
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_mask = cols < K
                y = _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask,
                                  temperature, HAS_CENTER, HAS_SHIFT)
                y = tl.where(row_mask[:, None], y, float("-inf"))
                m_old = tl.load(partial + cols, mask=col_mask, other=0.0)
                s_old = tl.load(partial + K + cols, mask=col_mask, other=0.0)
                m_new = tl.maximum(m_old, tl.max(y, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked columns: keep exp finite
                s_new = s_old * tl.exp(m_old - m_safe) + tl.sum(tl.exp(y - m_safe[None, :]), axis=0)
                tl.store(partial + cols, m_new, mask=col_mask)
                tl.store(partial + K + cols, s_new, mask=col_mask)
        else:
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            row_sum = tl.zeros([BLOCK_R], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_mask = cols < K
                y = _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask,
                                  temperature, HAS_CENTER, HAS_SHIFT)
                m_new = tl.maximum(m, tl.max(y, axis=1))
                row_sum = row_sum * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[:, None]), axis=1)
                m = m_new
            inv_sum = 1.0 / row_sum
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_mask = cols < K
                y = _centred_tile(logits_ptr, center_ptr, shift_ptr, row_offset, row_mask, cols, col_mask,
                                  temperature, HAS_CENTER, HAS_SHIFT)
                p = tl.exp(y - m[:, None]) * inv_sum[:, None]
                if MODE == 0:  # MODE_SOFTMAX
                    tl.store(out_ptr + row_offset + cols[None, :], p, mask=row_mask[:, None] & col_mask[None, :])
                else:
                    p = tl.where(row_mask[:, None], p, 0.0)
                    column = tl.load(partial + cols, mask=col_mask, other=0.0)
                    tl.store(partial + cols, column + tl.sum(p, axis=0), mask=col_mask)


def launch_plan(mode: int, R: int, sms: int, interpreter: bool = False) -> dict:
    """BLOCK_R, BLOCK_K and the grid of one mode: the one place the launcher and efficiency() read them.
    Column modes stride over the row blocks with at most 4 programs per SM, one partial row each."""
    block_r = 1 if R <= 2 * sms else 8
    blocks = triton.cdiv(R, block_r)
    programs = blocks if mode == MODE_SOFTMAX else min(blocks, 4 * sms)
    return {"BLOCK_R": block_r, "BLOCK_K": INTERPRETER_BLOCK_K if interpreter else GPU_BLOCK_K[block_r],
            "grid": (programs,), "blocks": blocks}


def _launch(mode: int, logits: torch.Tensor, temperature: float, center=None, shift=None) -> torch.Tensor:
    """Run one mode over logits (R, K); returns probs (R, K), or the reduced column statistics:
    (K,) for MODE_COLUMN, (max (K,), sum (K,)) stacked as (2, K) for MODE_COLMAX."""
    R, K = logits.shape
    device = logits.device
    plan = launch_plan(mode, R, sm_count(device), interpreted(logits))
    programs = plan["grid"][0]
    if mode == MODE_SOFTMAX:
        out = torch.empty((R, K), dtype=torch.float32, device=device)
    elif mode == MODE_COLUMN:
        out = torch.zeros((programs, K), dtype=torch.float32, device=device)
    else:
        out = torch.stack([torch.full((programs, K), float("-inf"), device=device),
                           torch.zeros((programs, K), device=device)], dim=1)
    _teacher_kernel[plan["grid"]](
        logits, logits if center is None else center, logits if shift is None else shift, out,
        R, K, float(temperature),
        MODE=mode, HAS_CENTER=center is not None, HAS_SHIFT=shift is not None, BLOCK_R=plan["BLOCK_R"],
        BLOCK_K=plan["BLOCK_K"], num_warps=GPU_NUM_WARPS,
    )
    if mode == MODE_SOFTMAX:
        return out
    if mode == MODE_COLUMN:
        return out.sum(dim=0)
    m, s = out[:, 0], out[:, 1]
    col_max = m.max(dim=0).values
    return torch.stack([col_max, (s * torch.exp(m - col_max)).sum(dim=0)])


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


# DINOv2's calls per GPU: the class-token teacher (2 global views x 64 samples = 128 rows, BLOCK_R = 1) and
# iBOT's masked patch tokens (about 8192 rows, BLOCK_R = 8), K = 65536 prototypes.
PRODUCTION_ROWS = {1: 128, 8: 8192}
PRODUCTION_K = 65536


def efficiency(mode: int, R: int, K: int, dtype_bytes: int, sms: int, concurrent: int, l2_bytes: int) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one launch of one mode from launch_plan's
    tiles and grid (docs/kernels.md, "Efficiency counts"). Softmax: one read of the logits is useful
    (roofline_cost); the two passes run 12 ops per element. Column modes (one Sinkhorn step): a read of
    the logits and K column results are useful; each program read-modify-writes its fp32 partial row."""
    plan = launch_plan(mode, R, sms)
    block_r, blocks, programs, e = plan["BLOCK_R"], plan["blocks"], plan["grid"][0], dtype_bytes
    padded = pad(R, block_r) * pad(K, plan["BLOCK_K"])
    rows = lambda b: min(block_r, R - b * block_r)  # noqa: E731
    width = 1 if mode == MODE_COLUMN else 2
    sizes = {"logits": R * K * e, "probs": 4 * R * K, "partial": 4 * width * programs * K, "vectors": 8 * K}

    def touches(p, _y, _z):
        out = [("vectors", 0, 8 * K)]
        for b in range(p, blocks, programs):
            out.append(("logits", b, rows(b) * K * e))
            out.append(("probs", b, 4 * rows(b) * K) if mode == MODE_SOFTMAX else ("partial", p, 8 * width * K))
        return out
    moved = hbm_bytes(plan["grid"], touches, sizes, concurrent, l2_bytes)
    if mode == MODE_SOFTMAX:
        floor = roofline_cost(R, K, e)
        executed = 12 * padded
    else:  # torch reduces the partial rows afterwards
        moved += 4 * width * programs * K + 4 * width * K
        floor = {"flops": (4 if mode == MODE_COLUMN else 3) * R * K, "bytes": R * K * e + 4 * width * K + 8 * K}
        executed = (10 if mode == MODE_COLUMN else 5) * padded
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved, "flop_kind": "fp32"}


def compile_specs() -> list[dict]:
    """Every shipped configuration (logit dtype x mode x BLOCK_R) for the AOT compile report."""
    specs = []
    shipped = [("centered_softmax", MODE_SOFTMAX, True, False), ("sk_softmax", MODE_SOFTMAX, False, True),
               ("sk_column", MODE_COLUMN, False, True), ("sk_colmax", MODE_COLMAX, False, False)]
    for dtype, ptr in TRITON_DTYPE.items():
        for tag, mode, has_center, has_shift in shipped:
            for block_r in (1, 8):
                specs.append({
                    "name": f"dino_teacher_{tag}_{str(dtype).removeprefix('torch.')}_r{block_r}",
                    "fn": _teacher_kernel,
                    "signature": {"logits_ptr": ptr, "center_ptr": "*fp32" if has_center else ptr,
                                  "shift_ptr": "*fp32" if has_shift else ptr, "out_ptr": "*fp32",
                                  "R": "i32", "K": "i32", "temperature": "fp32"},
                    "constexprs": {"MODE": mode, "HAS_CENTER": has_center, "HAS_SHIFT": has_shift,
                                   "BLOCK_R": block_r, "BLOCK_K": GPU_BLOCK_K[block_r]},
                    "num_warps": GPU_NUM_WARPS,
                    "num_stages": 3,
                    "uses_dot": False,
                    "efficiency": partial(efficiency, mode, PRODUCTION_ROWS[block_r], PRODUCTION_K,
                                          dtype_bytes=dtype.itemsize),
                })
    return specs
