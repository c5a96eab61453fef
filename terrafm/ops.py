"""The op registry: every accelerated op, its backends, and how one is chosen.

An op has up to three backends, each a lazily imported function with the reference's signature:
    torch   the pure-PyTorch reference (terrafm_kernels.reference), runs everywhere
    triton  the fused Triton kernel (terrafm_kernels.<module>), CUDA, or CPU tensors under TRITON_INTERPRET=1
    cpp     the C++ CPU path (terrafm._C), for data-path ops
Choice, first match wins:
    1. environment: TERRAFM_OPS="patch_embed=torch,teacher_softmax=triton" (for quick experiments)
    2. the caller's preference (a model's or the trainer's `ops` config: {"patch_embed": "triton"})
    3. "auto": the first usable backend in the device's default order (cuda: triton, cpp, torch;
       cpu: cpp, torch; the interpreter is never picked automatically: it is for tests)
A backend named explicitly but not usable raises an error that says why and what is usable.
"""

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from terrafm import backends

BACKEND_NAMES = ("torch", "triton", "cpp")
AUTO_ORDER = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:function", imported on first use
    devices: tuple[str, ...]

    def availability(self, device: str) -> backends.Availability:
        if device not in self.devices:
            return backends.Availability(False, f"{self.name} runs on {'/'.join(self.devices)}, not {device}")
        if self.name == "triton":
            avail = backends.triton_compiled() if device == "cuda" else backends.triton_interpreter()
            return avail
        if self.name == "cpp":
            return backends.csrc()
        return backends.Availability(True, "reference")

    def load(self) -> Callable:
        module_name, fn_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), fn_name)


@dataclass(frozen=True)
class Op:
    name: str
    doc: str
    backends: dict[str, Backend]


REGISTRY: dict[str, Op] = {}


def register(name: str, doc: str, **targets: str | tuple[str, tuple[str, ...]]) -> Op:
    """Register an op: register("x", "doc", torch="mod:fn", triton="mod:fn", cpp=("mod:fn", ("cpu",)))."""
    default_devices = {"torch": ("cpu", "cuda"), "triton": ("cuda", "cpu"), "cpp": ("cpu",)}
    table = {}
    for backend, target in targets.items():
        if backend not in BACKEND_NAMES:
            raise ValueError(f"op {name!r}: unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
        devices = default_devices[backend]
        if isinstance(target, tuple):
            target, devices = target
        table[backend] = Backend(backend, target, devices)
    REGISTRY[name] = Op(name, doc, table)
    return REGISTRY[name]


def _env_overrides() -> dict[str, str]:
    spec = os.environ.get("TERRAFM_OPS", "").strip()
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, backend = item.partition("=")
        if not backend:
            raise ValueError(f"TERRAFM_OPS entry {item!r} must look like op=backend, e.g. patch_embed=torch")
        out[op.strip()] = backend.strip()
    return out


def choose(name: str, device: str = "cpu", prefer: str = "auto") -> Backend:
    """Pick the backend of op `name` for tensors on `device` ("cpu"/"cuda")."""
    if name not in REGISTRY:
        raise KeyError(f"unknown op {name!r}; registered ops: {sorted(REGISTRY)}")
    op = REGISTRY[name]
    device = device.split(":")[0]
    prefer = _env_overrides().get(name, prefer or "auto")
    if prefer != "auto":
        if prefer not in op.backends:
            raise ValueError(f"op {name!r} has no backend {prefer!r}; it has {sorted(op.backends)} (or 'auto')")
        avail = op.backends[prefer].availability(device)
        if not avail.usable:
            raise RuntimeError(
                f"op {name!r}: backend {prefer!r} is not usable on {device}: {avail.detail}. "
                f"Usable here: {usable(name, device)}"
            )
        return op.backends[prefer]
    for backend in AUTO_ORDER.get(device, ("torch",)):
        if backend in op.backends and op.backends[backend].availability(device).usable:
            if backend == "triton" and device == "cpu":
                continue
            return op.backends[backend]
    raise RuntimeError(f"op {name!r}: no usable backend on {device}")


def usable(name: str, device: str = "cpu") -> list[str]:
    return [b for b, be in REGISTRY[name].backends.items() if be.availability(device).usable]


@functools.cache
def _load(target: str, backend: Backend) -> Callable:
    return backend.load()


def get(name: str, device: str = "cpu", prefer: str = "auto") -> Callable:
    """The function implementing op `name` on `device` (see module docstring for the choice)."""
    backend = choose(name, device, prefer)
    return _load(backend.target, backend)


REF = "terrafm_kernels.reference"
register("patch_embed", "patchify + GEMM + bias + modality/position embedding",
         torch=f"{REF}:patch_embed", triton="terrafm_kernels.patch_embed:patch_embed")
register("cross_attention_fusion", "per-position attention over modality tokens, pooled over queries",
         torch=f"{REF}:cross_attention_fusion", triton="terrafm_kernels.fusion:cross_attention_fusion")
register("teacher_softmax", "dual-centering teacher softmax + centre statistics",
         torch=f"{REF}:teacher_softmax", triton="terrafm_kernels.teacher_softmax:teacher_softmax")
register("dino_cross_entropy", "student DINO cross-entropy over view pairs",
         torch=f"{REF}:dino_cross_entropy", triton="terrafm_kernels.dino_cross_entropy:dino_cross_entropy")
register("dino_head_loss", "DINO prototype layer fused with teacher softmax and student CE (no rows x K logits)",
         torch="terrafm_kernels.dino_head_loss:dino_head_loss_reference",
         triton="terrafm_kernels.dino_head_loss:dino_head_loss")
register("normalize_bands", "per-band normalisation of raw tiles",
         torch=f"{REF}:normalize_bands", cpp=("terrafm.data.cpu_ops:normalize_bands", ("cpu",)))
