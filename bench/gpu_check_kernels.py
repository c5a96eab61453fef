"""gpu_check stages `kernel_correctness` and `kernel_timing`: every Triton kernel at the presets' shapes.

Shapes come from the presets themselves (batch per GPU, views, K, widths): patch embedding at E = 3 D
(ViT-B and ViT-L, fwd + bwd of the weights and embeddings: images need no gradient), fusion at T = B x 196
positions with 2 and 3 modalities, teacher softmax at R = 2 B rows, DINO cross-entropy and the fused head
over 2 + n_local views at K = 65536.

Correctness is flash-attn's rule, as in tests/kernels: for every output and gradient, the kernel's max error
against a float64 oracle is at most 2x plain PyTorch's own error at the same dtype, plus REL x max|oracle|.
The oracles are the references run in float64 (patch embedding, fusion) and tests/kernels/loss_oracle.py
(the loss references cast to float32 inside, so float64 needs its own copy of the math).
"""

import importlib
import importlib.util
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from terrafm_kernels import reference

from .gpu_check import ROOT, Context, Profile, require_device
from .kernels import shape_label

DTYPES = ("float32", "float16", "bfloat16")
REL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
FUSION_QUERIES, FUSION_HEADS, S2_BANDS = 5, 16, 12  # the model's defaults (Fusion, s2_l2a)
INTERPRETER_BF16 = "the Triton interpreter computes bf16 tl.dot wrongly: bf16 is checked on a GPU only"


def _test_oracle(name: str):
    """tests/kernels/NAME.py (plain float64 functions, no pytest), loaded from the checkout by path."""
    path = ROOT / "tests" / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"terrafm_{name}", path)
    if spec is None or not path.exists():
        raise FileNotFoundError(f"{path} is missing: run gpu_check from a terrafm checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORACLE = _test_oracle("loss_oracle")
DINOV2 = _test_oracle("dinov2_oracle")  # the DINOv2 drop-ins' semantics (terrafm_kernels.dino)


@dataclass(frozen=True)
class Case:
    """One kernel: how to make its inputs, call it, and what it must match."""

    op: str
    kernel: str  # "module:function" in terrafm_kernels
    outputs: tuple[str, ...]
    make: Callable[[dict, torch.Generator], dict[str, torch.Tensor]]  # float32 inputs, in argument order
    typed: tuple[str, ...]  # inputs in the tested dtype; the others stay float32 as the op expects
    grads: tuple[str, ...]  # inputs that get a gradient (the training path)
    scalars: Callable[[dict], tuple]
    plain: Callable  # plain PyTorch at the tested dtype (also what torch.compile compiles: the unfused path)
    oracle: Callable  # float64
    cost: Callable[[dict, int], dict]  # {"flops", "bytes"} of the timed call, dtype_bytes per element
    uses_dot: bool  # bf16 tl.dot: unreliable under the interpreter
    out_shape: Callable[[dict], tuple] | None = None  # a tensor output's shape: backward takes a random grad_out
    native: Callable | None = None  # torch's own module for the op where plain emulates it: its error is reported

    def grad_out(self, shape: dict, g: torch.Generator) -> torch.Tensor | None:
        return None if self.out_shape is None else torch.randn(*self.out_shape(shape), generator=g)

    def load(self) -> Callable:
        module, name = self.kernel.split(":")
        return getattr(importlib.import_module(f"terrafm_kernels.{module}"), name)


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _patch_embed_inputs(s: dict, g: torch.Generator) -> dict:
    B, C, H, W, E, p = (s[k] for k in ("B", "C", "H", "W", "E", "p"))
    return {"x": _randn(g, B, C, H, W), "weight": _randn(g, E, C, p, p, scale=(C * p * p) ** -0.5),
            "bias": _randn(g, E), "modality_embed": _randn(g, E), "pos_embed": _randn(g, (H // p) * (W // p), E)}


def _patch_embed_plain(x, weight, bias, modality_embed, pos_embed):
    """nn.Conv2d's math at the tested dtype; fp32 with tf32 operands where torch allows tf32 for convolutions (its
    default, which the kernel follows), emulated (reference.round_tf32) so that CPU and GPU hold the same bar."""
    from terrafm_kernels.patch_embed import tf32_allowed

    tf32 = x.dtype == torch.float32 and tf32_allowed()
    return reference.patch_embed(x, weight, bias, modality_embed, pos_embed, tf32=tf32)


def _patch_embed_conv2d(x, weight, bias, modality_embed, pos_embed):
    """nn.Conv2d itself (cuDNN on a GPU, at torch's tf32 switch): how far _patch_embed_plain's emulation is from it."""
    tokens = torch.nn.functional.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return tokens + modality_embed + pos_embed


def _patch_embed_cost(s: dict, e: int) -> dict:
    """Forward plus the weight-gradient GEMM, which reads x and grad_out (images need no gradient)."""
    from terrafm_kernels.patch_embed import roofline_cost

    return roofline_cost(**s, dtype_bytes=e, pos_embed=True, backward=True, grad_input=False)


def _fusion_inputs(s: dict, g: torch.Generator) -> dict:
    T, M, A, Q = s["T"], s["M"], s["A"], s["Q"]
    return {"keys": _randn(g, T, M, A), "values": _randn(g, T, M, A), "queries": _randn(g, Q, A),
            "pool": _randn(g, A, scale=0.3)}


def _teacher_inputs(s: dict, g: torch.Generator) -> dict:
    R, K = s["R"], s["K"]
    return {"teacher_logits": _randn(g, R, K, scale=3.0), "center": _randn(g, K, scale=3.0),
            "center_high": _randn(g, K, scale=3.0), "high_weight": (torch.rand(R, generator=g) > 0.5).float()}


def _ce_inputs(s: dict, g: torch.Generator) -> dict:
    S, T, B, K = s["S"], s["T"], s["B"], s["K"]
    return {"student_logits": _randn(g, S, B, K, scale=3.0),
            "teacher_probs": torch.softmax(_randn(g, T, B, K, scale=3.0), dim=-1)}


def _head_inputs(s: dict, g: torch.Generator) -> dict:
    S, T, B, K, D = s["S"], s["T"], s["B"], s["K"], s["D"]
    return {"student_features": _randn(g, S, B, D), "teacher_features": _randn(g, T, B, D),
            "weight_v": _randn(g, K, D), "center": _randn(g, K, scale=0.1), "center_high": _randn(g, K, scale=0.1),
            "high_weight": (torch.rand(T * B, generator=g) > 0.5).float()}


def _student_rows_inputs(s: dict, g: torch.Generator) -> dict:
    T, R, K = s["T"], s["R"], s["K"]
    return {"student_logits": _randn(g, R, K, scale=3.0),
            "targets": torch.softmax(_randn(g, T, R, K, scale=3.0), dim=-1), "row_weight": torch.rand(R, generator=g)}


def _weighted_soft_ce_f64(student_logits, targets, row_weight, student_temperature):
    log_p = torch.log_softmax(student_logits.double() / student_temperature, dim=-1)
    return (row_weight.double() * -(targets.double().sum(dim=0) * log_p).sum(dim=-1)).sum()


def _cost(module: str, **kwargs) -> Callable[[dict, int], dict]:
    def cost(s: dict, e: int) -> dict:
        fn = importlib.import_module(f"terrafm_kernels.{module}").roofline_cost
        return fn(**s, dtype_bytes=e, **kwargs)

    return cost


CASES = {
    "patch_embed": Case(
        "patch_embed", "patch_embed:patch_embed", ("out",), _patch_embed_inputs,
        ("x", "weight", "bias", "modality_embed", "pos_embed"), ("weight", "bias", "modality_embed", "pos_embed"),
        lambda s: (), _patch_embed_plain, reference.patch_embed, _patch_embed_cost, True,
        lambda s: (s["B"], (s["H"] // s["p"]) * (s["W"] // s["p"]), s["E"]), _patch_embed_conv2d),
    "fusion": Case(
        "fusion", "fusion:cross_attention_fusion", ("out",), _fusion_inputs, ("keys", "values", "queries", "pool"),
        ("keys", "values", "queries", "pool"), lambda s: (s["H"],), reference.cross_attention_fusion,
        reference.cross_attention_fusion,
        lambda s, e: _cost("fusion", backward=True)({k: s[k] for k in "TMAQ"}, e), False, lambda s: (s["T"], s["A"])),
    "teacher_softmax": Case(
        "teacher_softmax", "teacher_softmax:teacher_softmax", ("probs", "logit_sum", "high_logit_sum"),
        _teacher_inputs, ("teacher_logits",), (), lambda s: (0.04, 0.8), reference.teacher_softmax,
        ORACLE.teacher_softmax_f64, _cost("teacher_softmax"), False),
    "dino_cross_entropy": Case(
        "dino_cross_entropy", "dino_cross_entropy:dino_cross_entropy", ("loss",), _ce_inputs, ("student_logits",),
        ("student_logits",), lambda s: (0.1,), reference.dino_cross_entropy, ORACLE.dino_cross_entropy_f64,
        _cost("dino_cross_entropy", backward=True), False),
    "dino_head_loss": Case(
        "dino_head_loss", "dino_head_loss:dino_head_loss", ("loss", "logit_sum", "high_logit_sum"), _head_inputs,
        ("student_features", "teacher_features", "weight_v"), ("student_features", "weight_v"),
        lambda s: (0.04, 0.1, 0.8), reference.dino_head_loss, ORACLE.dino_head_loss_f64,
        _cost("dino_head_loss", backward=True), True),
    "centered_softmax": Case(
        "centered_softmax", "dino_teacher:centered_softmax", ("probs",),
        lambda s, g: {k: v for k, v in _teacher_inputs(s, g).items() if k in ("teacher_logits", "center")},
        ("teacher_logits",), (), lambda s: (0.04,), reference.centered_softmax, DINOV2.centered_softmax,
        _cost("dino_teacher"), False),
    "sinkhorn_knopp": Case(
        "sinkhorn_knopp", "dino_teacher:sinkhorn_knopp", ("probs",),
        lambda s, g: {"teacher_logits": _randn(g, s["R"], s["K"], scale=3.0)}, ("teacher_logits",), (),
        lambda s: (0.04, 3), reference.sinkhorn_knopp, DINOV2.sinkhorn_log_f64, _cost("dino_teacher", n_iterations=3),
        False),
    "weighted_soft_cross_entropy": Case(
        "weighted_soft_cross_entropy", "dino_student_ce:weighted_soft_cross_entropy", ("loss",),
        _student_rows_inputs, ("student_logits",), ("student_logits",), lambda s: (0.1,),
        reference.weighted_soft_cross_entropy, _weighted_soft_ce_f64, _cost("dino_student_ce", backward=True), False),
}


def preset_dims(preset: str, overrides: tuple[str, ...]) -> dict:
    """The per-GPU sizes a preset trains with: batch, widths, views, prototypes."""
    from terrafm.config import load_config
    from terrafm.models import MODELS

    cfg = load_config(preset, list(overrides))
    spec, d = MODELS[cfg.model.name], cfg.data
    return {"B": d.batch_size, "D": spec.embed_dim, "heads": spec.num_heads, "fusion_heads": FUSION_HEADS,
            "img": d.global_size, "p": cfg.model.patch_size, "S": d.n_global + d.n_local, "T": d.n_global,
            "K": cfg.ssl.num_prototypes, "Dh": cfg.ssl.head_bottleneck_dim}


def preset_shapes(profile: Profile) -> list[tuple[str, str, dict]]:
    """(preset, op, shape) for every kernel at each preset's per-GPU shapes, ViT-B's first."""
    out = []
    for preset, overrides in profile.presets:
        x = {**preset_dims(preset, overrides), **profile.toy_dims}
        B, S, T, K, A, grid = x["B"], x["S"], x["T"], x["K"], 3 * x["D"], x["img"] // x["p"]
        out += [(preset, "patch_embed", {"B": B, "C": S2_BANDS, "H": x["img"], "W": x["img"], "E": A, "p": x["p"]}),
                *[(preset, "fusion", {"T": B * grid**2, "M": m, "A": A, "Q": FUSION_QUERIES, "H": x["fusion_heads"]})
                  for m in (2, 3)],
                (preset, "teacher_softmax", {"R": T * B, "K": K}),
                (preset, "dino_cross_entropy", {"S": S, "T": T, "B": B, "K": K}),
                (preset, "dino_head_loss", {"S": S, "T": T, "B": B, "K": K, "D": x["Dh"]}),
                (preset, "centered_softmax", {"R": T * B, "K": K}),
                (preset, "sinkhorn_knopp", {"R": T * B, "K": K}),
                (preset, "weighted_soft_cross_entropy", {"T": T, "R": B, "K": K}),
                (preset, "attention", {"B": B, "H": x["heads"], "N": grid**2 + 1, "d": x["D"] // x["heads"]})]
    # last, so that a stage short of time skips it first: iBOT's masked patch rows (dino_teacher.PRODUCTION_ROWS),
    # where the Sinkhorn column step's groups of rows outnumber the class-token case's 4 by ~30
    preset, overrides = profile.presets[0]
    out.append((preset, "sinkhorn_knopp", {"R": profile.ibot_rows, "K": preset_dims(preset, overrides)["K"]}))
    return out


def make_call(fn: Callable, case: Case, leaves: dict, scalars: tuple, grad_out: torch.Tensor | None) -> Callable:
    """A no-argument closure: fn forward (+ backward of its first output), returning outputs and gradients.

    grad_out (made on the CPU) is moved to the output's device and dtype on the first call only: a copy per
    call put a 115 MB host-to-device transfer into every timed patch_embed and fusion call (the first H200
    run timed ~25 ms where the trainer's trace shows ~0.3 ms per patch_embed launch)."""
    moved: dict[str, torch.Tensor] = {}

    def call() -> dict[str, torch.Tensor]:
        out = fn(*leaves.values(), *scalars)
        outs = out if isinstance(out, tuple) else (out,)
        result = dict(zip(case.outputs, (o.detach() for o in outs), strict=False))
        if case.grads:
            first = outs[0]
            if first.dim() == 0:
                first.backward()
            else:
                if "grad_out" not in moved:
                    moved["grad_out"] = grad_out.to(first.device, first.dtype)
                first.backward(moved["grad_out"])
            for k in case.grads:
                result[f"grad {k}"], leaves[k].grad = leaves[k].grad, None
        return result

    return call


def leaves_for(case: Case, inputs: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype if k in case.typed else torch.float32).requires_grad_(k in case.grads)
            for k, v in inputs.items()}


def check_one(case: Case, shape: dict, dtype_name: str, device: str) -> dict:
    """Kernel, plain PyTorch and float64 oracle on the same (dtype-rounded) inputs; one check per output."""
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    inputs, scalars = case.make(shape, g), case.scalars(shape)
    grad_out = case.grad_out(shape, g)
    kernel_leaves = leaves_for(case, inputs, device, dtype)
    oracle_leaves = {k: v.detach().double().requires_grad_(k in case.grads) for k, v in kernel_leaves.items()}
    got = make_call(case.load(), case, kernel_leaves, scalars, grad_out)()
    want = make_call(case.oracle, case, oracle_leaves, scalars, None if grad_out is None else grad_out.double())()
    row = {}
    try:
        plain = make_call(case.plain, case, leaves_for(case, inputs, device, dtype), scalars, grad_out)()
    except RuntimeError as err:  # CPU PyTorch has no fp16 convolution: plain = fp32 rounded to the dtype
        if "not implemented" not in str(err):
            raise
        plain = make_call(case.plain, case, leaves_for(case, inputs, device, torch.float32), scalars, grad_out)()
        plain = {k: v.to(dtype) for k, v in plain.items()}
        row["plain_note"] = f"PyTorch has no {dtype_name} kernel here: plain = float32 rounded to {dtype_name}"
    if case.native is not None and dtype == torch.float32:  # does plain's emulation hold torch's own module?
        native = make_call(case.native, case, leaves_for(case, inputs, device, dtype), scalars, grad_out)()
        row["native_vs_plain"] = {name: ORACLE.max_err(native[name], oracle) / max(ORACLE.max_err(plain[name], oracle),
                                                                                  1e-30)
                                  for name, oracle in want.items()}
    checks = []
    for name, oracle in want.items():
        err, plain_err = ORACLE.max_err(got[name], oracle), ORACLE.max_err(plain[name], oracle)
        atol = REL[dtype_name] * oracle.abs().max().item() + 1e-7
        ok = tuple(got[name].shape) == tuple(oracle.shape) and math.isfinite(err) and err <= 2 * plain_err + atol
        checks.append({"what": name, "err": err, "plain_err": plain_err, "atol": atol, "ok": ok})
    return {**row, "ok": all(c["ok"] for c in checks), "checks": checks}


def correctness(ctx: Context) -> None:
    device = require_device(ctx)
    interpreted = device == "cpu"
    rows = ctx.figures.setdefault("rows", [])
    ctx.figures["rule"] = "max error vs float64 <= 2 x plain PyTorch's at the same dtype + REL x max|oracle|"
    ctx.figures["rel"] = REL
    for preset, op, shape in preset_shapes(ctx.profile):
        if op not in CASES:
            continue
        for dtype_name in DTYPES:
            row = {"op": op, "preset": preset, "shape": shape_label(shape), "dtype": dtype_name}
            if interpreted and dtype_name == "bfloat16" and CASES[op].uses_dot:
                row["skipped"] = INTERPRETER_BF16
            elif ctx.time_left() < 15:
                row["skipped"] = "the stage's time budget is spent"
                ctx.fail(f"{op} {dtype_name} at {preset} not checked: out of time")
            else:
                t0 = time.perf_counter()
                try:
                    row.update(check_one(CASES[op], shape, dtype_name, device))
                except Exception as err:
                    row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:500]}")
                row["seconds"] = round(time.perf_counter() - t0, 2)
                if not row["ok"]:
                    bad = [c["what"] for c in row.get("checks", []) if not c["ok"]] or [row.get("error")]
                    ctx.fail(f"{op} {dtype_name} at {preset} ({row['shape']}): {bad}")
            rows.append(row)
            print(f"  {op:18s} {dtype_name:9s} {preset:10s} "
                  f"{row.get('skipped') or ('ok' if row['ok'] else 'FAILED')}", flush=True)
            ctx.save()
    checked = [r for r in rows if "ok" in r]
    ctx.figures.update(checked=len(checked), passed=sum(r["ok"] for r in checked),
                       skipped=len(rows) - len(checked))


# -- timing --------------------------------------------------------------------------------------

def time_ms(fn: Callable, sync: Callable, profile: Profile) -> dict:
    """Median wall ms per call over `batches` batches of back-to-back calls (each batch >= batch_s), the host's
    share of it and the calls made: {"ms", "host_ms", "calls"}.

    host_ms is the time to issue one call, measured before the batch's sync. The host runs ahead of a busy GPU
    (host_ms well under ms); when host_ms is about ms, the GPU finished each call before the host had issued
    the next, so ms is the launch path's cost (Python, validation, dispatch), not the kernels'."""
    for _ in range(profile.warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    n = max(1, int(profile.batch_s / max(time.perf_counter() - t0, 1e-6)))
    walls, hosts = [], []
    for _ in range(profile.batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        issued = time.perf_counter()
        sync()
        walls.append((time.perf_counter() - t0) / n)
        hosts.append((issued - t0) / n)
    return {"ms": 1e3 * statistics.median(walls), "host_ms": 1e3 * statistics.median(hosts),
            "calls": 1 + profile.warmup + n * profile.batches}


def kernel_ms_per_call(trace: Path, calls: int, top: int = 3) -> tuple[float | None, list[tuple[str, float]]]:
    """GPU kernel time per call (ms) in a torch.profiler chrome trace of `calls` calls, the sum of its kernel
    events (None when the trace has none: a CPU run), and the `top` kernels by time as (name, ms per call)."""
    from .gpu_check_train import top_kernels

    found = top_kernels(trace, n=top)
    if found["what"] != "GPU kernels":
        return None, []
    return found["total_ms"] / calls, [(r["name"][:60], r["total_ms"] / calls) for r in found["rows"]]


def device_ms(fn: Callable, sync: Callable, device: str, calls: int = 5) -> tuple[float | None, list]:
    """GPU kernel time of one call and its largest kernels, from torch.profiler's CUDA activity over `calls`
    calls (gaps between kernels excluded): what the kernels cost, whatever the host adds. None on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return kernel_ms_per_call(trace, calls)


def _providers(case: Case | None, profile: Profile) -> dict[str, tuple[Callable | None, str]]:
    """name -> (function, "") or (None, why not here). attention (case None) has no terrafm kernel."""
    if case is None:
        from terrafm_bench.kernels import attention

        extra = attention.extra_providers()
        return {"eager": (attention.reference, ""),
                "compile": (torch.compile(attention.reference, backend=profile.compile_backend, dynamic=False), ""),
                **extra}
    return {"kernel": (case.load(), ""), "eager": (case.plain, ""),
            "compile": (torch.compile(case.plain, backend=profile.compile_backend, dynamic=False), "")}


def _attention_call(fn: Callable, shape: dict, device: str, dtype: torch.dtype) -> Callable:
    from terrafm_bench.kernels import attention

    q, k, v = attention.inputs(shape, device, dtype)
    return lambda: fn(q, k, v)


def time_op(ctx: Context, preset: str, op: str, shape: dict, device: str, gpu: str | None) -> list[dict]:
    from terrafm_bench.common import GPUS, peak_memory, roofline_floor_us, sync

    profile = ctx.profile
    dtype = getattr(torch, profile.timing_dtype)
    case = CASES.get(op)
    if case is None:
        from terrafm_bench.kernels import attention

        cost = attention.cost(shape, dtype.itemsize)
    else:
        cost = case.cost(shape, dtype.itemsize)
    base = {"op": op, "preset": preset, "shape": shape_label(shape), "dtype": profile.timing_dtype,
            "pass": "fwd+bwd" if case is not None and case.grads else "fwd", **cost}
    rows = []
    for name, (fn, why) in _providers(case, profile).items():
        row = {**base, "provider": name}
        rows.append(row)
        if fn is None:
            row["skipped"] = why
            continue
        try:
            if case is None:
                call = _attention_call(fn, shape, device, dtype)
            else:
                g = torch.Generator().manual_seed(0)
                inputs = case.make(shape, g)
                call = make_call(fn, case, leaves_for(case, inputs, device, dtype), case.scalars(shape),
                                 case.grad_out(shape, g))
            row.update(time_ms(call, lambda: sync(device), profile))
            row["gpu_ms"], row["gpu_kernels"] = device_ms(call, lambda: sync(device), device)
            if op == "dino_head_loss" and name != "compile":  # fused vs unfused footprint
                row["peak_bytes"] = peak_memory(call, device)["bytes"]
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            ctx.fail(f"{op} {name} at {preset} ({base['shape']}): {row['error']}")
            continue
        seconds = row["ms"] * 1e-3
        row["tflops_per_s"], row["tb_per_s"] = cost["flops"] / seconds / 1e12, cost["bytes"] / seconds / 1e12
        if gpu is not None:
            peak = "tflops_bf16" if case is None or case.uses_dot else "tflops_fp32"  # tensor cores or FMA units
            floor_us = roofline_floor_us(cost, gpu, peak)
            spec = GPUS[gpu]
            row.update(floor_us=floor_us, pct_of_roofline=100 * floor_us / (row["ms"] * 1e3),
                       bound="memory" if cost["bytes"] / spec["tb_per_s"] > cost["flops"] / spec[peak] else "compute")
            if row["gpu_ms"]:
                row["gpu_pct_of_roofline"] = 100 * floor_us / (row["gpu_ms"] * 1e3)
    timed = {r["provider"]: r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r and r["provider"] in ("kernel", "sdpa", "flash_attn"):
            r.update({f"speedup_vs_{p}": timed[p] / r["ms"] for p in ("eager", "compile") if p in timed})
    return rows


def timing(ctx: Context) -> None:
    from terrafm_bench.common import device_gpu_name

    device = require_device(ctx)
    gpu = ctx.profile.roofline_gpu or device_gpu_name()
    ctx.figures.update(dtype=ctx.profile.timing_dtype, roofline_gpu=gpu, compile_backend=ctx.profile.compile_backend,
                       note="ms: wall time per call of back-to-back calls; host ms: the time to issue one (near ms: "
                            "the host, not the GPU, sets the pace); GPU ms: the kernels' own time per call "
                            "(torch.profiler), on which 'GPU % of roofline' is computed. Inputs that fit in L2 stay "
                            "there across the back-to-back calls: over 100% of the HBM roofline means L2-resident"
                       if device == "cuda" else
                       "CPU run: the Triton interpreter and toy shapes; the times say nothing about a GPU")
    if gpu is None:
        ctx.figures["roofline_note"] = "no roofline for this GPU (bench.common.GPUS lists H100, H200, A100)"
    rows = ctx.figures.setdefault("rows", [])
    for preset, op, shape in preset_shapes(ctx.profile):
        if ctx.time_left() < 25:
            rows.append({"op": op, "preset": preset, "shape": shape_label(shape),
                         "skipped": "the stage's time budget is spent (rows are ordered ViT-B first)"})
            continue
        t0 = time.perf_counter()
        new = time_op(ctx, preset, op, shape, device, gpu)
        rows += new
        ctx.save()
        summary = ", ".join(f"{r['provider']} {r['ms']:.3f} ms" if "ms" in r else f"{r['provider']} -" for r in new)
        print(f"  {op:18s} {preset:10s} {summary} ({time.perf_counter() - t0:.1f} s)", flush=True)
