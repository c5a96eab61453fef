import torch

from terrafm.models import build_model
from terrafm.ssl.head import DINOHead
from terrafm.ssl.loss import DINOLoss
from terrafm.ssl.meta_arch import DINOModel, SSLMetaArch


class CountingBackbone(torch.nn.Module):
    """Records each call's (modalities, batch, size); returns a feature that depends on the input."""

    def __init__(self):
        super().__init__()
        self.embed_dim = 4
        self.calls = []
        self.proj = torch.nn.Linear(1, 4)

    def forward(self, x, modality):
        images = x if isinstance(x, dict) else {modality: x}
        first = next(iter(images.values()))
        self.calls.append((tuple(sorted(images)), first.shape[0], first.shape[-1], modality))
        return self.proj(sum(t.mean(dim=(1, 2, 3)) for t in images.values()).unsqueeze(1))


def view(mods, b, size, value=None):
    return {m: torch.full((b, 12 if m.startswith("s2") else 2, size, size), float(value or 0)) for m in mods}


def test_multicrop_forward_groups_views_into_one_backbone_call_per_modality_set_and_size():
    backbone = CountingBackbone()
    model = DINOModel(backbone, DINOHead(4, num_prototypes=8, hidden_dim=8, bottleneck_dim=4))
    views = [view(["s2_l2a"], 2, 32, 1), view(["s1"], 2, 32, 2), view(["s2_l2a"], 2, 16, 3),
             view(["s2_l2a"], 2, 32, 4), view(["s1", "s2_l1c"], 2, 16, 5)]
    out = model(views)
    assert out.shape == (5, 2, 8)
    assert sorted(backbone.calls) == sorted([
        (("s2_l2a",), 4, 32, "s2_l2a"), (("s1",), 2, 32, "s1"), (("s2_l2a",), 2, 16, "s2_l2a"),
        (("s1", "s2_l1c"), 2, 16, None),  # Case N: a dict and no modality argument
    ])
    # features come back in view order: each view equals its own forward alone
    for i, v in enumerate(views):
        torch.testing.assert_close(out[i], model([v])[0])


def test_ema_update_on_plain_tensors_matches_hand_computation():
    def model():
        return DINOModel(CountingBackbone(), DINOHead(4, num_prototypes=8, hidden_dim=8, bottleneck_dim=4))

    arch = SSLMetaArch(model(), model(), DINOLoss(8, num_classes=2))
    before = [p.clone() for p in arch.teacher.parameters()]
    arch.update_teacher(0.9)
    for t0, t1, s in zip(before, arch.teacher.parameters(), arch.student.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
    assert not any(p.requires_grad for p in arch.teacher.parameters())


def test_build_gives_teacher_equal_to_student_and_fusion_views_run_on_terrafm():
    factory = lambda **kw: build_model("terrafm_tiny", img_size=32, fusion=True, **kw)  # noqa: E731
    arch = SSLMetaArch.build(factory, dict(num_prototypes=16, hidden_dim=16, bottleneck_dim=8), DINOLoss(16, 2), 0.1)
    for s, t in zip(arch.student.state_dict().values(), arch.teacher.state_dict().values(), strict=True):
        torch.testing.assert_close(s, t)
    g = torch.Generator().manual_seed(0)
    globals_ = [{"s2_l2a": torch.randn(2, 12, 32, 32, generator=g)}, {"s1": torch.randn(2, 2, 32, 32, generator=g)}]
    locals_ = [{"s1": torch.randn(2, 2, 16, 16, generator=g), "s2_l1c": torch.randn(2, 12, 16, 16, generator=g)}]
    loss = arch(globals_, locals_, torch.tensor([0, 1]), teacher_temperature=0.04)
    loss.backward()
    assert torch.isfinite(loss)
    fusion_grad = arch.student.backbone.patch_embed.fusion.queries.grad
    assert fusion_grad is not None and fusion_grad.abs().sum() > 0
