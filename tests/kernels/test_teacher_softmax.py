"""teacher_softmax kernel (interpreter on CPU, compiled on CUDA) against the float64 oracle.

No tl.dot in this kernel, so bf16 logits are tested under the interpreter too.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_oracle import assert_flash_tolerance, teacher_softmax_f64

from terrafm_kernels import reference
from terrafm_kernels.modules import DualCenteringSoftmax
from terrafm_kernels.teacher_softmax import (
    compile_specs,
    efficiency,
    launch_plan,
    roofline_cost,
    teacher_softmax,
)


def _inputs(R, K, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(R, K, generator=g, dtype=torch.float64) * scale).to(dtype)
    center = torch.randn(K, generator=g) * scale
    center_high = torch.randn(K, generator=g) * scale
    high_weight = (torch.rand(R, generator=g) > 0.5).float()
    return [x.to(device) for x in (t, center, center_high, high_weight)]


def _check(R, K, dtype, device, temperature=0.04, alpha=0.8, scale=3.0, seed=0):
    t, c, ch, hw = _inputs(R, K, dtype, device, scale, seed)
    out = teacher_softmax(t, c, ch, hw, temperature, alpha)
    plain = reference.teacher_softmax(t, c, ch, hw, temperature, alpha)
    oracle = teacher_softmax_f64(t.cpu(), c.cpu(), ch.cpu(), hw.cpu(), temperature, alpha)
    for name, kernel, p, o in zip(("probs", "logit_sum", "high_logit_sum"), out, plain, oracle, strict=True):
        assert kernel.dtype == torch.float32 and kernel.shape == o.shape
        # column sums of R logits of size ~scale: fp32 accumulation error grows linearly with the magnitude (at scale
        # 1e4 a tolerance that grew with its square accepted a bf16 accumulation's error of 139)
        atol = 1e-6 if name == "probs" else 1e-6 * R * max(1.0, scale)
        assert_flash_tolerance(name, kernel.cpu(), p.cpu(), o, atol)
    assert torch.allclose(out[0].sum(-1).cpu().double(), torch.ones(R, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R,K", [(1, 1), (3, 97), (6, 130), (2, 4133)])
def test_matches_float64_oracle(R, K, dtype, device):
    _check(R, K, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shipped_gpu_tiles_match_float64_oracle(dtype, device, monkeypatch):
    """The GPU plan ((1, 8192) row chunks, (8, 512) column tiles) on a shape ragged against it: on CPU the
    interpreter runs it in place of its own small tiles."""
    module = importlib.import_module("terrafm_kernels.teacher_softmax")
    monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    _check(10, 9000, dtype, device)  # two row chunks, the second ragged


@pytest.mark.parametrize("temperature", [0.01, 0.06])
def test_large_logits_tiny_temperature(temperature, device):
    _check(4, 301, torch.float32, device, temperature=temperature, scale=1e4)
    t, c, ch, hw = _inputs(4, 301, torch.float32, device, scale=1e4)
    probs = teacher_softmax(t, c, ch, hw, temperature, 0.8)[0]
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_whose_first_tiles_are_minus_infinity(dtype, device):
    """Logits that are -inf after (t - c) / tau in a row's first tile (-3e38 in fp32, or -60 at tau 1e-37 in fp16)
    made the online max -inf - -inf: the whole row was NaN where the oracle is finite."""
    t, c, ch, hw = _inputs(3, 300, dtype, device)
    t[:2, :150] = -3e38 if dtype == torch.float32 else -60.0
    temperature = 0.04 if dtype == torch.float32 else 1e-37
    if dtype == torch.float32:
        t[1, 150:] -= 60.0  # the row max far below 0 as well
    c, ch = c.clamp(-1, 1), ch.clamp(-1, 1)
    out = teacher_softmax(t, c, ch, hw, temperature, 0.8)
    plain = reference.teacher_softmax(t, c, ch, hw, temperature, 0.8)
    oracle = teacher_softmax_f64(t.cpu(), c.cpu(), ch.cpu(), hw.cpu(), temperature, 0.8)
    assert torch.isfinite(out[0]).all() and torch.isfinite(plain[0]).all()
    assert_flash_tolerance("probs", out[0].cpu(), plain[0].cpu(), oracle[0], 1e-6)


@settings(max_examples=6, deadline=None)
@given(R=st.integers(1, 9), K=st.integers(1, 300), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_hypothesis_shapes(R, K, alpha, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(R, K, torch.float32, device, alpha=alpha, seed=seed)


def test_deterministic(device):
    t, c, ch, hw = _inputs(9, 200, torch.float32, device)
    a = teacher_softmax(t, c, ch, hw, 0.04, 0.8)
    b = teacher_softmax(t, c, ch, hw, 0.04, 0.8)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_module_forward_and_update(device):
    K = 50
    module = DualCenteringSoftmax(K, alpha=0.8).to(device)
    t, _, _, hw = _inputs(4, K, torch.float32, device)
    probs, logit_sum, high_sum = module(t, hw, 0.04)
    assert torch.allclose(probs, teacher_softmax(t, module.center, module.center_high, hw, 0.04, 0.8)[0])
    module.update(logit_sum, high_sum, rows=4, high_rows=float(hw.sum()))
    assert torch.allclose(module.center, 0.1 * t.mean(0), atol=1e-6)
    expected_high = 0.1 * (hw[:, None] * t).sum(0) / hw.sum()
    assert torch.allclose(module.center_high, expected_high, atol=1e-6)
    before = module.center_high.clone()
    module.update(logit_sum, high_sum, rows=4, high_rows=0)
    assert torch.equal(module.center_high, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_keeps_a_centre_whose_update_is_not_finite(bad, device):
    """A diverged step's NaN / inf sums leave that centre as it was (decided on the device); the other centre's
    finite update still lands."""
    K = 6
    module = DualCenteringSoftmax(K).to(device)
    module.center.fill_(0.5)
    module.center_high.fill_(0.25)
    logit_sum = torch.ones(K, device=device)
    logit_sum[2] = bad
    module.update(logit_sum, torch.full((K,), 2.0, device=device), rows=2, high_rows=2)
    assert torch.equal(module.center, torch.full((K,), 0.5, device=device))
    assert torch.allclose(module.center_high, torch.full((K,), 0.9 * 0.25 + 0.1 * 1.0, device=device))
    module.update(torch.ones(K, device=device), torch.full((K,), bad, device=device), rows=2, high_rows=2)
    assert torch.allclose(module.center, torch.full((K,), 0.9 * 0.5 + 0.1 * 0.5, device=device))


def test_validation_errors(device):
    t, c, ch, hw = _inputs(3, 20, torch.float32, device)
    with pytest.raises(ValueError, match="2 dimensions"):
        teacher_softmax(t[0], c, ch, hw, 0.04, 0.8)
    with pytest.raises(ValueError, match="K=20"):
        teacher_softmax(t, c[:-1], ch, hw, 0.04, 0.8)
    with pytest.raises(ValueError, match="center_high has 19"):
        teacher_softmax(t, c, ch[:-1], hw, 0.04, 0.8)
    with pytest.raises(ValueError, match="R=3"):
        teacher_softmax(t, c, ch, hw[:2], 0.04, 0.8)
    with pytest.raises(TypeError, match="dtype"):
        teacher_softmax(t.long(), c, ch, hw, 0.04, 0.8)
    with pytest.raises(ValueError, match="contiguous"):
        teacher_softmax(torch.randn(20, 3, device=device).t(), c, ch, hw, 0.04, 0.8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        teacher_softmax(t, c, ch, hw, 0.0, 0.8)
    with pytest.raises(ValueError, match="alpha"):
        teacher_softmax(t, c, ch, hw, 0.04, 1.5)
    with pytest.raises(ValueError, match=r"move the module \(\.to\(device\)\) or the inputs"):
        teacher_softmax(t, c.to("meta"), ch, hw, 0.04, 0.8)


def test_roofline_and_specs():
    cost = roofline_cost(R=256, K=65536, dtype_bytes=2)
    assert cost["bytes"] == 256 * 65536 * 6 + 16 * 65536 and cost["flops"] > 0
    specs = compile_specs()
    assert {s["name"] for s in specs} == {"teacher_softmax_float32", "teacher_softmax_float16",
                                          "teacher_softmax_bfloat16"}
    assert all(not s["uses_dot"] for s in specs)


def test_logits_cross_hbm_once_while_a_group_fits_half_of_l2():
    # bf16: the presets' 128 rows are 16 MiB, one launch of 128 row + 128 column programs. fp32: 32 MB, more than
    # half of an H100's L2, so two launches of 64 rows. At R = 4096 (past MAX_GROUPS) one launch whose rows leave
    # L2 before they are read again: three reads.
    assert launch_plan(128, 65536, 2)["grid"] == (128 + 65536 // launch_plan(128, 65536)["COL_BLOCK_K"],)
    assert launch_plan(128, 65536, 4)["groups"] == 2 and launch_plan(128, 65536, 4)["group_rows"] == 64
    h100 = {"sms": 132, "concurrent": 132 * 2, "l2_bytes": 50 << 20}
    for e in (2, 4):
        counts = efficiency("op", R=128, K=65536, dtype_bytes=e, **h100)
        assert counts["moved_bytes"] < 1.05 * counts["min_bytes"]  # + the shifts, and the sums read back in fp32
    many = efficiency("op", R=4096, K=65536, dtype_bytes=4, **h100)
    assert many["moved_bytes"] > 1.9 * many["min_bytes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_groups_match_one_launch_and_the_oracle(dtype, device, monkeypatch):
    """Groups of 4 rows of 300 prototypes (the last group ragged): the column sums accumulate over launches."""
    module = importlib.import_module("terrafm_kernels.teacher_softmax")
    whole = teacher_softmax(*_inputs(11, 300, dtype, device), 0.04, 0.8)
    monkeypatch.setattr(module, "GROUP_BYTES", 4 * 300 * dtype.itemsize)
    assert module.launch_plan(11, 300, dtype.itemsize)["groups"] == 3
    _check(11, 300, dtype, device)
    grouped = teacher_softmax(*_inputs(11, 300, dtype, device), 0.04, 0.8)
    assert torch.equal(grouped[0], whole[0])  # each row's probs come from the same program either way
    for a, b in zip(grouped[1:], whole[1:], strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-5)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    t, c, ch, hw = _inputs(3, 20, torch.float32, "cpu")
    from terrafm_kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        teacher_softmax(t, c, ch, hw, 0.04, 0.8)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(center_momentum=float("nan")), ValueError, "center_momentum"),
    (dict(center_momentum=5.0), ValueError, "center_momentum"),
    (dict(center_high_momentum=-0.1), ValueError, "center_high_momentum"),
    (dict(center_momentum="0.9"), TypeError, "center_momentum"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(num_prototypes=0), ValueError, "num_prototypes"),
])
def test_dual_centering_refuses_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        DualCenteringSoftmax(**{"num_prototypes": 4, **kwargs})


@pytest.mark.parametrize("logit_sum, high_logit_sum, rows, error, name", [
    (torch.zeros(3), torch.zeros(4), 2, ValueError, "logit_sum"),
    (torch.zeros(4), torch.zeros(5), 2, ValueError, "high_logit_sum"),
    (torch.zeros(4), torch.zeros(4), 0, ValueError, "rows"),
    (torch.zeros(4), torch.zeros(4), float("inf"), ValueError, "rows"),
])
def test_dual_centering_update_refuses_bad_arguments(logit_sum, high_logit_sum, rows, error, name):
    module = DualCenteringSoftmax(4)
    with pytest.raises(error, match=name):
        module.update(logit_sum, high_logit_sum, rows, 1)
    assert (module.center == 0).all() and (module.center_high == 0).all()


@pytest.mark.parametrize("high_rows, error", [(float("nan"), ValueError), (-2, ValueError), ("1", TypeError),
                                              (None, TypeError)])
def test_centre_update_names_a_bad_high_row_count(high_rows, error):
    """NaN and negative counts skipped the c_h update silently; a string or None failed on '>'."""
    d = DualCenteringSoftmax(8)
    with pytest.raises(error, match="high_rows"):
        d.update(torch.ones(8), torch.ones(8), 3, high_rows)
    assert torch.equal(d.center, torch.zeros(8))  # nothing updated
