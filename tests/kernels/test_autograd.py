"""The autograd contract of every public kernel function, checked against the reference (the spec).

Runs the kernels under TRITON_INTERPRET=1 on CPU (conftest) or compiled on CUDA; small shapes.
"""

import pytest
import torch

from terrafm_kernels import reference
from terrafm_kernels.dino_cross_entropy import dino_cross_entropy
from terrafm_kernels.dino_head_loss import dino_head_loss
from terrafm_kernels.dino_student_ce import weighted_soft_cross_entropy
from terrafm_kernels.fusion import cross_attention_fusion
from terrafm_kernels.patch_embed import patch_embed


def _randn(*shape, device):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(device)


def _losses(device):
    """name -> (the fused function's loss of a leaf x, x): every op with a backward."""
    x4, w4, b = _randn(2, 3, 8, 8, device=device), _randn(5, 3, 4, 4, device=device), _randn(5, device=device)
    keys, queries, pool = _randn(3, 2, 8, device=device), _randn(2, 8, device=device), _randn(8, device=device)
    logits, probs = _randn(3, 2, 10, device=device), torch.softmax(_randn(2, 2, 10, device=device), -1)
    feats, teacher = _randn(3, 2, 8, device=device), _randn(2, 2, 8, device=device)
    weight_v = _randn(12, 8, device=device)
    zeros, row_weight = torch.zeros(12, device=device), torch.tensor([0.3, 0.7], device=device)
    return {
        "patch_embed": (lambda x: patch_embed(x, w4, b).pow(2).sum(), x4),
        "cross_attention_fusion": (lambda x: cross_attention_fusion(x, keys, queries, pool, 2).pow(2).sum(), keys),
        "dino_cross_entropy": (lambda x: dino_cross_entropy(x, probs, 0.1), logits),
        "dino_head_loss": (lambda x: dino_head_loss(x, teacher, weight_v, zeros, zeros, torch.zeros(4, device=device),
                                                    0.05, 0.1, 0.8)[0], feats),
        "weighted_soft_cross_entropy": (lambda x: weighted_soft_cross_entropy(x[0], probs, row_weight, 0.1), logits),
    }


@pytest.mark.parametrize("name", ["patch_embed", "cross_attention_fusion", "dino_cross_entropy", "dino_head_loss",
                                  "weighted_soft_cross_entropy"])
def test_a_second_backward_is_refused_by_name(device, name):
    """create_graph=True then a backward through the gradient (a gradient penalty): torch's own error said "no
    autograd formula was registered. Please use register_autograd to add one", which reads as a bug to fix in the
    library. It names the op, says why, and points to the reference (which exists); the first-order gradient is the
    one a plain backward gives."""
    loss_of, x = _losses(device)[name]
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}: the fused kernel's gradient is not differentiable again"):
        grad.pow(2).sum().backward()
    x_plain = x.detach().clone().requires_grad_()
    (plain,) = torch.autograd.grad(loss_of(x_plain), x_plain)
    torch.testing.assert_close(grad.detach(), plain)
    assert hasattr(reference, name)


@pytest.mark.parametrize("logits_grad", [True, False])
def test_row_weights_get_the_reference_gradient(device, logits_grad):
    """The loss is linear in the row weights and the reference differentiates it there; the fused function detached
    them, so weights that require grad (learned, or DINOv2's masks_weight from a graph) silently got none."""
    R, K = 5, 13
    logits, row_weight = _randn(R, K, device=device), _randn(R, device=device).abs().half()
    targets = torch.softmax(_randn(2, R, K, device=device), -1)
    x, w = logits.clone().requires_grad_(logits_grad), row_weight.clone().requires_grad_()
    weighted_soft_cross_entropy(x, targets, w, 0.1).backward()
    x64, w64 = logits.double().requires_grad_(logits_grad), row_weight.double().requires_grad_()
    reference.weighted_soft_cross_entropy(x64, targets.double(), w64, 0.1).backward()
    assert w.grad.dtype == torch.float16
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-3, atol=1e-3)
    if logits_grad:
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    else:
        assert x.grad is None


@pytest.mark.parametrize("tau", [0.1, 1e-4])
def test_row_losses_of_large_equal_logits_do_not_cancel(device, tau):
    """Each row's loss (the row weights' gradient) was (n max - Q . x) / tau + n lse on the raw logits: equal fp16
    logits of 6e4 cancelled to 13.4 off at tau 1e-4 (the weights' gradient 156 off), the reference 2e-7."""
    R, K = 5, 70
    logits = torch.full((R, K), 6e4, dtype=torch.float16, device=device)
    targets = torch.softmax(_randn(2, R, K, device=device), -1)
    w = torch.full((R,), 0.2, device=device, requires_grad=True)
    loss = weighted_soft_cross_entropy(logits, targets, w, tau)
    loss.backward()
    w64 = w.detach().double().requires_grad_()
    loss64 = reference.weighted_soft_cross_entropy(logits.double(), targets.double(), w64, tau)
    loss64.backward()
    # every row's loss is n log K exactly: the targets sum to 1 per view, the softmax is uniform
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-6, atol=1e-6)


def test_a_second_backward_through_the_row_weights_gradient_is_refused(device):
    """The row weights' gradient is each row's loss, which depends on the logits. Under create_graph=True it came
    back as a constant: a penalty on it (learned sample weights) silently gave the logits none of its gradient, or
    torch's "does not require grad" alone. It refuses by name, as the logits' own gradient does; with logits that
    need no gradient it stays the reference's first-order gradient (the loss is linear in the weights)."""
    R, K = 4, 11
    logits, targets = _randn(R, K, device=device), torch.softmax(_randn(2, R, K, device=device), -1)
    x, w = logits.clone().requires_grad_(), _randn(R, device=device).abs().requires_grad_()
    (grad_w,) = torch.autograd.grad(weighted_soft_cross_entropy(x, targets, w, 0.1), w, create_graph=True)
    with pytest.raises(RuntimeError, match="weighted_soft_cross_entropy: the fused kernel's gradient is not"):
        (grad_w.pow(2).sum() + x.pow(2).sum()).backward()
    (grad_w,) = torch.autograd.grad(weighted_soft_cross_entropy(logits, targets, w, 0.1), w, create_graph=True)
    w64 = w.detach().double().requires_grad_()
    (grad_w64,) = torch.autograd.grad(reference.weighted_soft_cross_entropy(logits.double(), targets.double(), w64,
                                                                            0.1), w64)
    torch.testing.assert_close(grad_w.double(), grad_w64, rtol=1e-5, atol=1e-6)


def test_a_temperature_schedule_compiles_fullgraph(device):
    """DINO warms the teacher temperature up step by step. From the second value on torch.compile traces it as a
    symbolic float, and the temperature check's math.isfinite broke the graph: torch.compile(fullgraph=True) of a
    step raised on the second temperature, for every op that takes one. Each step still equals eager, and a
    schedule costs two graphs (the first value's, then the symbolic one): a float argument of a custom op was
    specialised, one graph per value, until torch's recompile limit (8) sent the step back to eager."""
    from torch._dynamo.utils import counters

    from terrafm_kernels.dino import DINOLoss
    from terrafm_kernels.modules import DINOHeadLoss, DualCenteringSoftmax

    torch._dynamo.reset()
    logits, high = _randn(4, 10, device=device), torch.rand(4).to(device)
    student, probs = _randn(3, 2, 10, device=device), torch.softmax(_randn(2, 2, 10, device=device), -1)
    centering, dino = DualCenteringSoftmax(10).to(device), DINOLoss(10).to(device)
    head = DINOHeadLoss(8, 12).to(device)
    feats, teacher = _randn(3, 2, 8, device=device), _randn(2, 2, 8, device=device)

    def step(temperature):
        return (centering(logits, high, temperature)[0].sum() + dino_cross_entropy(student, probs, temperature)
                + dino([logits], [dino.softmax_center_teacher(logits, temperature)])
                + dino.sinkhorn_knopp_teacher(logits, temperature).sum()
                + head(feats, teacher, torch.zeros(4, device=device), temperature)[0])

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    counters.clear()
    for temperature in (0.04, 0.05, 0.06, 0.07, 0.08):
        torch.testing.assert_close(compiled(temperature), step(temperature))
    assert counters["stats"]["unique_graphs"] == 2


def test_a_model_holding_the_modules_compiles_fullgraph_with_eager_gradients(device):
    """The README's promise for the nn.Module drop-ins: torch.compile(fullgraph=True) of a model containing them
    traces the custom ops (forward and backward) without a graph break, with eager's outputs and gradients."""
    from terrafm_kernels.modules import CrossAttentionFusion, PatchEmbed

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = PatchEmbed(8, 4, 3, 8)
            self.fusion = CrossAttentionFusion(8, 2, 2)

        def forward(self, x):
            tokens = self.embed(x)  # (B, 4, 8): fuse the first two patches of each image as two "modalities"
            return self.fusion(tokens[:, :2].contiguous(), tokens[:, 2:].contiguous())

    torch._dynamo.reset()
    model, x = Tiny().to(device), _randn(2, 3, 8, 8, device=device)
    grads = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        out = run(x)
        out.pow(2).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_the_loss_references_keep_float64_for_gradcheck():
    """The kernels' float64 refusal sends gradcheck to terrafm_kernels.reference, whose loss functions cast to fp32:
    gradcheck failed there (Jacobian mismatch) and float64 oracles built on them were fp32."""
    from terrafm_kernels import reference

    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 2, 7, dtype=torch.float64, generator=g), -1)
    assert torch.autograd.gradcheck(lambda s: reference.dino_cross_entropy(s, teacher, 0.1), (student,))
    rows = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 4, 7, dtype=torch.float64, generator=g), -1)
    weight = torch.rand(4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda r: reference.weighted_soft_cross_entropy(r, targets, weight, 0.1), (rows,))
    logits = torch.randn(5, 7, dtype=torch.float64, generator=g)
    zeros = torch.zeros(7, dtype=torch.float64)
    for out in (reference.teacher_softmax(logits, zeros, zeros, torch.ones(5, dtype=torch.float64), 0.04, 0.5)[0],
                reference.centered_softmax(logits, zeros, 0.04), reference.sinkhorn_knopp(logits, 0.04, 3)):
        assert out.dtype == torch.float64
