"""What users lifting TerraFM into their own code pass it: other dtypes and sizes, wrapped checkpoints, overrides."""

import pytest
import torch
from published_terrafm import PublishedTerraFM
from safetensors.torch import save_file

from terrafm.modalities import MODALITIES
from terrafm.models import build_model, load_checkpoint


def _image(modality, batch=2, h=32, w=32):
    return torch.randn(batch, MODALITIES[modality].channels, h, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_of_another_float_dtype_is_cast_to_the_weights(dtype):
    """fp16 tiles into a float32 model gave conv2d's 'Input type and bias type should be the same'."""
    model = build_model("terrafm_tiny", fusion=True).eval()
    x, s1 = _image("s2_l2a").to(dtype), _image("s1")
    with torch.no_grad():
        torch.testing.assert_close(model(x, "s2_l2a"), model(x.float(), "s2_l2a"))
        torch.testing.assert_close(model({"s2_l2a": x, "s1": s1}), model({"s2_l2a": x.float(), "s1": s1}))


def test_float32_input_into_a_bfloat16_model():
    model = build_model("terrafm_tiny").to(torch.bfloat16).eval()
    x = _image("s1")
    with torch.no_grad():
        out = model(x, "s1")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(x.bfloat16(), "s1"))


def test_autocast_runs_in_the_autocast_dtype():
    model = build_model("terrafm_tiny", fusion=True).eval()
    images = {"s2_l2a": _image("s2_l2a"), "s1": _image("s1")}
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_intermediate_layers_refuse_more_blocks_than_the_model_has():
    """n=5 of a 4-block model returned 5 maps, the first a copy of the last block's; n=0 was max()'s error."""
    model = build_model("terrafm_tiny").eval()
    x = _image("s1")
    for n in (0, 5):
        with pytest.raises(ValueError, match=f"n={n} last blocks asked of a 4-block model"):
            model.get_intermediate_layers(x, "s1", n=n)
    with pytest.raises(ValueError, match="no block indices"):  # [] gave the model's default out_indices
        model.multiscale_features(x, "s1", out_indices=[])
    assert len(model.get_intermediate_layers(x, "s1", n=4)) == 4


def test_multiscale_features_of_a_non_square_input_are_contiguous_maps():
    """Maps were transposed views: a head's `.view(B, D, -1)` failed (DINOv2 and timm return contiguous maps)."""
    model = build_model("terrafm_tiny").eval()
    x = _image("s2_l1c", batch=1, h=48, w=80)
    with torch.no_grad():
        maps = model.multiscale_features(x, "s2_l1c", out_indices=[1, -1])
        tokens = model.get_intermediate_layers(x, "s2_l1c", n=[1, 3])
    assert [m.shape for m in maps] == [(1, 192, 3, 5)] * 2
    for m, t in zip(maps, tokens, strict=True):
        assert m.is_contiguous()
        torch.testing.assert_close(m.view(1, 192, -1).transpose(1, 2), t)
        torch.testing.assert_close(m[0, :, 1, 4], t[0, 1 * 5 + 4])  # row-major patch order


@pytest.mark.parametrize("h,w", [(32, 64), (48, 16), (64, 64)])
def test_other_sizes_match_the_published_position_interpolation(h, w):
    torch.manual_seed(1)
    published = PublishedTerraFM(img_size=32, dim=96, depth=2, heads=4).eval()
    ours = build_model("terrafm_tiny", embed_dim=96, depth=2, num_heads=4, img_size=32).eval()
    ours.load_state_dict(published.state_dict(), strict=True)
    x = _image("s1", batch=1, h=h, w=w)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, "s1"), published(x), rtol=1e-5, atol=1e-5)


def test_one_sample_does_not_change_another():
    """Batch of 1 equals its row of a batch; a NaN sample leaves the others finite; channels_last is the same."""
    model = build_model("terrafm_tiny").eval()
    x = _image("s2_l2a", batch=3)
    with torch.no_grad():
        ref = model(x, "s2_l2a")
        torch.testing.assert_close(model(x[1:2], "s2_l2a"), ref[1:2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last), "s2_l2a"), ref,
                                   rtol=1e-5, atol=1e-5)
        bad = x.clone()
        bad[0, 3, 5, 7] = float("nan")
        out = model(bad, "s2_l2a")
        assert torch.equal(model(x, "s2_l2a"), ref)  # eval is deterministic
    assert out[0].isnan().all() and torch.equal(out[1:], ref[1:])


def test_img_size_that_is_not_a_multiple_of_the_patch_is_refused():
    """It built a 6 x 6 position grid for img_size 100, which no input of size 100 could use."""
    with pytest.raises(ValueError, match="img_size 100 is not a multiple of patch_size 16"):
        build_model("terrafm_tiny", img_size=100)


def _wrapped(kind, sd):
    if kind == "compiled":
        return {f"_orig_mod.{k}": v for k, v in sd.items()}
    if kind == "ddp_compiled":
        return {f"module._orig_mod.{k}": v for k, v in sd.items()}
    if kind == "fsdp1":
        return {k.replace("blocks.", "_fsdp_wrapped_module.blocks.").replace("attn.", "_fsdp_wrapped_module.attn."): v
                for k, v in sd.items()}
    return {k.replace("mlp.", "_checkpoint_wrapped_module.mlp."): v for k, v in sd.items()}


@pytest.mark.parametrize("kind", ["compiled", "ddp_compiled", "fsdp1", "activation_checkpointing"])
def test_state_dicts_of_wrapped_models_load(tmp_path, kind):
    """torch.compile's '_orig_mod.', FSDP1's and checkpoint_wrapper's parts were kept, so nothing matched."""
    published = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).eval()
    path = tmp_path / f"{kind}.pth"
    torch.save({"model": _wrapped(kind, published.state_dict())}, path)
    model = load_checkpoint(path).eval()
    x = _image("s2_l1c")
    with torch.no_grad():
        torch.testing.assert_close(model(x, "s2_l1c"), published(x), rtol=1e-5, atol=1e-5)


def test_weights_under_state_dict_load_beside_a_model_config_under_model(tmp_path):
    """{"model": {"arch": ...}, "state_dict": weights}: the first wrapper key holding a dict was taken, so the message
    said the weights were not tensors while naming 'state_dict' as a place to keep them."""
    published = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).eval()
    path = tmp_path / "x.pth"
    torch.save({"model": {"arch": "vit_tiny", "depth": 4}, "state_dict": published.state_dict()}, path)
    model = load_checkpoint(path).eval()
    x = _image("s2_l1c")
    with torch.no_grad():
        torch.testing.assert_close(model(x, "s2_l1c"), published(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "teacher.backbone."])
def test_safetensors_with_training_prefixes_load_like_a_pth(tmp_path, prefix):
    """A safetensors file was read as is: a DDP or DINO-style one was 'not a TerraFM backbone'."""
    published = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).eval()
    path = tmp_path / "x.safetensors"
    tensors = {f"{prefix}{k}": v.contiguous() for k, v in published.state_dict().items()}
    save_file({**tensors, "dino_head.last_layer.weight": torch.zeros(8, 192)}, str(path))
    model = load_checkpoint(path).eval()
    x = _image("s1")
    with torch.no_grad():
        torch.testing.assert_close(model(x, "s1"), published(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override,value,match", [("img_size", 64, "img_size=64 \\(the checkpoint's 32\\)"),
                                                  ("patch_size", 8, "patch_size=8 \\(the checkpoint's 16\\)"),
                                                  ("fusion", True, "fusion=True \\(the checkpoint's False\\)")])
def test_overrides_the_weights_decide_are_one_clear_error(tmp_path, override, value, match):
    """load_checkpoint(path, img_size=...) was Python's 'got multiple values for keyword argument'."""
    path = tmp_path / "tiny.pth"
    torch.save(build_model("terrafm_tiny", img_size=32).state_dict(), path)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, **{override: value})
    same = {"img_size": 32, "patch_size": 16, "fusion": False}[override]
    assert load_checkpoint(path, **{override: same}).img_size == 32


def test_a_position_grid_that_is_not_square_is_named(tmp_path):
    state = build_model("terrafm_tiny", img_size=32).state_dict()
    state["pos_embed"] = torch.zeros(1, 1 + 6, 192)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="pos_embed holds 6 patch positions, not a square grid"):
        load_checkpoint(path)


def test_keys_of_another_model_are_shown(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"model.conv1.weight": torch.zeros(8, 3, 7, 7), "model.fc.weight": torch.zeros(2, 8)}},
               path)
    with pytest.raises(ValueError, match=r"not a TerraFM backbone.*its keys begin \['model\.conv1"):
        load_checkpoint(path)


@pytest.mark.parametrize("layout", ["lightning", "student_only", "encoder_with_decoder"])
def test_a_backbone_under_any_prefix_loads(tmp_path, layout):
    """Lightning's 'model.' prefix, a DINO checkpoint saved with its student only, and an 'encoder.' beside other
    modules were each 'not a TerraFM backbone' (only 'backbone.' and 'teacher.backbone.' were looked for)."""
    published = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).eval()
    sd = published.state_dict()
    if layout == "lightning":
        content = {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "model.head.weight": torch.zeros(3, 192)},
                   "epoch": 4, "global_step": 100}
    elif layout == "student_only":
        content = {"student": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                               "module.head.last_layer.weight_g": torch.ones(8, 1)}, "epoch": 2}
    else:
        content = {**{f"encoder.{k}": v for k, v in sd.items()}, "decoder.weight": torch.zeros(4, 4)}
    torch.save(content, tmp_path / "x.pth")
    model = load_checkpoint(tmp_path / "x.pth").eval()
    x = _image("s2_l1c")
    with torch.no_grad():
        torch.testing.assert_close(model(x, "s2_l1c"), published(x), rtol=1e-5, atol=1e-5)


def test_two_backbones_and_no_teacher_is_refused_naming_both(tmp_path):
    sd = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).state_dict()
    torch.save({**{f"a.{k}": v for k, v in sd.items()}, **{f"b.{k}": v for k, v in sd.items()}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"x\.pth holds 2 backbones \(under 'a\.', 'b\.'\)"):
        load_checkpoint(tmp_path / "x.pth")


def test_a_key_held_twice_once_under_a_wrapper_is_refused_not_merged(tmp_path):
    """`cls_token` beside `module.cls_token`: the later one won without a word."""
    sd = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).state_dict()
    sd["module.cls_token"] = torch.ones_like(sd["cls_token"])
    path = tmp_path / "both.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"holds two tensors for 'cls_token' \(.*'module\.cls_token'\)"):
        load_checkpoint(path)


def test_a_mismatch_counts_every_key_and_an_unknown_shape_names_the_file(tmp_path):
    """The lists stopped at 8 keys with no count (a checkpoint missing 40 looked like one missing 8), and a depth no
    model has did not name the file or --model."""
    sd = PublishedTerraFM(img_size=32, dim=192, depth=4, heads=3).state_dict()
    path = tmp_path / "depth3.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.3.")}, path)
    with pytest.raises(ValueError, match=rf"{path}: no registered model has embed_dim=192 and depth=3.*--model"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"missing 12 \['blocks\.3\..*\] and 4 more, unexpected 0 \[\]"):
        load_checkpoint(path, name="terrafm_tiny")


def _tiny_state(**kwargs):
    return build_model("terrafm_tiny", img_size=32, **kwargs).state_dict()


def test_fusion_weights_without_their_settings_warn_that_the_defaults_are_used(tmp_path):
    """A fused model trained with 8 heads, saved as a plain state_dict: it loaded as 16 heads with other outputs and no
    word of it."""
    torch.save(_tiny_state(fusion=True, fusion_heads=8), tmp_path / "fused.pth")
    with pytest.warns(UserWarning, match=r"fused\.pth holds fusion weights but does not record fusion_heads or "
                                         r"fusion_norm .* fusion_heads=16, fusion_norm='values', the defaults"):
        load_checkpoint(tmp_path / "fused.pth")
    import warnings

    torch.save(_tiny_state(), tmp_path / "published.pth")  # no fusion at all, as published: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_checkpoint(tmp_path / "fused.pth", fusion_heads=8, fusion_norm="values")
        load_checkpoint(tmp_path / "published.pth")
    assert model.patch_embed.fusion.num_heads == 8


@pytest.mark.parametrize("content, match", [
    ({0: torch.zeros(1)}, r"holds a key 0 that is not a string"),
])
def test_a_state_dict_keyed_by_other_than_names_is_one_message(tmp_path, content, match):
    torch.save(content, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "odd.pth")


@pytest.mark.parametrize("metadata, match", [
    ({"mean": '{"s1": [' + "9" * 400 + ", 1.0]}"}, r"metadata 'mean' is .*; expected a JSON object"),
    ({"bands": "[" * 100_000 + "]" * 100_000}, r"metadata 'bands' is nested too deeply"),
    ({"model": "terrafm_tiny", "fusion_heads": "\u00b2"}, r"metadata 'fusion_heads' is '\u00b2'; expected a positive"),
])
def test_malformed_safetensors_metadata_is_named_not_a_traceback(tmp_path, metadata, match):
    save_file(_tiny_state(), str(tmp_path / "m.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("content, kind", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "an HTML page"),
    (b"PK\x03\x04" + bytes(60), "a ZIP archive, as torch.save writes"),
])
def test_a_safetensors_name_on_another_format_says_what_it_is(tmp_path, content, kind):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=rf"model\.safetensors is not a safetensors file: it is {kind}"):
        load_checkpoint(tmp_path / "model.safetensors")


def test_a_safetensors_file_under_a_name_that_is_not_utf8_loads(tmp_path):
    import os

    state = _tiny_state()
    path = tmp_path / os.fsdecode(b"w\xff.safetensors")
    save_file(state, str(tmp_path / "w.safetensors"))
    path.write_bytes((tmp_path / "w.safetensors").read_bytes())
    loaded = load_checkpoint(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_device_or_a_pipe_is_refused_before_reading(tmp_path):
    """A link to /dev/zero filled memory until the process was killed; a FIFO waited forever."""
    import os

    os.symlink("/dev/zero", tmp_path / "zero.pth")
    os.mkfifo(tmp_path / "pipe.safetensors")
    for name in ("zero.pth", "pipe.safetensors"):
        with pytest.raises(ValueError, match=rf"{name} is not a regular file \(a device, a pipe or a socket\)"):
            load_checkpoint(tmp_path / name)


def test_fusion_heads_of_thousands_of_digits_is_named_as_that_metadata():
    """int() of over 4300 digits raised Python's own words ('Exceeds the limit'), naming neither file nor key."""
    from pathlib import Path

    from terrafm.models import fusion_settings

    with pytest.raises(ValueError, match=r"x\.safetensors: metadata 'fusion_heads' is '9999.*'; expected a positive"):
        fusion_settings({"fusion_heads": "9" * 5000}, Path("x.safetensors"))
