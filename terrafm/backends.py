"""Detect the optional accelerated backends once, each with a reason when it is not usable.

Nothing here raises: a missing GPU package is a fallback, never a crash (`terrafm info` prints it).
"""

import functools
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Availability:
    usable: bool
    detail: str  # version when usable, the reason when not


def error_line(err: BaseException) -> str:
    """'Type: first line of the message': what one line of a report says of an error (a message may span lines)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _version(module_name: str) -> tuple[object | None, str]:
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or a broken binary raising something else
        return None, f"not importable: {error_line(err)}"
    return module, str(getattr(module, "__version__", "unknown version"))


@functools.cache
def cuda() -> Availability:
    import torch

    if not torch.cuda.is_available():
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        return Availability(False, why)
    try:  # a device that is visible but busy, lost or in an exclusive mode raises here
        name = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
    except Exception as err:
        return Availability(False, f"a CUDA device is visible but does not answer: {error_line(err)}")
    return Availability(True, f"{name} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET as the kernels read it (once, at import: terrafm_kernels._common.INTERPRET)."""
    from terrafm_kernels import _common

    return _common.INTERPRET


@functools.cache
def triton() -> Availability:
    module, detail = _version("triton")
    return Availability(module is not None, detail)


def triton_compiled() -> Availability:
    """Compiled Triton kernels need triton and a CUDA GPU, and the interpreter switched off."""
    t = triton()
    if not t.usable:
        return t
    if triton_interpreter_enabled():
        return Availability(False, "TRITON_INTERPRET=1 is set: kernels run in the interpreter")
    c = cuda()
    return Availability(c.usable, f"triton {t.detail} on {c.detail}" if c.usable else c.detail)


def triton_interpreter() -> Availability:
    t = triton()
    if not t.usable:
        return t
    if not triton_interpreter_enabled():
        return Availability(False, "set TRITON_INTERPRET=1 to run kernels on CPU tensors")
    return Availability(True, f"triton {t.detail} interpreter (CPU, slow, for tests)")


@functools.cache
def flash_attn() -> Availability:
    if not cuda().usable:
        return Availability(False, "needs CUDA; attention uses torch SDPA")
    module, detail = _version("flash_attn")
    return Availability(module is not None, detail if module else detail + "; attention uses torch SDPA")


@functools.cache
def apex() -> Availability:
    if not cuda().usable:
        return Availability(False, "needs CUDA; optimiser uses torch AdamW")
    module, detail = _version("apex.optimizers")
    return Availability(module is not None, "apex FusedAdam" if module else detail + "; using torch AdamW")


@functools.cache
def dali() -> Availability:
    module, detail = _version("nvidia.dali")
    if module is None:
        return Availability(False, detail + " (pip install terrafm[dali])")
    where = "CPU and GPU pipelines" if cuda().usable else "CPU pipelines only (no CUDA device)"
    return Availability(True, f"{detail}, {where}")


@functools.cache
def dali_inflate() -> Availability:
    """DALI's GPU LZ4 operator: fn.decoders.inflate, or fn.experimental.inflate in DALI releases before it moved."""
    d = dali()
    if not d.usable:
        return d
    if not cuda().usable:
        return Availability(False, "inflate is a GPU-only DALI operator; no CUDA device (chunks decode on the host)")
    from nvidia.dali import fn

    for name in ("decoders", "experimental"):
        if hasattr(getattr(fn, name, None), "inflate"):
            return Availability(True, f"nvidia.dali.fn.{name}.inflate")
    return Availability(False, f"DALI {d.detail} has no inflate operator (needs DALI >= 1.16)")


@functools.cache
def csrc() -> Availability:
    try:
        from terrafm import _C  # noqa: F401
    except ImportError as err:
        return Availability(False, f"terrafm._C not built ({err}); rebuild it: `pip install -e .` in a checkout, "
                                   "or reinstall terrafm")
    return Availability(True, "terrafm._C (pybind11)")


ALL = {
    "cuda": cuda,
    "triton_compiled": triton_compiled,
    "triton_interpreter": triton_interpreter,
    "flash_attn": flash_attn,
    "apex": apex,
    "dali": dali,
    "dali_inflate": dali_inflate,
    "csrc": csrc,
}
