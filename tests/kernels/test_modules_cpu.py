"""The drop-in modules on CPU tensors without TRITON_INTERPRET (a user's laptop): the reference, behind the
kernels' own input checks, so a bad input is the same error as on a GPU; and bf16 refused under the interpreter.

The test session sets TRITON_INTERPRET=1 before triton is imported (tests/conftest.py), so the reference path
runs in a subprocess with it cleared.
"""

import os
import subprocess
import sys

import pytest
import torch

from terrafm_kernels import _common

CPU_SCRIPT = r"""
import torch
from terrafm_kernels import _common, reference as R
from terrafm_kernels.dino import DINOLoss
from terrafm_kernels.modules import (CrossAttentionFusion, DINOCrossEntropy, DINOHeadLoss, DualCenteringSoftmax,
                                     PatchEmbed)

assert not _common.INTERPRET
torch.manual_seed(0)

def refused(call, kind, text):
    try:
        call()
    except kind as err:
        assert text in str(err), (text, str(err))
        return
    raise AssertionError(f"accepted: {text}")

fusion, embed = CrossAttentionFusion(32, 3, 4), PatchEmbed(32, 8, 3, 16)
refused(lambda: fusion(torch.randn(10, 3, 16), torch.randn(10, 3, 16)), ValueError, "must match the token width")
refused(lambda: fusion(torch.randn(10, 3, 32), torch.randn(9, 3, 32)), ValueError, "must have the shape of keys")
refused(lambda: fusion(torch.randn(10, 17, 32), torch.randn(10, 17, 32)), ValueError, "1..16 modality tokens")
refused(lambda: embed(torch.randn(2, 4, 32, 32)), ValueError, "x has 4 channels but weight expects C=3")
softmax = DualCenteringSoftmax(64)
refused(lambda: softmax(torch.randn(8, 64), torch.zeros(8), 0.0), ValueError, "temperature must be > 0")
refused(lambda: softmax(torch.randn(8, 32), torch.zeros(8), 0.04), ValueError, "")
refused(lambda: DINOCrossEntropy(0.1)(torch.randn(4, 2, 64), torch.rand(2, 3, 64)), ValueError, "")
refused(lambda: DINOHeadLoss(16, 64)(torch.randn(4, 2, 8), torch.randn(2, 2, 8), torch.zeros(4), 0.04), ValueError, "")
dino = DINOLoss(8)
refused(lambda: dino.softmax_center_teacher(torch.randn(4, 8), 0.0), ValueError, "teacher_temp must be > 0")
refused(lambda: dino.softmax_center_teacher(torch.randn(4, 16), 0.04), ValueError, "center must be (K,)")
refused(lambda: dino.sinkhorn_knopp_teacher(torch.randn(4, 8), 0.04, n_iterations=3.0), TypeError, "must be an int")

# what the kernels refuse for their own reasons the reference takes: float64, non-contiguous, an empty batch
x = torch.randn(2, 3, 32, 32)
torch.testing.assert_close(embed(x), R.patch_embed(x, embed.proj.weight, embed.proj.bias))
assert embed.double()(x.double()).dtype == torch.float64
embed.float()
assert embed(x.transpose(2, 3)).shape == (2, 16, 16) and embed(x[:0]).shape == (0, 16, 16)
keys = torch.randn(6, 3, 32)
torch.testing.assert_close(fusion(keys, keys), R.cross_attention_fusion(keys, keys, fusion.queries, fusion.pool, 4))
probs, _, _ = softmax(torch.randn(8, 64), torch.zeros(8), 0.04)
torch.testing.assert_close(probs.sum(1), torch.ones(8))
print("ok")
"""


def test_modules_on_cpu_check_inputs_like_the_kernels_and_compute_the_reference():
    """Without the interpreter, wrong shapes failed deep in torch ('shape [3, 4, 4] is invalid'), a temperature of
    0 gave NaN, and the three loss modules refused CPU tensors outright ('the Triton kernels need cuda')."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CPU_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not _common.INTERPRET, reason="checks the Triton interpreter (tests/conftest.py sets it)")
def test_bf16_under_the_interpreter_is_refused_for_the_dot_kernels():
    """The interpreter's bf16 tl.dot returned errors of ~1e11 (PatchEmbed) and a loss of 3e12 (DINOHeadLoss)."""
    from terrafm_kernels.modules import DINOHeadLoss, PatchEmbed

    with pytest.raises(TypeError, match="bfloat16 under TRITON_INTERPRET=1"):
        PatchEmbed(32, 8, 3, 16).bfloat16()(torch.randn(2, 3, 32, 32).bfloat16())
    head = DINOHeadLoss(16, 64)
    with pytest.raises(TypeError, match="bfloat16 under TRITON_INTERPRET=1"):
        head(torch.randn(4, 2, 16).bfloat16(), torch.randn(2, 2, 16).bfloat16(), torch.zeros(4), 0.04)


@pytest.mark.skipif(not _common.INTERPRET, reason="checks the Triton interpreter (tests/conftest.py sets it)")
def test_bf16_prototypes_with_fp32_features_run_under_the_interpreter():
    """The fused head's dots run in the features' dtype (the prototypes are cast to it first), but bf16 prototypes
    with fp32 features were refused as 'weight_v is bfloat16 under TRITON_INTERPRET=1, whose tl.dot gets bf16 wrong'."""
    from terrafm_kernels import reference
    from terrafm_kernels.modules import DINOHeadLoss

    torch.manual_seed(0)
    head = DINOHeadLoss(16, 40, train_weight_g=True).bfloat16()
    student, teacher, high = torch.randn(3, 2, 16, requires_grad=True), torch.randn(2, 2, 16), torch.rand(4)
    loss = head(student, teacher, high, 0.04)[0]
    loss.backward()
    c = head.centering
    want = reference.dino_head_loss(student.detach(), teacher, head.weight_v.float(), c.center, c.center_high, high,
                                    0.04, head.student_temperature, c.alpha, head.weight_g.float())[0]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert head.weight_v.grad.dtype == torch.bfloat16 and student.grad.isfinite().all()


@pytest.mark.skipif(not _common.INTERPRET, reason="checks the Triton interpreter (tests/conftest.py sets it)")
def test_bf16_from_cpu_autocast_under_the_interpreter_is_refused():
    """torch.autocast("cpu") casts to bf16 by default, after the input checks had passed the fp32 images: the
    interpreted patch embedding then returned errors of ~6e10 instead of refusing, and accelerate_vit's
    PatchProjection (which falls back to conv2d where the kernel cannot run) the same instead of falling back."""
    from terrafm_kernels.modules import PatchEmbed
    from terrafm_kernels.swap import PatchProjection

    embed, x = PatchEmbed(32, 8, 3, 16), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu"), pytest.raises(TypeError, match="bfloat16 under TRITON_INTERPRET=1"):
        embed(x)
    with torch.autocast("cpu", dtype=torch.float16):
        assert embed(x).dtype == torch.float16
    projection = PatchProjection.from_conv(embed.proj)
    with torch.autocast("cpu"):
        out, want = projection(x), embed.proj(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 4, 4)
    torch.testing.assert_close(out, want)


def test_every_launch_runs_on_its_operands_device(monkeypatch):
    """Triton launches on the current CUDA device: operands on cuda:1 with cuda:0 current (a model spread over
    GPUs in one process) ran on the wrong GPU. Every kernel launches through _common.launch_kernel, which
    switches to the first tensor argument's device around the launch."""
    import contextlib
    import pathlib
    import re
    from unittest import mock

    entered, launched = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield
        entered.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, list(entered)))

    monkeypatch.setattr(torch.cuda, "device", device)
    operand = mock.MagicMock(spec=torch.Tensor)
    operand.device = torch.device("cuda", 1)
    _common.launch_kernel(Kernel(), (3,), 7, operand, BLOCK=16)
    assert launched == [((3,), [torch.device("cuda", 1)])] and entered == []
    _common.launch_kernel(Kernel(), (1,), torch.zeros(1))  # CPU tensors (the interpreter): no CUDA guard
    assert launched[-1] == ((1,), [])
    root = pathlib.Path(_common.__file__).parent
    direct = [f"{p.name}: {m.group(0)}" for p in root.glob("*.py") if p.name != "_common.py"
              for m in re.finditer(r"\b_\w+_kernel\[", p.read_text())]
    assert direct == [], f"launch these through _common.launch_kernel: {direct}"


def test_modules_on_the_reference_path_pickle(monkeypatch):
    """Without the interpreter (a GPU machine, a laptop) every module kept a closure as its CPU implementation, so
    torch.save(model) / pickle of a model holding one failed ("Can't pickle ... not the same object as
    terrafm_kernels.reference.patch_embed"); DINOLoss(backend="torch") too."""
    import io
    import pickle

    from terrafm_kernels import reference
    from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss
    from terrafm_kernels.modules import (
        CrossAttentionFusion,
        DINOCrossEntropy,
        DINOHeadLoss,
        DualCenteringSoftmax,
        PatchEmbed,
    )

    monkeypatch.setattr(_common, "INTERPRET", False)  # what the modules read when they are built
    built = [PatchEmbed(16, 8, 3, 8), CrossAttentionFusion(8, 2, 2), DualCenteringSoftmax(8), DINOCrossEntropy(0.1),
             DINOHeadLoss(8, 16), DINOLoss(8, backend="torch"), iBOTPatchLoss(8, backend="torch")]
    buffer = io.BytesIO()
    torch.save(built, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded] == [type(m) for m in built]
    embed = pickle.loads(pickle.dumps(built[0]))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(embed(x), reference.patch_embed(x, embed.proj.weight, embed.proj.bias))
    with pytest.raises(ValueError, match="x has 4 channels but weight expects C=3"):
        embed(torch.randn(2, 4, 16, 16))  # still behind the kernel's checks


LIFTED_SCRIPT = r"""
import builtins, importlib, sys
real_import = builtins.__import__
def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in ("terrafm", "terrafm_kernels", "kernels"):
        raise ImportError(f"the lifted package imported {name}")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = guarded
import torch
for module in ("modules", "dino", "swap", "reference", "compile_report", "gpus"):
    importlib.import_module(f"vendored_kernels.{module}")
from vendored_kernels.compile_report import PACKAGE
from vendored_kernels.modules import PatchEmbed
assert PACKAGE == "vendored_kernels", PACKAGE
assert PatchEmbed(8, 4, 3, 5)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 5)
print("ok")
"""


def test_the_folder_lifted_into_another_project_imports_nothing_of_terrafm(tmp_path):
    """The package promises relative imports, so the folder can be copied into another project under another name:
    compile_report imported terrafm_kernels.gpus absolutely (an ImportError without terrafm installed) and looked
    its op modules up under terrafm_kernels."""
    import pathlib
    import shutil

    shutil.copytree(pathlib.Path(_common.__file__).parent, tmp_path / "vendored_kernels")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LIFTED_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_modules_with_fp32_parameters_take_fp16_inputs_on_the_reference_path_as_the_kernels_do(monkeypatch, device):
    """The kernels compute fp16 inputs against fp32 parameters (the parameters in the inputs' dtype: mixed precision
    without FSDP, a module left in fp32 fed half tiles). PatchEmbed, CrossAttentionFusion and DINOHeadLoss on the
    reference path (a CPU without the interpreter, terrafm's torch backend) failed deep in torch instead: 'mat1 and
    mat2 must have the same dtype, but got Half and Float'."""
    import copy

    from terrafm_kernels.modules import CrossAttentionFusion, DINOHeadLoss, PatchEmbed

    def build():
        torch.manual_seed(0)
        return [PatchEmbed(16, 8, 3, 12), CrossAttentionFusion(16, 3, 4), DINOHeadLoss(16, 40, train_weight_g=True)]

    kernel_path = [m.to(device) for m in build()]
    with monkeypatch.context() as patch:
        patch.setattr(_common, "INTERPRET", False)  # what the modules read when they are built
        reference_path = build()
    g = torch.Generator().manual_seed(1)
    x, keys, values = (torch.randn(shape, generator=g).half() for shape in ((2, 3, 16, 16), (7, 3, 16), (7, 3, 16)))
    student, teacher, high = torch.randn(3, 2, 16, generator=g).half(), torch.randn(2, 2, 16, generator=g).half(), \
        torch.rand(4, generator=g)
    calls = [lambda m, d: m(x.to(d)), lambda m, d: m(keys.to(d), values.to(d)),
             lambda m, d: m(student.to(d), teacher.to(d), high.to(d), 0.04)[0]]
    for call, kernel_module, reference_module in zip(calls, kernel_path, reference_path, strict=True):
        want = call(copy.deepcopy(reference_module).half(), "cpu")  # the same function, parameters in fp16
        for out in (call(reference_module, "cpu"), call(kernel_module, device)):
            assert out.dtype == want.dtype  # fp16 tokens, the fp32 loss
            torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2e-3, atol=2e-3)
