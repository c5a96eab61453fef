"""Observability for the trainer: MFU peak, rank-0 progress bar, JSONL + TensorBoard, curves.

Only rank 0 writes anything. `metrics.jsonl` has one JSON object per logged step; on resume records
after the resumed step are dropped (all of them when the checkpoint is another run's), so the file always
describes one consistent trajectory.
"""

import json
import math
import threading
from pathlib import Path

import torch

from terrafm.fileio import atomic_write_bytes

# The one table of GPU figures; a device matches a row by the first word of its key ("H100" in "NVIDIA H100 ..."),
# unless it is a variant with other figures (gpu_name).
from terrafm_kernels.gpus import GPUS


def peak_flops(device: torch.device, precision: str, override_tflops: float) -> float | None:
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU, unlisted GPU).

    The peak of the math the matmuls run in: bf16 tensor cores with precision=bf16; with fp32, TF32 tensor
    cores only where torch is allowed to use them (torch.set_float32_matmul_precision "high"/"medium"),
    else ("highest", torch's default) the FMA units' fp32 peak, about 7x lower."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    gpu = gpu_name(torch.cuda.get_device_name(device))
    if gpu is None:
        return None
    if precision == "bf16":
        key = "tflops_bf16"
    else:
        key = "tflops_fp32" if torch.get_float32_matmul_precision() == "highest" else "tflops_tf32"
    return GPUS[gpu][key] * 1e12


OTHER_VARIANTS = ("PCIE", "NVL", "40GB", "GH200")  # other peaks or bandwidth than the SXM rows of GPUS


def gpu_name(device_name: str) -> str | None:
    """The GPUS key a CUDA device name matches ("NVIDIA H100 80GB HBM3" -> "H100 SXM", "NVIDIA A100-SXM4-80GB" ->
    "A100 SXM 80GB"), or None for a GPU we have no figures for, including the variants of a listed one with other
    peaks or bandwidth (H100 PCIe: 756 dense bf16 TFLOP/s, not 989; H100 NVL; A100 40GB; GH200): MFU then needs
    train.peak_tflops rather than the SXM figures."""
    if any(v in device_name.upper() for v in OTHER_VARIANTS):
        return None
    for key in GPUS:
        if key.split()[0] in device_name:
            return key
    return None


def _step(line: str) -> float:
    """The step of one metrics.jsonl line; inf for a line that is not a record (a torn last line), so it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: nesting past the stack
        return math.inf


class MetricsLogger:
    """JSONL + TensorBoard + tqdm on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, own_history: bool = True):
        """own_history: the run continues its own records up to start_step (a resume from its own checkpoint);
        False drops them all (a fresh run, or one that starts from another run's checkpoint)."""
        self.enabled = rank == 0
        kept_step = start_step if own_history else -1
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        self.closed = False
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # resume: keep only the records up to the checkpoint we resume from
            kept = [line for line in self.path.read_text(errors="replace").splitlines() if _step(line) <= kept_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        self.write_failed = False
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=kept_step + 1)
        self._thread_hook = threading.excepthook
        threading.excepthook = self._quiet_tensorboard_thread
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: NaN / inf (teacher_cosine at batch 1) are written null
        line = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                          allow_nan=False) + "\n"
        try:
            self._append(line.encode())
        except OSError as err:  # a full disk: say so once and train on; the next checkpoint write stops the run
            if not self.write_failed:
                self.bar.write(f"warning: cannot append to {self.path} ({err.strerror or err}); training goes on, "
                               "and metrics are appended again once it can be written")
            self.write_failed = True
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        self._tensorboard(lambda tb: [tb.add_scalar(f"train/{k}", v, step) for k, v in scalars.items()])
        mfu = record.get("mfu")
        monitors = {}
        if record.get("teacher_entropy_gap") is not None:  # absent with ssl.fused_head_loss
            monitors = dict(gap=f"{record['teacher_entropy_gap']:.2f}", protos=f"{record['teacher_prototypes']:.0f}")
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **monitors, img_s=f"{record['img_per_s']:.1f}",
            mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", mem=f"{record['mem_gb']:.1f}G",
        )

    def _append(self, data: bytes) -> None:
        """Append `data` whole or not at all: a full disk takes the first bytes of a line into the file's last block,
        and the next record, appended once there is space, was glued to that fragment (both unreadable)."""
        with open(self.path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                written = 0
                while written < len(data):  # an unbuffered write may write less than asked before it fails
                    written += f.write(data[written:])
            except OSError:
                f.truncate(start)
                raise

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def _tensorboard(self, write) -> None:
        """write(SummaryWriter), unless TensorBoard has stopped: a full disk stops it for the rest of the run (its
        writer thread has died) with one warning, and training goes on like metrics.jsonl's."""
        if self.tb is None:
            return
        try:
            write(self.tb)
        except OSError as err:
            self.bar.write(f"warning: cannot write TensorBoard events ({err.strerror or err}); TensorBoard logging "
                           f"stops for this run, {self.path.name} goes on")
            self.tb = None

    def _quiet_tensorboard_thread(self, args) -> None:
        """TensorBoard's writer thread prints a traceback when its disk is full; _tensorboard reports it once."""
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        self._thread_hook(args)

    def close(self) -> None:
        """Close the progress bar and TensorBoard writer, restore threading.excepthook; a second call does nothing."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        self.bar.close()
        self._tensorboard(lambda tb: tb.close())
        threading.excepthook = self._thread_hook


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss and learning-rate curves from metrics.jsonl into one PNG (matplotlib Agg backend)."""
    if not metrics_path.exists():
        return None
    records = []
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            records.append({k: float(record[k]) for k in ("step", "loss", "lr")})
        except (ValueError, TypeError, KeyError, RecursionError):  # a torn or foreign line: the curves skip it
            continue
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(xlabel="step", ylabel="DINO loss", title="loss")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
