"""The op registry: the one place that decides which implementation each op uses.

Every op has named backends, each a `module:function` with the same signature (the first listed is
the reference the others must match; kernels/reference.py is the spec):

    op                       backends                 runs on
    attention                sdpa | flash_attn        cpu, cuda | cuda (fp16/bf16; fp32 falls back to SDPA)
    patch_embed              torch | triton           cpu, cuda | cuda, or cpu under TRITON_INTERPRET=1
    cross_attention_fusion   torch | triton           as patch_embed
    teacher_softmax          torch | triton           as patch_embed
    dino_cross_entropy       torch | triton           as patch_embed
    dino_head_loss           torch | triton           as patch_embed
    view_rendering           numpy | cpp | dali       cpu | cpu | cpu, cuda  (the data loader's executor)
    shard_decode             host | dali_inflate      cpu, cuda | cuda  (LZ4 chunks, inside the DALI executor)

The choice is made once, when a model, loss or loader is built, never inside `forward`:

    chosen = ops.resolve({"attention": "sdpa"}, device="cuda")   # {op: backend} for every op
    fn = ops.load("patch_embed", chosen["patch_embed"])          # the function; modules keep it

A preference is a backend name or "auto". "auto" takes the first usable backend in the op's order
for the device (cuda: flash_attn before sdpa, triton before torch, dali before cpp before numpy;
cpu: cpp before the reference); the Triton interpreter is never chosen automatically, it is for
tests. A backend named explicitly that cannot run raises, saying why and what can. Availability
comes from terrafm.backends, the same detection `terrafm info` prints.
"""

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from terrafm import backends

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    target: str | None  # "module:function", imported by load(); None for backends the caller dispatches on
    available: Callable[[str], backends.Availability]  # device -> usable here?


@dataclass(frozen=True)
class Op:
    name: str
    doc: str
    backends: dict[str, Backend]
    auto: dict[str, tuple[str, ...]]  # device -> backends "auto" tries, in order


REGISTRY: dict[str, Op] = {}


def register(name: str, doc: str, auto: dict[str, tuple[str, ...]], **backends_: Backend) -> Op:
    """Add an op; the first backend is its reference. `auto` lists, per device, the order "auto" tries."""
    for device, order in auto.items():
        unknown = [b for b in order if b not in backends_]
        if device not in DEVICES or unknown:
            raise ValueError(f"op {name!r}: auto order {device}: {order} names unknown backends {unknown}")
    REGISTRY[name] = Op(name, doc, dict(backends_), auto)
    return REGISTRY[name]


def _op(name: str) -> Op:
    if name not in REGISTRY:
        raise KeyError(f"unknown op {name!r}; registered ops: {sorted(REGISTRY)}")
    return REGISTRY[name]


def usable(name: str, device: str = "cpu") -> list[str]:
    """The backends of op `name` that can run on `device` here."""
    return [b for b, be in _op(name).backends.items() if be.available(device).usable]


def choose(name: str, device: str = "cpu", prefer: str = "auto") -> str:
    """The backend name op `name` uses on `device` ("cpu"/"cuda") given a preference (a name or "auto")."""
    op = _op(name)
    device = device.split(":")[0]
    if device not in DEVICES:
        raise ValueError(f"op {name!r}: device must be one of {DEVICES}, got {device!r}")
    prefer = prefer or "auto"
    if prefer != "auto":
        if prefer not in op.backends:
            raise ValueError(f"op {name!r} has no backend {prefer!r}; it has {list(op.backends)} (or 'auto')")
        avail = op.backends[prefer].available(device)
        if not avail.usable:
            raise RuntimeError(f"op {name!r}: backend {prefer!r} is not usable on {device}: {avail.detail}. "
                               f"Usable here: {usable(name, device)}")
        return prefer
    for backend in op.auto.get(device, ()):
        if op.backends[backend].available(device).usable:
            return backend
    raise RuntimeError(f"op {name!r}: no usable backend on {device}")


def resolve(prefs: Mapping[str, str] | None = None, device: str = "cpu") -> dict[str, str]:
    """{op: backend name} for every registered op on `device`, from preferences {op: name | "auto"}.

    This is what the trainer records in the run's config.yaml and what `terrafm info` prints."""
    prefs = dict(prefs or {})
    unknown = sorted(set(prefs) - set(REGISTRY))
    if unknown:
        raise KeyError(f"unknown op(s) {unknown} in the ops preferences; registered ops: {sorted(REGISTRY)}")
    return {name: choose(name, device, prefs.get(name, "auto")) for name in REGISTRY}


@functools.cache
def load(name: str, backend: str) -> Callable:
    """The function implementing op `name` with `backend` (imported on first use, then cached)."""
    op = _op(name)
    if backend not in op.backends:
        raise ValueError(f"op {name!r} has no backend {backend!r}; it has {list(op.backends)}")
    target = op.backends[backend].target
    if target is None:
        raise ValueError(f"op {name!r}: backend {backend!r} is dispatched by its caller, not loaded")
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def select(name: str, prefs: Mapping[str, str] | None = None, device: str = "cpu") -> Callable:
    """choose + load for one op: the callable a module holds."""
    return load(name, choose(name, device, (prefs or {}).get(name, "auto")))


# -- availability per device ---------------------------------------------------------------------------
def _everywhere(device: str) -> backends.Availability:
    return backends.Availability(True, "reference")


def _triton(device: str) -> backends.Availability:
    return backends.triton_compiled() if device == "cuda" else backends.triton_interpreter()


def _only(device_name: str, check: Callable[[], backends.Availability]) -> Callable[[str], backends.Availability]:
    def available(device: str) -> backends.Availability:
        if device != device_name:
            return backends.Availability(False, f"runs on {device_name} only, not {device}")
        return check()
    return available


def _flash_attn(device: str) -> backends.Availability:
    return _only("cuda", backends.flash_attn)(device)


def _dali(device: str) -> backends.Availability:
    return backends.dali()


def _dali_inflate(device: str) -> backends.Availability:
    return _only("cuda", backends.dali_inflate)(device)


REF = "terrafm_kernels.reference"
KERNEL_AUTO = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
register("attention", "softmax(q k^T / sqrt(d)) v over packed qkv (B, N, 3, H, d) -> (B, N, H, d)",
         {"cuda": ("flash_attn", "sdpa"), "cpu": ("sdpa",)},
         sdpa=Backend("sdpa", "terrafm.models.attention:sdpa_attention", _everywhere),
         flash_attn=Backend("flash_attn", "terrafm.models.flash_attention:flash_attention", _flash_attn))
register("patch_embed", "patchify + GEMM + bias + modality/position embedding", KERNEL_AUTO,
         torch=Backend("torch", f"{REF}:patch_embed", _everywhere),
         triton=Backend("triton", "terrafm_kernels.patch_embed:patch_embed", _triton))
register("cross_attention_fusion", "per-position attention over modality tokens, pooled over queries", KERNEL_AUTO,
         torch=Backend("torch", f"{REF}:cross_attention_fusion", _everywhere),
         triton=Backend("triton", "terrafm_kernels.fusion:cross_attention_fusion", _triton))
register("teacher_softmax", "dual-centering teacher softmax + centre statistics", KERNEL_AUTO,
         torch=Backend("torch", f"{REF}:teacher_softmax", _everywhere),
         triton=Backend("triton", "terrafm_kernels.teacher_softmax:teacher_softmax", _triton))
register("dino_cross_entropy", "student DINO cross-entropy over view pairs", KERNEL_AUTO,
         torch=Backend("torch", f"{REF}:dino_cross_entropy", _everywhere),
         triton=Backend("triton", "terrafm_kernels.dino_cross_entropy:dino_cross_entropy", _triton))
register("dino_head_loss", "DINO prototype layer fused with teacher softmax and student CE (no rows x K logits)",
         KERNEL_AUTO,
         torch=Backend("torch", "terrafm_kernels.reference:dino_head_loss", _everywhere),
         triton=Backend("triton", "terrafm_kernels.dino_head_loss:dino_head_loss", _triton))
register("view_rendering", "crop, resize, flip and normalise the views of a batch (the data loader's executor)",
         {"cuda": ("dali", "cpp", "numpy"), "cpu": ("cpp", "numpy")},
         numpy=Backend("numpy", None, _everywhere),
         cpp=Backend("cpp", None, lambda device: backends.csrc()),
         dali=Backend("dali", None, _dali))
register("shard_decode", "LZ4 shard chunks -> storage-dtype tiles for the DALI executor (raw chunks need none)",
         {"cuda": ("dali_inflate", "host"), "cpu": ("host",)},
         host=Backend("host", "terrafm.data.shards:decode_chunks", _everywhere),
         dali_inflate=Backend("dali_inflate", "terrafm.data.dali_path:dali_inflate", _dali_inflate))
