"""Dual-centering teacher softmax with the batch statistics of both centre updates: no partials, no atomics.

Math (reference.teacher_softmax): for teacher logits t (R, K), centres c, c_h (K,),
    probs = softmax((t - alpha c - (1 - alpha) c_h) / temperature)        (R, K) fp32
    logit_sum = sum_r t[r],  high_logit_sum = sum_r high_weight[r] t[r]    (K,) fp32
The caller all-reduces the two sums once per step and feeds them to DualCenteringSoftmax.update.

Kernel: one launch per group of rows (GROUP_BYTES of logits, so that they stay in L2 within the launch),
each of n row programs followed by K / COL_BLOCK_K column programs. Row program r owns row r: pass 1
streams its K logits with an online max and rescaled sum of exp, pass 2 re-reads the row (256 KB of fp32
at K = 65536, from L2) and writes exp(x - max) / sum. Column program c owns a chunk of COL_BLOCK_K
prototypes and sums t and high_weight * t down the group's rows, adding the earlier groups' sums, so each
column sum is complete after the last launch (no partials to write and reduce). Both roles read the same
logits within one launch, so the logits cross HBM once. The presets' 128 rows are one launch in bf16 (16
MiB) and two in fp32. The logits are centred and divided by the temperature in the same order as the
reference (t - alpha c - (1 - alpha) c_h, then / tau): with tiny temperatures the exponent is in the
hundreds and a rescaled exp2 form was measured 7x further from the fp64 oracle than PyTorch (hypothesis
case R=9, K=195, alpha=0). No atomics: results are bitwise reproducible for a fixed shape, which exact
resume needs.

Cost per call (e = bytes per logit; counts at the production shape in efficiency()):
    useful FLOPs ~ 11 R K (centre 2, scale, max, shift, exp, sum, normalise, three for the column sums)
    executed FLOPs ~ 16 R K (pass 2 recomputes the centred exponent: 6 per element)
    minimum HBM bytes = R K e (read logits) + 4 R K (write probs) + 8 K (read centres) + 8 K (sums)
    moved = the minimum + 4 R (high_weight) + 16 K per later group (the sums read back) while a group's
    logits fit in half of L2; one group past MAX_GROUPS (thousands of rows) reads them three times. The
    first design, a column-chunk stats kernel and a probs kernel in two launches, read the logits twice (1.51x
    for fp32, 1.35x for 16-bit logits); one launch for all 128 fp32 rows (32 MB) relied on L2 holding more
    than half of it. At R = 128 the row programs fill 128 of an H100's 132 SMs (fp32: 64, beside the 128
    column programs); with a few rows (R < SMs) the row programs are the critical path.
"""



import torch
import triton
import triton.language as tl

from ._common import (
    PRESET_SAMPLES,
    TRITON_DTYPE,
    aligned_at_production,
    at_presets,
    check_alpha,
    check_contiguous,
    check_positive,
    check_tensor,
    hbm_bytes,
    interpreted,
    launch_kernel,
    op_name,
    pad,
    scalar_input,
)

# H100/A100 config: the op is bandwidth bound. A row program streams (1, 8192) tiles over 8 warps (32 per
# thread: 16 KB of bf16 logits a step, as Little's law asks of the one row program an SM holds at R = 128; the
# (1, 2048) tiles before kept 12 KB in flight per SM with the column programs, under the H100's ~15 KB); a column
# program steps (8, 512) tiles (16 per thread) down its rows. K / 512 = 128 column programs at K = 65536 (see
# compile_specs and kernels.compile_report: 63-64 registers, no spills).
GPU_PLAN = {"ROW_BLOCK_K": 8192, "COL_BLOCK_R": 8, "COL_BLOCK_K": 512, "num_warps": 8}
# The interpreter pays per op: small enough that the test shapes take several row chunks (online rescale).
INTERPRETER_PLAN = {"ROW_BLOCK_K": 128, "COL_BLOCK_R": 4, "COL_BLOCK_K": 64, "num_warps": 4}
# Rows per launch: a group's logits are read three times (pass 1, pass 2, the column programs), and only the first
# read crosses HBM while the group fits in half of L2 (the compile report's residency rule; A100 40 MB, H100 50 MB).
# 16 MiB is 128 bf16 or 64 fp32 rows of 65536 prototypes; past MAX_GROUPS groups (thousands of rows) one launch.
GROUP_BYTES = 16 << 20
MAX_GROUPS = 4


@triton.jit
def _centred(logits_ptr, shifts_ptr, row, cols, col_mask, K, temperature):
    """x = (t - alpha c - (1 - alpha) c_h) / tau of one row's chunk (BLOCK_K,), fp32, -inf in masked columns;
    shifts (2, K) holds alpha c and (1 - alpha) c_h, rounded as the reference rounds them."""
    t = tl.load(logits_ptr + row.to(tl.int64) * K + cols, mask=col_mask, other=0.0).to(tl.float32)
    c = tl.load(shifts_ptr + cols, mask=col_mask, other=0.0)
    c_high = tl.load(shifts_ptr + K + cols, mask=col_mask, other=0.0)
    return tl.where(col_mask, (t - c - c_high) / temperature, float("-inf"))


@triton.jit
def _teacher_softmax_kernel(
    logits_ptr, shifts_ptr, high_weight_ptr, probs_ptr, logit_sum_ptr, high_sum_ptr, R, K, temperature, accumulate,
    ROW_BLOCK_K: tl.constexpr, COL_BLOCK_R: tl.constexpr, COL_BLOCK_K: tl.constexpr,
):
    """Programs 0..R-1: probs of one row (two passes over K). Programs R..: the column sums of t and
    high_weight * t over all R rows for one chunk of COL_BLOCK_K prototypes -> logit_sum, high_sum (K,),
    added to what they hold when accumulate != 0 (the launch of a later group of rows)."""
    pid = tl.program_id(0)
    if pid < R:
        m = tl.full([1], float("-inf"), tl.float32)
        row_sum = tl.zeros([1], tl.float32)
        for k0 in range(0, K, ROW_BLOCK_K):
            cols = k0 + tl.arange(0, ROW_BLOCK_K)
            x = _centred(logits_ptr, shifts_ptr, pid, cols, cols < K, K, temperature)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a first tile all -inf: exp(-inf + inf) was NaN
            row_sum = row_sum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        inv_sum = 1.0 / row_sum
        for k0 in range(0, K, ROW_BLOCK_K):
            cols = k0 + tl.arange(0, ROW_BLOCK_K)
            col_mask = cols < K
            x = _centred(logits_ptr, shifts_ptr, pid, cols, col_mask, K, temperature)
            tl.store(probs_ptr + pid.to(tl.int64) * K + cols, tl.exp(x - m) * inv_sum, mask=col_mask)
    else:
        cols = (pid - R) * COL_BLOCK_K + tl.arange(0, COL_BLOCK_K)
        col_mask = cols < K
        logit_sum = tl.zeros([COL_BLOCK_K], tl.float32)
        high_sum = tl.zeros([COL_BLOCK_K], tl.float32)
        for r0 in range(0, R, COL_BLOCK_R):
            rows = r0 + tl.arange(0, COL_BLOCK_R)
            row_mask = rows < R
            t = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            high_weight = tl.load(high_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            logit_sum += tl.sum(t, axis=0)  # masked rows load t = 0
            high_sum += tl.sum(t * high_weight[:, None], axis=0)
        if accumulate != 0:
            logit_sum += tl.load(logit_sum_ptr + cols, mask=col_mask, other=0.0)
            high_sum += tl.load(high_sum_ptr + cols, mask=col_mask, other=0.0)
        tl.store(logit_sum_ptr + cols, logit_sum, mask=col_mask)
        tl.store(high_sum_ptr + cols, high_sum, mask=col_mask)


def launch_plan(R: int, K: int, dtype_bytes: int = 4, interpreter: bool = False) -> dict:
    """Tiles, warps, row groups and grid of the kernel: the one place the launcher and efficiency() read them.
    grid is a launch of group_rows rows (the last group may hold fewer)."""
    plan = INTERPRETER_PLAN if interpreter else GPU_PLAN
    group_rows = max(1, GROUP_BYTES // (K * dtype_bytes))
    if triton.cdiv(R, group_rows) > MAX_GROUPS:
        group_rows = R
    group_rows, chunks = min(group_rows, R), triton.cdiv(K, plan["COL_BLOCK_K"])
    return {**plan, "group_rows": group_rows, "groups": triton.cdiv(R, group_rows), "chunks": chunks,
            "grid": (group_rows + chunks,)}


def validate(teacher_logits, center, center_high, high_weight, temperature, alpha) -> None:
    """A clear error for any input the kernel cannot take, before anything is launched (the torch backend's
    checks too: modules, dino.py)."""
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
    check_contiguous(teacher_logits=teacher_logits, center=center, center_high=center_high, high_weight=high_weight)


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
    validate(teacher_logits, center, center_high, high_weight, temperature, alpha)
    return _teacher_softmax_op(teacher_logits.detach(), center.detach(), center_high.detach(), high_weight.detach(),
                               scalar_input(temperature), float(alpha))


# A torch custom op: opaque to torch.compile (0 graph breaks; the fake function gives output shapes),
# so the same graph runs the compiled kernel on a GPU and the interpreter on CPU tensors.
@torch.library.custom_op(op_name("teacher_softmax"), mutates_args=())
def _teacher_softmax_op(teacher_logits: torch.Tensor, center: torch.Tensor, center_high: torch.Tensor,
                        high_weight: torch.Tensor, temperature: torch.Tensor,
                        alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature = temperature.item()  # a CPU tensor: no device sync
    R, K = teacher_logits.shape
    plan = launch_plan(R, K, teacher_logits.element_size(), interpreted(teacher_logits))
    device = teacher_logits.device
    shifts = torch.empty((2, K), dtype=torch.float32, device=device)
    torch.mul(center.float(), alpha, out=shifts[0])
    torch.mul(center_high.float(), 1.0 - alpha, out=shifts[1])
    probs = torch.empty((R, K), dtype=torch.float32, device=device)
    logit_sum = torch.empty(K, dtype=torch.float32, device=device)
    high_sum = torch.empty(K, dtype=torch.float32, device=device)
    tiles = {k: v for k, v in plan.items() if k in ("ROW_BLOCK_K", "COL_BLOCK_R", "COL_BLOCK_K", "num_warps")}
    for first in range(0, R, plan["group_rows"]):  # one launch per group, in order: the sums accumulate
        rows = slice(first, first + plan["group_rows"])
        n = min(plan["group_rows"], R - first)
        launch_kernel(_teacher_softmax_kernel, (n + plan["chunks"],), teacher_logits[rows], shifts, high_weight[rows],
                      probs[rows], logit_sum, high_sum, n, K, temperature, int(first > 0), **tiles)
    return probs, logit_sum, high_sum


@_teacher_softmax_op.register_fake
def _(teacher_logits, center, center_high, high_weight, temperature, alpha):
    R, K = teacher_logits.shape
    new = teacher_logits.new_empty
    return new((R, K), dtype=torch.float32), new((K,), dtype=torch.float32), new((K,), dtype=torch.float32)


def roofline_cost(R: int, K: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Useful FLOPs and minimum HBM bytes of one call: R teacher rows, K prototypes, dtype_bytes per logit."""
    return {"flops": 11 * R * K, "bytes": R * K * dtype_bytes + 4 * R * K + 16 * K}


def production_shape(samples: dict) -> dict:
    """The presets' call (ViT-B, per GPU): 2 global views x the samples = teacher rows, K = 65536."""
    return {"R": 2 * samples["base"], "K": 65536}


PRODUCTION_SHAPE = production_shape(PRESET_SAMPLES[90])  # vitb_h100's: 128 rows


def efficiency(kernel: str, R: int, K: int, dtype_bytes: int, sms: int, concurrent: int, l2_bytes: int) -> dict:
    """Counts of the whole op (torch's two centre scalings and the kernel's launches) from launch_plan's tiles,
    groups and grid (docs/kernels.md, "Efficiency counts"). Per launch, a row program touches its row and writes
    its probs, a column program its chunk of every row of the group; the group's logits cross HBM once when they
    fit in half of L2 (hbm_bytes's residency rule), else three times (pass 1, pass 2, the column programs: they
    are far apart in time for a row, so no wave rule is credited). Later groups' column programs also read the
    sums they add to."""
    plan = launch_plan(R, K, dtype_bytes)
    bk, br, chunks, e = plan["COL_BLOCK_K"], plan["COL_BLOCK_R"], plan["chunks"], dtype_bytes
    cols = lambda c: min(bk, K - c * bk)  # noqa: E731
    moved, executed, programs = 16 * K, 2 * K, plan["grid"][0]  # torch: read c, c_h; write the shifts
    for first in range(0, R, plan["group_rows"]):
        n = min(plan["group_rows"], R - first)

        def touches(pid, _y, _z, n=n, again=first > 0):
            if pid < n:  # row program: both shifts, its row of probs
                return [("shifts", c, 8 * cols(c)) for c in range(chunks)] + [("probs", pid, 4 * K)]
            c = pid - n  # column program: high_weight, its chunk of both sums (read back by later groups)
            return [("high_weight", 0, 4 * n), ("sums", c, 8 * cols(c) * (2 if again else 1))]

        sizes = {"shifts": 8 * K, "probs": 4 * n * K, "high_weight": 4 * n, "sums": 8 * K}
        logits = n * K * e
        moved += hbm_bytes((n + chunks,), touches, sizes, concurrent, l2_bytes)
        moved += logits if logits <= l2_bytes // 2 else 3 * logits
        programs = min(programs, n + chunks)
        # pass 1: centre (2 subtractions, the division), max, shift, exp, sum; pass 2: centre, shift, exp,
        # normalise; column programs: sum and multiply-add
        executed += 13 * n * pad(K, plan["ROW_BLOCK_K"]) + 3 * pad(n, br) * chunks * bk
    floor = roofline_cost(R, K, e)
    # loads in flight per program and loop step (the compile report's Little's law), averaged over the first
    # launch's row programs (a ROW_BLOCK_K chunk of logits; the centres come from L2) and column programs
    n = plan["group_rows"]
    step = (n * plan["ROW_BLOCK_K"] + chunks * br * bk) * e / (n + chunks)
    return {"useful_flops": floor["flops"], "executed_flops": executed, "min_bytes": floor["bytes"],
            "moved_bytes": moved, "flop_kind": "fp32", "programs": programs, "step_bytes": step}


# Integers that are multiples of 16 at the production shape (R = 128 rows, K = 65536; a later group's rows start
# at a multiple of K): with them the JIT vectorises the loads (the compile report compiles that variant).
MULTIPLES_OF_16 = ("R", "K")


def compile_specs() -> list[dict]:
    """Every shipped configuration (one per logit dtype) for the AOT compile report."""
    plan = launch_plan(1, 1)
    specs = []
    for dtype, ptr in TRITON_DTYPE.items():
        specs.append({
            "name": f"teacher_softmax_{str(dtype).removeprefix('torch.')}", "fn": _teacher_softmax_kernel,
            "constexprs": {k: plan[k] for k in ("ROW_BLOCK_K", "COL_BLOCK_R", "COL_BLOCK_K")},
            "num_warps": plan["num_warps"], "num_stages": 3, "uses_dot": False,
            "efficiency": at_presets(efficiency, production_shape, kernel="op", dtype_bytes=dtype.itemsize),
            "signature": {"logits_ptr": ptr, "shifts_ptr": "*fp32", "high_weight_ptr": "*fp32", "probs_ptr": "*fp32",
                          "logit_sum_ptr": "*fp32", "high_sum_ptr": "*fp32", "R": "i32", "K": "i32",
                          "temperature": "fp32", "accumulate": "i32"},
        })
    for spec in specs:
        spec["divisible_by_16"] = aligned_at_production(spec["signature"], MULTIPLES_OF_16)
    return specs
