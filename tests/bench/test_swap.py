"""accelerate_vit on real timm, torchvision and Hugging Face ViTs of two sizes: same outputs and gradients
as the untouched model, unchanged state_dicts, still trains, compiles and saves.

Hugging Face runs in the main environment; timm and torchvision need torchvision, which only imports in
.venv-swap (scripts/setup_swap_env.sh, then scripts/test_swap.sh).
"""

import copy
import importlib
import importlib.util
from unittest import mock

import pytest
import torch

from terrafm_kernels.swap import PatchProjection, accelerate_vit

# The untouched models' nn.Conv2d computes fp32 without tf32 on CPU; the kernel follows torch's switch, so every
# comparison here runs with it off (the kernel's tf32 path: tests/kernels/test_patch_embed.py).
pytestmark = pytest.mark.usefixtures("ieee_convolutions")

TORCHVISION_REASON = ("torchvision not importable beside the torch 2.13.0 CPU wheel; run scripts/test_swap.sh")


def _importable(name: str) -> bool:
    """False where the package is not installed, or where it fails to import beside the torch 2.13.0 CPU wheel (the
    known mismatch the skip reason names). Any other import error fails the run: catching every exception let a
    broken torchvision in .venv-swap skip all timm / torchvision tests, and scripts/test_swap.sh passed."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # torchvision raises RuntimeError ("operator torchvision::nms does not exist")
        if torch.__version__.startswith("2.13.0"):
            return False
        raise
    return True


HAVE_TV = _importable("torchvision")
HAVE_TIMM = HAVE_TV and _importable("timm")
HAVE_HF = _importable("transformers")

# two sizes per host: (image, patch, channels, width, depth, heads)
SIZES = {"small": (32, 8, 3, 32, 2, 2), "wide": (48, 16, 2, 48, 3, 3)}


def _build(host: str, size: str) -> torch.nn.Module:
    img, patch, chans, dim, depth, heads = SIZES[size]
    torch.manual_seed(0)
    if host == "timm":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
                                  num_heads=heads, num_classes=5)
        for m in model.modules():  # start from the manual attention path, which accelerate_vit switches
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        return model
    if host == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        if chans != 3:  # torchvision's ViT is RGB only
            img, patch = 48, 16
        return VisionTransformer(image_size=img, patch_size=patch, num_layers=depth, num_heads=heads,
                                 hidden_dim=dim, mlp_dim=2 * dim, num_classes=5)
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(image_size=img, patch_size=patch, num_channels=chans, hidden_size=dim,
                       num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=2 * dim,
                       num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       attn_implementation="eager")
    cls = ViTModel if size == "small" else ViTForImageClassification
    return cls(config, add_pooling_layer=False) if cls is ViTModel else cls(config)


def _channels(host: str, size: str) -> int:
    return 3 if host == "torchvision" else SIZES[size][2]


def _image(host: str, size: str, batch: int = 2) -> torch.Tensor:
    img = SIZES[size][0]
    if host == "torchvision" and size == "wide":
        img = 48
    return torch.randn(batch, _channels(host, size), img, img, generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    for key in ("logits", "last_hidden_state"):
        if hasattr(y, key):
            return getattr(y, key)
    return y


def _host_param(host: str):
    marks = {"timm": pytest.mark.skipif(not HAVE_TIMM, reason=TORCHVISION_REASON),
             "torchvision": pytest.mark.skipif(not HAVE_TV, reason=TORCHVISION_REASON),
             "huggingface": pytest.mark.skipif(not HAVE_HF, reason="transformers not installed (test extra)")}
    return pytest.param(host, marks=marks[host])


HOSTS = [_host_param(h) for h in ("timm", "torchvision", "huggingface")]


def _within_flash_rule(name: str, got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> None:
    """Tolerance rule (flash-attn): error against float64 at most 2x plain PyTorch's float32 error + atol."""
    err = (got.double() - ref64).abs().max().item()
    base = (ref32.double() - ref64).abs().max().item()
    atol = 1e-6 * max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} vs float32 PyTorch's {base:.3e} (+{atol:.1e})"


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("host", HOSTS)
def test_outputs_and_gradients_match_untouched_model(host, size):
    ref = _build(host, size)
    ref64 = copy.deepcopy(ref).double()
    fast = copy.deepcopy(ref)
    report = accelerate_vit(fast)
    assert any(e.what == "patch_embed" for e in report.swapped), str(report)
    assert sum(isinstance(m, PatchProjection) for m in fast.modules()) == 1
    x = _image(host, size)
    # on CPU the projection runs the kernel only under TRITON_INTERPRET=1; without it both sides would be conv2d
    assert next(m for m in fast.modules() if isinstance(m, PatchProjection)).kernel_on_cpu or x.is_cuda
    outputs = {}
    for label, model, inp in (("ref", ref, x), ("ref64", ref64, x.double()), ("fast", fast, x)):
        y = _out(model, inp)
        y.square().sum().backward()
        outputs[label] = y.detach()
    torch.testing.assert_close(outputs["fast"], outputs["ref"], rtol=1e-4, atol=1e-5)
    _within_flash_rule("output", outputs["fast"], outputs["ref"], outputs["ref64"])
    grads32, grads64 = dict(ref.named_parameters()), dict(ref64.named_parameters())
    for name, p in fast.named_parameters():
        _within_flash_rule(name, p.grad, grads32[name].grad, grads64[name].grad)


@pytest.mark.parametrize("host", HOSTS)
def test_state_dict_unchanged_and_save_load(host, tmp_path):
    ref = _build(host, "small")
    before = {k: v.shape for k, v in ref.state_dict().items()}
    fast = copy.deepcopy(ref)
    accelerate_vit(fast)
    assert {k: v.shape for k, v in fast.state_dict().items()} == before
    torch.save(fast.state_dict(), tmp_path / "swapped.pt")
    fresh = _build(host, "small")
    torch.manual_seed(5)
    for p in fresh.parameters():
        p.data.normal_()
    accelerate_vit(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "swapped.pt"))  # strict: same names and shapes
    ref.load_state_dict(torch.load(tmp_path / "swapped.pt"))  # and into an untouched host
    x = _image(host, "small")
    torch.testing.assert_close(_out(fresh, x), _out(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("host", HOSTS)
def test_swapped_model_trains(host):
    model = _build(host, "small")
    accelerate_vit(model)
    x = _image(host, "small", batch=4)
    target = torch.randn_like(_out(model, x))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = (_out(model, x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    projection = next(m for m in model.modules() if isinstance(m, PatchProjection))
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("host", HOSTS)
def test_swapped_model_compiles(host):
    model = _build(host, "small").eval()
    accelerate_vit(model)
    x = _image(host, "small")
    with torch.no_grad():
        eager = _out(model, x)
        compiled = _out(torch.compile(model, fullgraph=False), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("host", HOSTS)
def test_swapped_model_compiles_fullgraph_with_the_kernel_inside(host):
    """fullgraph=True, training mode with backward: the fused patch projection is a custom op that
    torch.compile takes without a graph break (the kernel runs compiled on a GPU, interpreted on CPU)."""
    model = _build(host, "small")
    accelerate_vit(model)
    x = _image(host, "small")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert next(m for m in model.modules() if isinstance(m, PatchProjection)).kernel_on_cpu or x.is_cuda
    assert "terrafm.patch_embed.default" in targets, targets
    eager = _out(model, x)
    eager.sum().backward()
    eager_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = _out(torch.compile(model, fullgraph=True), x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("host", HOSTS)
def test_report_says_what_was_swapped_and_left(host):
    model = _build(host, "small")
    report = accelerate_vit(model, attention=True)
    text = str(report)
    assert "patch_embed" in text and report.host.startswith(host)
    if host == "torchvision":  # nn.MultiheadAttention already runs SDPA: left, with the reason
        assert report.left and all("scaled_dot_product_attention" in e.detail for e in report.left)
    else:
        assert any(e.what == "attention" for e in report.swapped), text
    again = accelerate_vit(model)  # idempotent: a second call swaps nothing
    assert not again.swapped, str(again)
    plain = accelerate_vit(_build(host, "small"), patch_embed=False, attention=False)
    assert not plain.swapped and not plain.left


@pytest.mark.parametrize("host", [h for h in HOSTS if h.values[0] != "torchvision"])
def test_attention_swap_routes_through_sdpa(host):
    """Before the call the host's manual attention runs; after it, one SDPA call per block."""
    model = _build(host, "small").eval()
    x = _image(host, "small")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", side_effect=sdpa) as spy:
        _out(model, x)
        before = spy.call_count
        accelerate_vit(model, patch_embed=False)
        _out(model, x)
    assert before == 0 and spy.call_count == SIZES["small"][4]


@pytest.mark.skipif(not HAVE_HF, reason="transformers not installed (test extra)")
def test_a_hugging_face_model_that_returns_attentions_keeps_eager_attention():
    """With config.output_attentions the swap to sdpa silently dropped the attention weights it returns."""
    model = _build("huggingface", "small")
    model.config.output_attentions = True
    report = accelerate_vit(model)
    assert any("output_attentions" in e.detail for e in report.left), str(report)
    assert len(model(_image("huggingface", "small")).attentions) == SIZES["small"][4]


def test_rejects_a_model_that_is_not_a_supported_vit():
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        accelerate_vit(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        accelerate_vit("vit_base")
    with pytest.raises(TypeError, match=r"before torch.compile: call it on the module you compiled"):
        accelerate_vit(torch.compile(torch.nn.Linear(4, 4)))  # compile wraps lazily: nothing is compiled here


def test_patch_projection_keeps_conv_parameters_and_matches_conv():
    conv = torch.nn.Conv2d(4, 8, kernel_size=4, stride=4)
    proj = PatchProjection.from_conv(conv)
    assert proj.weight is conv.weight and proj.bias is conv.bias
    x = torch.randn(2, 4, 16, 12)
    torch.testing.assert_close(proj(x), conv(x))
    odd = torch.randn(1, 4, 18, 18)  # not a multiple of the patch: Conv2d drops the remainder, so do we
    torch.testing.assert_close(proj(odd), conv(odd))


def test_patch_projection_falls_back_to_conv2d_for_dtypes_the_kernel_does_not_take():
    """model.double() after the swap raised the kernel's dtype error (on a GPU and under the interpreter alike);
    an input in another dtype than the weight returned a result where Conv2d refuses it."""
    conv = torch.nn.Conv2d(4, 8, kernel_size=4, stride=4)
    proj = PatchProjection.from_conv(conv)
    x = torch.randn(2, 4, 16, 12)
    torch.testing.assert_close(proj.double()(x.double()), conv.double()(x.double()))
    proj.float()
    with pytest.raises(RuntimeError, match="should be the same"):
        proj(x.half())


def test_patch_projection_takes_an_unbatched_image_like_conv2d():
    conv = torch.nn.Conv2d(4, 8, kernel_size=4, stride=4)
    x = torch.randn(4, 16, 12)
    torch.testing.assert_close(PatchProjection.from_conv(conv)(x), conv(x))


class _StdConv2d(torch.nn.Conv2d):
    """timm's StdConv2d in short: the weight is standardised in forward, so the layer is not a plain conv."""

    def forward(self, x):
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (self.weight.std(dim=(1, 2, 3),
                                                                                           keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride)


@pytest.mark.skipif(not HAVE_HF, reason="transformers not installed (test extra)")
@pytest.mark.parametrize("change", ["own_forward", "float64", "weight_norm", "pruned", "hook"])
def test_a_patch_conv_that_is_not_a_plain_supported_conv_is_left_with_the_reason(change):
    model = _build("huggingface", "small")
    path = "embeddings.patch_embeddings.projection"
    conv = model.get_submodule(path)
    if change == "own_forward":
        std = _StdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride)
        std.load_state_dict(conv.state_dict())
        model.embeddings.patch_embeddings.projection = std
        reason = "_StdConv2d computes its own forward"
    elif change == "float64":
        model = model.double()
        reason = "torch.float64 weights"
    elif change == "weight_norm":  # the swap used to fail with torch's "cannot assign ... as parameter 'weight'"
        torch.nn.utils.parametrizations.weight_norm(conv)
        reason = "its weight is computed"
    elif change == "pruned":
        import torch.nn.utils.prune as prune

        prune.l1_unstructured(conv, "weight", 0.5)
        reason = "its weight is computed"
    else:  # a feature hook on the conv was silently dropped with it
        conv.register_forward_hook(lambda module, args, out: None)
        reason = "it has hooks (forward_hooks)"
    x = _image("huggingface", "small").to(next(model.parameters()).dtype)
    before = _out(model, x)
    report = accelerate_vit(model)
    assert [e.path for e in report.swapped if e.what == "patch_embed"] == []
    assert any(e.path == path and reason in e.detail for e in report.left), str(report)
    torch.testing.assert_close(_out(model, x), before)


@pytest.mark.skipif(not HAVE_TIMM, reason=TORCHVISION_REASON)
@pytest.mark.parametrize("pad", [False, True])
def test_timm_vit_with_dynamic_img_size_takes_the_drop_in_as_its_embed_layer(pad):
    """timm's VisionTransformer(dynamic_img_size=True, embed_layer=terrafm_kernels.modules.PatchEmbed): it builds
    the layer with output_fmt NHWC and strict_img_size False (and dynamic_img_pad when asked), and reads feat_ratio
    and dynamic_feat_size; the drop-in was refused there. Its outputs and intermediates match timm's own
    PatchEmbed with the same weights at the built size and at other sizes (odd ones with padding)."""
    from timm.models.vision_transformer import VisionTransformer

    from terrafm_kernels.modules import PatchEmbed

    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                dynamic_img_size=True, dynamic_img_pad=pad)
    torch.manual_seed(0)
    timm_model = VisionTransformer(**args).eval()
    ours = VisionTransformer(**args, embed_layer=PatchEmbed).eval()
    assert isinstance(ours.patch_embed, PatchEmbed) and ours.patch_embed.output_fmt == "NHWC"
    ours.load_state_dict(timm_model.state_dict())
    sizes = [(32, 32), (40, 56)] + ([(36, 45)] if pad else [])
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), timm_model(x), rtol=1e-4, atol=1e-5, msg=f"{h} x {w}")
            mine = ours.forward_intermediates(x, indices=1, intermediates_only=True)
            theirs = timm_model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert [t.shape for t in mine] == [t.shape for t in theirs]
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-4, atol=1e-5)
