"""DINOv2 teacher targets: centred softmax and numerically stable Sinkhorn-Knopp, one kernel family.

Math (reference.centered_softmax, reference.sinkhorn_knopp): for teacher logits t (R, K), temperature
tau, a centre c (K,) subtracted before the division (DINOv2's centering) and a log-domain prototype
potential a (K,) added after it (Sinkhorn-Knopp), y = (t - c) / tau + a. Three modes:
    MODE_SOFTMAX  out (R, K) fp32 = softmax_k(y)
    MODE_COLUMN   (K,) = per-prototype sums over all rows of softmax_k(y)
    MODE_COLMAX   (2, K) = per-prototype max of t / tau over all rows, and the sum of exp(t / tau - max)
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

Sinkhorn in base 2, constants folded: its kernels take scale = log2(e) / tau and the potential as a bias
b = a log2(e) (K,) fp32, so y2 = y log2(e) = fma(t, scale, b) and exp(y - m) = exp2(y2 - m2): an FMA and
an exp2 per element instead of a division, an addition and exp's own multiply by log2(e). The centred
softmax keeps plain PyTorch's arithmetic, (t - c) / tau (as a multiply by 1 / tau) and exp, because its
logits keep their size (below).

Kernels: MODE_SOFTMAX runs one program per row: pass 1 streams K chunks with an online max m and rescaled
sum s, keeping the exponentials e = exp(y - m_ref) of the first two chunks in registers; pass 2 writes
those as e exp(m_ref - m) / s (one multiply per element) and, for the other chunks, recomputes y and writes
the probabilities: exp2(y2 - n) with the row's
log2-normaliser n = m2 + log2(s) folded into the exponent for Sinkhorn, whose bias brings y2 to a few
units around 0; exp(y - m) / s for the centred softmax, whose |y| reaches ~2000 in the tests (logits
+-50, tau 0.04), where n rounds to 1e-4 per row and rows would no longer sum to 1 within the flash-attn
rule (up to 28x over it where one probability is ~1). MODE_COLUMN (one Sinkhorn iteration) needs each
row's normaliser before its column sums: two dependent reductions over the same logits. It is one launch of
persistent programs (COLUMN_PROGRAMS_PER_SM per SM) that take numbered work items from a counter. The rows go in
groups of COLUMN_GROUP_BYTES of logits; a group's statistics items find the max and sum of each (8-row block,
prototype chunk) tile, and the last of them to finish combines them into each row's log2-normaliser
n = m2 + log2(s). Its column items then add exp2(y2 - n) down 512 prototypes of the group's rows, into the
column sums after the previous group's (in group order, no atomics in the arithmetic: deterministic). Items go
in the order S0, S1, C0, S2, C1, ..., so a group's column items re-read its rows from L2 while the next group's
statistics stream in, and the logits cross HBM once at any row count (two launches per group did so only for a
few groups; iBOT's 3760 rows read them twice). An item waits (spinning on an acquire load) only on items of
smaller number, which programs already running hold, so no schedule deadlocks (and a wait that outlasts
COLUMN_MAX_SPINS polls gives NaN sums rather than a hang); the interpreter, which runs one
program to the end before the next, runs them all in order in its first program. MODE_COLMAX runs one program
per chunk of BLOCK_K prototypes over all rows (an online column max and sum), so each program owns its columns
outright. Nothing of size (R, K) is allocated besides the output.

Cost per call (e = bytes per logit; FLOPs per element, an FMA counted as 2): MODE_SOFTMAX moves
R K e + 4 R K bytes when a wave's rows fit in half of L2 (the second read of a row comes from there; else
the recomputed chunks' R (K - 2 BLOCK_K) e more) and executes pass 1's 6 (FMA, max, subtract, exp2, add)
and, in pass 2, 1 on the kept chunks and 4 for Sinkhorn (FMA, subtract, exp2) or 5 centred (subtract,
multiply, subtract, exp, multiply by 1 / s) on the others: 9.25 and 10 at K = 65536 against the op's 7
(11 and 10 recomputing every chunk); MODE_COLUMN R K e + 8 K bytes, the stats (8 bytes per row and chunk,
written and read) and torch's bias update, while a group, the next one and an item per program fit in half of
L2 (else 2 R K e), 6 + 5 = 11 FLOPs (statistics: FMA, max, subtract, exp2, add; columns: FMA, subtract, exp2,
column add) plus the combine (5 per row and chunk, once per row) against the op's 8 (its column sum weights
each row's exponentials by 1 / s: a multiply-add); MODE_COLMAX R K e + 8 K bytes and 5 FLOPs
(multiply, max, subtract, exp2, add). Sinkhorn-Knopp with n iterations reads the logits
n + 1 times from HBM and writes 4 R K, against DINOv2's eager ~(4 + 6 n) passes of 4 R K bytes (exp,
sums, in-place divisions) and a full fp32 copy of the logits.
"""

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (
    FLOAT_DTYPES,
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_contiguous,
    check_positive,
    check_size,
    check_tensor,
    hbm_bytes,
    interpreted,
    launch_kernel,
    op_name,
    pad,
    scalar_input,
    sm_count,
)
from .gpus import BY_CAPABILITY, GPUS
from .reference import sinkhorn_first_shift

MODE_SOFTMAX, MODE_COLUMN, MODE_COLMAX = 0, 1, 2
LOG2E = 1.0 / math.log(2.0)

# H100/A100 config: bandwidth bound, so sized by Little's law (the compile report's in-flight check: an SM must
# have ~15 KB of loads in flight on an H100, ~11 KB on an A100). The softmax runs one row per program, which keeps
# all SMs busy for class-token rows (2 x 16-128 per GPU) and is what iBOT's thousands of masked patch rows take too,
# so one program's step must carry it alone: 8192 prototypes (16 KB of bf16, 32 KB of fp32). Its two kept tiles
# hold 16384 fp32 exponentials: 32 registers a thread at 16 warps (88-107 in all, one CTA per SM; at 8 warps the
# fp32 variant was held to 128 registers on sm_80 and spilled).
GPU_BLOCK_K = 8192
SOFTMAX_NUM_WARPS = 16
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_K = 4096
# MODE_COLMAX: (BLOCK_R, BLOCK_K) tiles of one prototype chunk, stepping down the rows, K / BLOCK_K = 256 programs
# (2 per SM): 16 rows make 8 KB of 16-bit logits a step (8 rows: 4 KB, latency bound on sm_90).
GPU_COLMAX_BLOCKS = (16, 256)
INTERPRETER_COLMAX_BLOCKS = (16, 256)
# MODE_COLUMN: both kinds of work item step (8, 512) tiles (8 KB of 16-bit logits, 16 KB of fp32), in
# COLUMN_PROGRAMS_PER_SM persistent programs of 4 warps per SM. A statistics item reads COLUMN_ITEM_BYTES (8 rows x
# 2048 prototypes of bf16, x 1024 of fp32), a column item a group's rows x 512 prototypes; a group is
# COLUMN_GROUP_BYTES of logits (32 bf16 or 16 fp32 rows of 65536). A group's column items re-read its rows from L2
# while what was read since fits in half of it: the group, the next group (its statistics items run between) and
# one item per program in flight, 2 x 4 + 264 x 32 KB = 16.6 MB on an H100 (A100: 15.2 MB of its 20).
GPU_COLUMN_BLOCKS = (8, 512)
INTERPRETER_COLUMN_BLOCKS = (8, 128)  # and statistics items of 2 x 128 prototypes: several chunks at test shapes
COLUMN_ITEM_BYTES = 32 << 10
COLUMN_GROUP_BYTES = 4 << 20
COLUMN_PROGRAMS_PER_SM = 2
# Polls a column item makes of a flag before it gives up and writes NaN: ~2^24 acquire loads are seconds, where a
# real wait is one item of another program (microseconds), so this fires only if the schedule argument fails.
COLUMN_MAX_SPINS = 1 << 24


@triton.jit
def _logit_tile(logits_ptr, vec_ptr, row_offset, row_mask, cols, col_mask, scale, CENTER: tl.constexpr):
    """A (BLOCK_R, BLOCK_K) tile of y, fp32, 2 FLOPs per element: y = (t - c) scale with scale = 1 / tau (the
    centred softmax, natural units, vec = c) or y2 = t scale + b with scale = log2(e) / tau (Sinkhorn, base
    2, vec = b). Masked lanes load t = -inf, so they are -inf and add exp(-inf) = 0 without a select."""
    t = tl.load(logits_ptr + row_offset + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                other=float("-inf")).to(tl.float32)
    v = tl.load(vec_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if CENTER:
        return (t - v) * scale
    return t * scale + v  # one FMA


@triton.jit
def _exp(x, CENTER: tl.constexpr):
    if CENTER:
        return tl.exp(x)
    return tl.exp2(x)


@triton.jit
def _online_step(logits_ptr, vec_ptr, row_offset, row_mask, cols, col_mask, m, row_sum, scale, CENTER: tl.constexpr):
    """One tile of pass 1: the running row max m and sum of exp(y - m) (exp2 in base 2) updated with the tile at
    cols. Returns the tile's exponentials e = exp(y - m_ref), its reference max m_ref and the new m and sum.
    Rows past R, and rows whose tiles so far are all -inf (logits near -3e38, or a tiny temperature), take
    m_ref = 0: their lanes are -inf, so e = 0, where exp(-inf - -inf) was NaN."""
    y = _logit_tile(logits_ptr, vec_ptr, row_offset, row_mask, cols, col_mask, scale, CENTER)
    m_new = tl.maximum(m, tl.max(y, axis=1))
    m_ref = tl.where(row_mask & (m_new > float("-inf")), m_new, 0.0)
    e = _exp(y - m_ref[:, None], CENTER)
    return e, m_ref, m_new, row_sum * _exp(m - m_ref, CENTER) + tl.sum(e, axis=1)


@triton.jit
def _row_max_sum(logits_ptr, vec_ptr, row_offset, row_mask, k_start, k_end, scale, CENTER: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1: the row max m of y and sum_k exp(y - m) of BLOCK_R rows over the columns [k_start, k_end) (exp2
    in base 2), one online pass (the sum rescaled as m grows). Rows past R come out m = 0, sum = 1: their
    lanes are -inf, so pass 2 gives them exp(-inf) = 0 with no NaN."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        _, _, m, row_sum = _online_step(logits_ptr, vec_ptr, row_offset, row_mask, cols, cols < k_end, m, row_sum,
                                        scale, CENTER)
    return tl.where(row_mask, m, 0.0), tl.where(row_mask, row_sum, 1.0)


@triton.jit
def _softmax_kernel(logits_ptr, vec_ptr, out_ptr, R, K, scale, CENTER: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """MODE_SOFTMAX: softmax_k(y) of one block of BLOCK_R rows, two passes over K. Pass 1 keeps the exponentials
    e = exp(y - m_ref) of the row's first two tiles in registers; pass 2 writes them times exp(m_ref - m) / s
    (one multiply per element) and recomputes the other tiles from the logits: exp(y - m) / s (exp2 for Sinkhorn's
    base-2 y2). The normaliser is not folded into the exponent (exp2(y2 - m2 - log2(s))): where |m| is large (|y|
    up to ~2000 in the centred softmax, ~1e30 for Sinkhorn at a tiny temperature) m + log2(s) rounds log2(s) away,
    and rows summed to 2. Where a kept tile holds the row's max, e is exactly 1 there and its factor 1 / s, as in
    PyTorch."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_offset = rows.to(tl.int64)[:, None] * K
    cols0 = tl.arange(0, BLOCK_K)  # tile 0 always holds a prototype (K >= 1)
    cols1 = BLOCK_K + cols0  # tile 1 may be empty (K <= BLOCK_K): its lanes add exp(-inf - m) = 0
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    e0, m_ref0, m, row_sum = _online_step(logits_ptr, vec_ptr, row_offset, row_mask, cols0, cols0 < K, m, row_sum,
                                          scale, CENTER)
    e1, m_ref1, m, row_sum = _online_step(logits_ptr, vec_ptr, row_offset, row_mask, cols1, cols1 < K, m, row_sum,
                                          scale, CENTER)
    for k0 in range(2 * BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        _, _, m, row_sum = _online_step(logits_ptr, vec_ptr, row_offset, row_mask, cols, cols < K, m, row_sum,
                                        scale, CENTER)
    m = tl.where(row_mask, m, 0.0)
    row_sum = tl.where(row_mask, row_sum, 1.0)
    mask = row_mask[:, None]
    inv_sum = 1.0 / row_sum
    # m_ref <= m, except the 0 of a kept tile that was all -inf (e = 0 there) under a row max below 0: capped at m,
    # its factor is 1 and not exp(-m), which overflowed to inf (0 * inf = NaN) for m < -88
    m_ref0, m_ref1 = tl.minimum(m_ref0, m), tl.minimum(m_ref1, m)
    if CENTER:
        scale0, scale1 = tl.exp(m_ref0 - m) * inv_sum, tl.exp(m_ref1 - m) * inv_sum
    else:
        scale0, scale1 = tl.exp2(m_ref0 - m) * inv_sum, tl.exp2(m_ref1 - m) * inv_sum
    tl.store(out_ptr + row_offset + cols0[None, :], e0 * scale0[:, None], mask=mask & (cols0 < K)[None, :])
    tl.store(out_ptr + row_offset + cols1[None, :], e1 * scale1[:, None], mask=mask & (cols1 < K)[None, :])
    for k0 in range(2 * BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        y = _logit_tile(logits_ptr, vec_ptr, row_offset, row_mask, cols, col_mask, scale, CENTER)
        if CENTER:
            p = tl.exp(y - m[:, None]) * inv_sum[:, None]
        else:
            p = tl.exp2(y - m[:, None]) * inv_sum[:, None]
        tl.store(out_ptr + row_offset + cols[None, :], p, mask=mask & col_mask[None, :])


@triton.jit
def _stats_item(logits_ptr, bias_ptr, stats_ptr, norm_ptr, done_ptr, ready_ptr, R, K, group, index, GROUP_ROWS,
                CHUNK, CHUNKS, stats_items, scale, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """A statistics item: the max m2 and sum of exp2(y2 - m2) of BLOCK_R rows of a group over one chunk of CHUNK
    prototypes -> stats (R, CHUNKS, 2). The group's last statistics item to finish (its count of finished items
    says so) combines the group's chunks into each row's log2-normaliser n = m2 + log2(s) -> norm (R,) and
    marks the group ready for its column items."""
    block_row = index // CHUNKS
    chunk = index - block_row * CHUNKS
    first_row = group * GROUP_ROWS
    rows = first_row + block_row * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    k_start = chunk * CHUNK
    m, row_sum = _row_max_sum(logits_ptr, bias_ptr, rows.to(tl.int64)[:, None] * K, row_mask, k_start,
                              tl.minimum(k_start + CHUNK, K), scale, False, BLOCK_R, BLOCK_K)
    stat = stats_ptr + (rows * CHUNKS + chunk) * 2
    tl.store(stat, m, mask=row_mask)
    tl.store(stat + 1, row_sum, mask=row_mask)
    tl.debug_barrier()  # every thread's stores happen before the release below
    if tl.atomic_add(done_ptr + group, 1, sem="acq_rel") == stats_items - 1:
        chunks = tl.arange(0, BLOCK_C)
        for r0 in range(first_row, tl.minimum(first_row + GROUP_ROWS, R), BLOCK_R):
            group_rows = r0 + tl.arange(0, BLOCK_R)
            group_mask = group_rows < R
            group_stats = stats_ptr + (group_rows[:, None] * CHUNKS + chunks[None, :]) * 2
            stats_mask = group_mask[:, None] & (chunks < CHUNKS)[None, :]
            chunk_max = tl.load(group_stats, mask=stats_mask, other=float("-inf"), cache_modifier=".cg")
            max_all = tl.where(group_mask, tl.max(chunk_max, axis=1), 0.0)
            sum_all = tl.sum(tl.load(group_stats + 1, mask=stats_mask, other=0.0, cache_modifier=".cg")
                             * tl.exp2(chunk_max - max_all[:, None]), axis=1)
            tl.store(norm_ptr + group_rows, max_all + tl.log2(tl.where(group_mask, sum_all, 1.0)), mask=group_mask)
        tl.debug_barrier()
        tl.atomic_xchg(ready_ptr + group, 1, sem="release")


@triton.jit
def _wait_at_least(flag_ptr, value, MAX_SPINS: tl.constexpr):
    """Spin until *flag_ptr >= value (an acquire load a poll). False if MAX_SPINS polls pass first: the caller
    writes NaN instead of hanging, should a schedule ever break the no-deadlock argument (_column_kernel)."""
    spins = 0
    while (tl.atomic_add(flag_ptr, 0, sem="acquire") < value) & (spins < MAX_SPINS):
        spins += 1
    return spins < MAX_SPINS


@triton.jit
def _column_item(logits_ptr, bias_ptr, norm_ptr, ready_ptr, added_ptr, fail_ptr, out_ptr, R, K, group, index,
                 GROUP_ROWS, all_columns, scale, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 MAX_SPINS: tl.constexpr):
    """A column item: once the group's normalisers are ready, the sums of exp2(y2 - n) of BLOCK_K prototypes down
    the group's rows, added to out (K,) after the earlier groups' (in group order: the sums are reproducible).
    A wait that runs out of polls stores NaN and sets the sticky fail word. A slow item of an earlier group may
    still store finite sums over that NaN, so the last column item to finish (a count after every store) makes
    all K sums NaN when the word is set: every store happens before its count, the fill after the last one."""
    cols = index * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    first_row = group * GROUP_ROWS
    ok = _wait_at_least(ready_ptr + group, 1, MAX_SPINS)
    col_sum = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(first_row, tl.minimum(first_row + GROUP_ROWS, R), BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        y = _logit_tile(logits_ptr, bias_ptr, rows.to(tl.int64)[:, None] * K, row_mask, cols, col_mask, scale, False)
        norm = tl.load(norm_ptr + rows, mask=row_mask, other=0.0, cache_modifier=".cg")  # past R: -inf lanes add 0
        col_sum += tl.sum(tl.exp2(y - norm[:, None]), axis=0)
    ok = _wait_at_least(added_ptr + index, group, MAX_SPINS) & ok
    if ok == 0:
        tl.atomic_xchg(fail_ptr, 1, sem="relaxed")
    if group > 0:
        col_sum += tl.load(out_ptr + cols, mask=col_mask, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + cols, tl.where(ok, col_sum, float("nan")), mask=col_mask)
    tl.debug_barrier()
    tl.atomic_add(added_ptr + index, 1, sem="release")
    finished_ptr = fail_ptr + 1
    if tl.atomic_add(finished_ptr, 1, sem="acq_rel") == all_columns - 1:
        if tl.atomic_add(fail_ptr, 0, sem="acquire") != 0:
            for k0 in range(0, K, BLOCK_K):
                fill = k0 + tl.arange(0, BLOCK_K)
                tl.store(out_ptr + fill, tl.full([BLOCK_K], float("nan"), tl.float32), mask=fill < K)


@triton.jit
def _work_item(item, GROUPS, stats_items, per_block):
    """Work item number item -> (is a statistics item, group, index within its kind). The order is blocks of
    per_block items: S(0); then for b = 0 .. G - 2, S(b + 1) followed by C(b); then C(G - 1)."""
    block = tl.maximum(item - stats_items, 0) // per_block
    offset = item - stats_items - block * per_block
    first = item < stats_items
    is_stats = first | ((block < GROUPS - 1) & (offset < stats_items))
    group = tl.where(first, 0, tl.where(is_stats, block + 1, block))
    index = tl.where(first, item, tl.where(is_stats | (block == GROUPS - 1), offset, offset - stats_items))
    return is_stats, group, index


@triton.jit
def _column_kernel(logits_ptr, bias_ptr, stats_ptr, norm_ptr, sync_ptr, out_ptr, R, K, GROUPS, GROUP_ROWS, CHUNK,
                   CHUNKS, scale, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   MAX_SPINS: tl.constexpr):
    """MODE_COLUMN: one Sinkhorn column step in one launch of persistent programs. Each program takes work items
    in order from a counter (sync[0]) until none are left. Group g of GROUP_ROWS rows has statistics items (row
    block x prototype chunk) and column items (BLOCK_K prototypes over the group's rows); the order is S0, S1,
    C0, S2, C1, ..., C(G-1), so a group's column items re-read its rows from L2 while the next group's statistics
    stream in. An item waits only on items of smaller number, which running programs hold: no deadlock, whatever
    the hardware schedules (a wait of MAX_SPINS polls gives up: NaN sums). sync: [counter, finished statistics
    items per group, ready flag per group, groups added per column item, fail word, finished column items]."""
    stats_items = tl.cdiv(GROUP_ROWS, BLOCK_R) * CHUNKS
    column_items = tl.cdiv(K, BLOCK_K)
    per_block = stats_items + column_items
    done_ptr = sync_ptr + 1
    ready_ptr = done_ptr + GROUPS
    added_ptr = ready_ptr + GROUPS
    fail_ptr = added_ptr + column_items
    item = tl.atomic_add(sync_ptr, 1, sem="relaxed")  # a number only: the group flags order the data
    while item < GROUPS * per_block:
        is_stats, group, index = _work_item(item, GROUPS, stats_items, per_block)
        if is_stats:
            _stats_item(logits_ptr, bias_ptr, stats_ptr, norm_ptr, done_ptr, ready_ptr, R, K, group, index,
                        GROUP_ROWS, CHUNK, CHUNKS, stats_items, scale, BLOCK_R, BLOCK_K, BLOCK_C)
        else:
            _column_item(logits_ptr, bias_ptr, norm_ptr, ready_ptr, added_ptr, fail_ptr, out_ptr, R, K, group, index,
                         GROUP_ROWS, GROUPS * column_items, scale, BLOCK_R, BLOCK_K, MAX_SPINS)
        item = tl.atomic_add(sync_ptr, 1, sem="relaxed")


@triton.jit
def _colmax_kernel(logits_ptr, out_ptr, R, K, scale, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """MODE_COLMAX: per chunk of prototypes, over all rows: the column max of t / tau (t scale / log2(e)) and
    the sum of exp2(t scale - max) = exp(t / tau - max) -> out (2, K)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    col_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                    mask=(rows < R)[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
        y = t * scale
        m_new = tl.maximum(col_max, tl.max(y, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked columns: keep exp2 finite
        col_sum = col_sum * tl.exp2(col_max - m_safe) + tl.sum(tl.exp2(y - m_safe[None, :]), axis=0)
        col_max = m_new
    tl.store(out_ptr + cols, col_max * 0.6931471805599453, mask=col_mask)  # * ln 2: natural units
    tl.store(out_ptr + K + cols, col_sum, mask=col_mask)


def launch_plan(mode: int, R: int, K: int, sms: int, dtype_bytes: int = 2, interpreter: bool = False) -> dict:
    """BLOCK_R, BLOCK_K, num_warps and the grid of one mode: the one place the launcher and efficiency() read them.
    MODE_SOFTMAX: one program per row (every SM busy for the 32-256 class-token rows per GPU; iBOT's thousands of
    rows in waves of one row per SM, whose pass 2 re-reads come from L2); MODE_COLMAX: one program per BLOCK_K
    prototypes (256 programs at K = 65536); MODE_COLUMN: COLUMN_PROGRAMS_PER_SM persistent programs per SM over
    `items` work items: per group of group_rows rows (COLUMN_GROUP_BYTES of logits, whole BLOCK_R row blocks),
    stats_items (row blocks x chunks of CHUNK prototypes, about COLUMN_ITEM_BYTES each) and column_items (BLOCK_K
    prototypes each); `sync` int32 counters."""
    if mode == MODE_SOFTMAX:
        block_k = INTERPRETER_BLOCK_K if interpreter else GPU_BLOCK_K
        return {"BLOCK_R": 1, "BLOCK_K": block_k, "num_warps": SOFTMAX_NUM_WARPS, "grid": (R,)}
    if mode == MODE_COLMAX:
        block_r, block_k = INTERPRETER_COLMAX_BLOCKS if interpreter else GPU_COLMAX_BLOCKS
        return {"BLOCK_R": block_r, "BLOCK_K": block_k, "num_warps": GPU_NUM_WARPS, "grid": (triton.cdiv(K, block_k),)}
    block_r, block_k = INTERPRETER_COLUMN_BLOCKS if interpreter else GPU_COLUMN_BLOCKS
    chunk = max(block_k, COLUMN_ITEM_BYTES // (block_r * dtype_bytes) // block_k * block_k)
    chunk = min(2 * block_k if interpreter else chunk, pad(K, block_k))
    chunks = triton.cdiv(K, chunk)
    group_rows = min(pad(R, block_r), max(block_r, COLUMN_GROUP_BYTES // (K * dtype_bytes) // block_r * block_r))
    groups = triton.cdiv(R, group_rows)
    stats_items, column_items = group_rows // block_r * chunks, triton.cdiv(K, block_k)
    items = groups * (stats_items + column_items)
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "num_warps": GPU_NUM_WARPS, "CHUNK": chunk, "chunks": chunks,
            "BLOCK_C": triton.next_power_of_2(chunks), "group_rows": group_rows, "groups": groups,
            "stats_items": stats_items, "column_items": column_items, "items": items,
            "sync": 3 + 2 * groups + column_items, "grid": (min(items, COLUMN_PROGRAMS_PER_SM * sms),)}


# A torch custom op: opaque to torch.compile (0 graph breaks; the fake function gives output shapes).
@torch.library.custom_op(op_name("dino_teacher"), mutates_args=())
def _launch(mode: int, logits: torch.Tensor, scale: torch.Tensor, vec: torch.Tensor | None = None,
            center: bool = False) -> torch.Tensor:
    """Run one mode over logits (R, K) with vec (K,) fp32: the centre c and scale = 1 / tau (center), or the
    bias b and scale = log2(e) / tau (base 2), scale as _common.scalar_input gives it. Returns probs (R, K), or
    the column statistics: (K,) for MODE_COLUMN, (max (K,), sum (K,)) stacked as (2, K) for MODE_COLMAX (no vec)."""
    scale = scale.item()  # a CPU tensor: no device sync
    R, K = logits.shape
    device = logits.device
    plan = launch_plan(mode, R, K, sm_count(device), logits.element_size(), interpreted(logits))
    tiles = {"BLOCK_R": plan["BLOCK_R"], "BLOCK_K": plan["BLOCK_K"], "num_warps": plan["num_warps"]}
    if mode == MODE_SOFTMAX:
        out = torch.empty((R, K), dtype=torch.float32, device=device)
        launch_kernel(_softmax_kernel, plan["grid"], logits, vec, out, R, K, scale, CENTER=center, **tiles)
        return out
    if mode == MODE_COLMAX:
        out = torch.empty((2, K), dtype=torch.float32, device=device)
        launch_kernel(_colmax_kernel, plan["grid"], logits, out, R, K, scale, **tiles)
        return out
    stats = torch.empty((R, plan["chunks"], 2), dtype=torch.float32, device=device)
    norm = torch.empty((R,), dtype=torch.float32, device=device)
    sync = torch.zeros((plan["sync"],), dtype=torch.int32, device=device)
    out = torch.empty((K,), dtype=torch.float32, device=device)
    launch_kernel(_column_kernel, plan["grid"], logits, vec, stats, norm, sync, out, R, K, plan["groups"],
                  plan["group_rows"], plan["CHUNK"], plan["chunks"], scale, BLOCK_C=plan["BLOCK_C"],
                  MAX_SPINS=COLUMN_MAX_SPINS, **tiles)
    return out


@_launch.register_fake
def _(mode, logits, scale, vec=None, center=False):
    R, K = logits.shape
    shape = {MODE_SOFTMAX: (R, K), MODE_COLMAX: (2, K), MODE_COLUMN: (K,)}[mode]
    return logits.new_empty(shape, dtype=torch.float32)


def _validate(teacher_logits: torch.Tensor, temperature: float) -> None:
    """R = 0 rows is allowed (a rank with no masked patch in iBOT); K = 0 prototypes is not."""
    check_tensor("teacher_logits", teacher_logits, 2)
    if teacher_logits.shape[1] == 0:
        raise ValueError(f"teacher_logits (R, K) must have at least one prototype, got shape "
                         f"{tuple(teacher_logits.shape)}")
    check_positive("teacher_temp", temperature)
    check_contiguous(teacher_logits=teacher_logits)


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((teacher_logits - center) / temperature) over the last dim, fp32 (reference.centered_softmax).

    teacher_logits (..., K) fp32/fp16/bf16; center with K elements (DINOv2's (1, K) or (1, 1, K) buffer).
    """
    validate_centered_softmax(teacher_logits, center, temperature)
    K = teacher_logits.shape[-1]
    logits = teacher_logits.reshape(-1, K)
    if logits.shape[0] == 0:  # no rows (iBOT with no masked patch): DINOv2's empty softmax
        return teacher_logits.new_empty(teacher_logits.shape, dtype=torch.float32)
    center = center.detach().reshape(K).float().contiguous()
    return _launch(MODE_SOFTMAX, logits.detach(), scalar_input(1.0 / temperature), center, center=True).reshape(
        teacher_logits.shape)


def validate_centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> None:
    """centered_softmax's input checks (also its torch backend's, in dino.py)."""
    check_tensor("teacher_logits", teacher_logits, None)
    check_tensor("center", center, None, teacher_logits.device, FLOAT_DTYPES + (torch.float64,))
    K = teacher_logits.shape[-1]
    if K == 0:
        raise ValueError(f"teacher_logits (..., K) must have at least one prototype, got shape "
                         f"{tuple(teacher_logits.shape)}")
    if center.numel() != K or center.shape[-1] != K or any(d != 1 for d in center.shape[:-1]):
        raise ValueError(f"center must be (K,), (1, K) or (1, 1, K) with K={K} (teacher_logits "
                         f"{tuple(teacher_logits.shape)}), got shape {tuple(center.shape)}")
    check_positive("teacher_temp", temperature)
    _validate(teacher_logits.reshape(-1, K), temperature)


def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3,
                   all_reduce=None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets, computed in log domain (reference.sinkhorn_knopp).

    teacher_logits (R, K) fp32/fp16/bf16, this rank's rows. all_reduce(tensor, op) with op "max" or
    "sum" reduces in place over ranks (None: one process). Returns fp32 (R, K) rows summing to 1.
    DINOv2's sample count B (R x world size, or iBOT's n_masked_patches_tensor) only scales whole
    columns that the next normalisation divides out, so it does not enter.
    """
    validate_sinkhorn_knopp(teacher_logits, temperature, n_iterations, all_reduce)
    n_iterations = int(n_iterations)
    logits = teacher_logits.detach()
    if logits.shape[0] == 0:  # a rank with no rows (iBOT: no masked patch) still joins every all-reduce
        return reference.sinkhorn_knopp(logits, float(temperature), n_iterations, all_reduce)
    scale = scalar_input(LOG2E / temperature)
    col_max, col_sum = _launch(MODE_COLMAX, logits, scale)
    bias = sinkhorn_first_shift(col_max, col_sum, all_reduce) * LOG2E
    for _ in range(n_iterations - 1):
        mass = _launch(MODE_COLUMN, logits, scale, bias)
        if all_reduce is not None:
            all_reduce(mass, "sum")
        # where t / tau reaches ~1e10, fp32 rounds the folded potential by more than 126 doublings and a column can
        # sum to 0: its potential stops at the smallest normal mass instead of +inf (NaN rows); a NaN mass (a
        # column wait that gave up) stays NaN
        bias = bias - torch.log2(mass.clamp_min(torch.finfo(torch.float32).tiny))
    return _launch(MODE_SOFTMAX, logits, scale, bias)


def validate_sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3,
                            all_reduce=None) -> None:
    """sinkhorn_knopp's input checks (also its torch backend's, in dino.py)."""
    _validate(teacher_logits, temperature)
    check_size("n_iterations", n_iterations)  # DINOv2 uses 3
    if all_reduce is not None and not callable(all_reduce):
        raise TypeError(f"all_reduce must be a function all_reduce(tensor, op) or None, got "
                        f"{type(all_reduce).__name__} {all_reduce!r}")


def roofline_cost(R: int, K: int, dtype_bytes: int = 2, n_iterations: int = 0) -> dict[str, int]:
    """Minimum cost of the centred softmax (n_iterations=0) or of Sinkhorn-Knopp with n_iterations:
    R teacher rows, K prototypes, dtype_bytes per logit. Each step needs the previous one's result over all
    rows and prototypes, so the logits are read once per step: COLMAX, n - 1 column steps, the softmax.
    FLOPs per element: softmax 7, column step 8, column logsumexp 5 (efficiency())."""
    if n_iterations == 0:
        return {"flops": 7 * R * K, "bytes": R * K * dtype_bytes + 4 * R * K + 4 * K}
    steps = n_iterations + 1
    return {"flops": (5 + 8 * (n_iterations - 1) + 7) * R * K,
            "bytes": steps * R * K * dtype_bytes + 4 * R * K + 8 * K * steps}


# DINOv2's calls per GPU: the class-token teacher (2 global views x 64 samples = 128 rows) and
# iBOT's masked patch tokens: half of the 128 global crops masked at a ratio uniform in 0.1-0.5 of
# their 196 patches, 64 x 0.3 x 196 ~ 3763 rows on average (6272 at most; it was 8192, more than DINOv2 can
# produce), here 3760, a multiple of 16; K = 65536 prototypes.
PRODUCTION_ROWS = (128, 3760)
PRODUCTION_K = 65536
# The column step's plan in the compile report: H100's SMs (A100's 108 give the same BLOCK_C).
PRODUCTION_SMS = GPUS[BY_CAPABILITY[90]]["sms"]


def efficiency(mode: int, R: int, K: int, dtype_bytes: int, sms: int, concurrent: int, l2_bytes: int,
               center: bool = False) -> dict:
    """Useful / executed FLOPs and minimum / moved HBM bytes of one mode from launch_plan's tiles and grid
    (docs/kernels.md, "Efficiency counts"), torch's K-vector and partial-sum ops included. Useful: one read
    of the logits and one pass of the math per element (softmax: FMA 2, max, subtract, exp, row sum,
    normalise = 7; column step: the same with the normalisation a multiply-add into the column sum = 8;
    column logsumexp: multiply, max, subtract, exp, sum = 5). Executed (masked lanes included): softmax 6 in
    pass 1 and, in pass 2, 1 (a multiply) on the two kept tiles, 4 (Sinkhorn) or 5 (centred: its normalisation
    is a multiply) on the recomputed ones; column step 11, column logsumexp 5 per element, plus the online
    rescale (max, subtract, exp, multiply, add) per row (softmax, column step) or column (colmax) and tile, and
    the softmax's per-row normaliser and kept-tile factors."""
    plan = launch_plan(mode, R, K, sms, dtype_bytes)
    block_r, block_k, programs, e = plan["BLOCK_R"], plan["BLOCK_K"], plan["grid"][0], dtype_bytes
    padded = pad(R, block_r) * pad(K, block_k)
    tiles = (pad(R, block_r) // block_r) * (pad(K, block_k) // block_k)
    rows = lambda b: min(block_r, R - b * block_r)  # noqa: E731
    if mode == MODE_SOFTMAX:  # program b: one row, all K, the tiles after the kept two read twice, probs written
        sizes = {"logits": R * K * e, "probs": 4 * R * K, "vec": 4 * K}
        touches = lambda b, _y, _z: [("vec", 0, 4 * K), ("logits", b, rows(b) * K * e),  # noqa: E731
                                     ("probs", b, 4 * rows(b) * K)]
        moved = hbm_bytes(plan["grid"], touches, sizes, concurrent, l2_bytes)
        kept = 2 * block_k
        if min(programs, concurrent) * block_r * K * e > l2_bytes // 2:  # pass 2 of a wave's rows misses L2
            moved += R * max(0, K - kept) * e
        floor = {"flops": 7 * R * K, "bytes": R * K * e + 4 * R * K + 4 * K}
        k_tiles = max(2, pad(K, block_k) // block_k)  # tile 1 runs (masked) even where K fits in tile 0
        executed = R * (6 * k_tiles * block_k + kept + (5 if center else 4) * (k_tiles - 2) * block_k
                        + 5 * k_tiles + (7 if center else 6))
    elif mode == MODE_COLUMN:
        moved, executed = _column_counts(plan, R, K, e, l2_bytes)
        floor = {"flops": 8 * R * K, "bytes": R * K * e + 8 * K}
    else:  # program c: a chunk of columns over all rows
        cols = lambda c: min(block_k, K - c * block_k)  # noqa: E731
        sizes = {"logits": R * K * e, "out": 8 * K}
        touches = lambda c, _y, _z: [("logits", c, R * cols(c) * e), ("out", c, 8 * cols(c))]  # noqa: E731
        # + torch: the first bias from the column statistics (sinkhorn_first_shift: log, add, negate; * log2(e))
        moved = hbm_bytes(plan["grid"], touches, sizes, concurrent, l2_bytes) + 36 * K
        floor = {"flops": 5 * R * K, "bytes": R * K * e + 8 * K}
        executed = 5 * padded + 5 * block_k * tiles + 4 * K
    # every mode steps (rows, BLOCK_K) tiles of logits: the loads a program has in flight per loop step
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved, "flop_kind": "fp32", "programs": programs, "step_bytes": block_r * block_k * e}


def _column_counts(plan: dict, R: int, K: int, e: int, l2_bytes: int) -> tuple[int, int]:
    """Moved bytes and executed FLOPs of the column step (one launch, then torch's bias update). Bytes: the logits
    once, and once more if a group's column items cannot find its rows in L2, i.e. if what is read between a row's
    two reads (its group, the next group, one statistics item per program) is over half of L2; the chunk
    statistics written and read back by the combine (8 bytes per row and chunk each way), the normalisers written
    and read (4 bytes per row each), the bias and the sums (L2-resident: 4 K each once), torch's bias - log2(sums)
    (12 K). Executed: 6 per padded element and the online rescale (5 per row and tile) in the statistics items,
    whose row blocks fill every group (the last group's past R run masked); the combine (max, subtract, exp2,
    multiply-add over BLOCK_C slots; log2, add) once per row; 5 per padded element (FMA, subtract, exp2, column
    add) in the column items and one add per group and prototype into the sums; torch's subtract and log2 per
    prototype. The timeout's NaN fill (no wait gives up in a working schedule) is not counted."""
    block_r, block_k, group_rows, chunk = plan["BLOCK_R"], plan["BLOCK_K"], plan["group_rows"], plan["CHUNK"]
    window = 2 * group_rows * K * e + plan["grid"][0] * block_r * chunk * e
    reread = window > l2_bytes // 2
    moved = R * K * e * (2 if reread else 1) + 16 * R * plan["chunks"] + 8 * R + 8 * K + 12 * K
    rows, tiles = pad(R, block_r), pad(K, block_k) // block_k
    stats_rows = plan["groups"] * group_rows  # every group has its statistics items, masked past R in the last
    executed = (6 * stats_rows * tiles * block_k + 5 * stats_rows * tiles + 5 * rows * tiles * block_k
                + rows * (5 * plan["BLOCK_C"] + 2) + plan["groups"] * K + 2 * K)
    return moved, executed


# Integers that are multiples of 16 at the presets' shapes (R = 128 / 64 rows, iBOT's 3760, K = 65536, GROUP_ROWS
# 32 / 16, CHUNK a multiple of BLOCK_K); GROUPS and CHUNKS are not in general. The compile report compiles the
# variant the JIT builds.
MULTIPLES_OF_16 = ("R", "K", "GROUP_ROWS", "CHUNK")


def compile_specs() -> list[dict]:
    """Every shipped configuration (logit dtype x kernel x production rows) for the AOT compile report."""
    specs = []
    common = {"num_warps": GPU_NUM_WARPS, "num_stages": 3, "uses_dot": False}
    for dtype, ptr in TRITON_DTYPE.items():
        name, e = str(dtype).removeprefix("torch."), dtype.itemsize
        counts = lambda mode, rows, e=e, **kw: at_presets(  # noqa: E731  DINOv2's calls on any GPU
            efficiency, lambda samples: {}, mode=mode, R=rows, K=PRODUCTION_K, dtype_bytes=e, **kw)
        scalars = {"R": "i32", "K": "i32", "scale": "fp32"}
        for tag, center in (("centered_softmax", True), ("sk_softmax", False)):
            for rows in PRODUCTION_ROWS:
                specs.append({
                    **common, "num_warps": SOFTMAX_NUM_WARPS, "name": f"dino_teacher_{tag}_{name}_{rows}rows",
                    "fn": _softmax_kernel,
                    "signature": {"logits_ptr": ptr, "vec_ptr": "*fp32", "out_ptr": "*fp32", **scalars},
                    "constexprs": {"CENTER": center, "BLOCK_R": 1, "BLOCK_K": GPU_BLOCK_K},
                    "efficiency": counts(MODE_SOFTMAX, rows, center=center),
                })
        colmax_r, colmax_k = GPU_COLMAX_BLOCKS
        for rows in PRODUCTION_ROWS:
            plan = launch_plan(MODE_COLUMN, rows, PRODUCTION_K, PRODUCTION_SMS, e)
            specs.append({
                **common, "name": f"dino_teacher_sk_column_{name}_{rows}rows", "fn": _column_kernel,
                "signature": {"logits_ptr": ptr, "bias_ptr": "*fp32", "stats_ptr": "*fp32", "norm_ptr": "*fp32",
                              "sync_ptr": "*i32", "out_ptr": "*fp32", "R": "i32", "K": "i32", "GROUPS": "i32",
                              "GROUP_ROWS": "i32", "CHUNK": "i32", "CHUNKS": "i32", "scale": "fp32"},
                "constexprs": {"BLOCK_R": plan["BLOCK_R"], "BLOCK_K": plan["BLOCK_K"], "BLOCK_C": plan["BLOCK_C"],
                               "MAX_SPINS": COLUMN_MAX_SPINS},
                "efficiency": counts(MODE_COLUMN, rows),
            })
            specs.append({
                **common, "name": f"dino_teacher_sk_colmax_{name}_{rows}rows", "fn": _colmax_kernel,
                "signature": {"logits_ptr": ptr, "out_ptr": "*fp32", **scalars},
                "constexprs": {"BLOCK_R": colmax_r, "BLOCK_K": colmax_k},
                "efficiency": counts(MODE_COLMAX, rows),
            })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
