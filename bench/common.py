"""Shared pieces of `terrafm bench`: timing, peak memory, the GPUs' roofline, the run's metadata.

Timing: `time_call` runs warm-up calls, then repeats until `min_seconds` have passed or `max_repeats` calls
were timed, synchronising CUDA around every call; the median is reported. Peak memory: on CUDA
`torch.cuda.max_memory_allocated` above what was allocated before the call; on CPU `TensorPeak` counts the bytes
of live tensors created by PyTorch ops inside the call (a TorchDispatchMode; inputs and allocator caching are not
counted).
"""

import datetime
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from terrafm.train.metrics import GPUS, gpu_name

INTERPRETER_SKIP = ("Triton kernels run here only in the interpreter (no CUDA GPU); interpreter runs are "
                    "never timed: their speed says nothing about the compiled kernel")


def roofline_floor_us(cost: dict[str, int], gpu: str, peak: str = "tflops_bf16") -> float:
    """The lower bound on one call's time on `gpu` in microseconds: max(FLOPs / peak, bytes / bandwidth).

    `peak` is the GPUS key of the units the op's FLOPs run on: "tflops_bf16" (tensor-core dots) or "tflops_fp32"
    (elementwise and broadcast math on the FMA units, 15x slower on H100 and A100)."""
    spec = GPUS[gpu]
    return 1e6 * max(cost["flops"] / (spec[peak] * 1e12), cost["bytes"] / (spec["tb_per_s"] * 1e12))


def device_gpu_name() -> str | None:
    """The GPUS key matching the CUDA device here, or None (no GPU, or not one we list)."""
    return gpu_name(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, warmup: int = 2, min_seconds: float = 0.2,
              max_repeats: int = 50) -> dict:
    """Median / min wall time of fn() in milliseconds (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "repeats": len(times)}


class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storage created by ops run inside the mode (CPU memory accounting).

    Each new storage is counted once, when an op first returns it, and released when its last tensor is
    freed (PyTorch keeps a tensor's Python object alive while autograd still holds it). An op that returns the
    storage of one of its arguments made before the mode (a view, an in-place write) allocates nothing.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors referencing it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            elif key in inputs:  # the storage of an argument made outside the mode: nothing allocated
                continue
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak extra memory of one fn() call: {"bytes", "how"} (CUDA allocator or CPU tensor accounting)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return {"bytes": torch.cuda.max_memory_allocated() - base, "how": "cuda max_memory_allocated"}
    with TensorPeak() as mode:
        result = fn()
        del result
    return {"bytes": mode.peak, "how": "cpu live-tensor bytes (dispatch mode)"}


def git_revision() -> str:
    """The commit of the terrafm checkout this code runs from ("-dirty" with uncommitted changes). Only a checkout
    whose top level is this code's root counts: an installed copy in a venv inside another project's repository
    reported that project's commit."""
    root = Path(__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return "unknown (not a git checkout)"
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"
    if rev.returncode != 0:
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def metadata() -> dict:
    from terrafm.info import collect

    return {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_revision": git_revision(), "machine": machine(), "info": collect()}
