"""DINOv2 drop-in losses (terrafm_kernels.dino) against our float64 re-implementation of DINOv2's semantics.

Kernels run in the Triton interpreter on CPU (compiled on CUDA). Neither kernel family uses tl.dot, but
bf16 is checked on a GPU only (gpu_check), like the other loss kernels. Row counts stay small at
K = 65536 so that the interpreter stays fast.
"""

import dinov2_oracle as oracle
import pytest
import torch
import torch.multiprocessing as mp
import triton
import triton.language as tl
from loss_oracle import assert_flash_tolerance

from terrafm_kernels import dino_student_ce, dino_teacher, reference
from terrafm_kernels._common import scalar_input
from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss

KS = [1271, 65536, 65537]
TEMPS = [0.04, 0.07]
# bf16 runs where there is a GPU (gpu_check): these kernels use no tl.dot, but the fused head's do
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rows(K: int, small: int = 5) -> int:
    return 2 if K > 4096 else small


def _logits(shape, scale, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype).to(device)


def _probs(shape, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 3, dim=-1).float().to(device)


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_center_teacher(K, temp, dtype, device):
    R = _rows(K)
    t = _logits((R, K), 50.0, dtype, device)
    loss = DINOLoss(K).to(device)
    loss.center.copy_(_logits((1, K), 5.0, torch.float32, device, seed=2))
    out = loss.softmax_center_teacher(t, teacher_temp=temp)
    want = oracle.centered_softmax(t.cpu(), loss.center.cpu(), temp)
    plain = oracle.centered_softmax(t.cpu(), loss.center.cpu(), temp, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (R, K)
    assert_flash_tolerance("centred softmax", out.cpu(), plain, want, 1e-6)


def test_ibot_softmax_center_teacher_keeps_shape(device):
    K = 300
    t = _logits((1, 7, K), 10.0, torch.float16, device)
    loss = iBOTPatchLoss(K).to(device)
    loss.center.copy_(_logits((1, 1, K), 2.0, torch.float32, device))
    out = loss.softmax_center_teacher(t, teacher_temp=0.07)
    assert out.shape == (1, 7, K)
    want = oracle.centered_softmax(t.cpu(), loss.center.cpu(), 0.07)
    assert_flash_tolerance("ibot centred softmax", out.cpu(), oracle.centered_softmax(
        t.cpu(), loss.center.cpu(), 0.07, torch.float32), want, 1e-6)


@pytest.mark.parametrize("center", [True, False])
def test_softmax_row_max_in_a_kept_or_a_recomputed_tile(center, device):
    """Pass 2 scales the two kept tiles' exponentials by exp(m_ref - m) / s and recomputes the rest: rows whose max
    lies in tile 0, tile 1 or the recomputed tail, and rows of near-equal logits, all agree with the oracle.
    Logits +-50 for the centred softmax, +-1 for Sinkhorn's (its potential keeps y near 0)."""
    K = 2 * dino_teacher.INTERPRETER_BLOCK_K + 1809
    size = 50.0 if center else 1.0
    t = _logits((7, K), size, torch.float32, device)
    for row, col in enumerate((5, dino_teacher.INTERPRETER_BLOCK_K + 7, K - 1)):
        t[row, col] = 1.5 * size
    t[3] = t[3] * 1e-3
    t[4, : K // 2] = -4 * size  # the kept tiles' exponentials underflow against the tail's max
    # -inf after / tau in the first tile, or both kept tiles under a row max far below 0: exp(-inf + inf) and
    # 0 * exp(-m) were NaN
    t[5, : dino_teacher.INTERPRETER_BLOCK_K] = -3e38
    t[6, : 2 * dino_teacher.INTERPRETER_BLOCK_K] = -3e38
    t[6, 2 * dino_teacher.INTERPRETER_BLOCK_K:] -= 30 * size
    if center:
        c = _logits((1, K), 5.0, torch.float32, device, seed=2)
        out = dino_teacher.centered_softmax(t, c, 0.04)
        want = oracle.centered_softmax(t.cpu(), c.cpu(), 0.04)
        plain = oracle.centered_softmax(t.cpu(), c.cpu(), 0.04, dtype=torch.float32)
    else:
        out = dino_teacher._launch(dino_teacher.MODE_SOFTMAX, t, scalar_input(dino_teacher.LOG2E / 0.04),
                                   torch.zeros(K, device=device))
        want = torch.softmax(t.cpu().double() / 0.04, dim=-1)
        plain = torch.softmax(t.cpu() / 0.04, dim=-1)
    assert torch.allclose(out.cpu().double().sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-5)
    assert_flash_tolerance("softmax by the row max's tile", out.cpu(), plain, want, 1e-6)


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("K", KS)
def test_sinkhorn_knopp_matches_dinov2_where_it_is_finite(K, temp, device):
    R = _rows(K, small=6)
    # |t / tau| <= 30: neither exp(t / tau) nor its quotient by the total overflows or underflows in fp32
    t = _logits((R, K), 30 * temp, torch.float32, device)
    out = DINOLoss(K).to(device).sinkhorn_knopp_teacher(t, teacher_temp=temp)
    want = oracle.sinkhorn_literal([t.cpu()], temp)[0]
    plain = oracle.sinkhorn_literal([t.cpu()], temp, dtype=torch.float32)[0]
    assert torch.isfinite(plain).all()
    assert_flash_tolerance("sinkhorn-knopp", out.cpu(), plain, want, 1e-6)
    # the log-domain float64 oracle used below where DINOv2 overflows is the same function
    assert torch.allclose(oracle.sinkhorn_log_f64(t.cpu(), temp), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("K", [1271, 65537])
def test_sinkhorn_knopp_stays_finite_where_dinov2_overflows(K, temp, device):
    R = _rows(K, small=6)
    t = _logits((R, K), 50.0, torch.float16, device)
    plain = oracle.sinkhorn_literal([t.cpu()], temp, dtype=torch.float32)[0]
    assert not torch.isfinite(plain).all()  # DINOv2 in fp32: exp(50 / tau) = inf, then NaN
    out = DINOLoss(K).to(device).sinkhorn_knopp_teacher(t, teacher_temp=temp).cpu()
    want = oracle.sinkhorn_log_f64(t.cpu(), temp)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double().sum(-1), torch.ones(R, dtype=torch.float64), atol=1e-5)
    # exponents of ~1250 in fp32 carry ~1e-4 absolute rounding, so each probability agrees to ~1e-4 relative
    # (1.4e-4 measured; an absolute 2e-3 let any row-normalised output pass: the probabilities are ~1e-5)
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("scale, temp, seed", [(1e10, 0.04, 0), (1.0, 1e-12, 0), (1e20, 0.04, 0), (1.0, 1e-30, 1)])
def test_sinkhorn_knopp_rows_stay_finite_at_extreme_logit_temperature_ratios(scale, temp, seed, device):
    """Where t / tau reaches ~1e10, fp32 rounds the folded column potentials by more than exp2 can span, so a column
    summed to 0 and its potential became +inf: every row NaN (validation accepts any positive temperature). fp32
    cannot carry the potentials' precision there (the fp32 reference drifts too), so the promise is finite rows
    summing to 1. At 1e-30 a row whose max is tied summed to 2: the normaliser m + log2(s) rounded log2(2) away."""
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)) * scale
    for out in (DINOLoss(16).to(device).sinkhorn_knopp_teacher(t.to(device), teacher_temp=temp).cpu(),
                iBOTPatchLoss(16).to(device).sinkhorn_knopp_teacher(t.to(device), temp,
                                                                    torch.tensor(8, device=device)).cpu()):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double().sum(-1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_knopp_many_rows_strided_programs(dtype, device):
    """Many row blocks in one group: the column step's 19 x 2 statistics items (8-row blocks, the last 6 rows;
    two 256-wide chunks, the last 44 wide), then 3 column items down 150 rows."""
    K, R = 300, 150
    plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, K, 4, dtype.itemsize, interpreter=True)
    assert (plan["groups"], plan["chunks"], plan["stats_items"], plan["column_items"]) == (1, 2, 38, 3)
    t = _logits((R, K), 1.2, dtype, device)
    out = dino_teacher.sinkhorn_knopp(t, 0.04, n_iterations=3)
    want = oracle.sinkhorn_literal([t.cpu()], 0.04)[0]
    plain = oracle.sinkhorn_literal([t.cpu()], 0.04, dtype=torch.float32)[0]
    assert_flash_tolerance("sinkhorn-knopp strided", out.cpu(), plain, want, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_knopp_few_rows_in_groups_and_chunks(dtype, device, monkeypatch):
    """Several groups: 3 groups of 8 rows (the last 6), each with its statistics items over 2 prototype chunks
    (the last 44 wide), its combine and its column items, whose sums add up in group order."""
    K, R = 300, 22
    monkeypatch.setattr(dino_teacher, "COLUMN_GROUP_BYTES", 10 * K * dtype.itemsize)
    plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, K, 4, dtype.itemsize, interpreter=True)
    assert (plan["groups"], plan["group_rows"], plan["chunks"]) == (3, 8, 2)
    t = _logits((R, K), 1.2, dtype, device)
    out = dino_teacher.sinkhorn_knopp(t, 0.04, n_iterations=3)
    want = oracle.sinkhorn_literal([t.cpu()], 0.04)[0]
    plain = oracle.sinkhorn_literal([t.cpu()], 0.04, dtype=torch.float32)[0]
    assert_flash_tolerance("sinkhorn-knopp groups", out.cpu(), plain, want, 1e-6)
    # the column sums of one step are bitwise the same call after call (no atomics in the arithmetic)
    bias = torch.zeros(K, dtype=torch.float32, device=device)
    scale = scalar_input(dino_teacher.LOG2E / 0.04)
    first = dino_teacher._launch(dino_teacher.MODE_COLUMN, t, scale, bias)
    assert torch.equal(first, dino_teacher._launch(dino_teacher.MODE_COLUMN, t, scale, bias))


@triton.jit
def _decode_items(out_ptr, GROUPS, stats_items, column_items, BLOCK: tl.constexpr):
    item = tl.arange(0, BLOCK)
    is_stats, group, index = dino_teacher._work_item(item, GROUPS, stats_items, stats_items + column_items)
    mask = item < GROUPS * (stats_items + column_items)
    tl.store(out_ptr + item * 3, is_stats.to(tl.int32), mask=mask)
    tl.store(out_ptr + item * 3 + 1, group, mask=mask)
    tl.store(out_ptr + item * 3 + 2, index, mask=mask)


@pytest.mark.parametrize("groups", [1, 2, 5])
def test_column_step_work_items_wait_only_on_earlier_ones(groups):
    """The column step's work order, decoded by the kernel's own function: every item of every group once; a
    group's column items after all its statistics items (they wait on them) and after the next group's (which
    stream in while the column items re-read the group from L2); column item c of group g after that of g - 1
    (the sums add up in group order). So an item waits only on items taken before it: no deadlock."""
    stats_items, column_items = 3, 2
    items = groups * (stats_items + column_items)
    out = torch.zeros((items, 3), dtype=torch.int32)
    _decode_items[(1,)](out, groups, stats_items, column_items, BLOCK=triton.next_power_of_2(items))
    order = [(bool(k), g, i) for k, g, i in out.tolist()]
    assert sorted(order) == sorted([(True, g, i) for g in range(groups) for i in range(stats_items)]
                                   + [(False, g, i) for g in range(groups) for i in range(column_items)])
    at = {item: n for n, item in enumerate(order)}
    for g in range(groups):
        last_stats = max(at[(True, g, i)] for i in range(stats_items))
        first_column = min(at[(False, g, i)] for i in range(column_items))
        assert last_stats < first_column
        if g + 1 < groups:
            assert max(at[(True, g + 1, i)] for i in range(stats_items)) < first_column
        if g > 0:
            assert all(at[(False, g - 1, i)] < at[(False, g, i)] for i in range(column_items))


def _column_launch(t, plan, sync, stats, norm, out, max_spins):
    """The column kernel with a given sync state (the launcher always starts from zeros)."""
    R, K = t.shape
    bias = torch.zeros(K, dtype=torch.float32, device=t.device)
    dino_teacher._column_kernel[plan["grid"]](
        t, bias, stats, norm, sync, out, R, K, plan["groups"], plan["group_rows"], plan["CHUNK"], plan["chunks"],
        dino_teacher.LOG2E / 0.04, BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"], BLOCK_C=plan["BLOCK_C"],
        MAX_SPINS=max_spins)


def _column_buffers(t, plan):
    R, K = t.shape
    return (torch.zeros((R, plan["chunks"], 2), dtype=torch.float32, device=t.device),
            torch.zeros(R, dtype=torch.float32, device=t.device), torch.zeros(K, dtype=torch.float32, device=t.device))


def test_column_step_writes_nan_instead_of_hanging_on_a_wait_that_never_ends(device):
    """Should a column item's flag never come (here: the counter starts past the statistics items, so no group is
    ever marked ready), its waits give up after MAX_SPINS polls and its sums are NaN, which the loss reports,
    where an endless spin would hang the job. sync ends [.., fail word, finished column items]."""
    R, K = 10, 300
    plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, K, 4, 4, interpreter=True)
    assert plan["groups"] == 1
    t = _logits((R, K), 1.2, torch.float32, device)
    stats, norm, out = _column_buffers(t, plan)
    sync = torch.zeros(plan["sync"], dtype=torch.int32, device=device)
    sync[0] = plan["stats_items"]
    _column_launch(t, plan, sync, stats, norm, out, max_spins=8)
    assert torch.isnan(out).all()
    assert sync[-2].item() == 1 and sync[-1].item() == plan["column_items"]  # the sticky fail word; all finished
    assert dino_teacher.COLUMN_MAX_SPINS >= 1 << 20  # seconds of polling on a GPU, not a real wait's microseconds


@pytest.mark.parametrize("failed", [0, 1])
def test_column_step_a_late_store_after_a_timeout_still_ends_nan(failed, device):
    """A wait that times out because an earlier item is slow, not dead: the timed-out item stores NaN, then the
    slow one stores finite sums over it. Emulated in the interpreter (one program runs items in order): the
    statistics and flags of a finished step, the fail word as a timed-out item left it, and the column items run
    again, storing finite sums. The last of them to finish fills NaN when the word is set, and leaves the sums
    bitwise alone when it is not."""
    R, K = 10, 300
    plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, K, 4, 4, interpreter=True)
    t = _logits((R, K), 1.2, torch.float32, device)
    stats, norm, out = _column_buffers(t, plan)
    sync = torch.zeros(plan["sync"], dtype=torch.int32, device=device)
    _column_launch(t, plan, sync, stats, norm, out, max_spins=8)
    reference = out.clone()
    assert torch.isfinite(reference).all() and sync[-2].item() == 0
    again = torch.zeros_like(sync)
    again[0] = plan["stats_items"]  # the column items only: the group is ready, its normalisers are in norm
    again[1:1 + 2 * plan["groups"]] = sync[1:1 + 2 * plan["groups"]]
    again[-2] = failed
    out.fill_(0.0)
    _column_launch(t, plan, again, stats, norm, out, max_spins=8)
    if failed:
        assert torch.isnan(out).all()
    else:
        assert torch.equal(out, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shipped_gpu_tiles_match_the_oracle(dtype, device, monkeypatch):
    """The GPU plans, which the interpreter runs here in place of its own tiles, on shapes ragged against them:
    the softmax's (1, 8192) steps (one row per program: two kept tiles, the second ragged; then two kept tiles
    and a ragged recomputed one), the column step's (8, 512) tiles in statistics chunks of 2048 (16-bit) or 1024
    (fp32) prototypes, the last ragged, over 3 groups of 16 rows (the last 5), the column max's (16, 256) tiles."""
    monkeypatch.setattr(dino_teacher, "interpreted", lambda tensor: False)
    for K in (9000, 2 * 8192 + 1000):
        t = _logits((2, K), 50.0, dtype, device)
        center = _logits((1, K), 5.0, torch.float32, device, seed=2)
        assert dino_teacher.launch_plan(dino_teacher.MODE_SOFTMAX, 2, K, 4)["BLOCK_K"] == 8192
        out = dino_teacher.centered_softmax(t, center, 0.04)
        want = oracle.centered_softmax(t.cpu(), center.cpu(), 0.04)
        plain = oracle.centered_softmax(t.cpu(), center.cpu(), 0.04, dtype=torch.float32)
        assert_flash_tolerance(f"centred softmax, GPU tiles, K={K}", out.cpu(), plain, want, 1e-6)
    K, R = 2900, 37
    monkeypatch.setattr(dino_teacher, "COLUMN_GROUP_BYTES", 20 * K * dtype.itemsize)
    plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, K, 4, dtype.itemsize)
    assert (plan["BLOCK_R"], plan["BLOCK_K"], plan["group_rows"], plan["groups"], plan["chunks"]) == (
        8, 512, 16, 3, 2 if dtype.itemsize == 2 else 3)
    t = _logits((R, K), 1.2, dtype, device)
    out = dino_teacher.sinkhorn_knopp(t, 0.04, n_iterations=3)
    want = oracle.sinkhorn_literal([t.cpu()], 0.04)[0]
    plain = oracle.sinkhorn_literal([t.cpu()], 0.04, dtype=torch.float32)[0]
    assert_flash_tolerance("sinkhorn-knopp, GPU tiles", out.cpu(), plain, want, 1e-6)


def test_ibot_sinkhorn_knopp_any_n_masked_patches(device):
    """DINOv2 divides by n_masked_patches_tensor (B) and multiplies by it at the end: any B gives the same
    targets, in DINOv2 (float64) and here."""
    K, M = 1271, 9
    t = _logits((M, K), 2.0, torch.float32, device)
    loss = iBOTPatchLoss(K).to(device)
    out = loss.sinkhorn_knopp_teacher(t, 0.04, n_masked_patches_tensor=torch.tensor([M + 3], device=device))
    want = oracle.sinkhorn_literal([t.cpu()], 0.04, n_samples=M + 3)[0]
    assert torch.allclose(want, oracle.sinkhorn_literal([t.cpu()], 0.04, n_samples=M)[0], rtol=1e-12, atol=0)
    plain = oracle.sinkhorn_literal([t.cpu()], 0.04, n_samples=M + 3, dtype=torch.float32)[0]
    assert_flash_tolerance("ibot sinkhorn-knopp", out.cpu(), plain, want, 1e-6)


def _grad_run(fn, student, *args):
    x = student.detach().clone().requires_grad_()
    loss = fn(x, *args)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


def _check_loss_and_grad(name, kernel, plain, want, rel):
    for part, k, p, o in zip(("loss", "grad"), kernel, plain, want, strict=True):
        scale = max(1.0, o.abs().max().item()) if part == "loss" else o.abs().max().item()
        assert torch.isfinite(k).all(), f"{name} {part}"
        assert_flash_tolerance(f"{name} {part}", k, p, o, rel * scale + 1e-7)


@pytest.mark.parametrize("K,dtype", [(1271, d) for d in DTYPES] + [(65536, torch.float32), (65537, torch.float16)])
def test_dino_forward_local_and_global_crops(K, dtype, device):
    """DINOv2's two calls: local crops chunked against the (2, B, K) teacher, global crops against the
    flattened teacher; student logits up to +-50."""
    B, n_local = _rows(K, small=3), 2
    loss = DINOLoss(K, student_temp=0.1).to(device)
    teacher = _probs((2, B, K), device)
    local = _logits((n_local * B, K), 50.0, dtype, device)
    rel = REL[dtype]

    def ours(x):
        return loss(x.chunk(n_local), teacher)

    def dinov2(x, dt):
        return oracle.dino_forward(x.chunk(n_local), teacher.cpu(), 0.1, dtype=dt)

    kernel = _grad_run(ours, local)
    plain = _grad_run(lambda x: dinov2(x, torch.float32), local.cpu())
    want = _grad_run(lambda x: dinov2(x, torch.float64), local.cpu())
    _check_loss_and_grad("local crops", kernel, plain, want, rel)

    global_student = _logits((2 * B, K), 50.0, dtype, device, seed=3)
    flat = teacher.flatten(0, 1)
    kernel = _grad_run(lambda x: loss([x], [flat]), global_student)
    plain = _grad_run(lambda x: oracle.dino_forward([x], [flat.cpu()], 0.1, torch.float32), global_student.cpu())
    want = _grad_run(lambda x: oracle.dino_forward([x], [flat.cpu()], 0.1), global_student.cpu())
    _check_loss_and_grad("global crops", kernel, plain, want, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_student_cross_entropy_gpu_tiles_match_dinov2(dtype, device, monkeypatch):
    """The student cross-entropy's GPU plan ((4, 512) tiles, K split for 4 programs per SM) on a shape ragged
    against it (K = 1300: two whole steps and a ragged one; 7 rows: a ragged row block): on CPU the interpreter runs
    it in place of its own (4, 4096) tiles."""
    monkeypatch.setattr(dino_student_ce, "interpreted", lambda tensor: False)
    K, B = 1300, 7
    assert dino_student_ce.launch_plan(B, K, 4)[:2] == (dino_student_ce.GPU_BLOCK_R, dino_student_ce.GPU_BLOCK_K)
    loss = DINOLoss(K, student_temp=0.1).to(device)
    assert loss.backend == "triton"  # the kernel: under the interpreter on CPU
    teacher = _probs((2, B, K), device)
    student = _logits((2 * B, K), 50.0, dtype, device)

    def dinov2(x, dt):
        return oracle.dino_forward(x.chunk(2), teacher.cpu(), 0.1, dtype=dt)

    kernel = _grad_run(lambda x: loss(x.chunk(2), teacher), student)
    plain = _grad_run(lambda x: dinov2(x, torch.float32), student.cpu())
    want = _grad_run(lambda x: dinov2(x, torch.float64), student.cpu())
    _check_loss_and_grad("GPU tiles", kernel, plain, want, REL[dtype])


def _masks(B, N, device):
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks[1, ::3] = True  # image 0: no masked patch; image 1: some; image 2: all
    masks[2] = True
    return masks.to(device)


@pytest.mark.parametrize("K,dtype", [(1271, d) for d in DTYPES] + [(65537, torch.float32)])
def test_ibot_forward_masked(K, dtype, device):
    B, N = 3, (6 if K > 4096 else 10)
    masks = _masks(B, N, device)
    M = int(masks.sum())
    loss = iBOTPatchLoss(K, student_temp=0.1).to(device)
    student = _logits((M + 2, K), 50.0, dtype, device)  # two padding rows past n_masked_patches
    teacher = _probs((M + 2, K), device)
    rel = REL[dtype]
    for weights in (None, torch.rand(M, generator=torch.Generator().manual_seed(0)).to(device)):
        def ours(x, w=weights):
            return loss.forward_masked(x, teacher, masks, n_masked_patches=M, masks_weight=w)

        def dinov2(x, dt, w=weights):
            return oracle.ibot_forward_masked(x, teacher.cpu(), masks.cpu(), 0.1, M,
                                              None if w is None else w.cpu(), dtype=dt)

        kernel = _grad_run(ours, student)
        plain = _grad_run(lambda x: dinov2(x, torch.float32), student.cpu())
        want = _grad_run(lambda x: dinov2(x, torch.float64), student.cpu())
        _check_loss_and_grad("ibot forward_masked", kernel, plain, want, rel)
        assert kernel[1][M:].abs().max() == 0  # rows past n_masked_patches get no gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_ibot_forward_with_empty_and_full_masks(dtype, device):
    B, N, K = 3, 8, 1271
    masks = _masks(B, N, device)
    loss = iBOTPatchLoss(K).to(device)
    student = _logits((B, N, K), 50.0, dtype, device)
    teacher = _probs((B, N, K), device)
    rel = REL[dtype]
    kernel = _grad_run(lambda x: loss(x, teacher, masks), student)
    plain = _grad_run(lambda x: oracle.ibot_forward(x, teacher.cpu(), masks.cpu(), 0.1, torch.float32),
                      student.cpu())
    want = _grad_run(lambda x: oracle.ibot_forward(x, teacher.cpu(), masks.cpu(), 0.1), student.cpu())
    _check_loss_and_grad("ibot forward", kernel, plain, want, rel)
    assert kernel[1][0].abs().max() == 0  # the image with no masked patch contributes nothing


def test_forward_masked_with_no_masked_patch(device):
    K = 64
    masks = torch.zeros(2, 5, dtype=torch.bool, device=device)
    student = torch.zeros(0, K, device=device, requires_grad=True)
    out = iBOTPatchLoss(K).to(device).forward_masked(student, torch.zeros(0, K, device=device), masks)
    out.backward()
    assert out.item() == 0.0 and student.grad.shape == (0, K)


def test_center_update_and_checkpoints(device):
    K, m = 50, 0.9
    dino, ibot = DINOLoss(K, center_momentum=m).to(device), iBOTPatchLoss(K, center_momentum=m).to(device)
    assert dino.center.shape == (1, K) and ibot.center.shape == (1, 1, K)
    cls = _logits((6, K), 3.0, torch.float16, device)
    patches = _logits((1, 9, K), 3.0, torch.float32, device)
    dino.update_center(cls)
    ibot.update_center(patches)
    assert not dino.updated and torch.equal(dino.center, torch.zeros_like(dino.center))  # deferred, as DINOv2
    probs = dino.softmax_center_teacher(cls, teacher_temp=0.07)
    want_center = oracle.center_after_update(torch.zeros(1, K, dtype=torch.float64), cls.double().cpu().sum(0), 6, m)
    assert torch.allclose(dino.center.cpu().double(), want_center, atol=1e-6)
    assert torch.allclose(probs.cpu().double(), oracle.centered_softmax(cls.cpu(), want_center, 0.07), atol=1e-6)
    ibot.apply_center_update()
    want_patch = oracle.center_after_update(torch.zeros(1, 1, K, dtype=torch.float64),
                                            patches.double().cpu().mean(1).sum(0), 1, m)
    assert torch.allclose(ibot.center.cpu().double(), want_patch, atol=1e-6)
    # a DINOv2 checkpoint's buffers load into ours and back (same names and shapes)
    state = {"center": torch.randn(1, K)}
    dino.load_state_dict(state)
    assert torch.equal(dino.state_dict()["center"].cpu(), state["center"])
    ibot.load_state_dict({"center": torch.randn(1, 1, K)})


def test_torch_backend_matches_triton(device):
    K = 700
    t = _logits((5, K), 2.0, torch.float32, device)
    s = _logits((5, K), 20.0, torch.float32, device, seed=4)
    results = []
    for backend in ("triton", "torch"):
        loss = DINOLoss(K, backend=backend).to(device)
        assert loss.backend == backend
        sk = loss.sinkhorn_knopp_teacher(t, 0.04)
        results.append((sk, loss.softmax_center_teacher(t, 0.04), loss([s], [sk])))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        DINOLoss(K, backend="cuda")


def test_two_ranks_match_one(tmp_path):
    """2 gloo ranks (each holding part of the batch) give the rows, centres and Sinkhorn-Knopp targets that
    one process computes on the whole batch."""
    import dino_dist_worker as worker

    mp.spawn(worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    K, cls, patches, _, patch_shards = worker.shards()
    one, one_ibot = DINOLoss(K), iBOTPatchLoss(K)
    sk_cls = torch.cat([r["sk_cls"] for r in ranks])
    assert torch.allclose(sk_cls, one.sinkhorn_knopp_teacher(cls, 0.04), rtol=1e-5, atol=1e-7)
    assert torch.allclose(sk_cls.double(), oracle.sinkhorn_literal([cls], 0.04)[0], rtol=1e-4, atol=1e-7)
    sk_patches = torch.cat([r["sk_patches"] for r in ranks])
    n_masked = torch.tensor([patches.shape[0]])
    assert torch.allclose(sk_patches, one_ibot.sinkhorn_knopp_teacher(patches, 0.04, n_masked), rtol=1e-5,
                          atol=1e-7)
    assert torch.allclose(sk_patches.double(), torch.cat(oracle.sinkhorn_literal(patch_shards, 0.04)), rtol=1e-4,
                          atol=1e-7)
    assert all(r["n_masked_after"].item() == patches.shape[0] for r in ranks)  # all-reduced in place
    one.update_center(cls)
    one.apply_center_update()
    for r in ranks:
        assert torch.allclose(r["center_cls"], one.center, atol=1e-6)
    # iBOT's centre is the mean over ranks of each rank's mean patch (DINOv2: sum of means / ranks)
    want = 0.1 * (patch_shards[0].mean(0) + patch_shards[1].mean(0)) / 2
    for r in ranks:
        assert torch.allclose(r["center_patches"].reshape(-1), want, atol=1e-6)
    probs = torch.cat([r["probs_cls"] for r in ranks])
    assert torch.allclose(probs, reference.centered_softmax(cls, one.center, 0.07), atol=1e-6)


def test_validation_errors(device):
    K = 40
    loss = DINOLoss(K).to(device)
    s = _logits((4, K), 1.0, torch.float32, device)
    with pytest.raises(ValueError, match=r"must be \(T, R, K\)"):
        loss([s], [_probs((3, K), device)])
    with pytest.raises(ValueError, match=r"center must be \(K,\), \(1, K\) or \(1, 1, K\) with K=41"):
        dino_teacher.centered_softmax(_logits((2, K + 1), 1.0, torch.float32, device), loss.center, 0.04)
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        loss.softmax_center_teacher(s, teacher_temp=0.0)
    with pytest.raises(ValueError, match="n_iterations must be >= 1"):
        loss.sinkhorn_knopp_teacher(s, 0.04, n_iterations=0)
    with pytest.raises(ValueError, match="row weights have 3 entries"):
        dino_student_ce.weighted_soft_cross_entropy(s, _probs((1, 4, K), device), torch.ones(3, device=device), 0.1)
    with pytest.raises(ValueError, match="student_temp must be > 0"):
        dino_student_ce.weighted_soft_cross_entropy(s, _probs((1, 4, K), device), torch.ones(4, device=device), 0)
    with pytest.raises(TypeError, match="dtype"):
        loss.softmax_center_teacher(s.long(), teacher_temp=0.04)
    masks = torch.ones(2, 2, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="masks_weight has 3 entries but there are 4"):
        iBOTPatchLoss(K).to(device).forward_masked(s, _probs((4, K), device), masks, masks_weight=torch.ones(3))


def test_roofline_and_specs():
    # COLMAX, 2 column steps, the softmax: the logits read 4 times, a (K,) vector in and out per step, probs written
    assert dino_teacher.roofline_cost(R=8, K=100, dtype_bytes=2, n_iterations=3)["bytes"] == 4 * 1600 + 3200 + 3200
    assert dino_student_ce.roofline_cost(R=8, K=100, T=2, dtype_bytes=2, backward=False)["bytes"] == 1600 + 6400
    # H100 counts at DINOv2's 128 class-token rows and 8192 iBOT rows (the compile report's, without compiling).
    # The column step is one launch: a group's column items re-read its rows from L2 (4 MiB groups, 264 programs of
    # 32 KB items: 16.6 MB read between a row's two reads), so the logits cross HBM once at any row count, unless L2
    # is too small for that (here 16 MB: half of it is 8 MB): then twice
    h100 = {"sms": 132, "concurrent": 132 * 5, "l2_bytes": 50 * 2**20}
    for R in (128, 8192):
        for e in (2, 4):
            plan = dino_teacher.launch_plan(dino_teacher.MODE_COLUMN, R, 65536, 132, e)
            column = dino_teacher.efficiency(dino_teacher.MODE_COLUMN, R, 65536, e, **h100)
            assert plan["group_rows"] == 64 // e and plan["groups"] == R * e // 64 and column["programs"] == 264
            assert column["executed_flops"] / column["useful_flops"] < 1.40
            assert column["moved_bytes"] / column["min_bytes"] < (1.06 if R == 128 else 1.01)
            small_l2 = dino_teacher.efficiency(dino_teacher.MODE_COLUMN, R, 65536, e, **{**h100, "l2_bytes": 16 << 20})
            assert small_l2["moved_bytes"] / small_l2["min_bytes"] > 2.0
    # the softmax keeps a row's first two 8192-wide tiles in registers and re-reads the rest in pass 2, from L2
    # only while a wave's rows fit in half of it: 128 bf16 rows (17 MB) do, 128 fp32 rows (34 MB) and 8192 rows
    # (660 resident programs here) do not
    for R, e, reread in ((128, 2, 0), (128, 4, 1), (8192, 2, 1)):
        softmax = dino_teacher.efficiency(dino_teacher.MODE_SOFTMAX, R, 65536, e, **h100)
        assert softmax["moved_bytes"] - softmax["min_bytes"] == reread * R * (65536 - 2 * 8192) * e
    # pass 2 is one multiply on the kept quarter of the row: 6 + (1 + 3 x 4) / 4 = 9.25 FLOPs (Sinkhorn), 6 + (1 +
    # 3 x 5) / 4 = 10 (centred) against the op's 7, where recomputing every tile took 10 and 11 (1.57x)
    sk = dino_teacher.efficiency(dino_teacher.MODE_SOFTMAX, 128, 65536, 2, **h100)
    centred = dino_teacher.efficiency(dino_teacher.MODE_SOFTMAX, 128, 65536, 2, center=True, **h100)
    assert 1.32 < sk["executed_flops"] / sk["useful_flops"] < 1.33
    assert 1.428 < centred["executed_flops"] / centred["useful_flops"] < 1.43
    names = {s["name"] for s in dino_teacher.compile_specs() + dino_student_ce.compile_specs()}
    assert names >= {"dino_teacher_sk_column_bfloat16_3760rows", "dino_teacher_centered_softmax_float16_128rows",
                     "dino_student_ce_bwd_bfloat16"}



def _last_layer(K, D, seed):
    torch.manual_seed(seed)
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(D, K, bias=False))
    layer.parametrizations.weight.original0.data.fill_(1.0)
    layer.parametrizations.weight.original0.requires_grad_(False)  # DINOv2's norm_last_layer
    return layer


def _dinov2_head_and_loss(student_global, student_local, teacher_global, v, tv, center, n_local, temp, dtype):
    """DINOv2 from the bottleneck on: normalise, last layer, swapped centred teacher, local + global terms."""
    import torch.nn.functional as F

    def logits(x, w):
        return F.normalize(x.to(dtype), dim=-1) @ (w.to(dtype) / w.to(dtype).norm(dim=1, keepdim=True)).t()

    B = student_global.shape[0] // 2
    chunks = teacher_global.detach().chunk(2)
    teacher = logits(torch.cat((chunks[1], chunks[0])), tv.detach())
    probs = oracle.centered_softmax(teacher, center, temp, dtype=dtype).view(2, B, -1)
    terms = 2 + 2 * n_local
    local = oracle.dino_forward(logits(student_local, v).chunk(n_local), probs, 0.1, dtype) / terms
    global_ = oracle.dino_forward([logits(student_global, v)], [probs.flatten(0, 1)], 0.1, dtype) * 2 / terms
    return local + global_, teacher.sum(0)


@pytest.mark.parametrize("K,dtype", [(37, torch.float32)] + [(300, d) for d in DTYPES[1:]])
def test_forward_fused_matches_dinov2_head_and_loss(K, dtype, device):
    B, n_local, D, temp = 3, 2, 16, 0.04
    layer, teacher_layer = _last_layer(K, D, 0).to(device), _last_layer(K, D, 1).to(device)
    features = [_logits(shape, 2.0, dtype, device, seed) for seed, shape in
                enumerate([(2 * B, D), (n_local * B, D), (2 * B, D)])]
    center = _logits((1, K), 0.5, torch.float32, device, seed=7)
    loss_module = DINOLoss(K).to(device)
    loss_module.center.copy_(center)
    sg, sl = (f.clone().requires_grad_() for f in features[:2])
    v = layer.parametrizations.weight.original1
    layer_dtype = layer.to(dtype) if dtype != torch.float32 else layer
    loss = loss_module.forward_fused(sg, sl, features[2], layer_dtype, teacher_layer.to(dtype), temp)
    loss.backward()
    kernel = (loss.detach(), sg.grad, sl.grad, v.grad)

    tv = teacher_layer.parametrizations.weight.original1.detach().cpu()
    results = []
    for dt in (torch.float32, torch.float64):
        sg_o, sl_o = (f.detach().cpu().clone().requires_grad_() for f in features[:2])
        v_o = v.detach().cpu().clone().requires_grad_()
        out, teacher_sum = _dinov2_head_and_loss(sg_o, sl_o, features[2].cpu(), v_o, tv, center.cpu(), n_local, temp,
                                                 dt)
        out.backward()
        results.append((out.detach(), sg_o.grad, sl_o.grad, v_o.grad, teacher_sum))
    (plain, want) = results
    rel = REL[dtype]
    for name, k, p, o in zip(("loss", "grad global", "grad local", "grad weight_v"), kernel, plain, want,
                             strict=False):
        scale = max(1.0, o.abs().max().item()) if name == "loss" else o.abs().max().item()
        assert torch.isfinite(k).all(), name
        assert_flash_tolerance(f"fused {name}", k.float().cpu(), p.float(), o, rel * scale + 1e-7)
    loss_module.apply_center_update()
    want_center = oracle.center_after_update(center.cpu().double(), want[4], 2 * B, 0.9)
    assert torch.allclose(loss_module.center.cpu().double(), want_center, atol=REL[dtype])


@pytest.mark.parametrize("logits, center, temp, error, name", [
    (torch.tensor(1.0), torch.zeros(1), 0.04, ValueError, "teacher_logits"),
    ([[1.0]], torch.zeros(1), 0.04, TypeError, "teacher_logits"),
    (torch.randn(2, 3), "x", 0.04, TypeError, "center"),
    (torch.randn(6, 0), torch.randn(0), 0.04, ValueError, "teacher_logits"),
    (torch.randn(2, 3), torch.zeros(3), float("inf"), ValueError, "teacher_temp"),
    (torch.randn(2, 3), torch.zeros(3), 1e-45, ValueError, "teacher_temp must be at least"),  # 1 / tau is inf
    (torch.randn(2, 4), torch.zeros(2, 2), 0.04, ValueError, r"center must be \(K,\)"),  # K elements, not (1, K)
    # sparse and nested tensors failed in a reshape inside with torch's own error; bool and complex temperatures
    # were taken as 1.0 or failed inside the check
    (torch.randn(2, 3).to_sparse(), torch.zeros(3), 0.04, TypeError, "teacher_logits must be a dense"),
    (torch.randn(2, 3), torch.zeros(3).to_sparse(), 0.04, TypeError, "center must be a dense"),
    (torch.nested.as_nested_tensor([torch.randn(2, 3)], layout=torch.jagged), torch.zeros(3), 0.04, TypeError,
     "teacher_logits must be a dense .* got a nested tensor"),
    (torch.randn(2, 3), torch.zeros(3), torch.tensor(True), TypeError, "teacher_temp must be a real number"),
    (torch.randn(2, 3), torch.zeros(3), torch.tensor(0.04j), TypeError, "teacher_temp must be a real number"),
    (torch.randn(2, 3), torch.zeros(3), torch.tensor(0.04, device="meta"), ValueError,  # was torch's .item() error
     "teacher_temp must have a value"),
])
def test_centered_softmax_refuses_bad_inputs(device, logits, center, temp, error, name):
    if isinstance(logits, torch.Tensor):
        logits = logits.to(device)
    if isinstance(center, torch.Tensor):
        center = center.to(device)
    with pytest.raises(error, match=name):
        dino_teacher.centered_softmax(logits, center, temp)


@pytest.mark.parametrize("temp, n_iterations, all_reduce, error, name", [
    (float("inf"), 3, None, ValueError, "teacher_temp"), (1e-45, 3, None, ValueError, "teacher_temp"),
    (0.04, True, None, TypeError, "n_iterations"), (0.04, 0, None, ValueError, "n_iterations"),
    (0.04, 3, "sum", TypeError, "all_reduce must be a function")])
def test_sinkhorn_refuses_bad_arguments(device, temp, n_iterations, all_reduce, error, name):
    with pytest.raises(error, match=name):
        dino_teacher.sinkhorn_knopp(torch.randn(4, 5, device=device), temp, n_iterations, all_reduce)


def test_sinkhorn_takes_a_numpy_iteration_count(device):
    import numpy as np

    t = torch.randn(4, 5, device=device)
    assert torch.equal(dino_teacher.sinkhorn_knopp(t, 0.04, np.int64(3)), dino_teacher.sinkhorn_knopp(t, 0.04, 3))


@pytest.mark.parametrize("kwargs, name", [(dict(student_temp=float("inf")), "student_temp"),
                                          (dict(center_momentum=float("nan")), "center_momentum"),
                                          (dict(center_momentum=2.0), "center_momentum")])
def test_losses_refuse_bad_arguments(kwargs, name):
    for cls in (DINOLoss, iBOTPatchLoss):
        with pytest.raises(ValueError, match=name):
            cls(8, **kwargs)


def test_losses_name_bad_shapes_before_reshaping(device):
    K, D = 8, 4
    dino, ibot = DINOLoss(K).to(device), iBOTPatchLoss(K).to(device)
    s = _logits((4, K), 1.0, torch.float32, device)
    with pytest.raises(ValueError, match="each student output must have 2 dimensions"):
        dino([s.reshape(2, 2, K)], [_probs((4, K), device)])
    with pytest.raises(TypeError, match="each student output must be a float tensor"):
        dino([s.long()], [_probs((4, K), device)])
    tokens = _logits((2, 3, K), 1.0, torch.float32, device)
    with pytest.raises(ValueError, match="student_patch_tokens must have 3 dimensions"):
        ibot(s, s, torch.ones(2, 2, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"teacher_patch_tokens has shape \(2, 4, 8\), expected \(2, 3, 8\)"):
        ibot(tokens, _probs((2, 4, K), device), torch.ones(2, 3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"student_masks_flat must have shape \(B, N\) = \(2, 3\)"):
        ibot(tokens, _probs((2, 3, K), device), torch.ones(6, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="student_patch_tokens_masked must have 2 dimensions"):
        ibot.forward_masked(tokens, tokens, torch.ones(2, 3, dtype=torch.bool, device=device))
    layer = torch.nn.Linear(D, K, bias=False).to(device)
    feats = lambda n: torch.randn(n, D, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="student_global has 3 rows"):
        dino.forward_fused(feats(3), feats(4), feats(4), layer, layer, 0.04)
    with pytest.raises(ValueError, match="student_local has 5 rows"):
        dino.forward_fused(feats(4), feats(5), feats(4), layer, layer, 0.04)
    with pytest.raises(ValueError, match=r"teacher_global has shape \(6, 4\), expected \(4, 4\)"):
        dino.forward_fused(feats(4), feats(4), feats(6), layer, layer, 0.04)
    with pytest.raises(ValueError, match=r"at least one row \(R, K\), got shape \(0, 8\)"):
        dino([s[:0]], _probs((2, 0, K), device))  # was a ZeroDivisionError from the 1 / R row weight


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_rank_without_masked_patches_still_joins_every_all_reduce(backend, device):
    """iBOT at one image per GPU masks no patch (DINOv2's collate: int(B * 0.5) = 0 images): the teacher gets
    (0, K) rows. DINOv2 returns empty targets; a rank that raised instead would leave the others waiting in
    their all-reduces."""
    K = 70
    calls = {}

    def recording(rows):
        def all_reduce(tensor, op):
            calls.setdefault(rows, []).append((op, tuple(tensor.shape)))
        return all_reduce

    loss = iBOTPatchLoss(K, backend=backend).to(device)
    for rows in (0, 5):
        t = _logits((rows, K), 2.0, torch.float32, device)
        out = loss._ops.sinkhorn_knopp(t, 0.04, 3, recording(rows))
        assert out.shape == (rows, K) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert calls[0] == calls[5]
    assert loss.sinkhorn_knopp_teacher(torch.zeros(0, K, device=device), 0.04, torch.tensor([0])).shape == (0, K)
    probs = loss.softmax_center_teacher(torch.zeros(1, 0, K, device=device), teacher_temp=0.04)
    assert probs.shape == (1, 0, K) and probs.dtype == torch.float32
    loss.center.fill_(0.5)
    for empty in (torch.zeros(0, K, device=device), torch.zeros(1, 0, K, device=device)):
        loss.update_center(empty)  # no rows: the centre stays (DINOv2 divides 0 by 0, and NaN spreads)
        assert loss.async_batch_center.isfinite().all()
        loss.apply_center_update()
        assert torch.equal(loss.center, torch.full_like(loss.center, 0.5))


def test_second_order_gradients_of_the_student_loss_raise(device):
    """create_graph=True through the fused student loss: its gradient is not differentiable again, so a
    gradient penalty on it must raise, not silently add nothing (the former autograd.Function did)."""
    K = 40
    s = _logits((4, K), 3.0, torch.float32, device).requires_grad_()
    loss = DINOLoss(K).to(device)([s], _probs((2, 4, K), device))
    (grad,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="weighted_soft_cross_entropy"):
        (loss + grad.pow(2).sum()).backward()


def test_drop_ins_compile_fullgraph(device):
    """Both teachers and the student loss are custom ops: one graph, no break, eager's numbers and gradients."""
    K = 300
    dino = DINOLoss(K).to(device)
    teacher = _logits((4, K), 2.0, torch.float32, device)
    student = _logits((4, K), 3.0, torch.float32, device)

    def step(s, t):
        targets = [dino.sinkhorn_knopp_teacher(t, 0.04), dino.softmax_center_teacher(t, teacher_temp=0.04)]
        return dino([s], targets)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        s = student.clone().requires_grad_()
        out = fn(s, teacher)
        out.backward()
        results.append((out.detach(), s.grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_drop_ins_on_meta_tensors_give_shapes():
    """A DINOv2 step traced on the meta device: teachers, student losses and their gradients get shapes."""
    K = 50
    dino, ibot = DINOLoss(K).to("meta"), iBOTPatchLoss(K).to("meta")
    t = torch.randn(4, K, device="meta")
    targets = [dino.softmax_center_teacher(t, 0.04), dino.sinkhorn_knopp_teacher(t, 0.04)]
    s = torch.randn(4, K, device="meta", requires_grad=True)
    loss = dino([s], targets) + ibot(s[None], targets[1][None], torch.ones(1, 4, device="meta"))
    loss.backward()
    assert loss.shape == () and loss.device.type == "meta" and s.grad.shape == (4, K)


def test_drop_ins_refuse_what_they_would_misread(device):
    """Each was accepted or failed deep inside before: a wrong prototype count, an empty teacher list, centre
    updates of the wrong shape, a last layer with a bias (silently dropped) or of another size, a float mask,
    a negative masked-row count."""
    K, D = 8, 4
    with pytest.raises(ValueError, match="out_dim must be >= 1"):
        DINOLoss(0)
    with pytest.raises(TypeError, match="out_dim must be an int"):
        DINOLoss(True)
    with pytest.raises(ValueError, match="patch_out_dim must be >= 1"):
        iBOTPatchLoss(-1)
    dino, ibot = DINOLoss(K).to(device), iBOTPatchLoss(K).to(device)
    with pytest.raises(ValueError, match="the teacher list is empty"):
        dino([torch.randn(3, K, device=device)], [])
    with pytest.raises(ValueError, match=r"teacher_output has shape \(3, 4\), expected \(any, 8\)"):
        dino.reduce_center_update(torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="teacher_output must have 2 dimensions"):
        dino.reduce_center_update(torch.randn(1, 3, K, device=device))
    rows = torch.randn(3, K, device=device)  # one image's masked rows: its mean row, not a mean over prototypes
    ibot.reduce_center_update(rows)
    torch.testing.assert_close(ibot.async_batch_center, rows.mean(0).reshape(1, K))
    with pytest.raises(ValueError, match=r"teacher_patch_tokens has shape \(1, 3, 4\), expected"):
        ibot.reduce_center_update(torch.randn(1, 3, 4, device=device))
    feats = lambda n: torch.randn(n, D, device=device)  # noqa: E731
    biased = torch.nn.Linear(D, K, bias=True).to(device)
    with pytest.raises(ValueError, match="last_layer has a bias"):
        dino.forward_fused(feats(4), feats(4), feats(4), biased, biased, 0.04)
    narrow = torch.nn.Linear(D, 5, bias=False).to(device)
    with pytest.raises(ValueError, match=r"last_layer has weight \(5, 4\), expected \(K, D\) = \(8, 4\)"):
        dino.forward_fused(feats(4), feats(4), feats(4), narrow, narrow, 0.04)
    with pytest.raises(TypeError, match="last_layer must be the head's nn.Linear"):
        dino.forward_fused(feats(4), feats(4), feats(4), None, None, 0.04)
    masks = torch.tensor([[True, False], [True, True]], device=device)
    s, t = torch.randn(3, K, device=device), _probs((3, K), device)
    with pytest.raises(TypeError, match="student_masks_flat must be a bool mask"):
        ibot.forward_masked(s, t, masks.float())
    with pytest.raises(ValueError, match=r"n_masked_patches must be in 0..3"):
        ibot.forward_masked(s, t, masks, n_masked_patches=-1, masks_weight=torch.ones(1, device=device))
    with pytest.raises(TypeError, match="masks_weight must be a tensor"):
        ibot.forward_masked(s, t, masks, masks_weight=[1.0, 1.0, 1.0])
