import pytest
import torch

from terrafm.config import Config
from terrafm.models import build_model
from terrafm.models.terrafm import backbone_flops
from terrafm.ssl.head import DINOHead
from terrafm.ssl.loss import DINOLoss
from terrafm.ssl.meta_arch import DINOModel, SSLMetaArch


class CountingBlock(torch.nn.Module):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.calls.append(("block", x.shape[0], x.shape[1]))
        return x + self.lin(x)


class CountingBackbone(torch.nn.Module):
    """Records embedding calls (modalities, batch, size, modality arg) and block calls (batch, tokens)."""

    def __init__(self):
        super().__init__()
        self.embed_dim = 4
        self.calls = []
        self.proj = torch.nn.Linear(1, 4)
        self.blocks = torch.nn.ModuleList([CountingBlock(self.calls)])
        self.norm = torch.nn.Identity()

    def prepare_tokens(self, x, modality=None):
        images = x if isinstance(x, dict) else {modality: x}
        first = next(iter(images.values()))
        self.calls.append((tuple(sorted(images)), first.shape[0], first.shape[-1], modality))
        pooled = sum(t.mean(dim=1, keepdim=True) for t in images.values())  # (n, 1, h, w)
        patches = torch.nn.functional.avg_pool2d(pooled, 8).flatten(1).unsqueeze(-1)  # (n, T, 1)
        return self.proj(torch.cat([patches.mean(1, keepdim=True), patches], dim=1))


def view(mods, b, size, value=None):
    return {m: torch.full((b, 12 if m.startswith("s2") else 2, size, size), float(value or 0)) for m in mods}


def test_multicrop_forward_embeds_per_modality_group_and_runs_blocks_once_per_crop_size():
    backbone = CountingBackbone()
    model = DINOModel(backbone, DINOHead(4, num_prototypes=8, hidden_dim=8, bottleneck_dim=4))
    views = [view(["s2_l2a"], 2, 32, 1), view(["s1"], 2, 32, 2), view(["s2_l2a"], 2, 16, 3),
             view(["s2_l2a"], 2, 32, 4), view(["s1", "s2_l1c"], 2, 16, 5)]
    out = model(views)
    assert out.shape == (5, 2, 8)
    embeds = [c for c in backbone.calls if c[0] != "block"]
    assert sorted(embeds) == sorted([
        (("s2_l2a",), 4, 32, "s2_l2a"), (("s1",), 2, 32, "s1"), (("s2_l2a",), 2, 16, "s2_l2a"),
        (("s1", "s2_l1c"), 2, 16, None),  # Case N: a dict and no modality argument
    ])
    # the blocks run once per crop size, sizes in sorted order (the same sequence on every rank)
    assert [c for c in backbone.calls if c[0] == "block"] == [("block", 4, 5), ("block", 6, 17)]
    # features come back in view order: each view equals its own forward alone
    for i, v in enumerate(views):
        torch.testing.assert_close(out[i], model([v])[0])


def test_two_stage_forward_equals_the_backbone_forward():
    backbone = build_model("terrafm_tiny", img_size=32, fusion=True).eval()
    head = DINOHead(backbone.embed_dim, num_prototypes=16, hidden_dim=16, bottleneck_dim=8)
    model = DINOModel(backbone, head)
    g = torch.Generator().manual_seed(0)
    views = [{"s2_l2a": torch.randn(2, 12, 32, 32, generator=g)},
             {"s1": torch.randn(2, 2, 16, 16, generator=g), "s2_l1c": torch.randn(2, 12, 16, 16, generator=g)}]
    with torch.no_grad():
        out = model(views)
        torch.testing.assert_close(out[0], head(backbone(views[0]["s2_l2a"], "s2_l2a")))
        torch.testing.assert_close(out[1], head(backbone(views[1])))


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


def test_from_config_assembles_the_configured_model_and_counts_its_flops():
    cfg = Config()
    cfg.model.name, cfg.model.img_size, cfg.model.fusion, cfg.model.drop_path_rate = "terrafm_tiny", 32, True, 0.2
    cfg.ssl.num_prototypes, cfg.ssl.head_hidden_dim, cfg.ssl.head_bottleneck_dim = 16, 32, 8
    cfg.ssl.student_temperature, cfg.ssl.center_alpha, cfg.ssl.fused_head_loss = 0.2, 0.5, True
    cfg.ops = {"patch_embed": "torch", "dino_head_loss": "torch"}
    arch = SSLMetaArch.from_config(cfg, num_classes=11, high_classes=[4])
    student, teacher = arch.student.backbone, arch.teacher.backbone
    assert (student.name, student.img_size, student.patch_embed.fusion is not None) == ("terrafm_tiny", 32, True)
    assert student.blocks[-1].drop_path and not teacher.blocks[-1].drop_path  # drop path: the student only
    torch.testing.assert_close(student.blocks[-1].drop_path_rate, torch.tensor(0.2))
    for s, t in zip(arch.student.state_dict().values(), arch.teacher.state_dict().values(), strict=True):
        torch.testing.assert_close(s, t)
    assert arch.student.head.last_layer.weight_v.shape == (16, 8)
    assert arch.fused_head_loss and arch.loss.student_temperature == 0.2 and arch.loss.alpha == 0.5
    assert arch.loss.high_class_weight.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    globals_ = [{"s2_l2a": torch.zeros(2, 12, 32, 32)}]
    locals_ = [{"s1": torch.zeros(2, 2, 16, 16), "s2_l1c": torch.zeros(2, 12, 16, 16)}]
    head = 2 * (192 * 32 + 32 * 32 + 32 * 8 + 8 * 16)  # MLP 192 -> 32 -> 32 -> 8, then 16 prototypes
    g = backbone_flops(192, 4, 16, [12], 32, 32) + head
    loc = backbone_flops(192, 4, 16, [2, 12], 16, 16) + head
    conv = 2 * 4 * (12 * 16 * 16 * 576) + 2 * 1 * ((2 + 12) * 16 * 16 * 576)  # patches x C p p x A, both views
    # student fwd + bwd (no input gradient for the images: the conv's backward is 1x its forward), teacher fwd
    assert arch.flops_per_sample(globals_, locals_) == 3 * (g + loc) - conv + g


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the kernel under TRITON_INTERPRET=1
def test_fused_head_loss_matches_the_unfused_path(backend):
    """ssl.fused_head_loss: same loss, gradients and centre statistics as prototype layers + teacher
    softmax + cross-entropy; the teacher's own prototypes are used (made to differ from the student's)."""
    factory = lambda **kw: build_model("terrafm_tiny", img_size=32, **kw)  # noqa: E731
    head = dict(num_prototypes=40, hidden_dim=16, bottleneck_dim=8, learn_prototype_norm=True)
    archs = []
    for fused in (False, True):
        torch.manual_seed(0)
        loss = DINOLoss(40, 3, high_classes=[1], ops_prefer={"dino_head_loss": backend})
        arch = SSLMetaArch.build(factory, head, loss, 0.0, fused_head_loss=fused)
        with torch.no_grad():
            arch.teacher.head.last_layer.weight_v.mul_(1.5).add_(0.01)
            arch.teacher.head.last_layer.weight_g.fill_(0.9)
            arch.loss.center.normal_(generator=torch.Generator().manual_seed(3))
        archs.append(arch)
    g = torch.Generator().manual_seed(1)
    globals_ = [{"s2_l2a": torch.randn(3, 12, 32, 32, generator=g)}, {"s1": torch.randn(3, 2, 32, 32, generator=g)}]
    locals_ = [{"s2_l1c": torch.randn(3, 12, 16, 16, generator=g)}]
    majority = torch.tensor([1, 0, -1])
    losses = []
    for arch in archs:
        loss = arch(globals_, locals_, majority, teacher_temperature=0.05)
        loss.backward()
        losses.append(loss)
    unfused, fused = archs
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(unfused.student.named_parameters(), fused.student.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            # atol relative to the tensor's scale: elements that cancel to ~0 keep fp32 reordering noise
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * a.grad.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert fused.student.head.last_layer.weight_g.grad.abs().sum() > 0
    torch.testing.assert_close(fused.loss._pending, unfused.loss._pending, rtol=1e-5, atol=1e-6)
    assert unfused.last_teacher_probs is not None and fused.last_teacher_probs is None


@pytest.mark.parametrize("channels", [{"s2_l2a": 12}, {"s2_l2a": 12, "s1": 2}])
def test_backbone_flops_match_torchs_flop_counter(channels):
    """MFU's numerator against torch's own count of the matmuls and convs of one forward (Case 1 and Case N,
    where the fusion's key projection runs per modality): within 1%."""
    from torch.utils.flop_counter import FlopCounterMode

    from terrafm.models import build_model

    model = build_model("terrafm_tiny", fusion=True).eval()
    x = {m: torch.randn(2, c, 64, 64) for m, c in channels.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x) if len(x) > 1 else model(x["s2_l2a"], "s2_l2a")
    ours = 2 * backbone_flops(model.embed_dim, len(model.blocks), model.patch_size, list(channels.values()), 64, 64)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)
