"""gpu_check's `summary` stage (the tables docs/bench.md's GPU section shows) and the final report.

`report` runs after every stage, whatever happened: a stage with no result file, or one still marked
"running", failed (its process timed out or crashed; the exit code says which); a stage that was not run
is "skipped" with the reason. It writes OUT/gpu_report.json ({"stages": name -> {status, seconds, ...}})
and OUT/gpu_report.md (stage table, the summary's tables, every failure).
"""

import datetime
import json
from pathlib import Path

from terrafm.fileio import atomic_write_bytes

from .gpu_check import STAGES, Context
from .markdown import mib, table


def _f(value, fmt: str = ".3g", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _env(s: dict) -> list[str]:
    lines = ["## Environment", ""]
    lines += table(["GPU", "nvidia-smi (name, driver, memory, max SM clock)", "torch", "triton", "python", "CPUs"],
                   [[s.get("gpu") or "none (CPU run)", s.get("nvidia_smi", "-"), s.get("torch"), s.get("triton"),
                     s.get("python"), s.get("cpu_count")]])
    if s.get("ops"):
        devices = sorted({d for per in s["ops"].values() for d in per})
        lines += table(["op (terrafm info)", *devices], [[op, *(per.get(d, "-") for d in devices)]
                                                         for op, per in s["ops"].items()])
    if s.get("missing_dependencies"):
        lines += [f"Declared dependencies that do not import here: {', '.join(s['missing_dependencies'])}.", ""]
    return lines


def _correctness(s: dict) -> list[str]:
    lines = ["## Kernel correctness (forward + backward vs float64; flash-attn's 2x rule)", "",
             f"{s.get('passed', 0)} of {s.get('checked', 0)} checked cases pass, {s.get('skipped', 0)} skipped. "
             "Margin = worst over outputs and gradients of error / (2 x plain PyTorch's error + atol): < 1 passes.", ""]
    rows = []
    for r in s.get("rows", []):
        margin = max((c["err"] / (2 * c["plain_err"] + c["atol"]) for c in r.get("checks", [])), default=None)
        result = r.get("skipped") and f"skipped: {r['skipped']}" or ("ok" if r.get("ok") else
                                                                    f"FAILED {r.get('error', '')}")
        native = ", ".join(f"{name} {ratio:.2f}" for name, ratio in r.get("native_vs_plain", {}).items()) or "-"
        rows.append([r["op"], r["preset"], r["shape"], r["dtype"], result, _f(margin, ".2f"), native])
    lines += table(["op", "preset", "shape", "dtype", "result", "margin", "torch module / plain error"], rows)
    return lines + ["The last column, where plain emulates torch's own module (fp32 patch_embed: the reference with "
                    "tf32 operands, as nn.Conv2d computes on a GPU at torch's default), is the ratio of the module's "
                    "error to plain's per output and gradient (the sums of bias and embeddings read 1): near 1 on a "
                    "GPU says the emulation holds the kernel to cuDNN's own bar; on a CPU, torch's convolution is "
                    "IEEE fp32 and reads far below 1.",
                    ""]


def _timing(s: dict) -> list[str]:
    lines = [f"## Kernel timing ({s.get('dtype')}; roofline of {s.get('roofline_gpu') or 'no known GPU'})", "",
             s.get("note", ""), ""]
    groups: dict[tuple, dict] = {}
    for r in s.get("rows", []):
        groups.setdefault((r["op"], r["preset"], r["shape"]), {})[r.get("provider", "-")] = r
    rows = []
    for (op, preset, shape), by in groups.items():
        fast = by.get("kernel") or by.get("sdpa") or {}
        parts = [f"{p}: {r['skipped']}" for p, r in by.items() if "skipped" in r]
        parts += [f"{p}: {r['error']}" for p, r in by.items() if "error" in r]
        if fast.get("gpu_kernels"):  # where the kernel path's GPU time goes, ms per call
            parts.append("GPU: " + ", ".join(f"{name.replace('|', '/')} {ms:.3f}" for name, ms in fast["gpu_kernels"]))
        note = "; ".join(parts)
        pct, gpu_pct = fast.get("pct_of_roofline"), fast.get("gpu_pct_of_roofline")
        eager, compiled = by.get("eager", {}), by.get("compile", {})
        rows.append([op, preset, shape, fast.get("pass", "-"), fast.get("provider", "-"), _f(fast.get("ms"), ".3f"),
                     _f(fast.get("host_ms"), ".3f"), _f(fast.get("gpu_ms"), ".3f"), _f(eager.get("ms"), ".3f"),
                     _f(eager.get("gpu_ms"), ".3f"), _f(compiled.get("ms"), ".3f"), _f(compiled.get("gpu_ms"), ".3f"),
                     _f(fast.get("speedup_vs_eager"), ".3g", "x"), _f(fast.get("speedup_vs_compile"), ".3g", "x"),
                     _f(fast.get("tflops_per_s")), _f(fast.get("tb_per_s")),
                     f"{pct:.0f}% ({fast.get('bound')})" if pct is not None else "-",
                     f"{gpu_pct:.0f}%" if gpu_pct is not None else "-", note])
    lines += table(["op", "preset", "shape", "pass", "fast path", "ms", "host ms", "GPU ms", "eager ms",
                    "eager GPU ms", "compile ms", "compile GPU ms", "vs eager", "vs compile", "TFLOP/s", "TB/s",
                    "% of roofline", "GPU % of roofline", "note"], rows)
    heads = [r for r in s.get("rows", []) if r["op"] == "dino_head_loss" and "peak_bytes" in r]
    if heads:
        lines += ["DINO head loss peak memory, fwd + bwd: " + ", ".join(
            f"{'fused' if r['provider'] == 'kernel' else 'unfused'} {mib(r['peak_bytes'], 0)} ({r['preset']})"
            for r in heads) + ".", ""]
    return lines


def _train(s: dict) -> list[str]:
    lines = [f"## Training step (`terrafm pretrain --config {s.get('preset')}`: {s.get('model')}, batch "
             f"{s.get('batch_size')} per GPU, K = {s.get('num_prototypes')}, compile {s.get('compile')}, "
             f"{s.get('precision')})", ""]
    rows = [[r["head"], _f(r.get("img_per_s"), ".1f"), _f(r.get("mfu") and 100 * r["mfu"], ".1f", "%"),
             _f(r.get("step_time_s") and 1e3 * r["step_time_s"], ".0f"),
             _f(None if r.get("data_wait_s") is None else 1e3 * r["data_wait_s"], ".0f"),
             _f(r.get("peak_memory_gb"), ".1f", " GB"),
             f"{_f(r.get('loss_first'), '.3f')} -> {_f(r.get('loss_last'), '.3f')}", _f(r.get("wall_s"), ".0f"),
             r.get("error", "")] for r in s.get("runs", [])]
    lines += table(["head", "img/s", "MFU", "step ms", "data wait ms", "peak memory", "loss", "run wall s", "error"],
                   rows)
    lines += [f"Steady state: the logged windows after the profiled steps; peak memory: {s.get('memory_how')}.", ""]
    for r in s.get("runs", []):
        top = r.get("top_kernels")
        if top:
            steps = top.get("steps", 1)
            lines += [f"Top {len(top['rows'])} {top['what']}, {r['head']} head (of {top['total_ms']:.1f} ms traced "
                      f"over {steps} step(s): {top['total_ms'] / steps:.1f} ms a step):", ""]
            lines += table(["name", "calls", "ms", "%"], [[t["name"][:90].replace("|", "/"), t["calls"],
                                                           f"{t['total_ms']:.2f}", f"{t['pct']:.1f}"]
                                                          for t in top["rows"]])
    bench = s.get("bench_step", {})
    if bench.get("rows"):
        lines += ["Bench step (bench/step.py: one process, no FSDP, no compile):", ""]
        lines += table(["config", "head", "batch", "img/s", "MFU", "peak memory", "note"],
                       [[r["config"], r.get("head"), r.get("batch", "-"), _f(r.get("img_per_s"), ".1f"),
                         _f(r.get("mfu") and 100 * r["mfu"], ".1f", "%"), mib(r.get("peak_bytes"), 0),
                         r.get("skipped") or r.get("mfu_note", "")] for r in bench["rows"]])
    elif bench:
        lines += [f"Bench step rows: {bench.get('skipped') or bench.get('error')}.", ""]
    return lines


def _data(s: dict) -> list[str]:
    cfg = s.get("loader", {})
    lines = [f"## Data loader ({cfg.get('num_workers')} workers, batch {cfg.get('batch_size')}, crops "
             f"{cfg.get('global_size')}/{cfg.get('local_size')} px, {s.get('loader_data', {}).get('tile_size')} px "
             "tiles)", ""]
    return lines + table(["path", "tiles/s", "views/s", "backend", "note"],
                         [[r["path"], _f(r.get("tiles_per_s"), ".1f"), _f(r.get("views_per_s"), ".1f"),
                           r.get("backend", "-"), r.get("skipped", "")] for r in s.get("rows", [])])


def render(stages: dict[str, dict]) -> str:
    """The summary tables from the stages' results (the ones present)."""
    lines = []
    for name, part in (("env", _env), ("kernel_correctness", _correctness), ("kernel_timing", _timing),
                       ("train_step", _train), ("data", _data)):
        if name in stages:
            lines += part(stages[name])
    return "\n".join(lines)


def _load(work: Path, name: str) -> dict | None:
    path = work / "stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary(ctx: Context) -> None:
    stages = {n: r for n in STAGES[:-1] if (r := _load(ctx.work, n)) is not None}
    ctx.figures["markdown"] = render(stages)


def collect(work: Path, selected: list[str]) -> dict[str, dict]:
    """name -> result for every stage, with the wrapper's exit code and wall time folded in."""
    stages = {}
    stopped = work / "stages" / "interrupted"  # the stages gpu_check.sh did not run after a Ctrl-C or SIGTERM
    interrupted = stopped.read_text().split() if stopped.exists() else []
    for name in STAGES:
        exit_file = work / "stages" / f"{name}.exit"
        if name not in selected:
            stages[name] = {"status": "skipped", "seconds": 0.0, "reason": "not selected (--stages)"}
            continue
        if not exit_file.exists():
            why = "the check was interrupted" if name in interrupted else "the check's time budget was spent"
            stages[name] = {"status": "skipped", "seconds": 0.0, "reason": f"not run: {why}"}
            continue
        rc, seconds, limit = (int(float(x)) for x in exit_file.read_text().split())
        result = _load(work, name) or {}
        if result.get("status") not in ("ok", "failed", "skipped"):
            why = (f"timed out after {limit} s" if rc in (124, 137) else
                   f"exited with code {rc} before writing its result")
            result = {**result, "status": "failed", "failures": [*result.get("failures", []), why]}
        stages[name] = {"status": result.pop("status"), **result, "seconds": float(seconds), "limit_s": limit,
                        "exit_code": rc}
    return stages


def report(work: Path, out: Path, mode: str, selected: list[str]) -> int:
    stages = collect(work, selected)
    env = stages["env"]
    result = {"mode": mode, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "gpu": env.get("gpu"), "nvidia_smi": env.get("nvidia_smi"), "git_revision": env.get("git_revision"),
              "total_seconds": sum(s["seconds"] for s in stages.values()),
              "all_ok": all(s["status"] == "ok" for n, s in stages.items() if n in selected), "stages": stages}
    out.mkdir(parents=True, exist_ok=True)
    # each file whole or not at all: a full disk or a kill keeps a previous run's report, never a torn one
    atomic_write_bytes(out / "gpu_report.json", json.dumps(result, indent=1, default=str).encode())
    lines = [f"# terrafm GPU check ({mode})", "",
             f"{result['created']} · {env.get('gpu') or 'no GPU'} · git {env.get('git_revision')} · "
             f"{result['total_seconds']:.0f} s", ""]
    lines += table(["stage", "status", "seconds", "limit", "first problem"],
                   [[n, s["status"], f"{s['seconds']:.0f}", s.get("limit_s", "-"),
                     (s.get("failures") or [s.get("reason", "")])[0][:200].replace("|", "/")]
                    for n, s in stages.items()])
    summary_md = stages["summary"].get("markdown")
    lines += [summary_md, ""] if summary_md else [render(stages), ""]
    failed = {n: s for n, s in stages.items() if s["status"] == "failed"}
    if failed:
        lines += ["## Failures", ""]
        for n, s in failed.items():
            lines += [f"### {n}", ""] + [f"- {f}" for f in s.get("failures", [])] + [""]
            for key in ("traceback", "pip_output_tail"):
                if s.get(key):
                    lines += ["```", s[key].strip()[-3000:], "```", ""]
    atomic_write_bytes(out / "gpu_report.md", "\n".join(lines).encode())
    for n, s in stages.items():
        print(f"  {n:20s} {s['status']:8s} {s['seconds']:6.0f} s")
    print(f"wrote {out / 'gpu_report.json'} and {out / 'gpu_report.md'}")
    return 0 if result["all_ok"] else 1
