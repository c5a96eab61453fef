"""Fused cross-attention fusion vs the float64 reference: forward and all four gradients.

Under TRITON_INTERPRET=1 on CPU (conftest) or compiled on CUDA. The kernel computes in fp32 from
any input dtype (its small per-head products are fp32 FMA dots, never bf16 tl.dot), so bf16 is
tested under the interpreter too.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terrafm_kernels import reference
from terrafm_kernels.fusion import cross_attention_fusion
from terrafm_kernels.modules import CrossAttentionFusion

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _check(T, M, A, Q, H, dtype, device, seed=0):
    """flash-attn rule: kernel error vs fp64 <= 2 x plain PyTorch error at the same dtype + atol."""
    g = torch.Generator().manual_seed(seed)
    base = {"keys": torch.randn(T, M, A, generator=g), "values": torch.randn(T, M, A, generator=g),
            "queries": torch.randn(Q, A, generator=g), "pool": torch.randn(A, generator=g) * 0.3}
    kern = {k: v.to(device=device, dtype=dtype).clone().requires_grad_() for k, v in base.items()}
    oracle = {k: v.to(dtype).double().requires_grad_() for k, v in base.items()}
    plain = {k: v.to(dtype).clone().requires_grad_() for k, v in base.items()}
    out = cross_attention_fusion(**kern, num_heads=H)
    ref = reference.cross_attention_fusion(**oracle, num_heads=H)
    ref_plain = reference.cross_attention_fusion(**plain, num_heads=H)
    assert out.dtype == dtype and out.shape == (T, A)
    grad = torch.randn(T, A, generator=g)
    out.backward(grad.to(device=device, dtype=dtype))
    ref.backward(grad.double())
    ref_plain.backward(grad.to(dtype))
    err, plain_err = _max_err(out, ref), _max_err(ref_plain, ref)
    assert err <= 2 * plain_err + ATOL[dtype], f"out: {err:.3e} vs plain {plain_err:.3e}"
    for k in base:
        scale = max(1.0, oracle[k].grad.abs().max().item())
        g_err, g_plain = _max_err(kern[k].grad, oracle[k].grad), _max_err(plain[k].grad, oracle[k].grad)
        assert g_err <= 2 * g_plain + ATOL[dtype] * scale, f"grad {k}: {g_err:.3e} vs plain {g_plain:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,M,A,Q,H", [
    (7, 3, 48, 5, 4),    # three modalities, d = 12 (not a power of two), ragged T
    (5, 2, 36, 5, 2),    # two modalities, d = 18
    (9, 1, 32, 3, 2),    # one modality: reduces to the values
    (3, 16, 40, 17, 5),  # the most modalities, more queries than the 16-wide block
    (4, 2, 96, 5, 2),    # d = 48: whole 32-column chunks (16-bit) and a 16-column tail, two sensors paired
    (3, 3, 74, 5, 2),    # d = 37: a tail of 5 (16-bit) or 5 of 16 (fp32) columns, masked
])
def test_matches_float64_reference(T, M, A, Q, H, dtype, device):
    _check(T, M, A, Q, H, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,M,A,Q,H", [
    (150, 3, 48, 5, 4),  # forward: 16-position tiles, the tenth ragged; head backward: 128 and a ragged 22, in 8s
    (37, 2, 96, 5, 2),   # two sensors paired in the lanes; d = 48 in 32-column chunks (16-bit) and a tail
])
def test_shipped_gpu_tiles_match_float64_reference(T, M, A, Q, H, dtype, device, monkeypatch):
    """The GPU plan (GPU_BLOCK_T positions per backward program, BLOCK_P / GPU_BLOCK_P_HEAD positions per tile) on
    shapes ragged against it: on CPU the interpreter runs it in place of its own 4 / 2 positions. The precision of
    the GPU's own arithmetic (tf32 mma.sync in the 16-position sums) is gpu_check's to prove."""
    import importlib

    module = importlib.import_module("terrafm_kernels.fusion")
    monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    plan = module.launch_plan(T, M, Q, A, H, torch.tensor([], dtype=dtype).element_size())
    assert plan["BLOCK_T"] == module.GPU_BLOCK_T and plan["BLOCK_P_HEAD"] == module.GPU_BLOCK_P_HEAD
    assert plan["BLOCK_P"] > module.INTERPRETER_BLOCK_P
    _check(T, M, A, Q, H, dtype, device)


@settings(max_examples=5, deadline=None)
@given(T=st.integers(1, 9), M=st.integers(1, 5), d=st.integers(1, 20), H=st.integers(1, 3),
       Q=st.integers(1, 6), seed=st.integers(0, 100))
def test_hypothesis_shapes(T, M, d, H, Q, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(T, M, d * H, Q, H, torch.float32, device, seed)


def test_one_modality_returns_the_values(device):
    keys, values = torch.randn(6, 1, 32, device=device), torch.randn(6, 1, 32, device=device)
    out = cross_attention_fusion(keys, values, torch.randn(5, 32, device=device), torch.randn(32, device=device), 4)
    torch.testing.assert_close(out, values[:, 0], rtol=1e-6, atol=1e-6)


def test_module_drop_in_matches_reference(device):
    module = CrossAttentionFusion(32, num_queries=5, num_heads=4).to(device)
    keys, values = torch.randn(4, 3, 32, device=device), torch.randn(4, 3, 32, device=device)
    expected = reference.cross_attention_fusion(keys, values, module.queries, module.pool, 4)
    torch.testing.assert_close(module(keys, values), expected, rtol=1e-5, atol=1e-5)


def test_model_case_n_uses_the_kernel(device, monkeypatch):
    from terrafm.models import build_model
    from terrafm_kernels import fusion

    ref_model = build_model("terrafm_tiny", img_size=32, fusion=True, fusion_heads=4).to(device)
    kern_model = build_model("terrafm_tiny", img_size=32, fusion=True, fusion_heads=4,
                             ops={"cross_attention_fusion": "triton"}, ops_device=device).to(device)
    kern_model.load_state_dict(ref_model.state_dict())
    images = {"s2_l2a": torch.randn(2, 12, 32, 32, device=device), "s1": torch.randn(2, 2, 32, 32, device=device)}
    launched, launch = [], fusion.launch_kernel

    def counted(kernel, *args, **kwargs):
        launched.append(kernel)
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(fusion, "launch_kernel", counted)
    kern_out = kern_model(images)
    assert fusion._forward_kernel in launched  # the equality below would hold for a model running the reference too
    launched.clear()
    torch.testing.assert_close(kern_out, ref_model(images), rtol=1e-4, atol=1e-4)
    assert not launched


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(values=torch.randn(2, 2, 8)), ValueError, "values must have the shape of keys"),
    (lambda a: a.update(keys=torch.randn(2, 17, 8), values=torch.randn(2, 17, 8)), ValueError, "1..16 modality"),
    (lambda a: a.update(queries=torch.randn(5, 4)), ValueError, "token width A=8"),
    (lambda a: a.update(num_heads=3), ValueError, "divisor of the token width 8"),
    (lambda a: a.update(pool=a["pool"].to(torch.int64)), TypeError, r"pool must have dtype in \['torch.float32'"),
    (lambda a: a.update(keys=a["keys"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "contiguous"),
    (lambda a: a.update(keys=a["keys"][0]), ValueError, "3 dimensions"),
])
def test_bad_inputs_raise_before_launch(change, error, match):
    args = {"keys": torch.randn(2, 3, 8), "values": torch.randn(2, 3, 8), "queries": torch.randn(5, 8),
            "pool": torch.randn(8), "num_heads": 2}
    change(args)
    with pytest.raises(error, match=match):
        cross_attention_fusion(**args)


@pytest.mark.parametrize("size", ["b", "l", "b_m2", "l_m2"])
def test_efficiency_counts_at_production_shapes(size):
    """The compile report's counts (no compile needed): every kernel within the 1.5x bounds unless the report lists
    it as over (then it must be over), never less work than the op needs, and the kernels' useful FLOPs add up to
    roofline_cost's plus the O(T H Q M) softmax terms. M = 2 (two fused sensors) is as frequent as M = 3."""
    from terrafm_kernels.compile_report import KNOWN_OVER_BOUND
    from terrafm_kernels.fusion import PRODUCTION_SHAPES, efficiency, roofline_cost

    shape = PRODUCTION_SHAPES[size]
    assert set(PRODUCTION_SHAPES) == {"b", "l", "b_m2", "l_m2"} and shape["M"] == (2 if size.endswith("m2") else 3)
    h100 = {"sms": 132, "concurrent": 132 * 4, "l2_bytes": 50 * 2**20}
    kernels = {"forward": "fwd", "backward_pool": "bwd_pool", "backward_head": "bwd_head"}
    counts = {k: efficiency(k, **shape, dtype_bytes=2, **h100) for k in kernels}
    for kernel, c in counts.items():
        assert c["useful_flops"] <= c["executed_flops"], (kernel, c)
        over = c["executed_flops"] > 1.5 * c["useful_flops"]
        assert over == (f"fusion_{kernels[kernel]}_bfloat16_{size}" in KNOWN_OVER_BOUND), (kernel, c)
        assert c["min_bytes"] <= c["moved_bytes"] <= 1.5 * c["min_bytes"], (kernel, c)
    T, M, Q, A, H = (shape[k] for k in "TMQAH")
    cost = roofline_cost(T, M, A, Q, backward=True)
    softmax_terms = T * 20 * H * Q * M + 7 * T * Q + T * M * A + Q * A  # + the grad keys / queries scale
    assert sum(c["useful_flops"] for c in counts.values()) == cost["flops"] + softmax_terms


def test_forward_count_pays_the_output_pass_reread_only_when_a_wave_outgrows_l2():
    """The forward's output pass reads the values and attention again: from HBM when what a wave streams in between
    (keys, values, attention) outgrows L2 (ViT-B, 132 x 3 programs of 16 positions: 181 MB of bf16 tokens), from L2
    when it fits (128 positions)."""
    from terrafm_kernels.fusion import PRODUCTION_SHAPES, efficiency

    shape = PRODUCTION_SHAPES["b"]
    M, Q, A, H = (shape[k] for k in "MQAH")
    h100 = {"sms": 132, "concurrent": 132 * 3, "l2_bytes": 50 * 2**20}

    def first_pass(T):  # keys, values, out, w, attention + r saved, queries: each once; pool once per wave
        waves = math.ceil(math.ceil(T / 16) / h100["concurrent"])
        return 2 * T * M * A * 2 + T * A * 2 + T * Q * 4 + T * H * (Q * M + M) * 4 + Q * A * 2 + waves * A * 2

    T = shape["T"]
    big = efficiency("forward", **shape, dtype_bytes=2, **h100)
    assert big["moved_bytes"] == first_pass(T) + T * M * A * 2 + T * H * Q * M * 4
    small = efficiency("forward", **{**shape, "T": 128}, dtype_bytes=2, **h100)
    assert small["moved_bytes"] == first_pass(128)


@pytest.mark.parametrize("A, num_heads, error, name", [
    (0, 4, ValueError, "keys"),        # token width A = 0
    (8, True, TypeError, "num_heads"),
    (8, 2.0, TypeError, "num_heads"),
    (8, 0, ValueError, "num_heads"),
    (8, 3, ValueError, "num_heads"),
])
def test_refuses_bad_sizes(device, A, num_heads, error, name):
    keys = torch.randn(5, 3, A, device=device)
    with pytest.raises(error, match=name):
        cross_attention_fusion(keys, keys.clone(), torch.randn(2, A, device=device), torch.randn(A, device=device),
                               num_heads)


@pytest.mark.parametrize("args, error, name", [
    ((0, 2, 1), ValueError, "dim"),
    ((16, 0, 1), ValueError, "num_queries"),
    ((16, 2, 0), ValueError, "num_heads"),
    ((16, 2, True), TypeError, "num_heads"),
    ((16, 2, 3), ValueError, "num_heads"),
])
def test_module_refuses_bad_sizes(args, error, name):
    with pytest.raises(error, match=name):
        CrossAttentionFusion(*args)


def test_meta_tensors_give_shapes():
    """On the meta device the op's fake implementation gives the shapes (they were refused as not cuda / cpu)."""
    layer = CrossAttentionFusion(dim=16, num_queries=5, num_heads=2).to("meta")
    keys = torch.randn(7, 3, 16, device="meta", requires_grad=True)
    out = layer(keys, torch.randn(7, 3, 16, device="meta"))
    assert out.shape == (7, 16) and out.device.type == "meta"
    out.sum().backward()
    assert keys.grad.shape == keys.shape and layer.queries.grad.shape == (5, 16)


def test_module_refuses_what_its_forward_never_could_take():
    with pytest.raises(ValueError, match="num_queries must be at most 64"):
        CrossAttentionFusion(8, num_queries=65, num_heads=2)
    with pytest.raises(TypeError, match="keys must be a"):
        CrossAttentionFusion(8, 2, 2)(None, torch.randn(2, 2, 8))


def test_fp16_reference_scales_before_its_product(device):
    """The reference divided q.k by sqrt(d) after the fp16 product: raw dots over 65504 became inf and the softmax
    NaN, where the scaled scores (here up to ~4e4) and the kernel's fp32 ones are finite."""
    g = torch.Generator().manual_seed(0)
    T, M, A, Q, H = 8, 3, 48, 5, 4
    keys, values = torch.randn(T, M, A, generator=g) * 100, torch.randn(T, M, A, generator=g)
    queries, pool = torch.randn(Q, A, generator=g) * 100, torch.randn(A, generator=g)
    d = A // H
    raw = torch.einsum("qhd,tmhd->thqm", queries.reshape(Q, H, d), keys.reshape(T, M, H, d))
    assert raw.abs().max() > 65504 > raw.abs().max() / math.sqrt(d)
    want = reference.cross_attention_fusion(keys.double(), values.double(), queries.double(), pool.double(), H)
    half = [t.half() for t in (keys, values, queries, pool)]
    for out in (reference.cross_attention_fusion(*half, H),
                cross_attention_fusion(*(t.to(device) for t in half), H).cpu()):
        assert out.isfinite().all()
        assert _max_err(out, want) < 0.05 * want.abs().max().item()
