"""gpu_check stages `train_step` and `data`: the real trainer and the real loader on generated sample data.

train_step runs `terrafm pretrain` (the CLI a user runs) on the preset with overrides for steps and data,
once with the unfused head and once with `ssl.fused_head_loss`, and reads what the trainer itself records:
metrics.jsonl (img/s, MFU, peak memory per logged window) and its torch.profiler trace (top kernels).
The windows that include compilation or the profiler are left out of the steady-state figures. Then the
bench step rows (bench/step.py: ViT-S/B/L, one process, no compile) if time is left.
"""

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from .gpu_check import Context, require_device, wait_for_data

HEADS = ("unfused", "fused")
SECOND_RUN_S = 75


def top_kernels(trace: Path, n: int = 15, steps: int = 1) -> dict:
    """The n largest entries of a torch.profiler chrome trace by total time: GPU kernels, else CPU ops. steps: how
    many optimiser steps the trace holds (its totals are theirs together, not one step's)."""
    events = json.loads(trace.read_text())["traceEvents"]
    chosen = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    what = "GPU kernels"
    if not chosen:
        chosen = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
        what = "CPU ops, inclusive time (the trace has no GPU kernels)"
    total_us, calls = defaultdict(float), defaultdict(int)
    for e in chosen:
        total_us[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    everything = sum(total_us.values()) or 1.0
    rows = [{"name": name[:160], "calls": calls[name], "total_ms": us / 1e3, "pct": 100 * us / everything}
            for name, us in sorted(total_us.items(), key=lambda kv: -kv[1])[:n]]
    return {"what": what, "total_ms": everything / 1e3, "steps": steps, "rows": rows}


def steady_rates(windows: list[dict]) -> dict:
    """img_per_s and mfu over metrics.jsonl windows (log_every steps each) as total work / total time, step_time_s
    and data_wait_s as means. A plain mean of the windows' rates overweights the fast ones (145 img/s reported
    where 97 ran on the H200)."""
    seconds = sum(r["step_time_s"] for r in windows)

    def rate(key: str) -> float | None:
        if any(r.get(key) is None for r in windows):
            return None
        return sum(r[key] * r["step_time_s"] for r in windows) / seconds

    return {"img_per_s": rate("img_per_s"), "step_time_s": statistics.mean(r["step_time_s"] for r in windows),
            "data_wait_s": statistics.mean(r["data_wait_s"] for r in windows), "mfu": rate("mfu")}


def run_trainer(ctx: Context, head: str, shard_dir: Path, timeout: float) -> dict:
    """One `terrafm pretrain` run; its figures, or the tail of its output when it failed."""
    p = ctx.profile
    run_dir = ctx.work / "runs" / head
    shutil.rmtree(run_dir, ignore_errors=True)
    first, last = p.profile_steps
    cmd = [sys.executable, "-m", "terrafm.cli", "pretrain", "--config", p.train_preset, "--out", str(run_dir),
           *p.train_overrides, f"data.shard_dir={shard_dir}", f"ssl.fused_head_loss={str(head == 'fused').lower()}",
           f"train.max_steps={p.train_steps}", f"train.log_every={p.log_every}", "train.profile=true",
           f"train.profile_steps=[{first},{last}]"]
    row = {"head": head, "command": "terrafm pretrain " + " ".join(cmd[4:])}
    print(f"  {row['command']}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 10))
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        row.update(wall_s=round(time.perf_counter() - t0, 1), error=f"timed out after {max(timeout, 10):.0f} s",
                   output_tail=out[-3000:])
        return row
    row.update(wall_s=round(time.perf_counter() - t0, 1), exit_code=proc.returncode)
    if proc.returncode != 0:
        row.update(error=f"exited with {proc.returncode}", output_tail=(proc.stdout + proc.stderr)[-3000:])
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in records if r["step"] - p.log_every >= last] or records[-1:]
    row.update(steps=records[-1]["step"], steady_steps=[r["step"] for r in steady], **steady_rates(steady),
               peak_memory_gb=max(r["mem_gb"] for r in records),
               loss_first=records[0]["loss"], loss_last=records[-1]["loss"],
               top_kernels=top_kernels(run_dir / "profile" / "trace_rank0.json", steps=last - first))
    return row


def train_step(ctx: Context) -> None:
    from terrafm.config import load_config

    device = require_device(ctx)
    p = ctx.profile
    cfg = load_config(p.train_preset, list(p.train_overrides))
    ctx.figures.update(preset=p.train_preset, compile=cfg.train.compile, precision=cfg.train.precision,
                       batch_size=cfg.data.batch_size, model=cfg.model.name, num_prototypes=cfg.ssl.num_prototypes,
                       memory_how="torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS")
    shard_dir = wait_for_data(ctx, "train")
    runs = ctx.figures.setdefault("runs", [])
    for i, head in enumerate(HEADS):
        # the first run compiles from scratch; the second reuses inductor's and Triton's on-disk caches,
        # so it is kept SECOND_RUN_S only
        row = run_trainer(ctx, head, shard_dir, ctx.time_left() - 15 - (SECOND_RUN_S if i == 0 else 0))
        runs.append(row)
        ctx.save()
        if "error" in row:
            ctx.fail(f"terrafm pretrain with the {head} head: {row['error']}")
        else:
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            print(f"  {head:8s} {row['img_per_s']:.1f} img/s  MFU {mfu}  peak {row['peak_memory_gb']:.1f} GB  "
                  f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}  ({row['wall_s']:.0f} s)", flush=True)
    ctx.figures["bench_step"] = bench_step(device, ctx.time_left() - 5)
    if "error" in ctx.figures["bench_step"]:
        ctx.fail(ctx.figures["bench_step"]["error"])


def bench_step(device: str, timeout: float) -> dict:
    """bench/step.py's rows (ViT-S/B/L on a GPU, tiny on CPU), in a subprocess: out of time, they are skipped
    without taking the stage's trainer figures down with them."""
    if timeout < 40:
        return {"skipped": f"only {timeout:.0f} s left in the stage"}
    code = ("import json, sys; from terrafm_bench import step; "
            "print(json.dumps(step.run(sys.argv[1], True, lambda m: print(m, file=sys.stderr, flush=True))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s (the stage's time was spent)"}
    print(proc.stderr, end="", flush=True)
    if proc.returncode != 0:
        return {"error": f"bench/step.py exited with {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return {"rows": json.loads(proc.stdout.strip().splitlines()[-1])}


def data(ctx: Context) -> None:
    from terrafm.data.throughput import measure_paths

    shard_dir = wait_for_data(ctx, "loader")
    ctx.figures["loader"] = ctx.profile.loader
    rows = ctx.figures["rows"] = []

    def keep(row: dict) -> None:  # a stage killed at its limit still reports the paths it measured
        rows.append(row)
        ctx.save()

    measure_paths(shard_dir, **ctx.profile.loader, on_row=keep)
    for r in rows:
        if "skipped" in r:
            print(f"  {r['path']:18s} skipped: {r['skipped']}", flush=True)
            if r["path"] in ("numpy", "cpp", "geotiff_baseline"):
                ctx.fail(f"data path {r['path']} did not run: {r['skipped']}")
        else:
            print(f"  {r['path']:18s} {r['tiles_per_s']:8.1f} tiles/s  {r['views_per_s']:8.1f} views/s", flush=True)
