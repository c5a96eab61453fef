"""TerraFM backbone: shapes, published-layout parity, fusion math, bad inputs, checkpoints."""

import math

import pytest
import torch
from published_terrafm import PublishedTerraFM

from terrafm.modalities import MODALITIES
from terrafm.models import MODELS, build_model, infer_model_name, load_checkpoint, published_state_dict

torch.manual_seed(0)


def _image(modality, batch=2, size=32, dtype=torch.float32):
    return torch.randn(batch, MODALITIES[modality].channels, size, size, dtype=dtype)


@pytest.mark.parametrize("name", ["terrafm_tiny", "terrafm_small"])
@pytest.mark.parametrize("modality", list(MODALITIES))
def test_output_shapes_every_modality(name, modality):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(_image(modality), modality)
        feats = model.forward_features(_image(modality), modality)
    D = MODELS[name].embed_dim
    assert out.shape == (2, D)
    assert feats["x_norm_patchtokens"].shape == (2, 4, D)
    assert feats["x_prenorm"].shape == (2, 5, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["terrafm_base", "terrafm_large"])
def test_base_and_large_forward_shapes(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(_image("s1", batch=1, size=48), "s1")
    assert out.shape == (1, MODELS[name].embed_dim)


@pytest.mark.parametrize("name,dims", [("terrafm_base", (768, 12, 12)), ("terrafm_large", (1024, 24, 16))])
def test_state_dict_layout_matches_published(name, dims):
    dim, depth, heads = dims
    with torch.device("meta"):
        ours = build_model(name)
        published = PublishedTerraFM(dim=dim, depth=depth, heads=heads)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    pub_shapes = {k: tuple(v.shape) for k, v in published.state_dict().items()}
    assert ours_shapes == pub_shapes
    assert ours_shapes["patch_embed.conv2d_s2_l2a.weight"] == (3 * dim, 12, 16, 16)
    assert ours_shapes["patch_embed.projection.proj3.weight"] == (dim, 3 * dim)
    assert "patch_embed.projection.proj1.bias" not in ours_shapes


@pytest.mark.parametrize("size", [32, 48])
def test_case1_parity_with_published_model(size):
    torch.manual_seed(1)
    published = PublishedTerraFM(img_size=32, dim=96, depth=2, heads=4).eval()
    ours = build_model("terrafm_tiny", embed_dim=96, depth=2, num_heads=4, img_size=32).eval()
    ours.load_state_dict(published.state_dict(), strict=True)
    for modality, is_l2a in [("s2_l2a", True), ("s2_l1c", False), ("s1", False)]:
        x = _image(modality, batch=3, size=size)
        with torch.no_grad():
            expected = published(x, is_l2a=is_l2a)
            got = ours(x, modality)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_published_checkpoint_loads_strict_into_fusion_free_model(tmp_path):
    published = PublishedTerraFM(img_size=32, dim=96, depth=2, heads=4)
    path = tmp_path / "TerraFM-tiny.pth"
    torch.save(published.state_dict(), path)
    model = load_checkpoint(path, name="terrafm_tiny", embed_dim=96, depth=2, num_heads=4)
    assert model.patch_embed.fusion is None
    x = _image("s2_l1c")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, "s2_l1c"), published.eval()(x), rtol=1e-5, atol=1e-5)


def test_published_state_dict_drops_only_fusion_keys():
    model = build_model("terrafm_tiny", fusion=True)
    keys = set(model.state_dict())
    pub = set(published_state_dict(model))
    assert keys - pub == {k for k in keys if k.startswith("patch_embed.fusion.")}
    assert len(keys - pub) == 3


def _plain_fusion(model, images):
    """The fusion written out per patch position, head and query with explicit softmaxes."""
    pe = model.patch_embed
    A, H, Q = pe.attn_dim, pe.fusion.num_heads, pe.fusion.queries.shape[0]
    d = A // H
    tokens = []
    for m, x in images.items():
        conv = getattr(pe, f"conv2d_{m}")
        tokens.append(conv(x).flatten(2).transpose(1, 2) + getattr(pe, f"{m}_embed"))
    B, N = tokens[0].shape[:2]
    out = torch.zeros(B, N, A, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            xs = [t[b, n].double() for t in tokens]
            keys = [pe.fusion.key.weight.double() @ x for x in xs]
            vals = [pe.projection.proj1.weight.double() @ x for x in xs]
            if pe.fusion_norm == "values":  # "LayerNorm after proj1" (method.md): each sensor's value
                vals = [pe.projection.norm_input(v.float()).double() for v in vals]
            z = torch.zeros(Q, A, dtype=torch.float64)
            for q in range(Q):
                for h in range(H):
                    sl = slice(h * d, (h + 1) * d)
                    qv = pe.fusion.queries[q, sl].double()
                    s = torch.stack([qv @ k[sl] for k in keys]) / math.sqrt(d)
                    a = torch.exp(s - s.max())
                    a = a / a.sum()
                    z[q, sl] = sum(a[j] * vals[j][sl] for j in range(len(vals)))
            logits = z @ pe.fusion.pool.double()
            w = torch.exp(logits - logits.max())
            w = w / w.sum()
            out[b, n] = (w[:, None] * z).sum(0)
    proj = pe.projection
    pooled = out.float() if pe.fusion_norm == "values" else proj.norm_input(out.float())
    return proj.proj3(proj.proj2(pooled))


@pytest.mark.parametrize("fusion_norm", ["values", "pooled"])
def test_fusion_matches_plain_per_patch_softmax(fusion_norm):
    torch.manual_seed(3)
    model = build_model("terrafm_tiny", embed_dim=32, num_heads=2, fusion=True, fusion_heads=4,
                        fusion_norm=fusion_norm).eval()
    with torch.no_grad():
        model.patch_embed.fusion.pool.normal_()  # non-uniform pooling weights
        images = {m: _image(m, batch=2, size=32) for m in ("s2_l2a", "s2_l1c", "s1")}
        for x in images.values():  # sensors at different scales: where the norm sits then matters
            x.mul_(torch.rand(1).item() * 10)
        expected = _plain_fusion(model, images)
        got = model.patch_embed(images)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        other = "pooled" if fusion_norm == "values" else "values"
        model.patch_embed.fusion_norm = other
        assert (model.patch_embed(images) - got).abs().max() > 1e-2  # the two placements are different models


def test_fusion_of_one_modality_reduces_to_case1():
    model = build_model("terrafm_tiny", fusion=True).eval()
    x = _image("s2_l2a")
    pe = model.patch_embed
    with torch.no_grad():
        tokens = pe.patchify(x, *pe.modality_params("s2_l2a")).reshape(-1, 1, pe.attn_dim)
        from terrafm_kernels.reference import cross_attention_fusion

        fused = cross_attention_fusion(pe.fusion.key(tokens), pe.projection.proj1(tokens),
                                       pe.fusion.queries, pe.fusion.pool, pe.fusion.num_heads)
        torch.testing.assert_close(fused, pe.projection.proj1(tokens)[:, 0], rtol=1e-6, atol=1e-6)
        case_n = pe.projection.output(fused.reshape(2, -1, pe.attn_dim))
        torch.testing.assert_close(case_n, pe({"s2_l2a": x}), rtol=1e-6, atol=1e-6)
        for placement in ("values", "pooled"):  # pe.fuse itself, with either norm placement
            pe.fusion_norm = placement
            torch.testing.assert_close(pe.fuse(tokens.reshape(2, -1, 1, pe.attn_dim)), case_n, rtol=1e-5, atol=1e-5)


def test_case_n_forward_and_backward():
    model = build_model("terrafm_tiny", fusion=True)
    images = {"s2_l2a": _image("s2_l2a"), "s1": _image("s1")}
    out = model(images)
    out.square().mean().backward()
    assert out.shape == (2, 192)
    for name in ("queries", "pool", "key.weight"):
        grad = dict(model.patch_embed.fusion.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_position_embedding_interpolation():
    model = build_model("terrafm_tiny", img_size=64).eval()
    assert model.interpolate_pos_encoding(17, 64, 64) is model.pos_embed
    pos = model.interpolate_pos_encoding(1 + 6 * 3, 96, 48)
    assert pos.shape == (1, 19, 192)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])
    with torch.no_grad():
        assert model(_image("s1", size=96), "s1").shape == (2, 192)


def test_intermediate_layers_and_multiscale_features():
    model = build_model("terrafm_tiny").eval()
    x = _image("s2_l2a", size=48)
    with torch.no_grad():
        last2 = model.get_intermediate_layers(x, "s2_l2a", n=2)
        picked = model.get_intermediate_layers(x, "s2_l2a", n=[0, 3], return_class_token=True)
        maps = model.multiscale_features(x, "s2_l2a")
        features = model.forward_features(x, "s2_l2a")
        final = features["x_norm_patchtokens"]
    assert [t.shape for t in last2] == [(2, 9, 192)] * 2
    torch.testing.assert_close(last2[-1], final)
    assert picked[1][1].shape == (2, 192)
    # n=[0, 3] picks the first block's output and the last block's (depth 4): the last is the final features
    assert len(model.blocks) == 4 and len(picked) == 2
    torch.testing.assert_close(picked[1][0], final)
    torch.testing.assert_close(picked[1][1], features["x_norm_clstoken"])
    assert (picked[0][0] - final).abs().max() > 1e-3  # block 0's output is another layer's
    assert [m.shape for m in maps] == [(2, 192, 3, 3)] * 4
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, "s2_l2a", n=[7])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m(torch.randn(1, 11, 32, 32), "s2_l2a"), ValueError, "expected 12 bands"),
        (lambda m: m(torch.randn(1, 12, 32, 32), "s1"), ValueError, "expected 2 bands"),
        (lambda m: m(torch.randn(1, 12, 32, 32), "landsat"), ValueError, "unknown modality"),
        (lambda m: m(torch.randn(1, 12, 30, 32), "s2_l1c"), ValueError, "not divisible by the patch size 16"),
        (lambda m: m(torch.randint(0, 9, (1, 12, 32, 32), dtype=torch.int32), "s2_l2a"), TypeError, "floating"),
        (lambda m: m(torch.randn(12, 32, 32), "s2_l2a"), ValueError, r"\(B, C, H, W\)"),
        (lambda m: m(torch.randn(1, 12, 32, 32)), ValueError, "needs `modality`"),
        (lambda m: m({"s2_l2a": torch.randn(1, 12, 32, 32), "s1": torch.randn(1, 2, 32, 32)}), ValueError,
         "fusion=True"),
    ],
)
def test_bad_inputs_are_rejected_before_compute(call, error, match):
    model = build_model("terrafm_tiny")
    with pytest.raises(error, match=match):
        call(model)


def test_fused_modalities_must_share_shape():
    model = build_model("terrafm_tiny", fusion=True)
    with pytest.raises(ValueError, match="share batch and size"):
        model({"s2_l2a": torch.randn(1, 12, 32, 32), "s1": torch.randn(1, 2, 48, 48)})


def test_unknown_model_name():
    with pytest.raises(ValueError, match="terrafm_base"):
        build_model("terrafm_huge")


def test_safetensors_round_trip_keeps_name_and_fusion(tmp_path):
    from safetensors.torch import save_file

    model = build_model("terrafm_tiny", fusion=True).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"model": "terrafm_tiny"})
    loaded = load_checkpoint(path).eval()
    assert loaded.name == "terrafm_tiny" and loaded.patch_embed.fusion is not None
    x = _image("s1")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, "s1"), model(x, "s1"))
    assert infer_model_name(model.state_dict()) == "terrafm_tiny"


def test_checkpoint_that_does_not_match_is_rejected(tmp_path):
    state = build_model("terrafm_tiny").state_dict()
    state.pop("norm.weight")
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path, name="terrafm_tiny")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth")


def _dino_style(kind: str, teacher: dict, student: dict) -> dict:
    """How DINO-family code saves a backbone beside its heads (tensors only, as weights-only loading needs)."""
    heads = {"dino_head.mlp.0.weight": torch.zeros(8, 192), "ibot_head.last_layer.weight": torch.zeros(8, 192)}
    if kind.startswith("dinov2"):  # DINOv2's ViT has iBOT's mask token beside the published keys
        teacher, student = ({**sd, "mask_token": torch.zeros(1, 192)} for sd in (teacher, student))
    if kind == "dinov2_eval":  # DINOv2's teacher_checkpoint.pth: {'teacher': model.teacher.state_dict()}
        return {"teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **heads}}
    if kind == "dinov2_train":  # DINOv2's fvcore checkpoint: the whole meta-architecture under 'model'
        return {"model": {**{f"teacher.backbone.{k}": v for k, v in teacher.items()},
                          **{f"student.backbone.{k}": v for k, v in student.items()},
                          **{f"student.{k}": v for k, v in heads.items()}},
                "optimizer": {"state": {}, "param_groups": []}, "iteration": 7}
    if kind == "dino_v1":  # DINO's checkpoint.pth: MultiCropWrapper state dicts (student under DDP) and its args
        import argparse

        wrapped = lambda prefix, sd: {**{f"{prefix}backbone.{k}": v for k, v in sd.items()},  # noqa: E731
                                      f"{prefix}head.last_layer.weight_g": torch.ones(8, 1)}
        return {"student": wrapped("module.", student), "teacher": wrapped("", teacher), "epoch": 3,
                "optimizer": {"state": {}, "param_groups": []}, "dino_loss": {"center": torch.zeros(1, 8)},
                "args": argparse.Namespace(arch="vit_small", lr=0.0005, local_crops_scale=(0.05, 0.4))}
    return {**{f"module.{k}": v for k, v in teacher.items()},  # DDP-saved backbone with a classifier head
            "head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}


@pytest.mark.parametrize("kind", ["dinov2_eval", "dinov2_train", "dino_v1", "ddp_with_classifier"])
def test_dino_style_checkpoints_load_the_teacher_backbone_without_heads(tmp_path, kind):
    teacher, student = build_model("terrafm_tiny"), build_model("terrafm_tiny")
    path = tmp_path / f"{kind}.pth"
    torch.save(_dino_style(kind, published_state_dict(teacher), published_state_dict(student)), path)
    loaded = load_checkpoint(path)
    for key, value in published_state_dict(teacher).items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_export_metadata_of_another_form_is_refused_by_name(tmp_path):
    """Eval looks statistics up by modality and converts S1 by s1_scaling: an entry of another form is one message."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_model("terrafm_tiny").state_dict().items()}
    for key, value, form in (("bands", '["B01"]', r"a JSON object \{modality: \[band names\]\}"),
                             ("mean", '{"s1": 3}', r"a JSON object \{modality: \[finite numbers\]\}"),
                             ("mean", '{"s1": [NaN, 1.0]}', r"a JSON object \{modality: \[finite numbers\]\}"),
                             ("std", '{"s1": [0.0, 1.0]}', r"a JSON object \{modality: \[positive finite numbers\]\}"),
                             ("s1_scaling", "decibel", "db or linear"), ("img_size", "32.5", "a positive integer")):
        path = tmp_path / f"{key}.safetensors"
        save_file(state, str(path), metadata={"model": "terrafm_tiny", key: value})
        with pytest.raises(ValueError, match=rf"{key}\.safetensors: metadata '{key}' is '.*'; expected {form}"):
            load_checkpoint(path)


@pytest.mark.parametrize("metadata, message", [
    ({"model": "vit_base"}, "unknown model 'vit_base'"),
    ({"fusion_heads": "7"}, "must be divisible by fusion heads 7"),
])
def test_a_model_that_metadata_cannot_build_names_the_file(tmp_path, metadata, message):
    """A model name or fusion head count in a file's metadata that builds no model was refused without naming the
    file it came from."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_model("terrafm_tiny", fusion=True).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=rf"w\.safetensors: .*{message}"):
        load_checkpoint(tmp_path / "w.safetensors")


def test_a_fused_checkpoint_loads_with_the_fusion_it_was_built_with(tmp_path):
    """The head count and the norm's place do not show in the tensors' shapes: a checkpoint built with 8 heads or
    the norm after the pooling loaded as 16 heads with the norm on the values, silently another model. Exports
    record them; files from before they were recorded load as they were built then (LEGACY_FUSION)."""
    from safetensors.torch import save_file

    from terrafm.models import LEGACY_FUSION

    torch.manual_seed(0)
    built = build_model("terrafm_tiny", fusion=True, fusion_queries=3, fusion_heads=8, fusion_norm="pooled").eval()
    state = {k: v.contiguous() for k, v in built.state_dict().items()}
    images = {m: _image(m) for m in ("s2_l2a", "s1")}
    with torch.no_grad():
        want = built(images)
    save_file(state, str(tmp_path / "new.safetensors"),
              metadata={"model": "terrafm_tiny", "fusion_heads": "8", "fusion_norm": "pooled"})
    loaded = load_checkpoint(tmp_path / "new.safetensors").eval()
    pe = loaded.patch_embed
    assert (pe.fusion.num_heads, pe.fusion_norm, pe.fusion.queries.shape[0]) == (8, "pooled", 3)
    assert "fusion_norm" not in loaded.input_metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), want)
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"model": "terrafm_tiny"})
    old = load_checkpoint(tmp_path / "old.safetensors").patch_embed
    assert (old.fusion.num_heads, old.fusion_norm) == (LEGACY_FUSION["fusion_heads"], LEGACY_FUSION["fusion_norm"])
    # no terrafm metadata at all (not an export): the defaults, as for the same tensors in a .pth (the safetensors
    # file was built with LEGACY_FUSION, so the same weights were two networks by container)
    save_file(state, str(tmp_path / "plain.safetensors"))
    torch.save(state, tmp_path / "plain.pth")
    with pytest.warns(UserWarning, match="holds fusion weights but does not record fusion_heads or fusion_norm"):
        plain = [load_checkpoint(tmp_path / f"plain.{ext}").patch_embed for ext in ("safetensors", "pth")]
    assert {(pe.fusion.num_heads, pe.fusion_norm) for pe in plain} == {(16, "values")}
    for key, value, form in (("fusion_norm", "before", "one of values, pooled"), ("fusion_heads", "8.0", "a positive "
                                                                                                    "integer")):
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={"model": "terrafm_tiny", key: value})
        with pytest.raises(ValueError, match=f"metadata '{key}' is '{value}'; expected {form}"):
            load_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda v: v * float("nan"), r"not finite: \d+ NaN or inf values"),  # eval scored chance with exit 0
    (lambda v: (v * 100).to(torch.int8), "torch.int8, not float16/bfloat16/float32/float64"),  # loaded as garbage
    (lambda v: v.to_sparse(), "a torch.sparse_coo tensor"),
])
def test_weights_that_are_not_finite_dense_floats_are_refused_by_name(tmp_path, change, message):
    model = build_model("terrafm_tiny")
    state = model.state_dict()
    state["blocks.0.attn.qkv.weight"] = change(state["blocks.0.attn.qkv.weight"])
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=f"weight blocks.0.attn.qkv.weight .* is {message}"):
        load_checkpoint(tmp_path / "w.pth")


@pytest.mark.parametrize("content, kind", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Not Found</body></html>", "an HTML page"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 file"),
    (b"junk", "a text file \\(it starts 'junk'\\)"),  # was "error: unpack requires a buffer of 4 bytes"
    (b"model weights: see https://example.org/terrafm\n", "a text file"),  # was "KeyError: <a number>"
    (b"", r"empty \(0 bytes\)"),
])
def test_a_file_that_is_not_a_pickle_says_what_it_is(tmp_path, content, kind):
    """A clone without git-lfs or a wget of a wrong URL was called 'a pickle that names classes'."""
    (tmp_path / "TerraFM-B.pth").write_bytes(content)
    with pytest.raises(ValueError, match=f"is not a PyTorch checkpoint: it is {kind}"):
        load_checkpoint(tmp_path / "TerraFM-B.pth")


class _Double(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_torchscript_npz_or_tar_file_says_what_it_is(tmp_path):
    """These read 'not a PyTorch checkpoint terrafm can read (RuntimeError: ...)' with torch's advice to re-run
    torch.load with weights_only=False (running the file's code), or an internal zip error for the .npz."""
    import tarfile

    import numpy as np

    torch.jit.save(torch.jit.script(_Double()), tmp_path / "scripted.pt")
    np.savez(tmp_path / "w.npz", w=np.zeros(3))
    torch.save(build_model("terrafm_tiny").state_dict(), tmp_path / "w.pth")
    with tarfile.open(tmp_path / "TerraFM-B.tar", "w") as archive:
        archive.add(tmp_path / "w.pth", arcname="TerraFM-B.pth")
    for name, kind in (("scripted.pt", r"a TorchScript archive \(torch\.jit\.save\), whose code terrafm does not run"),
                       ("w.npz", "a NumPy .npz archive"), ("TerraFM-B.tar", "a tar archive: unpack it")):
        with pytest.raises(ValueError, match=f"is not a PyTorch checkpoint: it is {kind}") as err:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("layout, named", [
    ("ema", r"entries 'model_ema' \(OrderedDict\), 'epoch' \(int\) are not tensors"),
    ("state_and_epoch", r"entries 'epoch' \(int\) are not tensors"),
])
def test_a_dict_with_entries_that_are_not_tensors_names_them(tmp_path, layout, named):
    """Was 'holds a dict, not a state_dict of tensors', naming neither the entries nor where the tensors may be."""
    state = build_model("terrafm_tiny").state_dict()
    torch.save({**state, "epoch": 3} if layout == "state_and_epoch" else {"model_ema": state, "epoch": 3},
               tmp_path / "m.pth")
    with pytest.raises(ValueError, match=named + ".*under 'teacher', 'model', 'state_dict' or 'student'"):
        load_checkpoint(tmp_path / "m.pth")


def test_a_downloaded_folder_of_weight_files_names_them(tmp_path):
    """A Hugging Face snapshot folder passed as --checkpoint read 'is not a checkpoint, a checkpoints/ folder or a
    run folder with one', not which file in it to pass."""
    torch.save(published_state_dict(build_model("terrafm_tiny")), tmp_path / "TerraFM-B.pth")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a `terrafm pretrain` checkpoint folder; it holds TerraFM-B\.pth: "
                                         "pass the file"):
        load_checkpoint(tmp_path)
    assert isinstance(load_checkpoint(tmp_path / "TerraFM-B.pth"), torch.nn.Module)


def test_safetensors_under_another_name_and_a_teacher_under_a_nested_prefix_load(tmp_path):
    from safetensors.torch import save_file

    model = build_model("terrafm_tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.sft"))  # was refused as a pickle
    torch.testing.assert_close(load_checkpoint(tmp_path / "w.sft").state_dict(), model.state_dict())
    other = {k: v + 1 for k, v in state.items()}
    for teacher, student in (("model.teacher.backbone.", "model.student.backbone."),  # Lightning around DINO
                             ("teacher_backbone.", "student_backbone.")):  # lightly
        wrapped = {**{teacher + k: v for k, v in state.items()}, **{student + k: v for k, v in other.items()}}
        torch.save({"state_dict": wrapped}, tmp_path / "dino.ckpt")
        torch.testing.assert_close(load_checkpoint(tmp_path / "dino.ckpt").state_dict(), model.state_dict())


def test_a_refused_pickle_names_the_class_it_refers_to(tmp_path):
    import numpy as np

    torch.save({"model": build_model("terrafm_tiny").state_dict(), "best_acc": np.float64(0.9)}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match=r"refuses \(it names numpy\.[\w.]*scalar"):
        load_checkpoint(tmp_path / "m.pth")


def test_images_and_models_of_no_size_are_refused():
    with pytest.raises(ValueError, match="img_size must be a positive whole number"):
        build_model("terrafm_tiny", img_size=0)
    with pytest.raises(ValueError, match="patch_size must be a positive whole number"):
        build_model("terrafm_tiny", patch_size=0)
    with pytest.raises(ValueError, match="image size 0x32 has no pixels"):
        build_model("terrafm_tiny", img_size=32)(torch.randn(1, 12, 0, 32), "s2_l2a")


class _RunsCode:
    """A pickle that would call print(...) when unpickled: loading it must refuse, never run it."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize("content", ["garbage", "truncated", "code", "not_tensors", "not_terrafm", "safetensors"])
def test_files_from_elsewhere_get_one_clear_error(tmp_path, capsys, content):
    """Whatever the file, load_checkpoint raises ValueError naming it (the CLI's exit 2), and runs nothing."""
    import pickle

    path = tmp_path / ("x.safetensors" if content == "safetensors" else "x.pth")
    if content == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif content == "truncated":
        torch.save(build_model("terrafm_tiny").state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "code":
        path.write_bytes(pickle.dumps({"model": _RunsCode()}))
    elif content == "not_tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif content == "not_terrafm":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_text("not a safetensors header")
    with pytest.raises(ValueError, match="x\\.(pth|safetensors)"):
        load_checkpoint(path)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_half_precision_forward():
    model = build_model("terrafm_tiny").to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(_image("s2_l2a", dtype=torch.bfloat16), "s2_l2a")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_weights_of_another_size_than_the_name_given_say_which_model_they_are(tmp_path):
    """The hint said 'pass the checkpoint's own model (or leave --model out)' also when no --model was given (the
    name came from the file's metadata), and did not say which model fits."""
    from safetensors.torch import save_file

    model = build_model("terrafm_tiny", img_size=32)
    path = tmp_path / "tiny.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": "terrafm_small"})
    with pytest.raises(ValueError, match=r"the name 'terrafm_small' comes from the file's metadata: pass --model "
                                         r"terrafm_tiny, the model of these weights") as err:
        load_checkpoint(path)
    assert "leave --model out" not in str(err.value)
    with pytest.raises(ValueError, match=r"--model terrafm_small was given: pass --model terrafm_tiny"):
        load_checkpoint(tmp_path / "tiny.safetensors", name="terrafm_small")
    assert load_checkpoint(path, name="terrafm_tiny").embed_dim == model.embed_dim
