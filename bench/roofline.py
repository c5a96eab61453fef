"""Roofline floor of every kernel shape on each GPU of common.GPUS (H100, H200, A100), and the measured fraction.

floor = max(FLOPs / peak, bytes / HBM bandwidth) from the kernel's roofline_cost at bf16, where peak is the dense
peak of the units the op computes on: the bf16 tensor cores for the ops built on dots (a bench module's
PEAK = "tflops_bf16", the default) or the fp32 FMA units for elementwise and broadcast math (PEAK = "tflops_fp32":
the fusion, softmax and cross-entropy ops). The measured fraction (floor / measured kernel time) needs the kernels
section run on one of those GPUs.
"""

from .common import GPUS, device_gpu_name, roofline_floor_us
from .kernels import OPS, load, shape_label


def run(kernel_rows: list[dict] | None, quick: bool, log) -> list[dict]:
    here = device_gpu_name()
    measured = {(r["op"], r["shape"]): r["ms"] for r in kernel_rows or []
                if r["provider"] == "kernel" and "ms" in r}
    rows = []
    for op in OPS:
        bench = load(op)
        shapes = bench.shapes(False) + (bench.shapes(True) if quick else [])  # analytic: production shapes too
        for shape in shapes:
            cost = bench.cost(shape)
            peak = getattr(bench, "PEAK", "tflops_bf16")
            row = {"op": op, "shape": shape_label(shape), "flops": cost["flops"], "bytes": cost["bytes"],
                   "intensity": cost["flops"] / max(cost["bytes"], 1), "peak": peak}
            for gpu in GPUS:
                key = gpu.split()[0]
                row[f"floor_us_{key}"] = roofline_floor_us(cost, gpu, peak)
            ms = measured.get((op, row["shape"]))
            if here and ms:
                row["measured_us"] = ms * 1e3
                row["fraction_of_roofline"] = row[f"floor_us_{here.split()[0]}"] / row["measured_us"]
            else:
                row["fraction_of_roofline"] = None
                row["fraction_note"] = ("needs an H100/H200/A100 GPU" if not here
                                        else "no kernel timing (kernels section not run or kernel absent)")
            rows.append(row)
            log(f"  {op:18s} {row['shape']:40s} floor H100 {row['floor_us_H100']:9.2f} us, "
                f"A100 {row['floor_us_A100']:9.2f} us")
    return rows
