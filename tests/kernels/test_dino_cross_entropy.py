"""dino_cross_entropy kernels (forward + backward) against the float64 oracle.

No tl.dot in these kernels, so bf16 student logits are tested under the interpreter too.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_oracle import assert_flash_tolerance, dino_cross_entropy_f64

from terrafm_kernels import reference
from terrafm_kernels.dino_cross_entropy import (
    PRODUCTION_SHAPE,
    compile_specs,
    dino_cross_entropy,
    efficiency,
    roofline_cost,
    view_tiles,
)
from terrafm_kernels.modules import DINOCrossEntropy


def _inputs(S, T, B, K, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(S, B, K, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = torch.softmax(torch.randn(T, B, K, generator=g) * scale, dim=-1)
    return student.to(device), teacher.to(device)


def _check(S, T, B, K, dtype, device, tau=0.1, scale=3.0, seed=0):
    student, teacher = _inputs(S, T, B, K, dtype, device, scale, seed)
    x = student.clone().requires_grad_()
    loss = dino_cross_entropy(x, teacher, tau)
    loss.backward()
    x_plain = student.clone().requires_grad_()
    plain = reference.dino_cross_entropy(x_plain, teacher, tau)
    plain.backward()
    x64 = student.cpu().double().requires_grad_()
    oracle = dino_cross_entropy_f64(x64, teacher.cpu(), tau)
    oracle.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert x.grad.dtype == dtype and x.grad.shape == student.shape
    assert_flash_tolerance("loss", loss.detach().cpu(), plain.detach().cpu(), oracle.detach(),
                           1e-5 * max(1.0, abs(oracle.item())))
    grad_atol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype] * x64.grad.abs().max()
    assert_flash_tolerance("grad", x.grad.cpu(), x_plain.grad.cpu(), x64.grad, grad_atol.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S,T,B,K", [(2, 2, 1, 1), (4, 2, 3, 97), (6, 2, 2, 130), (3, 2, 1, 4133)])
def test_matches_float64_oracle(S, T, B, K, dtype, device):
    _check(S, T, B, K, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shipped_gpu_tiles_match_float64_oracle(dtype, device, monkeypatch):
    """The GPU plan (256-prototype column steps over 4 warps, K split for 4 programs per SM) on a shape ragged
    against it: on CPU the interpreter runs it in place of its own small tiles."""
    import importlib

    module = importlib.import_module("terrafm_kernels.dino_cross_entropy")
    monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    assert module.launch_plan(10, 3, 1300, 4)[2] == module.GPU_BLOCK_K == 256
    _check(10, 2, 3, 1300, dtype, device)


@pytest.mark.parametrize("S,T", [(1, 2), (3, 1), (2, 3)])
def test_view_counts(S, T, device):
    _check(S, T, 2, 65, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S", list(range(1, 13)) + [13, 16])
def test_view_tiles(S, dtype, device):
    """Every split of the S views into the (BLOCK_S_HI, BLOCK_S_LO) tiles, K not a multiple of BLOCK_K."""
    _check(S, 2, 2, 45, dtype, device, seed=S)


@pytest.mark.parametrize("S,T", [(3, 3), (5, 5), (12, 11)])
def test_teacher_views_in_second_tile(S, T, device):
    """Teacher views past BLOCK_S_HI: the shared teacher sum takes P from both tiles."""
    _check(S, T, 2, 45, torch.float32, device)


def test_view_tiles_plan():
    assert [view_tiles(S) for S in (1, 2, 3, 7, 8, 10, 12, 13, 16)] == [
        (1, 0), (2, 0), (2, 1), (4, 4), (8, 0), (8, 2), (8, 4), (8, 8), (16, 0)]


def test_large_logits_small_temperature(device):
    _check(4, 2, 2, 301, torch.float32, device, tau=0.01, scale=1e3)
    student, teacher = _inputs(4, 2, 2, 301, torch.float32, device, scale=1e4)
    x = student.requires_grad_()
    loss = dino_cross_entropy(x, teacher, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype, tau, offset", [(torch.float16, 0.1, 6e4), (torch.float16, 1e-4, 6e4),
                                               (torch.float32, 1e-4, 1e3)])
def test_large_logits_on_a_common_offset_do_not_cancel(dtype, tau, offset, device):
    """The loss was (n max - Q . x) / tau + n lse, Q . x summed on the raw logits: at a large common offset the two
    terms cancelled (equal fp16 logits of 6e4 at tau 1e-4: 4.9 off, the reference 1e-7). The kernel now sums Q .
    (x - running max), whose error follows the logits' spread as the reference's does."""
    S, T, B, K = 3, 2, 2, 70
    student, teacher = _inputs(S, T, B, K, torch.float64, device, scale=1.0 if dtype == torch.float32 else 100.0)
    student = (student + offset).to(dtype)
    loss = dino_cross_entropy(student, teacher, tau)
    plain = reference.dino_cross_entropy(student, teacher, tau)
    oracle = dino_cross_entropy_f64(student.cpu().double(), teacher.cpu(), tau)
    assert_flash_tolerance("loss", loss.cpu(), plain.cpu(), oracle, 1e-6 * max(1.0, abs(oracle.item())))


@settings(max_examples=6, deadline=None)
@given(S=st.integers(2, 8), B=st.integers(1, 4), K=st.integers(1, 300), seed=st.integers(0, 99))
def test_hypothesis_shapes(S, B, K, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(S, 2, B, K, torch.float32, device, seed=seed)


def test_module_and_grad_scaling(device):
    student, teacher = _inputs(4, 2, 2, 50, torch.float32, device)
    x = student.clone().requires_grad_()
    (3.0 * DINOCrossEntropy(0.1)(x, teacher)).backward()
    y = student.clone().requires_grad_()
    dino_cross_entropy(y, teacher, 0.1).backward()
    assert torch.allclose(x.grad, 3.0 * y.grad, rtol=1e-6, atol=1e-9)


def test_validation_errors(device):
    student, teacher = _inputs(4, 2, 2, 20, torch.float32, device)
    with pytest.raises(ValueError, match="3 dimensions"):
        dino_cross_entropy(student[0], teacher, 0.1)
    with pytest.raises(ValueError, match="in B and K"):
        dino_cross_entropy(student, teacher[..., :-1].contiguous(), 0.1)
    with pytest.raises(TypeError, match="dtype"):
        dino_cross_entropy(student.long(), teacher, 0.1)
    with pytest.raises(ValueError, match="student_logits must be contiguous"):  # the right shape, strided
        dino_cross_entropy(student.transpose(0, 1).contiguous().transpose(0, 1), teacher, 0.1)
    with pytest.raises(ValueError, match="student_temperature must be > 0"):
        dino_cross_entropy(student, teacher, -0.1)
    with pytest.raises(ValueError, match="pair of different views"):
        dino_cross_entropy(student[:1].contiguous(), teacher[:1].contiguous(), 0.1)
    with pytest.raises(ValueError, match="at most 16"):
        dino_cross_entropy(torch.zeros(17, 2, 20, device=device), teacher, 0.1)
    with pytest.raises(ValueError, match=r"move the module \(\.to\(device\)\) or the inputs"):
        dino_cross_entropy(student, teacher.to("meta"), 0.1)


def test_roofline_and_specs():
    cost = roofline_cost(S=12, T=2, B=64, K=65536, dtype_bytes=2, backward=False)
    assert cost["bytes"] == 12 * 64 * 65536 * 2 + 4 * 2 * 64 * 65536
    assert {s["name"] for s in compile_specs()} >= {"dino_ce_fwd_bfloat16", "dino_ce_bwd_float32"}


@pytest.mark.parametrize("kernel,ratio", [("forward", 100 / 84), ("backward", 80 / 64)])
def test_efficiency_counts_the_view_tiles(kernel, ratio):
    """Presets' S = 10, T = 2: 8 + 2 tile rows x (8 or 6 ops + teacher sum + Q) per element against the
    op's 8 S + 2 T (6 S + 2 T) per column; K = 65536 splits into whole 128-column blocks at 132 SMs."""
    counts = efficiency(kernel, **PRODUCTION_SHAPE, dtype_bytes=2, sms=132, concurrent=3 * 132, l2_bytes=50 << 20)
    assert counts["executed_flops"] / counts["useful_flops"] == pytest.approx(ratio)
    assert counts["moved_bytes"] / counts["min_bytes"] < 1.01


@pytest.mark.parametrize("tau, error", [(float("inf"), ValueError), (float("nan"), ValueError), (0.0, ValueError),
                                        (-1.0, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_refuses_bad_temperature(device, tau, error):
    student, teacher = _inputs(2, 2, 3, 8, torch.float32, device)
    with pytest.raises(error, match="student_temperature"):
        dino_cross_entropy(student, teacher, tau)
    with pytest.raises(error, match="student_temperature"):
        DINOCrossEntropy(tau)
