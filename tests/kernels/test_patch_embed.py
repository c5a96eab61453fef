"""Fused patch embedding vs the float64 reference: forward and every gradient, ragged shapes.

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU (conftest) or compiled on CUDA. bf16 is
tested only on CUDA: the kernel's GEMM is a tl.dot, and tl.dot on bf16 operands is wrong under
the Triton interpreter.
"""

import importlib

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from terrafm_kernels import reference
from terrafm_kernels.modules import PatchEmbed
from terrafm_kernels.patch_embed import _slice_block, patch_embed, tf32_allowed

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(B, C, H, W, E, p, dtype, device, pos=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = {
        "x": make(B, C, H, W), "weight": make(E, C, p, p) * (C * p * p) ** -0.5, "bias": make(E),
        "modality_embed": make(E), "pos_embed": make((H // p) * (W // p), E) if pos else None,
    }
    return {k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_() for k, v in tensors.items()}


def _max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _check(B, C, H, W, E, p, dtype, device, pos=True, seed=0):
    """flash-attn rule: kernel error vs fp64 <= 2 x plain PyTorch error at the same dtype + atol; fp32 with tf32
    allowed for convolutions (torch's default) against nn.Conv2d's tf32 GEMMs, as a GPU computes them."""
    args = _inputs(B, C, H, W, E, p, dtype, device, pos, seed)
    names = [k for k, v in args.items() if v is not None]
    oracle_args = {k: None if v is None else v.detach().cpu().double().requires_grad_() for k, v in args.items()}
    plain_args = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in args.items()}
    if device == "cpu" and dtype == torch.float16:  # CPU conv has no fp16 kernel: plain = fp32 rounded to fp16
        plain_args = {k: None if v is None else v.detach().float().requires_grad_() for k, v in args.items()}
    out = patch_embed(**args)
    oracle = reference.patch_embed(**oracle_args)
    # plain fp32 = nn.Conv2d on a GPU at torch's default (tf32 operands), which the kernel follows
    plain = reference.patch_embed(**plain_args, tf32=dtype == torch.float32 and tf32_allowed())
    assert out.dtype == dtype and out.shape == (B, (H // p) * (W // p), E)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(grad.to(device=device, dtype=dtype))
    oracle.backward(grad.double())
    plain.backward(grad.to(dtype=plain.dtype, device=plain.device))
    err, ref_err = _max_err(out, oracle), _max_err(plain.to(dtype), oracle)
    assert err <= 2 * ref_err + ATOL[dtype], f"out: {err:.3e} vs plain {ref_err:.3e}"
    for k in names:
        g_err = _max_err(args[k].grad, oracle_args[k].grad)
        g_ref = _max_err(plain_args[k].grad.to(dtype), oracle_args[k].grad)
        scale = max(1.0, oracle_args[k].grad.abs().max().item())
        assert g_err <= 2 * g_ref + ATOL[dtype] * scale, f"grad {k}: {g_err:.3e} vs plain {g_ref:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,E,p", [
    (2, 12, 32, 48, 40, 16),   # S2: 12 bands, non-square image, E not a multiple of the block
    (3, 2, 16, 16, 24, 16),    # S1: 2 bands, one patch per image
    (1, 3, 28, 42, 19, 14),    # RGB ViT patch 14, ragged everything
    (2, 13, 24, 16, 33, 8),    # 13 bands (S2 with B10), patch 8
])
def test_matches_float64_reference(B, C, H, W, E, p, dtype, device):
    _check(B, C, H, W, E, p, dtype, device)



TIES = [1 + 2**-11, 1 + 2**-12, 1 + 3 * 2**-12, -(1 + 2**-11), 3.0e38, torch.finfo(torch.float32).max, float("inf"),
        float("nan")]


def test_fp32_operands_round_to_nearest_as_cudnn_rounds_them(device):
    """One product per output (p = 1, weight 1 or x 1): the output is the rounded operand itself. Ties go away from
    zero and fp32's largest value overflows to inf (cuDNN's cvt.rna); truncation, the tensor core's own, would give
    1 for the first three. NaN stays NaN."""
    values = torch.tensor(TIES, device=device)
    x = values.reshape(1, 1, 1, -1)
    out = patch_embed(x, torch.ones(1, 1, 1, 1, device=device), None).reshape(-1)
    by_weight = patch_embed(torch.ones(1, 1, 1, 1, device=device), values.reshape(-1, 1, 1, 1), None)
    want = reference.round_tf32(values)
    assert want[:4].tolist() == [1 + 2**-10, 1.0, 1 + 2**-10, -(1 + 2**-10)] and want[5] == float("inf")
    assert out[:-1].tolist() == want[:-1].tolist() and out[-1].isnan()
    assert by_weight.reshape(-1)[:-1].tolist() == want[:-1].tolist() and by_weight.reshape(-1)[-1].isnan()


@pytest.mark.parametrize("setting", ["legacy", "per-op"])
def test_fp32_without_tf32_is_ieee_against_float32_pytorch(setting, device, monkeypatch):
    """With tf32 off for convolutions (either of torch's APIs; mixing them makes allow_tf32 itself raise) the fp32
    dots are IEEE: exact on single products, and within the 2x rule of plain fp32 PyTorch."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    if setting == "legacy":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    else:
        conv.fp32_precision = "ieee"  # a property monkeypatch cannot take
    try:
        assert not tf32_allowed()
        values = torch.tensor(TIES[:-1], device=device)
        out = patch_embed(values.reshape(1, 1, 1, -1), torch.ones(1, 1, 1, 1, device=device), None)
        assert out.reshape(-1).tolist() == values.tolist()
        _check(2, 12, 32, 48, 40, 16, torch.float32, device)
    finally:
        conv.fp32_precision = previous

@pytest.mark.parametrize("dtype", DTYPES)
def test_shipped_gpu_tiles_match_float64_reference(dtype, device, monkeypatch):
    """The GPU tile configs (128-wide tiles and descriptor blocks, grad_weight's 128 x 128 X^T G tiles) on a
    shape ragged against them: on CPU the interpreter runs them in place of its own narrow tiles."""
    module = importlib.import_module("terrafm_kernels.patch_embed")
    monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    _check(2, 12, 48, 32, 200, 16, dtype, device)


@pytest.mark.parametrize("gpu_tiles", [False, True])
@pytest.mark.parametrize("slice_bytes", [60000, 160000])
def test_forward_and_grad_input_in_several_w_slices_match_float64_reference(gpu_tiles, slice_bytes, device,
                                                                            monkeypatch):
    """The forward takes W in E slices and grad_input in KD slices when W is over W_SLICE_BYTES (fp32 at the
    presets' shape: 2 each), one slice after the other on grid axis 2, the odd ones walking the row blocks
    backwards; here a small limit cuts a ragged W (E = 70, KD = 588) into 3 or 5 slices, or into 2 where a last
    slice shorter than the other leaves spare programs, with the interpreter's tiles and with the GPU tiles, on 3 row
    blocks (a backwards walk over one row block would be no walk at all)."""
    module = importlib.import_module("terrafm_kernels.patch_embed")
    monkeypatch.setattr(module, "W_SLICE_BYTES", slice_bytes)
    if gpu_tiles:
        monkeypatch.setattr(module, "interpreted", lambda tensor: False)
    plan = module.launch_plan(M=12, E=70, KD=588, dtype_bytes=4, interpreter=not gpu_tiles)
    blocks = {"forward": -(-70 // plan["forward"]["BLOCK_N"]), "grad_input": -(-588 // plan["grad_input"]["BLOCK_K"])}
    for kernel, n in blocks.items():
        per_slice, _, slices = plan[kernel]["grid"]
        assert slices >= 2 and (slices - 1) * per_slice < n <= slices * per_slice, (kernel, plan[kernel]["grid"])
    if not gpu_tiles and slice_bytes == 160000:  # spare programs in both kernels' last slice
        assert all(plan[k]["grid"][0] * plan[k]["grid"][2] > n for k, n in blocks.items())
    B = 24 if gpu_tiles else 11  # 6 patches an image: 3 row blocks of 64 (GPU tiles) or 32 (the interpreter's)
    rows = module.launch_plan(M=6 * B, E=70, KD=588, dtype_bytes=4, interpreter=not gpu_tiles)["forward"]["grid"][1]
    assert rows == 3
    _check(B, 3, 28, 42, 70, 14, torch.float32, device)


def test_w_is_sliced_only_when_it_is_over_half_an_l2():
    from terrafm_kernels.patch_embed import PRODUCTION_SHAPE, launch_plan

    M, E, KD = 128 * 196, PRODUCTION_SHAPE["E"], 12 * 256
    fp32 = launch_plan(M, E, KD, dtype_bytes=4)
    k_blocks, n_blocks = KD // fp32["grad_input"]["BLOCK_K"], E // fp32["forward"]["BLOCK_N"]
    assert fp32["grad_input"]["grid"][::2] == (k_blocks // 2, 2)  # 28 MB of W: two 14 MB slices
    assert fp32["forward"]["grid"][::2] == (n_blocks // 2, 2)
    bf16 = launch_plan(M, E, KD, dtype_bytes=2)
    assert bf16["grad_input"]["grid"][2] == bf16["forward"]["grid"][2] == 1  # 14 MB of W stays in L2


@pytest.mark.parametrize("E", [2304, 2368, 3072, 3392, 3400])
def test_each_w_slice_stays_within_w_slice_bytes(E):
    """Two slices of a W just over twice the limit would each be over it (E = 3392: 27 of 53 blocks of 786 KB,
    21.2 MB): then one more slice."""
    from terrafm_kernels.patch_embed import W_SLICE_BYTES, launch_plan

    KD = 12 * 256
    plan = launch_plan(64 * 196, E, KD, dtype_bytes=4)
    forward, grad_input = plan["forward"], plan["grad_input"]
    assert forward["grid"][0] * forward["BLOCK_N"] * KD * 4 <= W_SLICE_BYTES
    assert grad_input["grid"][0] * grad_input["BLOCK_K"] * E * 4 <= W_SLICE_BYTES
    assert forward["grid"][0] * forward["grid"][2] - -(-E // forward["BLOCK_N"]) < forward["grid"][2]  # few spares


@triton.jit
def _slice_block_of_each_program(out_ptr):
    block, row_block = _slice_block()
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + 2 * pid, block)
    tl.store(out_ptr + 2 * pid + 1, row_block)


def test_the_kernels_slice_block_is_the_counts_slice_blocks(device):
    """_slice_block (the kernels' program -> block map) against slice_blocks (efficiency()'s copy of it): the
    bytes the counts credit to the backwards walk are the kernels' only while the two agree."""
    from terrafm_kernels import _common
    from terrafm_kernels.patch_embed import slice_blocks

    grid = (3, 4, 3)
    out = torch.full((grid[0] * grid[1] * grid[2], 2), -1, dtype=torch.int32, device=device)
    _common.launch_kernel(_slice_block_of_each_program, grid, out)
    expected = [slice_blocks(grid, i, m, s) for s in range(grid[2]) for m in range(grid[1]) for i in range(grid[0])]
    assert [tuple(row) for row in out.tolist()] == expected


def test_slice_blocks_cover_every_block_and_row_block_once():
    """slice_blocks (the counts' copy of the kernels' _slice_block): every (block, row block) pair of a sliced grid
    exactly once, spare programs past the last block aside, the odd slices walking the row blocks backwards."""
    from terrafm_kernels.patch_embed import slice_blocks

    grid, blocks = (3, 4, 3), 8
    seen = [slice_blocks(grid, i, m, s) for s in range(grid[2]) for m in range(grid[1]) for i in range(grid[0])]
    assert sorted(p for p in seen if p[0] < blocks) == [(b, m) for b in range(blocks) for m in range(grid[1])]
    assert [m for _, m in seen[:grid[0] * grid[1]:grid[0]]] == [0, 1, 2, 3]
    assert [m for _, m in seen[grid[0] * grid[1]:2 * grid[0] * grid[1]:grid[0]]] == [3, 2, 1, 0]


def test_without_position_embedding_and_without_input_grad(device):
    args = _inputs(2, 12, 32, 32, 20, 16, torch.float32, device, pos=False)
    args["x"].requires_grad_(False)
    out = patch_embed(**args)
    ref = reference.patch_embed(**{k: None if v is None else v.detach() for k, v in args.items()}, tf32=tf32_allowed())
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert args["x"].grad is None and args["weight"].grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("train_weight", [True, False])
def test_bias_and_modality_gradients_come_with_grad_weights_reads_of_g(dtype, train_weight, device):
    """The bias and modality gradients (G's column sums) are summed by grad_weight's KD-block-0 programs from the G
    tiles they load: torch's column sum read all of G (115 MB at the presets' bf16 shape) once more. A frozen
    weight runs no grad_weight kernel, and torch sums G as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sums(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.sum, torch.ops.aten.mean):
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    args = _inputs(2, 12, 48, 32, 40, 16, dtype, device, pos=False)
    args["x"].requires_grad_(False)
    args["weight"].requires_grad_(train_weight)
    out = patch_embed(**args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    with Sums() as sums:
        out.backward(grad)
    want = grad.double().reshape(-1, 40).sum(0).cpu()
    for name in ("bias", "modality_embed"):
        assert _max_err(args[name].grad, want) <= ATOL[dtype] * max(1.0, want.abs().max().item()), name
    if train_weight:  # no reduction of G outside the kernels' op (a frozen weight's torch sum runs inside it)
        assert not [shape for shape in sums.shapes if shape in ((out.shape[0] * out.shape[1], 40), tuple(out.shape))]


def test_fp32_weight_with_fp16_input_gets_an_fp32_gradient(device):
    """Mixed precision without FSDP: the kernel stores grad_weight straight in the weight's dtype."""
    args = _inputs(2, 12, 32, 48, 40, 16, torch.float16, device, pos=False)
    args["weight"] = args["weight"].detach().float().requires_grad_()
    out = patch_embed(**args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=out.dtype)
    out.backward(grad)
    x64 = args["x"].detach().cpu().double()
    w64 = args["weight"].detach().cpu().double().requires_grad_()
    reference.patch_embed(x64, w64, None).backward(grad.cpu().double())
    assert args["weight"].grad.dtype == torch.float32
    torch.testing.assert_close(args["weight"].grad.cpu().double(), w64.grad, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype,cols,aligned", [(torch.float16, 3072, True), (torch.float16, 588, False),
                                                (torch.float32, 588, True), (torch.float32, 19, False)])
def test_descriptor_operands_get_16_byte_aligned_rows(dtype, cols, aligned):
    """W (E, KD) and G (M, E) go to the kernels as tensor descriptors: aligned ones as they are, others
    (RGB patch 14 in fp16: 588 x 2 bytes a row) as a copy with padded rows."""
    from terrafm_kernels._common import descriptor_operand

    t = torch.randn(5, cols).to(dtype)
    got = descriptor_operand(t)
    assert (got is t) == aligned
    assert got.data_ptr() % 16 == 0 and got.stride(0) * got.element_size() % 16 == 0 and got.stride(1) == 1
    assert torch.equal(got[:, :cols], t)
    column_major = t.t().contiguous().t()
    copied = descriptor_operand(column_major)
    assert copied is not column_major and copied.stride(1) == 1 and torch.equal(copied[:, :cols], t)


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 3), C=st.sampled_from([2, 3, 12, 13]), gh=st.integers(1, 3), gw=st.integers(1, 3),
       E=st.integers(1, 40), p=st.sampled_from([8, 14, 16]), seed=st.integers(0, 100))
def test_hypothesis_shapes(B, C, gh, gw, E, p, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(B, C, gh * p, gw * p, E, p, torch.float32, device, pos=seed % 2 == 0, seed=seed)


def test_module_is_a_timm_style_drop_in(device, ieee_convolutions):
    module = PatchEmbed(img_size=32, patch_size=16, in_chans=12, embed_dim=24).to(device)
    assert module.proj.weight.shape == (24, 12, 16, 16)
    assert module.num_patches == 4 and module.grid_size == (2, 2)
    x = torch.randn(2, 12, 32, 32, device=device)
    expected = module.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    module.load_state_dict({"proj.weight": torch.zeros(24, 12, 16, 16), "proj.bias": torch.ones(24)})
    assert torch.equal(module(x).cpu(), torch.ones(2, 4, 24))
    # timm's strict_img_size: another image size is refused unless the module is built to take it
    with pytest.raises(ValueError, match=r"input is \(32, 48\) pixels, the module's img_size is \(32, 32\)"):
        module(torch.randn(2, 12, 32, 48, device=device))
    loose = PatchEmbed(img_size=32, patch_size=16, in_chans=12, embed_dim=24, strict_img_size=False).to(device)
    assert loose(torch.randn(2, 12, 32, 48, device=device)).shape == (2, 6, 24)


def test_module_takes_the_keywords_timms_vision_transformer_builds_its_embed_layer_with(device, ieee_convolutions):
    """timm's VisionTransformer(embed_layer=PatchEmbed) builds it with keywords of timm's PatchEmbed: dynamic_img_pad,
    device and dtype always, norm_layer for embed_norm_layer. The drop-in refused the call ("unexpected keyword
    argument 'dynamic_img_pad'"), and a timm-style positional call, whose 5th argument is norm_layer, silently built
    a module without bias (None) or without its norm (a class, taken as bias=True)."""
    timm_call = dict(img_size=32, patch_size=16, in_chans=12, embed_dim=24, bias=True, dynamic_img_pad=False,
                     device=device, dtype=torch.float32)  # timm/models/vision_transformer.py
    plain = PatchEmbed(**timm_call)
    assert plain.proj.weight.device.type == torch.device(device).type and list(plain.state_dict()) == [
        "proj.weight", "proj.bias"]
    normed = PatchEmbed(**timm_call, norm_layer=torch.nn.LayerNorm, flatten=True, output_fmt="NLC")
    state = {**plain.state_dict(), "norm.weight": torch.rand(24), "norm.bias": torch.randn(24)}
    normed.load_state_dict(state)  # timm's names with a norm layer
    x = torch.randn(2, 12, 32, 32, device=device)
    norm = {k: v.to(device) for k, v in state.items() if k.startswith("norm.")}
    want = torch.nn.functional.layer_norm(plain(x), (24,), norm["norm.weight"], norm["norm.bias"])
    torch.testing.assert_close(normed(x), want)
    with pytest.raises(ValueError, match=r"output_fmt='NHCW' is not one of timm's formats \['NLC', 'NCL', 'NHWC'"):
        PatchEmbed(**timm_call, output_fmt="NHCW")
    for norm_layer in (None, torch.nn.LayerNorm):  # timm's positional order: ..., embed_dim, norm_layer, flatten
        with pytest.raises(TypeError, match="bias must be a bool"):
            PatchEmbed(32, 16, 12, 24, norm_layer)


def test_module_gives_timms_output_formats_padding_and_size_methods(device, ieee_convolutions):
    """What timm's VisionTransformer(dynamic_img_size=True, embed_layer=PatchEmbed) asks of its patch embedding: the
    (B, H/p, W/p, E) layout (output_fmt NHWC; NCL, NCHW and flatten=False as timm's too), images of any size padded to
    whole patches (dynamic_img_pad), set_input_size, feat_ratio and dynamic_feat_size. Each layout is the conv's
    output in timm's arrangement; the padded image embeds as the conv of the zero-padded image."""
    torch.manual_seed(0)
    base = dict(img_size=32, patch_size=16, in_chans=12, embed_dim=24, device=device)
    plain = PatchEmbed(**base)
    x = torch.randn(2, 12, 32, 48, device=device)
    conv = torch.nn.functional.conv2d(x, plain.proj.weight, plain.proj.bias, stride=16)  # (B, E, 2, 3)
    want = {"NCHW": conv, "NHWC": conv.permute(0, 2, 3, 1), "NLC": conv.flatten(2).transpose(1, 2),
            "NCL": conv.flatten(2)}
    for fmt, expected in want.items():
        layer = PatchEmbed(**base, output_fmt=fmt, strict_img_size=False)
        layer.load_state_dict(plain.state_dict())
        assert layer.output_fmt == fmt and not layer.flatten
        torch.testing.assert_close(layer(x), expected, msg=fmt)
    nchw = PatchEmbed(**base, flatten=False, strict_img_size=False)
    nchw.load_state_dict(plain.state_dict())
    torch.testing.assert_close(nchw(x), conv)

    padded = PatchEmbed(**base, strict_img_size=False, dynamic_img_pad=True, output_fmt="NHWC")
    padded.load_state_dict(plain.state_dict())
    odd = torch.randn(2, 12, 30, 40, device=device)
    zero_padded = torch.nn.functional.pad(odd, (0, 8, 0, 2))  # bottom and right, to 32 x 48
    expected = torch.nn.functional.conv2d(zero_padded, plain.proj.weight, plain.proj.bias, stride=16)
    torch.testing.assert_close(padded(odd), expected.permute(0, 2, 3, 1))
    assert padded.dynamic_feat_size((30, 40)) == (2, 3) and plain.dynamic_feat_size((30, 40)) == (1, 2)
    assert plain.feat_ratio() == 16 and plain.feat_ratio(as_scalar=False) == (16, 16)

    plain.set_input_size(img_size=48)  # as timm's: the grid follows, and strict_img_size checks the new size
    assert (plain.img_size, plain.grid_size, plain.num_patches) == ((48, 48), (3, 3), 9)
    assert plain(torch.randn(1, 12, 48, 48, device=device)).shape == (1, 9, 24)
    with pytest.raises(ValueError, match=r"input is \(32, 32\) pixels, the module's img_size is \(48, 48\)"):
        plain(torch.randn(1, 12, 32, 32, device=device))
    plain.set_input_size(patch_size=16)  # the same patch: nothing to resample
    with pytest.raises(ValueError, match=r"set_input_size\(patch_size=8\): resampling the projection"):
        plain.set_input_size(patch_size=8)
    anywhere = PatchEmbed(**{**base, "img_size": None})  # timm's img_size=None: no size to check
    assert anywhere.grid_size is None and anywhere(x).shape == (2, 6, 24)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        anywhere(odd)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(x=a["x"][:, :5]), ValueError, "x has 5 channels but weight expects C=12"),
    (lambda a: a.update(x=a["x"][..., :30]), ValueError, "not a multiple of the patch size 16"),
    (lambda a: a.update(x=a["x"][0]), ValueError, r"\(B, C, H, W\)"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x must have dtype in"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must have shape \(20,\)"),
    (lambda a: a.update(pos_embed=a["pos_embed"][:3]), ValueError, "pos_embed must have shape"),
    (lambda a: a.update(weight=a["weight"][..., :8]), ValueError, "Conv2d weight"),
    (lambda a: a.update(bias=a["bias"].to("meta")), ValueError,
     r"bias is on meta but the other inputs are on .*: move the module \(\.to\(device\)\) or the inputs"),
    # sparse tensors got torch's "unsupported memory format option Contiguous" from the launcher's copy
    (lambda a: a.update(x=a["x"].to_sparse()), TypeError, "x must be a dense .* got a sparse_coo tensor"),
    (lambda a: a.update(weight=a["weight"].to_sparse()), TypeError, "weight must be a dense"),
    (lambda a: a.update(bias=a["bias"].to_sparse()), TypeError, "bias must be a dense"),
])
def test_bad_inputs_raise_before_launch(change, error, match, device):
    args = {k: v.detach() for k, v in _inputs(2, 12, 32, 32, 20, 16, torch.float32, device).items()}
    change(args)
    with pytest.raises(error, match=match):
        patch_embed(**args)


@pytest.mark.parametrize("fn", [reference.patch_embed, patch_embed], ids=["torch", "triton"])
def test_a_size_not_a_multiple_of_the_patch_raises_alike_on_every_backend(fn, device):
    args = {k: v.detach() for k, v in _inputs(2, 12, 32, 32, 20, 16, torch.float32, device).items()}
    args["pos_embed"] = None
    args["x"] = args["x"][..., :30].contiguous()  # conv2d alone would silently drop the partial patch column
    with pytest.raises(ValueError, match=r"image size 32x30 is not a multiple of the patch size 16; resize or crop "
                                         r"the images to a multiple of 16 \(e\.g\. 32x32 or 32x16\) first"):
        fn(**args)


def test_cpu_without_interpreter_points_to_the_reference(monkeypatch):
    from terrafm_kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    args = {k: v.detach() for k, v in _inputs(1, 2, 16, 16, 8, 16, torch.float32, "cpu").items()}
    with pytest.raises(ValueError, match="terrafm_kernels.reference"):
        patch_embed(**args)


def test_registry_and_model_use_the_kernel(device, ieee_convolutions):
    from terrafm import ops
    from terrafm.models import build_model

    assert ops.select("patch_embed", {"patch_embed": "triton"}, device) is patch_embed
    model = build_model("terrafm_tiny", img_size=32).to(device).eval()
    kernel_model = build_model("terrafm_tiny", img_size=32, ops={"patch_embed": "triton"},
                               ops_device=device).to(device).eval()
    assert kernel_model.patch_embed.patch_embed_fn is patch_embed
    kernel_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 12, 32, 32, device=device)
    with torch.no_grad():
        torch.testing.assert_close(kernel_model(x, "s2_l2a"), model(x, "s2_l2a"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape, w_shape, b_len, error, name", [
    ((2, 3, 8, 8), (0, 3, 4, 4), 0, ValueError, "weight"),    # E = 0
    ((2, 0, 8, 8), (4, 0, 4, 4), 4, ValueError, "weight"),    # C = 0
    ((2, 3, 8, 8), (16, 3, 0, 0), 16, ValueError, "weight"),  # p = 0
])
def test_refuses_zero_sizes(device, x_shape, w_shape, b_len, error, name):
    with pytest.raises(error, match=name):
        patch_embed(torch.randn(x_shape, device=device), torch.randn(w_shape, device=device),
                    torch.randn(b_len, device=device))


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(img_size=8, patch_size=0), ValueError, "patch_size"),
    (dict(img_size=0), ValueError, "img_size"),
    (dict(in_chans=0), ValueError, "in_chans"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(embed_dim=True), TypeError, "embed_dim"),
    (dict(patch_size=4.0), TypeError, "patch_size"),
    (dict(img_size=()), ValueError, r"img_size must be an int or \(height, width\)"),
    (dict(img_size=[8], patch_size=4), ValueError, "img_size must be an int or"),
    (dict(img_size=(8, 8, 8), patch_size=4), ValueError, "img_size must be an int or"),
    (dict(img_size=8, patch_size=(4,)), ValueError, "patch_size must be an int or"),
    (dict(img_size=10, patch_size=4), ValueError, "not a multiple of patch_size 4"),  # its own size was refused
    (dict(img_size=2, patch_size=4), ValueError, "not a multiple of patch_size 4"),  # zero patches
])
def test_module_refuses_bad_sizes(kwargs, error, name):
    with pytest.raises(error, match=name):
        PatchEmbed(**kwargs)


def test_module_refuses_a_non_tensor_input():
    with pytest.raises(TypeError, match="PatchEmbed takes a"):
        PatchEmbed(img_size=8, patch_size=4, in_chans=2, embed_dim=4)(None)


@pytest.mark.parametrize("name, value, error, match", [
    ("pos_embed", torch.randn(5), ValueError, r"pos_embed must have shape \(4, 3\) or \(1, 4, 3\)"),
    ("pos_embed", torch.randn(2, 2, 3), ValueError, r"pos_embed must have shape"),  # 12 elements, not (N, E)
    ("pos_embed", [1.0] * 12, TypeError, "pos_embed must be a tensor or None, got list"),
    ("modality_embed", 3.0, TypeError, "modality_embed must be a tensor or None, got float"),
    ("modality_embed", torch.randn(2, 3), ValueError, r"modality_embed must have shape \(3,\)"),
])
def test_embeddings_of_the_wrong_kind_or_shape_are_named(device, name, value, error, match):
    x, w, b = (torch.randn(1, 2, 4, 4, device=device), torch.randn(3, 2, 2, 2, device=device),
               torch.randn(3, device=device))
    with pytest.raises(error, match=match):
        patch_embed(x, w, b, **{name: value.to(device) if isinstance(value, torch.Tensor) else value})


def test_autocast_runs_in_the_autocast_dtype_like_conv2d(device):
    """Under torch.autocast nn.Conv2d casts its inputs to the autocast dtype; the fused drop-in does too
    (it ran in the images' fp32 and returned fp32), and fp32 parameters still get fp32 gradients."""
    args = _inputs(2, 12, 32, 48, 40, 16, torch.float32, device)
    with torch.autocast(device, dtype=torch.float16):
        out = patch_embed(**args)
        conv = torch.nn.functional.conv2d(args["x"], args["weight"], args["bias"], stride=16)
    assert out.dtype == conv.dtype == torch.float16
    half = {k: v.detach().half().double() for k, v in args.items()}
    want = reference.patch_embed(**half)
    plain = reference.patch_embed(**{k: v.float() for k, v in half.items()}).half()
    assert _max_err(out, want) <= 2 * _max_err(plain, want) + ATOL[torch.float16]
    out.float().sum().backward()
    assert all(args[k].grad.dtype == torch.float32 for k in args)


def test_meta_tensors_give_shapes_like_conv2d():
    """Models built on the meta device (deferred init, shape tracing) run the drop-in as they run nn.Conv2d:
    the op's fake implementation gives the shapes (they were refused as not cuda / cpu)."""
    module = PatchEmbed(img_size=32, patch_size=16, in_chans=3, embed_dim=20).to("meta")
    x = torch.randn(2, 3, 32, 48, device="meta", requires_grad=True)
    out = patch_embed(x, module.proj.weight, module.proj.bias, pos_embed=torch.randn(6, 20, device="meta"))
    assert out.shape == (2, 6, 20) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape and module.proj.weight.grad.shape == (20, 3, 16, 16)
    assert module(torch.randn(1, 3, 32, 32, device="meta")).shape == (1, 4, 20)


@pytest.mark.parametrize("layout", ["x", "weight"])
def test_the_backward_fake_gives_the_strides_the_kernel_returns(layout):
    """The fake kernel of the backward op kept a channels_last x's or weight's strides (empty_like) where the
    launcher returns contiguous gradients, and inductor failed the first backward of a channels_last model
    (expected stride 16 == 1)."""
    from terrafm_kernels.patch_embed import _patch_embed_backward_op

    x, w, g = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 4, 4), torch.randn(2, 4, 5)
    if layout == "x":
        x = x.to(memory_format=torch.channels_last)
    else:
        w = w.to(memory_format=torch.channels_last)
    torch.library.opcheck(_patch_embed_backward_op, (g, x, w, True, True, True), test_utils=("test_faketensor",))


def test_reference_under_autocast_gives_the_autocast_dtype_with_embeddings():
    """Under CPU autocast the reference's GEMM gave bf16 tokens and adding the fp32 modality and position embeddings
    (cast to x's fp32) turned them back into fp32, where the kernel and nn.Conv2d give bf16."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 16, 16, generator=g), torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, generator=g)
    embed, pos = torch.randn(8, generator=g), torch.randn(16, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference.patch_embed(x, w, b, embed, pos)
        conv = torch.nn.functional.conv2d(x, w, b, stride=4)
    assert out.dtype == conv.dtype == torch.bfloat16
    want = reference.patch_embed(x.double(), w.double(), b.double(), embed.double(), pos.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=5e-2)
