"""dino_head_loss (prototype layer + teacher softmax + cross-entropy, fused) against the float64 oracle.

Every kernel here uses tl.dot, which the Triton interpreter gets wrong for bf16 operands, so bf16 is
only tested on a CUDA GPU; fp32 and fp16 run everywhere.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from loss_oracle import assert_flash_tolerance, dino_head_loss_f64
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from terrafm_kernels import reference
from terrafm_kernels.dino_head_loss import (
    PRODUCTION_SHAPE,
    LaunchPlan,
    compile_specs,
    dino_head_loss,
    efficiency,
    roofline_cost,
)
from terrafm_kernels.modules import DINOHeadLoss

TAU_T, TAU_S, ALPHA = 0.04, 0.1, 0.8
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _inputs(S, T, B, K, D, dtype, device, seed=0, center_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(S, B, D, generator=g).to(dtype)
    teacher = torch.randn(T, B, D, generator=g).to(dtype)
    weight_v = torch.randn(K, D, generator=g).to(dtype)
    center = torch.randn(K, generator=g) * center_scale
    center_high = torch.randn(K, generator=g) * center_scale
    high_weight = (torch.rand(T * B, generator=g) > 0.5).float()
    return [x.to(device) for x in (student, teacher, weight_v, center, center_high, high_weight)]


def _run(fn, student, teacher, weight_v, *rest, weight_g=None, **kwargs):
    x = student.clone().requires_grad_()
    v = weight_v.clone().requires_grad_()
    g = None if weight_g is None else weight_g.clone().requires_grad_()
    loss, logit_sum, high_sum = fn(x, teacher, v, *rest, TAU_T, TAU_S, ALPHA, weight_g=g, **kwargs)
    loss.backward()
    return (loss.detach(), logit_sum, high_sum, x.grad, v.grad) + (() if g is None else (g.grad,))


def _check(S, T, B, K, D, dtype, device, seed=0, separate_teacher=False, gain=False, v_scale=None):
    """Loss, centre sums and the gradients of the features, weight_v (and weight_g with gain: a per-prototype
    weight-norm gain, and the teacher's own) against the fp64 oracle by the flash-attn 2x rule. v_scale (K,): fp32
    prototypes (the parameters' dtype under autocast) scaled per row, with features of `dtype`."""
    student, teacher, weight_v, center, center_high, high_weight = _inputs(S, T, B, K, D, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {}
    if v_scale is not None:
        weight_v = weight_v.float() * v_scale.to(device)[:, None]
    if separate_teacher or gain:
        noise = 0.3 * torch.randn(K, D, generator=g)
        kwargs["teacher_weight_v"] = (weight_v.float().cpu() + noise).to(weight_v.dtype).to(device)
    if gain:
        kwargs["weight_g"] = (0.5 + torch.rand(K, 1, generator=g)).to(dtype).to(device)
        kwargs["teacher_weight_g"] = (0.5 + torch.rand(K, 1, generator=g)).to(dtype).to(device)
    kernel = _run(dino_head_loss, student, teacher, weight_v, center, center_high, high_weight, **kwargs)
    rest = (center, center_high, high_weight)
    plain = _run(reference.dino_head_loss, student, teacher, weight_v, *rest, **kwargs)
    oracle_kwargs = {k: v.cpu().double() for k, v in kwargs.items()}
    oracle = _run(dino_head_loss_f64, *(x.cpu().double() for x in (student, teacher, weight_v, *rest)),
                  **oracle_kwargs)
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    names = ("loss", "logit_sum", "high_logit_sum", "grad student_features", "grad weight_v", "grad weight_g")
    for name, k, p, o in zip(names, kernel, plain, oracle, strict=False):
        assert k.shape == o.shape and torch.isfinite(k).all(), name
        # logits are cosines (|z| <= 1): loss and centre sums get an absolute floor of one logit's rounding;
        # gradients are differences of fp32 terms up to 1/tau_s per unit input that cancel exactly where the loss
        # is flat (K = 1: one prototype, softmax 1, gradient 0), so they get a floor of two fp32 roundings of those
        scale = o.abs().max().item() if name.startswith("grad") else max(1.0, o.abs().max().item())
        floor = 2 * torch.finfo(torch.float32).eps / TAU_S if name.startswith("grad") else 1e-7
        assert_flash_tolerance(name, k.float().cpu(), p.float().cpu(), o, rel * scale + floor)
    assert len(kernel) == len(oracle) and kernel[3].dtype == dtype and kernel[4].dtype == weight_v.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "S,T,B,K,D", [(2, 2, 1, 1, 16), (4, 2, 3, 37, 20), (5, 2, 2, 130, 32), (3, 2, 1, 4133, 16)]
)
def test_matches_float64_oracle(S, T, B, K, D, dtype, device):
    _check(S, T, B, K, D, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [40, 300])
def test_shipped_gpu_tiles_match_float64_oracle(D, dtype, device, monkeypatch):
    """The GPU configs (16-bit: 64-row x 32-prototype tiles by tensor descriptor; fp32: 16 x 16 IEEE dots; 256-column
    D blocks, two of them at D = 300) on shapes ragged against them (18 rows, 300 prototypes): on CPU the interpreter
    runs them in place of its own 16-wide tiles."""
    import importlib

    module = importlib.import_module("terrafm_kernels.dino_head_loss")
    monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    plan = module.LaunchPlan.for_tensor(torch.empty(0, dtype=dtype), 300, D)
    assert plan.config == module.CONFIGS["fp32" if dtype == torch.float32 else "16bit"]
    assert plan.tma == (dtype != torch.float32)
    _check(2, 2, 9, 300, D, dtype, device)


def test_separate_teacher_weight(device):
    _check(4, 2, 2, 50, 16, torch.float32, device, separate_teacher=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,T,B,K,D", [(4, 2, 3, 37, 20), (3, 2, 2, 70, 48)])
def test_weight_norm_gains_match_float64_oracle(S, T, B, K, D, dtype, device):
    """The kernels apply W = g v / ||v|| themselves: per-prototype gains on both sides, and dL/dv and dL/dg
    from grad_weight's epilogue, against the fp64 oracle (ragged K and D: padded descriptor rows at D = 20)."""
    _check(S, T, B, K, D, dtype, device, gain=True)


@pytest.mark.parametrize("separate_teacher", [False, True])
def test_fp32_prototypes_beyond_the_features_range(separate_teacher, device):
    """fp16 features with fp32 prototypes (autocast keeps parameters fp32): rows past fp16's 65504 were cast to
    inf before their norm (the whole loss NaN), and rows under its normal range lost their digits; the weight norm
    makes each row's scale irrelevant, so both must match the oracle."""
    K = 37
    v_scale = torch.ones(K)
    v_scale[0], v_scale[1], v_scale[2] = 7e4, 1e-6, 1e12  # (1e12)^2 D still fits fp32: the norm is finite
    _check(3, 2, 2, K, 20, torch.float16, device, separate_teacher=separate_teacher, v_scale=v_scale)


def test_weight_norm_is_never_materialised(device):
    """No torch op around the kernels makes a (K, D) tensor: the normalised prototypes W, their casts and the
    autograd of the normalisation are gone; only the backward op's dL/dv (and autograd's detach of it) remain."""
    K, D = 50, 32
    student, teacher, weight_v, center, center_high, high_weight = _inputs(3, 2, 2, K, D, torch.float32, device)
    weight_v.requires_grad_()
    weight_g = torch.full((K, 1), 1.5, device=device, requires_grad=True)
    teacher_weight_v = weight_v.detach() + 0.1

    class KxD(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.numel() == K * D for t in tree_flatten(out)[0]):
                self.ops.add(func.__name__.split(".")[0])
            return out

    with KxD() as seen:
        dino_head_loss(student, teacher, weight_v, center, center_high, high_weight, TAU_T, TAU_S, ALPHA,
                       weight_g=weight_g, teacher_weight_v=teacher_weight_v)[0].backward()
    assert seen.ops <= {"dino_head_loss_backward", "detach"}, seen.ops
    assert weight_v.grad is not None and weight_g.grad is not None


@settings(max_examples=5, deadline=None)
@given(S=st.integers(2, 6), B=st.integers(1, 3), K=st.integers(1, 120), D=st.integers(1, 40),
       seed=st.integers(0, 99))
@example(S=3, B=1, K=1, D=2, seed=0)  # a flat loss: the fused gradient is fp32 cancellation noise around 0
def test_hypothesis_shapes(S, B, K, D, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(S, 2, B, K, D, torch.float32, device, seed=seed)


def test_trainable_weight_g_gets_gradient(device):
    student, teacher, weight_v, center, center_high, high_weight = _inputs(3, 2, 2, 40, 16, torch.float32,
                                                                           device)
    g_kernel = torch.full((40, 1), 1.5, device=device, requires_grad=True)
    g_plain = torch.full((40, 1), 1.5, device=device, dtype=torch.float64, requires_grad=True)
    dino_head_loss(student, teacher, weight_v, center, center_high, high_weight, TAU_T, TAU_S, ALPHA,
                   weight_g=g_kernel)[0].backward()
    dino_head_loss_f64(student.double(), teacher.double(), weight_v.double(), center.double(),
                       center_high.double(), high_weight.double(), TAU_T, TAU_S, ALPHA,
                       weight_g=g_plain)[0].backward()
    assert torch.allclose(g_kernel.grad.double(), g_plain.grad, rtol=1e-4, atol=1e-7)


def test_module_matches_function(device):
    torch.manual_seed(0)
    module = DINOHeadLoss(in_dim=16, num_prototypes=30).to(device)
    student, teacher, _, _, _, high_weight = _inputs(3, 2, 2, 30, 16, torch.float32, device)
    loss, logit_sum, high_sum = module(student, teacher, high_weight, TAU_T)
    expected = dino_head_loss(student, teacher, module.weight_v.detach(), module.centering.center,
                              module.centering.center_high, high_weight, TAU_T, TAU_S, ALPHA)
    assert torch.allclose(loss, expected[0])
    loss.backward()
    assert module.weight_v.grad is not None and module.weight_v.grad.abs().sum() > 0
    module.update_centers(logit_sum, high_sum, rows=4, high_rows=float(high_weight.sum()))
    assert torch.allclose(module.centering.center, 0.1 * logit_sum / 4)


def test_validation_errors(device):
    student, teacher, weight_v, center, center_high, high_weight = _inputs(3, 2, 2, 20, 16, torch.float32,
                                                                           device)
    args = [student, teacher, weight_v, center, center_high, high_weight, TAU_T, TAU_S, ALPHA]

    def call(**changes):
        names = ["student_features", "teacher_features", "weight_v", "center", "center_high", "high_weight",
                 "teacher_temperature", "student_temperature", "alpha"]
        kwargs = dict(zip(names, args, strict=True))
        kwargs.update(changes)
        return dino_head_loss(**kwargs)

    with pytest.raises(ValueError, match="3 dimensions"):
        call(student_features=student[0])
    with pytest.raises(ValueError, match="in B and D"):
        call(teacher_features=teacher[:, :1].contiguous())
    with pytest.raises(ValueError, match="D=16"):
        call(weight_v=weight_v[:, :8].contiguous())
    with pytest.raises(ValueError, match="K=20"):
        call(center=center[:5])
    with pytest.raises(ValueError, match="T\\*B=4"):
        call(high_weight=high_weight[:3])
    with pytest.raises(TypeError, match="dtype"):
        call(weight_v=weight_v.long())
    with pytest.raises(ValueError, match="student_features must be contiguous"):  # the right shape, strided
        call(student_features=student.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        call(teacher_temperature=0.0)
    with pytest.raises(ValueError, match="student_temperature must be > 0"):
        call(student_temperature=-1.0)
    with pytest.raises(ValueError, match=r"move the module \(\.to\(device\)\) or the inputs"):
        call(weight_v=weight_v.to("meta"))


@pytest.mark.parametrize("fn", [reference.dino_head_loss, dino_head_loss], ids=["torch", "triton"])
def test_empty_batches_prototypes_and_bad_weight_g_raise_alike_on_every_backend(fn, device):
    student, teacher, weight_v, center, center_high, high_weight = _inputs(3, 2, 2, 20, 16, torch.float32, device)

    def call(s=student, t=teacher, w=weight_v, c=center, ch=center_high, hw=high_weight, weight_g=None):
        return fn(s, t, w, c, ch, hw, TAU_T, TAU_S, ALPHA, weight_g=weight_g)

    with pytest.raises(ValueError, match=r"at least one sample and view: student_features \(S, B, D\) = "
                                         r"\(3, 0, 16\)"):
        call(s=student[:, :0].contiguous(), t=teacher[:, :0].contiguous(), hw=high_weight[:0])
    with pytest.raises(ValueError, match=r"weight_v \(K, D\) = \(0, 16\) must have at least one prototype"):
        call(w=weight_v[:0], c=center[:0], ch=center_high[:0])
    with pytest.raises(ValueError, match=r"weight_g must be None or a \(K, 1\) = \(20, 1\) tensor .* got "
                                         r"torch.Size\(\[20\]\)"):
        call(weight_g=torch.ones(20, device=device))
    with pytest.raises(ValueError, match=r"weight_g must be None or a \(K, 1\)"):
        call(weight_g=torch.ones(16, 1, device=device))
    with pytest.raises(ValueError, match="teacher_weight_g is given without teacher_weight_v"):  # it was ignored
        fn(student, teacher, weight_v, center, center_high, high_weight, TAU_T, TAU_S, ALPHA,
           teacher_weight_g=torch.full((20, 1), 3.0, device=device))


def test_roofline_and_specs():
    cost = roofline_cost(S=12, T=2, B=64, K=65536, D=256, dtype_bytes=2, backward=False)
    assert cost["flops"] == 2 * 65536 * 256 * (128 + 768)
    specs = compile_specs()
    assert all(s["uses_dot"] == (not s["name"].endswith("float32")) for s in specs)
    names = {s["name"] for s in specs}
    assert names == {f"head_{kernel}_{dtype}" for dtype in ("float32", "float16", "bfloat16")
                     for kernel in ("softmax_project_student", "softmax_project_teacher", "grad_weight")}


def test_production_plan_computes_each_logit_tile_once_per_pass():
    """At the presets' shape (bf16, H100) each pass computes every logit tile once: the forward's
    project pass executes exactly its two GEMMs (logits, projection), the backward's grad_weight pass
    2x its projection (the head's 2.0x bound with no padding to spare); the project grid is one wave:
    one full-width D block, and no more K splits (each an fp32 (R, D) partial) than SMs."""
    K, D, sms = PRODUCTION_SHAPE["K"], PRODUCTION_SHAPE["D"], 132
    for kernel, centred, recomputed in (("project", False, 1), ("project", True, 1), ("grad_weight", False, 2)):
        counts = efficiency(kernel, centred, **PRODUCTION_SHAPE, dtype_bytes=2, sms=sms, concurrent=sms,
                            l2_bytes=50 * 2**20)
        assert counts["executed_flops"] == recomputed * counts["useful_flops"], (kernel, centred)
        assert counts["moved_bytes"] <= 2.0 * counts["min_bytes"], (kernel, centred)
    plan = LaunchPlan(K, D, fp32=False, interpreter=False, sms=sms)
    for rows in (PRODUCTION_SHAPE["T"] * PRODUCTION_SHAPE["B"], PRODUCTION_SHAPE["S"] * PRODUCTION_SHAPE["B"]):
        grid, block_do, splits, per_split = plan.project_grid(rows)
        assert grid[0] == 1 and block_do == D and math.prod(grid) <= sms, grid
        assert (splits - 1) * per_split < K <= splits * per_split


def test_project_count_pays_the_norm_loop_reread_only_when_v_outgrows_l2():
    """A norm loop of its own streams a program's split of v just before its GEMM loop does: L2 serves the second
    read while a wave's v fits in it (bf16, 34 MB), HBM when it does not (the fp32 teacher's 67 MB): exactly one more
    K D e. The fp32 student takes its norms in its GEMM loop (LaunchPlan.norm_in_loop): v streams once."""
    K, D, sms = PRODUCTION_SHAPE["K"], PRODUCTION_SHAPE["D"], 132
    mib = 2**20
    # (bytes per element, centred, L2, an L2 that holds v but leaves the same tensors L2-resident, the difference)
    for e, centred, l2, roomy, extra in ((2, False, 50 * mib, 64 * mib, 0), (2, False, 30 * mib, 64 * mib, K * D * 2),
                                         (4, True, 50 * mib, 100 * mib, K * D * 4), (4, False, 50 * mib, 100 * mib, 0)):
        counts = [efficiency("project", centred, **PRODUCTION_SHAPE, dtype_bytes=e, sms=sms, concurrent=4 * sms,
                             l2_bytes=size) for size in (l2, roomy)]
        assert counts[0]["moved_bytes"] - counts[1]["moved_bytes"] == extra, (e, centred, l2)
    assert LaunchPlan(K, D, fp32=True, interpreter=False, sms=sms).norm_in_loop(False)
    assert not LaunchPlan(K, D, fp32=False, interpreter=False, sms=sms).norm_in_loop(False)


def test_compile_report_compiles_the_specialized_variant_the_jit_runs():
    """At D = 256 the JIT specializes the sizes and pointers as multiples of 16, which turns the (rows, D)
    loads into vector loads; the report compiles that variant (the specs' divisible_by_16), which needs fewer
    registers than the unspecialized one (162 against 135 on sm_90, where TMA computes the tile addresses;
    255 before the operands came by tensor descriptor)."""
    code = """
import json
from terrafm_kernels import compile_report, dino_head_loss
spec = [s for s in dino_head_loss.compile_specs() if s["name"] == "head_softmax_project_student_bfloat16"][0]
assert {"h_ptr", "v_proj_ptr", "D", "D_STRIDE", "K_PER_SPLIT"} <= set(spec["divisible_by_16"])
rows = [compile_report.compile_one(s, 90) for s in (spec, {**spec, "divisible_by_16": ()})]
print(json.dumps([{k: r.get(k) for k in ("regs", "stack", "local", "ok", "problem")} for r in rows]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    specialized, plain = json.loads(run.stdout.splitlines()[-1])
    assert specialized["ok"] and specialized["stack"] == 0 and specialized["local"] == 0, specialized
    assert specialized["regs"] < plain["regs"], (specialized, plain)


def test_module_refuses_a_width_the_kernels_never_take():
    from terrafm_kernels.modules import DINOHeadLoss

    with pytest.raises(ValueError, match="in_dim must be at most 512"):
        DINOHeadLoss(in_dim=513, num_prototypes=8)


def test_frozen_prototypes_skip_the_weight_gradient_pass(device, monkeypatch):
    """With v (and g) frozen the backward gives the features the same gradient and runs no pass over K."""
    import importlib

    module = importlib.import_module("terrafm_kernels.dino_head_loss")
    student, teacher, weight_v, center, center_high, high_weight = _inputs(3, 2, 2, 40, 16, torch.float32, device)
    grads, original = {}, module._grad_weight
    for frozen in (False, True):
        calls = []
        monkeypatch.setattr(module, "_grad_weight",
                            lambda *a, calls=calls, **k: calls.append(1) or original(*a, **k))
        x = student.clone().requires_grad_()
        v = weight_v.clone().requires_grad_(not frozen)
        loss = dino_head_loss(x, teacher, v, center, center_high, high_weight, TAU_T, TAU_S, ALPHA)[0]
        loss.backward()
        grads[frozen] = x.grad
        assert len(calls) == (0 if frozen else 1) and (v.grad is None) == frozen
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)
