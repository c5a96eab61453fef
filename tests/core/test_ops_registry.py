"""The op registry: one decision per op at build time, from preferences and what is usable here."""

import ast
from pathlib import Path

import pytest

from terrafm import backends, ops

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_auto_picks_the_references_for_kernels_and_cpp_for_data_ops():
    chosen = ops.resolve(device="cpu")
    assert set(chosen) == set(ops.REGISTRY)
    assert chosen["attention"] == "sdpa"
    for op in ("patch_embed", "cross_attention_fusion", "teacher_softmax", "dino_cross_entropy", "dino_head_loss"):
        assert chosen[op] == "torch", op  # the interpreter is never chosen automatically
    cpp = "cpp" if backends.csrc().usable else None
    assert chosen["view_rendering"] == (cpp or "numpy")


def test_every_op_has_a_reference_that_runs_everywhere():
    for name, op in ops.REGISTRY.items():
        reference = next(iter(op.backends))
        for device in ops.DEVICES:
            assert reference in ops.usable(name, device), (name, device)
        if op.backends[reference].target is not None:
            assert callable(ops.load(name, reference))


def test_preferences_are_honoured_and_checked():
    assert ops.resolve({"patch_embed": "torch", "attention": "auto"})["patch_embed"] == "torch"
    assert ops.choose("view_rendering", "cpu", "numpy") == "numpy"
    with pytest.raises(KeyError, match="unknown op"):
        ops.resolve({"flash_softmax": "torch"})
    with pytest.raises(ValueError, match="has no backend 'cpp'"):
        ops.choose("patch_embed", "cpu", "cpp")
    with pytest.raises(RuntimeError, match="not usable on cpu"):
        ops.choose("attention", "cpu", "flash_attn")


def test_unusable_triton_names_the_reason(monkeypatch):
    from terrafm_kernels import _common

    if backends.cuda().usable:
        pytest.skip("needs a machine without CUDA to see triton refused on CPU")
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.choose("patch_embed", "cpu", "triton")


def test_register_rejects_an_auto_order_naming_unknown_backends():
    with pytest.raises(ValueError, match="unknown backends"):
        ops.register("x", "doc", {"cpu": ("cuda_only",)}, torch=ops.Backend("torch", None, lambda d: None))
    assert "x" not in ops.REGISTRY


def test_modules_hold_the_chosen_callables():
    """The model and the loss keep the functions the registry chose when they were built."""
    from terrafm.models import build_model
    from terrafm.models.attention import sdpa_attention
    from terrafm.ssl.loss import DINOLoss
    from terrafm_kernels import reference

    model = build_model("terrafm_tiny", img_size=32, fusion=True)
    assert all(block.attn.attention is sdpa_attention for block in model.blocks)
    assert model.patch_embed.patch_embed_fn is reference.patch_embed
    assert model.patch_embed.fusion_fn is reference.cross_attention_fusion
    loss = DINOLoss(8, 3)
    assert loss.teacher_softmax_fn is reference.teacher_softmax
    assert loss.cross_entropy_fn is reference.dino_cross_entropy


def _forward_bodies(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            yield node


def test_no_forward_probes_the_environment_imports_or_the_registry():
    """No `forward` in terrafm/ or kernels/ reads env vars, imports, or asks the registry/backends."""
    banned_names = {"os", "importlib", "backends", "ops", "__import__"}
    offenders = []
    for path in sorted((ROOT / "terrafm").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        for fn in _forward_bodies(path):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import")
                elif isinstance(node, ast.Name) and node.id in banned_names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.id}")
                elif isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "INTERPRET"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_triton_interpret_is_read_in_one_place():
    readers = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "terrafm").rglob("*.py"))
               + sorted((ROOT / "kernels").rglob("*.py"))
               if "TRITON_INTERPRET\"" in p.read_text() or "TRITON_INTERPRET'" in p.read_text()]
    # _common reads it; compile_report only removes it from a child process's environment
    assert readers == ["kernels/_common.py", "kernels/compile_report.py"], readers


def test_the_cpp_extension_is_built_in_a_test_environment():
    """terrafm._C is built by `pip install -e .`; without it the C++ view-rendering tests would only skip."""
    assert backends.csrc().usable, backends.csrc().detail
    assert ops.choose("view_rendering", "cpu") == "cpp"


def test_a_visible_gpu_that_does_not_answer_is_unusable_not_a_traceback(monkeypatch):
    """torch.cuda.is_available() can be True while the device is busy or lost: get_device_name raised out of
    `terrafm info` and out of every backend choice."""
    import torch

    def busy(*args):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    backends.cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", busy)
    try:
        found = backends.cuda()
    finally:
        backends.cuda.cache_clear()
    assert not found.usable and "does not answer: RuntimeError: CUDA error: all CUDA-capable" in found.detail


def test_info_names_an_installed_package_that_fails_to_import_as_broken(tmp_path, monkeypatch):
    """A broken install was listed as 'not installed' beside a backends line saying it does not import."""
    import sys

    from terrafm import info

    (tmp_path / "tifffile.py").write_text("raise RuntimeError('simulated broken tifffile')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tifffile", raising=False)
    versions = info.collect()["versions"]
    assert versions["tifffile"] == "broken: RuntimeError: simulated broken tifffile"
    assert versions["flash_attn"] is None  # not installed here
