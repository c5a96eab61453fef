"""One benchmark file per kernel (same shape for all, Liger-style) and the runner that times them.

Each module here defines:
    OP                     the op name (as in terrafm_kernels / the op registry)
    BACKWARD               True when the timed call is forward + backward of a scalar loss
    KERNEL_MODULES         the terrafm_kernels modules whose Triton kernels it launches (compile report names):
                           what the compile section reports under --ops
    PEAK                   optional: "tflops_fp32" for an op without tensor-core dots (default "tflops_bf16")
    shapes(quick)          list of shape dicts (the keyword arguments of cost())
    inputs(shape, device, dtype) -> tuple of call arguments
    kernel()               the fused function, or raises ImportError with the reason it is absent
    reference(*args)       the eager PyTorch function it must match (also what torch.compile compiles)
    cost(shape, dtype_bytes=2)  {"flops", "bytes"}: the kernel's roofline_cost for that shape, dtype_bytes per
                           element of the inputs `inputs` makes in the timed dtype (2: bf16, the roofline's)
    extra_providers()      optional: {name: (fn or None, reason)} (flash-attn and the like)
"""

import importlib

import torch

from ..common import INTERPRETER_SKIP, peak_memory, time_call

OPS = ("patch_embed", "fusion", "attention", "teacher_softmax", "dino_cross_entropy", "dino_head_loss",
       "dinov2_dino_loss", "dinov2_dino_head_loss", "dinov2_ibot_loss", "dinov2_sinkhorn_knopp")


def load(op: str):
    return importlib.import_module(f"{__name__}.{op}")


def kernel_modules(ops: tuple[str, ...]) -> list[str]:
    """The compile report modules of these ops' Triton kernels, each once, in the order the ops name them."""
    return list(dict.fromkeys(m for op in ops for m in load(op).KERNEL_MODULES))


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _call(fn, args: tuple, backward: bool):
    """A no-argument closure running fn(*args) (and the backward of its scalar loss)."""
    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        out = fn(*args)
        if backward:
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            for a in grads:
                a.grad = None
        return out

    return run


def _providers(bench, device: str) -> dict[str, tuple[object | None, str]]:
    """name -> (function, "") or (None, why it is skipped)."""
    providers = {}
    try:
        fn = bench.kernel()
        providers["kernel"] = (fn, "") if device == "cuda" else (None, INTERPRETER_SKIP)
    except ImportError as err:
        providers["kernel"] = (None, f"kernel not importable here: {err}")
    providers["eager"] = (bench.reference, "")
    providers["compile"] = (torch.compile(bench.reference, dynamic=False), "")
    providers.update(getattr(bench, "extra_providers", dict)())
    return providers


def run_op(op: str, device: str, quick: bool, log) -> list[dict]:
    """Time every provider of one op over its shape sweep; one row per (shape, provider)."""
    bench = load(op)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    providers = _providers(bench, device)
    for shape in bench.shapes(quick):
        cost = bench.cost(shape, dtype_bytes=dtype.itemsize)  # the bytes of the dtype timed, not bf16's
        for name, (fn, why) in providers.items():
            row = {"op": op, "shape": shape_label(shape), "dtype": str(dtype).removeprefix("torch."),
                   "provider": name, "pass": "fwd+bwd" if bench.BACKWARD else "fwd", **cost}
            if fn is None:
                row["skipped"] = why
                rows.append(row)
                log(f"  {op:18s} {row['shape']:40s} {name:10s} skipped: {why}")
                continue
            args = bench.inputs(shape, device, dtype)
            call = _call(fn, args, bench.BACKWARD)
            try:
                row.update(time_call(call, device, min_seconds=0.1 if quick else 0.5))
                if device != "cuda" and name == "compile":  # compiled code bypasses the dispatch-mode count
                    mem = {"bytes": None, "how": "not measured on CPU for compiled code"}
                else:
                    mem = peak_memory(call, device)
            except Exception as err:  # report the failure as data: one broken provider must not stop the run
                row["skipped"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                rows.append(row)
                log(f"  {op:18s} {row['shape']:40s} {name:10s} {row['skipped']}")
                continue
            row["peak_bytes"], row["memory_how"] = mem["bytes"], mem["how"]
            row["tflops_per_s"] = cost["flops"] / (row["ms"] * 1e-3) / 1e12
            row["gb_per_s"] = cost["bytes"] / (row["ms"] * 1e-3) / 1e9
            log(f"  {op:18s} {row['shape']:40s} {name:10s} {row['ms']:9.3f} ms  {row['gb_per_s']:8.2f} GB/s")
            rows.append(row)
    return rows
