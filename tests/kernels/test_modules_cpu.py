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
refused(lambda: softmax(torch.randn(8, 32), torch.zeros(8), 0.04), ValueError,
        "center has 64 entries but teacher_logits has K=32")
refused(lambda: DINOCrossEntropy(0.1)(torch.randn(4, 2, 64), torch.rand(2, 3, 64)), ValueError,
        "must match student_logits (S, B, K) = (4, 2, 64) in B and K")
refused(lambda: DINOHeadLoss(16, 64)(torch.randn(4, 2, 8), torch.randn(2, 2, 8), torch.zeros(4), 0.04), ValueError,
        "weight_v (K, D) = (64, 16) must have D=8 like the features")
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

# the teacher carries no gradient on this path either (the kernels detach it): 6.08 flowed into teacher_logits
teacher, student = torch.randn(2 * 4, 64, requires_grad=True), torch.randn(3, 4, 64, requires_grad=True)
probs, _, _ = softmax(teacher, torch.zeros(8), 0.04)
assert not probs.requires_grad
DINOCrossEntropy(0.1)(student, probs.reshape(2, 4, 64)).backward()
assert teacher.grad is None and student.grad is not None
targets = torch.rand(2, 4, 64, requires_grad=True)
DINOCrossEntropy(0.1)(student, targets).backward()
assert targets.grad is None
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



TWO_COPIES_SCRIPT = r"""
import torch
import terrafm_kernels.patch_embed as ours
import vendored_kernels.patch_embed as theirs
def not_ours(*args):
    raise AssertionError("terrafm_kernels' op ran the copy's launcher")
theirs._launch_forward = not_ours
x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
torch.testing.assert_close(ours.patch_embed(x, w, None), torch.ops.terrafm.patch_embed(x, w, None, None, None))
assert hasattr(torch.ops.vendored_kernels, "patch_embed")
print("ok")
"""


def test_a_copy_of_the_folder_registers_its_ops_in_its_own_namespace(tmp_path):
    """Every op was registered as terrafm::<op> whatever the package was called, so importing a project's copy of
    the folder beside terrafm_kernels silently replaced terrafm_kernels' ops with the copy's code."""
    import pathlib
    import shutil

    shutil.copytree(pathlib.Path(_common.__file__).parent, tmp_path / "vendored_kernels")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TWO_COPIES_SCRIPT], capture_output=True, text=True, env=env,
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
        halves = [copy.deepcopy(m).half() for m in reference_path]  # a copy chooses its CPU path again, as built
    g = torch.Generator().manual_seed(1)
    x, keys, values = (torch.randn(shape, generator=g).half() for shape in ((2, 3, 16, 16), (7, 3, 16), (7, 3, 16)))
    student, teacher, high = torch.randn(3, 2, 16, generator=g).half(), torch.randn(2, 2, 16, generator=g).half(), \
        torch.rand(4, generator=g)
    calls = [lambda m, d: m(x.to(d)), lambda m, d: m(keys.to(d), values.to(d)),
             lambda m, d: m(student.to(d), teacher.to(d), high.to(d), 0.04)[0]]
    for call, kernel_module, reference_module, half in zip(calls, kernel_path, reference_path, halves, strict=True):
        want = call(half, "cpu")  # the same function, parameters in fp16
        for out in (call(reference_module, "cpu"), call(kernel_module, device)):
            assert out.dtype == want.dtype  # fp16 tokens, the fp32 loss
            torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2e-3, atol=2e-3)


def test_a_float64_refusal_says_where_float64_runs():
    """The kernels' float64 refusal only listed the dtypes they take: the reference (gradcheck's) was not named."""
    from terrafm_kernels.teacher_softmax import teacher_softmax

    with pytest.raises(TypeError, match=r"got torch.float64; .*\(e.g. torch.autograd.gradcheck\) use "
                                        r"terrafm_kernels.reference, the pure-PyTorch spec functions, which take it"):
        _common.check_tensor("x", torch.zeros(2, dtype=torch.float64, device="meta"), 1)
    logits = torch.zeros(4, 8, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match="teacher_logits must have dtype in .* use terrafm_kernels.reference"):
        teacher_softmax(logits, torch.zeros(8), torch.zeros(8), torch.zeros(4), 0.1, 0.5)
    with pytest.raises(TypeError, match=r"got torch.int64$"):  # other dtypes: no float64 advice
        _common.check_tensor("x", torch.zeros(2, dtype=torch.int64, device="meta"), 1)


def test_a_device_mismatch_names_both_devices_and_says_move_the_module_or_the_inputs(monkeypatch):
    """'weight is on cuda:0 ... move it there' sent users to move a parameter, where the module (or the input) is
    what moves; on the reference path (a CPU without the interpreter) a module on another device than its input
    failed inside torch ('Tensor on device meta is not on the expected device cpu!')."""
    from terrafm_kernels.modules import CrossAttentionFusion, DINOHeadLoss, DualCenteringSoftmax, PatchEmbed

    move = r": move the module \(\.to\(device\)\) or the inputs so that all are on one device"
    with pytest.raises(ValueError, match="weight is on meta but the other inputs are on cpu" + move):
        _common.check_tensor("weight", torch.zeros(2, device="meta"), 1, torch.device("cpu"))
    monkeypatch.setattr(_common, "INTERPRET", False)  # the reference path, as on a laptop
    calls = [(PatchEmbed(16, 8, 3, 8), lambda m: m(torch.randn(2, 3, 16, 16)), "weight is on meta but x is on cpu"),
             (CrossAttentionFusion(8, 2, 2), lambda m: m(torch.randn(4, 2, 8), torch.randn(4, 2, 8)),
              "queries is on meta but keys is on cpu"),
             (DualCenteringSoftmax(8), lambda m: m(torch.randn(4, 8), torch.zeros(4), 0.1),
              "center is on meta but teacher_logits is on cpu"),
             (DINOHeadLoss(8, 16), lambda m: m(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.zeros(4), 0.04),
              "weight_v is on meta but student_features is on cpu")]
    for module, call, message in calls:
        with pytest.raises(ValueError, match=message + move):
            call(module.to("meta"))
    # a temperature as a 0-d tensor (checked by its value: it was refused as 'a meta tensor has none') on the cpu
    # is no device mismatch, as torch's own ops allow it
    softmax, logits = DualCenteringSoftmax(8), torch.randn(4, 8)
    want = softmax(logits, torch.zeros(4), 0.1)[0]
    torch.testing.assert_close(softmax(logits, torch.zeros(4), torch.tensor(0.1))[0], want)
    probs, _, _ = softmax.to("meta")(logits.to("meta"), torch.zeros(4, device="meta"), torch.tensor(0.1))
    assert probs.shape == (4, 8) and probs.is_meta


@pytest.mark.parametrize("logit_sum, high_logit_sum, error, message", [
    (torch.zeros(4, device="meta"), torch.zeros(4), ValueError,
     r"logit_sum is on meta but the module's centres are on cpu: move the module \(\.to\(device\)\)"),
    (torch.zeros(4), torch.zeros(4, device="meta"), ValueError, "high_logit_sum is on meta but the module's centres"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.int64), TypeError, "high_logit_sum must have dtype in"),
    (torch.zeros(4, dtype=torch.complex64), torch.zeros(4), TypeError, "logit_sum must have dtype in"),
])
def test_dual_centering_update_names_sums_of_another_device_or_dtype(logit_sum, high_logit_sum, error, message):
    """Sums on another device than the centres failed with torch's 'Tensor on device meta is not on the expected
    device cpu!'; integer sums were taken and complex ones lost their imaginary part with a warning."""
    from terrafm_kernels.modules import DualCenteringSoftmax

    module = DualCenteringSoftmax(4)
    with pytest.raises(error, match=message):
        module.update(logit_sum, high_logit_sum, 2, 1)
    assert (module.center == 0).all() and (module.center_high == 0).all()
    module.update(torch.ones(4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float16), 2, 1)  # still taken
    assert torch.allclose(module.center, torch.full((4,), 0.05))


def test_the_drop_in_losses_name_an_argument_on_another_device():
    """DINOLoss.forward_fused failed inside torch.cat ('Tensor on device meta is not on the expected device cpu!'),
    a centre update from another device failed later in apply_center_update (on a GPU) or not at all, and iBOT's
    masks were named as the 'row weights' derived from them."""
    from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss

    K, meta = 8, {"device": "meta"}
    dino, ibot = DINOLoss(K), iBOTPatchLoss(K)
    layer = torch.nn.Linear(4, K, bias=False)
    with pytest.raises(ValueError, match="student_local is on meta but student_global is on cpu: move the module"):
        dino.forward_fused(torch.randn(4, 4), torch.randn(4, 4, **meta), torch.randn(4, 4), layer, layer, 0.04)
    with pytest.raises(ValueError, match="teacher_global is on meta but student_global is on cpu"):
        dino.forward_fused(torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4, **meta), layer, layer, 0.04)
    with pytest.raises(ValueError, match="teacher_output is on meta but the loss's center is on cpu"):
        dino.update_center(torch.randn(4, K, **meta))
    with pytest.raises(ValueError, match="teacher_patch_tokens is on meta but the loss's center is on cpu"):
        ibot.update_center(torch.randn(1, 3, K, **meta))
    assert dino.updated and ibot.updated  # nothing pending
    tokens, targets = torch.randn(2, 3, K), torch.softmax(torch.randn(2, 3, K), -1)
    with pytest.raises(ValueError, match="student_masks_flat is on meta but student_patch_tokens is on cpu"):
        ibot(tokens, targets, torch.ones(2, 3, **meta))
    with pytest.raises(ValueError, match="teacher_patch_tokens is on meta but student_patch_tokens is on cpu"):
        ibot(tokens, targets.to("meta"), torch.ones(2, 3))
    masks = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="student_masks_flat is on meta but student_patch_tokens_masked is on cpu"):
        ibot.forward_masked(tokens[0], targets[0], masks.to("meta"))
    with pytest.raises(ValueError, match="masks_weight is on meta but student_patch_tokens_masked is on cpu"):
        ibot.forward_masked(tokens[0], targets[0], masks, masks_weight=torch.ones(3, **meta))


def _cpu_path(module) -> str:
    """Which CPU path a module (or DINOv2 drop-in, or accelerate_vit's projection) holds: kernel or reference."""
    import functools

    from terrafm_kernels.swap import PatchProjection

    if isinstance(module, PatchProjection):
        return "kernel" if module.kernel_on_cpu else "reference"
    if hasattr(module, "backend"):
        return {"triton": "kernel", "torch": "reference"}[module.backend]
    return "reference" if isinstance(module.cpu_impl, functools.partial) else "kernel"  # checked_reference or not


def test_an_unpickled_module_chooses_its_cpu_path_in_the_process_that_runs_it(monkeypatch):
    """A module pickled under TRITON_INTERPRET=1 kept the interpreted kernel as its CPU path: unpickled in a process
    without the variable it refused CPU tensors ('the Triton kernels need cuda tensors'), and one pickled without
    it ran the reference under the interpreter. The choice is made again on unpickling (deepcopy too); the state
    dict is unchanged, and a DINOv2 drop-in built with an explicit backend keeps it."""
    import copy
    import io
    import pickle

    from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss
    from terrafm_kernels.modules import (
        CrossAttentionFusion,
        DINOCrossEntropy,
        DINOHeadLoss,
        DualCenteringSoftmax,
        PatchEmbed,
    )
    from terrafm_kernels.swap import PatchProjection

    def build():
        torch.manual_seed(0)
        embed = PatchEmbed(16, 8, 3, 8)
        return [embed, CrossAttentionFusion(8, 2, 2), DualCenteringSoftmax(8), DINOCrossEntropy(0.1),
                DINOHeadLoss(8, 16), DINOLoss(8), iBOTPatchLoss(8), PatchProjection.from_conv(embed.proj)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # backend="auto" follows the interpreter alone
    for built_under, other in ((True, "reference"), (False, "kernel")):
        monkeypatch.setattr(_common, "INTERPRET", built_under)
        built = build()
        assert {_cpu_path(m) for m in built} == {"kernel" if built_under else "reference"}
        pickled, saved = pickle.dumps(built), io.BytesIO()
        torch.save(built, saved)
        monkeypatch.setattr(_common, "INTERPRET", not built_under)  # another process
        for loaded in (pickle.loads(pickled), torch.load(io.BytesIO(saved.getvalue()), weights_only=False),
                       copy.deepcopy(built)):
            assert [_cpu_path(m) for m in loaded] == [other] * len(built)
            assert _cpu_path(loaded[4].centering) == other
            for old, new in zip(built, loaded, strict=True):
                assert type(new) is type(old) and old.state_dict().keys() == new.state_dict().keys()
                assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
        explicit = pickle.loads(pickle.dumps(DINOLoss(8, backend="triton")))
        assert explicit.backend == "triton"
    monkeypatch.setattr(_common, "INTERPRET", True)
    pickled = pickle.dumps(build()[0])
    monkeypatch.setattr(_common, "INTERPRET", False)
    embed = pickle.loads(pickled)  # its reference path runs what the (interpreted) kernel refuses: float64
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert embed.double()(x).dtype == torch.float64


@pytest.mark.skipif(not _common.INTERPRET, reason="checks the Triton interpreter (tests/conftest.py sets it)")
def test_a_wrongly_shaped_slice_is_a_shape_error_on_the_kernel_path_too():
    """values[:, :2] (non-contiguous, one modality short) was 'values must be contiguous' on the kernel path and the
    shape error on the reference path: the same bad input, two errors (docs/kernels.md promises one)."""
    from terrafm_kernels.fusion import cross_attention_fusion
    from terrafm_kernels.modules import CrossAttentionFusion, DINOCrossEntropy

    fusion = CrossAttentionFusion(32, 3, 4)
    keys, values = torch.randn(10, 3, 32), torch.randn(10, 3, 32)
    with pytest.raises(ValueError, match="values must have the shape of keys"):
        fusion(keys, values[:, :2])
    student, teacher = torch.randn(4, 2, 64), torch.softmax(torch.randn(2, 4, 64), -1)
    with pytest.raises(ValueError, match=r"must match student_logits \(S, B, K\) = \(4, 2, 64\) in B and K"):
        DINOCrossEntropy(0.1)(student, teacher[:, :3])
    transposed = torch.randn(3, 10, 32).transpose(0, 1)  # right shape, wrong layout: the functional op names it,
    with pytest.raises(ValueError, match="values must be contiguous"):  # the module copies it (as the reference
        cross_attention_fusion(keys, transposed, fusion.queries, fusion.pool, 4)  # takes any strides)
    torch.testing.assert_close(fusion(keys, transposed), fusion(keys, transposed.contiguous()))


def test_modules_take_non_contiguous_inputs_on_the_kernel_path_as_the_reference_does(device):
    """keys / values from kv.chunk(2, -1) and a column slice of teacher logits ran on a laptop's reference path and
    were refused on the kernel path ('keys must be contiguous')."""
    from terrafm_kernels.modules import CrossAttentionFusion, DINOCrossEntropy, DualCenteringSoftmax

    torch.manual_seed(0)
    fusion = CrossAttentionFusion(16, 3, 2).to(device)
    keys, values = torch.randn(5, 3, 32, device=device).chunk(2, -1)
    assert not keys.is_contiguous()
    torch.testing.assert_close(fusion(keys, values), fusion(keys.contiguous(), values.contiguous()))
    softmax = DualCenteringSoftmax(16).to(device)
    logits = torch.randn(4, 32, device=device)[:, ::2]
    probs, _, _ = softmax(logits, torch.zeros(4, device=device), 0.1)
    torch.testing.assert_close(probs, softmax(logits.contiguous(), torch.zeros(4, device=device), 0.1)[0])
    student = torch.randn(3, 2, 32, device=device)[..., :16]
    loss = DINOCrossEntropy(0.1)(student, probs.reshape(2, 2, 16))
    torch.testing.assert_close(loss, DINOCrossEntropy(0.1)(student.contiguous(), probs.reshape(2, 2, 16)))


def test_patch_embed_takes_timms_format_enum():
    """str(Format.NHWC) is 'Format.NHWC' on Python 3.11: timm's own enum was refused as not one of timm's formats."""
    import enum

    from terrafm_kernels.modules import PatchEmbed

    class Format(str, enum.Enum):  # noqa: UP042 (timm.layers.Format's form; a StrEnum's str() is its value)
        NHWC = "NHWC"

    assert PatchEmbed(16, 8, 3, 4, output_fmt=Format.NHWC).output_fmt == "NHWC"
    assert PatchEmbed(16, 8, 3, 4, output_fmt=Format.NHWC)(torch.randn(1, 3, 16, 16)).shape == (1, 2, 2, 4)


def test_the_interpreter_names_triton_3_6_with_numpy_2_4_before_launching(monkeypatch):
    """triton 3.6 (the GPU image's, which the metadata accepts) with numpy 2.4 failed in every kernel under
    TRITON_INTERPRET=1 with "only 0-dimensional arrays can be converted to Python scalars", deep in triton."""
    import numpy
    import triton

    assert _common.interpreter_problem("3.6.0", "2.4.6") is not None
    assert _common.interpreter_problem("3.6.0+git1a2b", "2.4.0rc1") is not None
    for versions in (("3.6.0", "2.3.5"), ("3.7.1", "2.4.6"), ("3.8.0", "1.26.4")):
        assert _common.interpreter_problem(*versions) is None, versions
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match=r"triton 3.6.0's interpreter .* numpy 2.4.6.*numpy<2.4 or triton>=3.7"):
        _common.launch_kernel(None, (1,), torch.zeros(1))  # refused before the kernel is looked at
