"""The op registry: backend choice by device, preference, environment, availability."""

import pytest
import torch

from terrafm import backends, ops


def test_cpu_auto_picks_torch_reference_for_kernels_and_cpp_for_data_ops():
    assert ops.choose("patch_embed", "cpu").name == "torch"
    assert ops.choose("normalize_bands", "cpu").name == ("cpp" if backends.csrc().usable else "torch")


def test_every_op_has_a_torch_reference_with_a_callable():
    for name, op in ops.REGISTRY.items():
        assert "torch" in op.backends, name
        assert callable(ops.get(name, "cpu", "torch"))


def test_explicit_preference_and_environment_override(monkeypatch):
    assert ops.choose("patch_embed", "cpu", "torch").name == "torch"
    monkeypatch.setenv("TERRAFM_OPS", "normalize_bands=torch")
    assert ops.choose("normalize_bands", "cpu", "cpp").name == "torch"
    monkeypatch.setenv("TERRAFM_OPS", "normalize_bands")
    with pytest.raises(ValueError, match="op=backend"):
        ops.choose("normalize_bands", "cpu")


def test_unusable_backend_names_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backends.cuda().usable:
        pytest.skip("needs a machine without CUDA to see triton refused on CPU")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.choose("patch_embed", "cpu", "triton")


def test_unknown_op_and_backend():
    with pytest.raises(KeyError, match="registered ops"):
        ops.choose("flash_softmax", "cpu")
    with pytest.raises(ValueError, match="has no backend 'cpp'"):
        ops.choose("patch_embed", "cpu", "cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.register("x", "doc", cuda="m:f")


def test_cpp_normalize_matches_reference():
    """terrafm._C is built by `pip install -e .`: in a test environment it must be usable."""
    from terrafm_kernels.reference import normalize_bands

    assert backends.csrc().usable, backends.csrc().detail
    x = torch.randint(0, 10000, (3, 7, 5), dtype=torch.uint16)
    mean, std = torch.rand(3) * 1000, torch.rand(3) * 100 + 1
    cpp = ops.get("normalize_bands", "cpu", "cpp")
    torch.testing.assert_close(cpp(x, mean, std), normalize_bands(x, mean, std))
    with pytest.raises(ValueError, match="uint16"):
        cpp(x.float(), mean, std)
