"""The stages of `scripts/gpu_check.sh`: check and time everything GPU-side in one prepared command.

A GPU machine is lent rarely and briefly (one H200, minutes, no network), so one command must prove the GPU
code correct and produce every figure the README marks "needs a GPU". The shell script runs each stage in its
own process under its own timeout, in this order:

    env                 GPU, driver, versions, the backend `terrafm info` resolves for each op
    build               `pip install --no-deps --no-build-isolation --no-index -e .` (builds csrc/), then imports it
    kernel_correctness  every Triton kernel, forward and backward, vs float64 (flash-attn's 2x rule), fp32/fp16/bf16
    kernel_timing       each kernel vs eager and torch.compile of its reference at the presets' shapes; % roofline
    train_step          `terrafm pretrain --config vitb_h100` for 20 steps, unfused and fused head: img/s, MFU,
                        peak memory, the profiler's top 15 kernels; then the bench step rows (ViT-S/B/L)
    data                loader tiles/s with 16 workers at 534 px tiles and 224/96 px crops: numpy vs C++ (vs DALI)
    summary             the tables of the report (docs/bench.md's GPU section shows them)

Each stage writes WORK/stages/<name>.json ({status, failures, ...figures}, rewritten as it goes, so a stage
killed by its timeout keeps what it measured); `report` merges them into OUT/gpu_report.json and .md.
`--mode cpu` runs the same code at toy shapes on CPU (Triton kernels under TRITON_INTERPRET=1): every choice
that differs between the modes is a field of PROFILES, picked once at the top.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from terrafm.fileio import atomic_write_bytes

STAGES = ("env", "build", "kernel_correctness", "kernel_timing", "train_step", "data", "summary")
ROOT = Path(__file__).resolve().parent.parent  # the checkout (bench/ is installed editable or put on PYTHONPATH)
# Registry ops with a Triton kernel: `terrafm info` must resolve each to "triton" on CUDA.
TRITON_OPS = ("patch_embed", "cross_attention_fusion", "teacher_softmax", "dino_cross_entropy", "dino_head_loss")


@dataclass(frozen=True)
class Profile:
    """Everything that differs between a GPU run and the CPU (--cpu) run of the same stages."""

    device: str
    presets: tuple[tuple[str, tuple[str, ...]], ...]  # (preset, overrides): the kernels' production shapes
    toy_dims: dict  # replaces widths read from the presets (gpu_check_kernels.preset_dims): interpreter-sized
    ibot_rows: int  # Sinkhorn-Knopp also runs at iBOT's masked patch rows per GPU (dino_teacher.PRODUCTION_ROWS)
    timing_dtype: str  # dtype of the timed calls
    compile_backend: str  # torch.compile backend of the "compile" provider
    roofline_gpu: str | None  # bench.common.GPUS key for % of roofline; None = the GPU found here
    warmup: int  # timing: untimed calls, then batches of calls lasting >= batch_s each
    batch_s: float
    batches: int
    train_preset: str
    train_overrides: tuple[str, ...]
    train_steps: int
    log_every: int
    profile_steps: tuple[int, int]  # [first, last) optimiser steps traced by torch.profiler
    train_data: tuple[int, int]  # (cells, tile px) of the sample set for train_step (4 locations per cell)
    loader_data: tuple[int, int]  # the same for the data stage: real 534 px tiles on a GPU machine
    loader: dict = field(default_factory=dict)  # measure_paths keyword arguments


PROFILES = {
    "gpu": Profile(
        device="cuda", presets=(("vitb_h100", ()), ("vitl_h100", ())), toy_dims={}, ibot_rows=3760,
        timing_dtype="bfloat16",
        compile_backend="inductor", roofline_gpu=None, warmup=3, batch_s=0.02, batches=5,
        train_preset="vitb_h100",
        # 14 loader threads on the 16-core GPU machine (no DALI there: views render on the host); with 8 the first
        # H200 run's 145-169 img/s were of the order the host path supplies, so the loader may have set the pace
        train_overrides=("train.checkpoint_every=1000", "data.num_workers=14"),
        train_steps=20, log_every=5, profile_steps=(6, 8),
        train_data=(128, 240), loader_data=(16, 534),
        loader=dict(seconds=3.0, batch_size=4, n_local=8, global_size=224, local_size=96, num_workers=16)),
    # Toy shapes: the tiny_cpu preset shrunk so the Triton interpreter takes seconds. torch.compile uses
    # aot_eager (dynamo + AOT autograd, no codegen) and the trainer runs uncompiled: inductor's CPU
    # compile takes minutes on 2 shared cores (tests/train/test_trainer.py covers the compiled trainer).
    "cpu": Profile(
        device="cpu", presets=(("tiny_cpu", ("data.batch_size=2", "data.n_local=2", "data.global_size=32",
                                             "model.img_size=32", "ssl.num_prototypes=300",
                                             "ssl.head_bottleneck_dim=32")),),
        toy_dims={"D": 16, "heads": 2, "fusion_heads": 4}, ibot_rows=40,
        timing_dtype="float32", compile_backend="aot_eager", roofline_gpu="H200 SXM", warmup=0, batch_s=0.0,
        batches=1, train_preset="tiny_cpu",
        train_overrides=("train.compile=false", "data.batch_size=2", "data.n_local=2", "data.global_size=32",
                         "data.local_size=16", "model.img_size=32", "data.num_workers=1"),
        train_steps=4, log_every=1, profile_steps=(1, 2),
        train_data=(2, 48), loader_data=(2, 48),
        loader=dict(seconds=0.5, batch_size=2, n_local=2, global_size=32, local_size=16, num_workers=2)),
}


class Skipped(Exception):
    """Raised by a stage that cannot run here, with the reason (status "skipped", not "failed")."""


@dataclass
class Context:
    """One stage's run: where it writes, its mode, its deadline and the figures it has so far."""

    name: str
    mode: str
    work: Path
    deadline: float  # time.monotonic() by which the stage must have written its result
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def profile(self) -> Profile:
        return PROFILES[self.mode]

    @property
    def path(self) -> Path:
        return self.work / "stages" / f"{self.name}.json"

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def fail(self, message: str) -> None:
        print(f"  FAILED: {message}", flush=True)
        self.failures.append(message)

    def save(self, status: str = "running") -> None:
        """Write the result so far (atomically: the report never reads half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps({"status": status, "failures": self.failures, **self.figures},
                                                 indent=1, default=str).encode())


def require_device(ctx: Context) -> str:
    """The stage's device; a GPU run on a machine without CUDA fails here, with what to do instead."""
    import torch

    device = ctx.profile.device
    if device == "cuda" and not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise RuntimeError(f"{why}: this is the GPU check; on a machine without a GPU run it with --cpu")
    return device


# -- env -----------------------------------------------------------------------------------------

def op_backends(info: dict) -> dict[str, dict[str, str]]:
    """op -> {device: backend} from `terrafm info --json`. The one place that reads that output's layout."""
    return {op: dict(per_device) for op, per_device in info["ops"].items()}


def terrafm_info() -> dict:
    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "info", "--json"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"terrafm info exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def missing_dependencies() -> list[str]:
    """pyproject.toml's dependencies whose module is not installed here (the GPU image lacks some)."""
    import importlib.util
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    modules = {"pyyaml": "yaml"}
    missing = []
    for dep in deps:
        name = re.split(r"[<>=!;\[ ]", dep, maxsplit=1)[0].strip()
        if importlib.util.find_spec(modules.get(name.lower(), name.replace("-", "_"))) is None:
            missing.append(name)
    return missing


def nvidia_smi() -> str:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"not available ({type(err).__name__})"
    return proc.stdout.strip() or proc.stderr.strip()


def env(ctx: Context) -> None:
    import platform

    import torch

    from terrafm_bench.common import git_revision

    f = ctx.figures
    f.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
             cpu_count=os.cpu_count(), hostname=platform.node(), git_revision=git_revision(),
             nvidia_smi=nvidia_smi(), missing_dependencies=missing_dependencies())
    try:
        import triton

        f["triton"] = triton.__version__
    except ImportError as err:
        f["triton"] = None
        ctx.fail(f"triton does not import: {err}")
    info = terrafm_info()
    f["backends"] = info["backends"]
    f["ops"] = op_backends(info)
    device = require_device(ctx)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        f.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                 gpu_memory_gb=round(props.total_memory / 1e9, 1))
        wrong = {op: d.get("cuda") for op, d in f["ops"].items() if op in TRITON_OPS and d.get("cuda") != "triton"}
        if wrong:
            ctx.fail(f"ops that do not resolve to their Triton kernel on CUDA: {wrong}")
    else:
        f["gpu"] = None


# -- build ---------------------------------------------------------------------------------------

def build(ctx: Context) -> None:
    """The editable install exactly as the issue gives it; then a clean process (no PYTHONPATH) imports it."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(ctx.time_left() - 20, 10), cwd=ROOT)
    ctx.figures.update(command=" ".join(cmd[2:]), pip_seconds=round(time.perf_counter() - t0, 1),
                       pip_exit_code=proc.returncode)
    if proc.returncode != 0:
        ctx.figures["pip_output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        ctx.fail(f"pip install exited with {proc.returncode} (see pip_output_tail)")
        return
    probe = ("import json, terrafm, terrafm_kernels, terrafm_bench; from terrafm import backends; "
             "c = backends.csrc(); print(json.dumps({'terrafm': terrafm.__file__, 'csrc': c.usable, "
             "'csrc_detail': c.detail}))")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=clean,
                          cwd="/")
    if proc.returncode != 0:
        ctx.fail(f"the installed package does not import: {proc.stderr.strip()[-500:]}")
        return
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    ctx.figures.update(installed_from=found["terrafm"], csrc=found["csrc"], csrc_detail=found["csrc_detail"])
    if not found["csrc"]:
        ctx.fail(f"csrc (terrafm._C) is not usable after the install: {found['csrc_detail']}")
    if not Path(found["terrafm"]).resolve().is_relative_to(ROOT):
        ctx.fail(f"terrafm imports from {found['terrafm']}, not from this checkout {ROOT}")


# -- sample data (made in the background while the kernel stages run) ----------------------------

DATA_KINDS = ("train", "loader")


def prepare_data(work: Path, mode: str) -> int:
    """Generate both synthetic sample sets; WORK/data/<kind>.json says where each is (or why it failed),
    so a stage waiting for one never waits for a generator that is gone."""
    profile, status = PROFILES[mode], 0
    for kind, (cells, tile) in zip(DATA_KINDS, (profile.train_data, profile.loader_data), strict=True):
        t0 = time.perf_counter()
        try:
            from terrafm.data.sample import ensure_sample_shards

            shard_dir = ensure_sample_shards(work / "data", seed=0, cells=cells, tile_size=tile)
            result = {"shard_dir": str(shard_dir), "cells": cells, "tile_size": tile, "locations": 4 * cells}
        except Exception as err:
            result, status = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, 1
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"sample set {kind}: {result}", flush=True)
        atomic_write_bytes(work / "data" / f"{kind}.json", json.dumps(result).encode())  # never read half-written
    return status


def wait_for_data(ctx: Context, kind: str) -> Path:
    """The shard directory of sample set `kind`, waiting for the background generator up to the deadline."""
    marker = ctx.work / "data" / f"{kind}.json"
    t0 = time.monotonic()
    while not marker.exists():
        if ctx.time_left() < 30:
            raise RuntimeError(f"the {kind} sample set was not ready after {time.monotonic() - t0:.0f} s "
                               f"(see {ctx.work / 'prepare-data.log'})")
        time.sleep(1.0)
    result = json.loads(marker.read_text())
    ctx.figures[f"{kind}_data"] = {**result, "waited_s": round(time.monotonic() - t0, 1)}
    if "error" in result:
        raise RuntimeError(f"generating the {kind} sample set failed: {result['error']}")
    return Path(result["shard_dir"])


# -- running one stage ---------------------------------------------------------------------------

def _stage_function(name: str):
    if name in ("env", "build"):
        return globals()[name]
    if name in ("kernel_correctness", "kernel_timing"):
        from terrafm_bench import gpu_check_kernels

        return getattr(gpu_check_kernels, name.removeprefix("kernel_"))
    if name in ("train_step", "data"):
        from terrafm_bench import gpu_check_train

        return getattr(gpu_check_train, name)
    from terrafm_bench import gpu_check_report

    return gpu_check_report.summary


def run_stage(name: str, mode: str, work: Path, budget: float) -> int:
    """Run one stage and write its result; exit code 1 when it failed. Exceptions are results, not crashes."""
    ctx = Context(name, mode, work, time.monotonic() + budget - 5)
    print(f"== {name} ({mode}, {budget:.0f} s)", flush=True)
    ctx.save()
    status = "ok"
    try:
        _stage_function(name)(ctx)
    except Skipped as why:
        status, ctx.figures["reason"] = "skipped", str(why)
    except KeyboardInterrupt:  # gpu_check.sh passes on a Ctrl-C: a result that says so, with the figures so far
        ctx.fail("interrupted (Ctrl-C)")
    except Exception as err:
        ctx.fail(f"{type(err).__name__}: {err}")
        ctx.figures["traceback"] = traceback.format_exc()[-4000:]
    if ctx.failures and status == "ok":
        status = "failed"
    ctx.save(status)
    print(f"== {name}: {status}", flush=True)
    return 1 if status == "failed" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrafm_bench.gpu_check",
                                     description="The stages of scripts/gpu_check.sh (run that script, not this).")
    parser.add_argument("command", choices=("stage", "prepare-data", "report"))
    parser.add_argument("stage", nargs="?", choices=STAGES)
    parser.add_argument("--work", type=Path, required=True, help="the run's scratch folder")
    parser.add_argument("--mode", choices=tuple(PROFILES), default="gpu")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds this stage may take")
    parser.add_argument("--out", type=Path, help="report: where gpu_report.json/.md go")
    parser.add_argument("--selected", default=",".join(STAGES), help="report: the stages that were asked for")
    args = parser.parse_args(argv)
    if args.mode == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    if args.command == "stage":
        if args.stage is None:
            parser.error("stage needs a stage name")
        return run_stage(args.stage, args.mode, args.work, args.budget)
    if args.command == "prepare-data":
        (args.work / "data").mkdir(parents=True, exist_ok=True)
        return prepare_data(args.work, args.mode)
    if args.out is None:
        parser.error("report needs --out")
    from terrafm_bench import gpu_check_report

    return gpu_check_report.report(args.work, args.out, args.mode, args.selected.split(","))


if __name__ == "__main__":
    sys.exit(main())
