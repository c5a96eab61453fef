"""DINOv2's KoLeo regulariser: value against a float64 brute force, its gradient, and its place in the SSL loss."""

import math

import pytest
import torch

from terrafm.config import ConfigError, load_config
from terrafm.models import build_model
from terrafm.ssl.loss import DINOLoss, koleo_loss
from terrafm.ssl.meta_arch import SSLMetaArch


def brute_force(features: torch.Tensor, eps: float = 1e-8) -> float:
    """-mean log(distance to the nearest other row) of the L2-normalised rows, in float64 with plain loops."""
    x = [row / max(row.norm().item(), eps) for row in features.double()]
    total = 0.0
    for i, xi in enumerate(x):
        nearest = min((j for j in range(len(x)) if j != i), key=lambda j: (xi - x[j]).norm().item())
        total += math.log((xi - x[nearest] + eps).norm().item() + eps)
    return -total / len(x)


@pytest.mark.parametrize("shape", [(2, 3), (7, 5), (16, 64)])
def test_koleo_matches_the_brute_force_definition(shape):
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 3.0
    assert koleo_loss(features).item() == pytest.approx(brute_force(features), rel=1e-5, abs=1e-6)


def test_koleo_gradient_spreads_the_closest_pair_and_ignores_the_scale():
    """A gradient step on the loss moves the two nearest rows apart; scaling a row changes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    x[1] = x[0] + 0.01 * torch.randn(16, generator=g)  # a near-duplicate pair
    x.requires_grad_(True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()
    unit = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
    before = (unit(x[0]) - unit(x[1])).norm()
    stepped = x.detach() - 0.01 * x.grad
    assert (unit(stepped[0]) - unit(stepped[1])).norm() > before
    scaled = x.detach().clone()
    scaled[3] *= 7.0
    assert koleo_loss(scaled).item() == pytest.approx(koleo_loss(x.detach()).item(), rel=1e-6)


def test_koleo_is_finite_on_identical_rows_and_refuses_a_single_row():
    same = torch.ones(4, 8, requires_grad=True)
    value = koleo_loss(same)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 8))
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(4, 2, 8))


@pytest.mark.parametrize("fused", [False, True])
def test_meta_arch_adds_the_weighted_koleo_term_of_each_global_view(fused):
    """loss(koleo_weight=w) = loss(w=0) + w x sum over global views of koleo(student cls); same on the fused path;
    the KoLeo gradient reaches the backbone."""
    factory = lambda **kw: build_model("terrafm_tiny", img_size=32, **kw)  # noqa: E731
    head = dict(num_prototypes=24, hidden_dim=16, bottleneck_dim=8)
    g = torch.Generator().manual_seed(1)
    globals_ = [{"s2_l2a": torch.randn(4, 12, 32, 32, generator=g)}, {"s1": torch.randn(4, 2, 32, 32, generator=g)}]
    locals_ = [{"s2_l1c": torch.randn(4, 12, 16, 16, generator=g)}]
    majority = torch.tensor([1, 0, -1, 2])
    losses, archs = [], []
    for weight in (0.0, 0.3):
        torch.manual_seed(0)
        arch = SSLMetaArch.build(factory, head, DINOLoss(24, 3), 0.0, fused_head_loss=fused, koleo_weight=weight)
        losses.append(arch(globals_, locals_, majority, teacher_temperature=0.05))
        archs.append(arch)
    plain, regularised = archs
    assert plain.last_koleo is None and regularised.last_koleo is not None
    _, cls = regularised.student(globals_, return_cls=True)
    expected = sum(koleo_loss(f) for f in cls)
    torch.testing.assert_close(regularised.last_koleo, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], losses[0] + 0.3 * expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    assert regularised.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="koleo_weight"):
        SSLMetaArch.build(factory, head, DINOLoss(24, 3), 0.0, koleo_weight=-0.1)


def test_config_refuses_a_negative_koleo_weight_and_koleo_on_one_image_per_rank():
    with pytest.raises(ConfigError, match="koleo_weight"):
        load_config("tiny_cpu", ["ssl.koleo_weight=-1"])
    with pytest.raises(ConfigError, match="needs data.batch_size >= 2"):
        load_config("tiny_cpu", ["data.batch_size=1"])
    assert load_config("tiny_cpu", ["data.batch_size=1", "ssl.koleo_weight=0"]).data.batch_size == 1
