"""The pretraining loop: read it top to bottom (nanoGPT style), from `train(cfg)`.

One optimiser step = `grad_accum_steps` micro-batches, each: teacher forward on the global views ->
dual-centred teacher probabilities -> student forward on all views -> DINO loss -> backward. Then one
small all-reduce (mean loss, stop and data-failure flags), NaN/Inf check, last-layer freeze, clipping (a non-finite
gradient norm skips the AdamW step), AdamW, centre update (one all-reduce), EMA teacher update on local
shards, logging, checkpointing.
All schedules are pure functions of the step, so a resumed run continues bitwise.
`_train` is that loop; the parts of a step are the functions above it, in the order the loop calls them
(torchtitan's layout): `forward_backward`, `reduce_status`, `optimizer_step`, `teacher_step`, `log_metrics`;
`restore` resumes from a checkpoint. Just above `_train`, its setup and reporting: `_resume_source` (which
checkpoint, if any), `_resume_notes` (what a resume changed), the non-finite messages and `_check_collapse`.
"""

import contextlib
import copy
import faulthandler
import gc
import json
import math
import os
import pickle
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from terrafm import backends, checkpoint_io, ops, stop_signals
from terrafm.config import Config, check_epoch, save_config, to_dict
from terrafm.data.shards import ShardError
from terrafm.data.views import View
from terrafm.fileio import atomic_write_bytes, nearest_existing, read_small, shown, try_lock
from terrafm.models import FUSION_SETTINGS, LEGACY_FUSION, fusion_settings
from terrafm.ssl import schedules
from terrafm.ssl.loss import high_frequency_classes
from terrafm.ssl.meta_arch import DINOModel, SSLMetaArch, backbone_factory, head_kwargs
from terrafm.ssl.monitors import collapse_state, teacher_monitors
from terrafm.train import checkpoint
from terrafm.train.export import input_metadata
from terrafm.train.metrics import MetricsLogger, peak_flops, plot_curves
from terrafm.train.parallelize import MESH_DIMS, check_gpus_per_node, mesh_shape, parallelize, reshard_model


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    pass


class NonFiniteGradError(TrainingError):
    pass


class CollapseError(TrainingError):
    """The teacher's targets collapsed and train.stop_on_collapse is set."""


class SetupError(TrainingError):
    """The run cannot start or continue as set up (output folder, data, checkpoint, disk): fix it and rerun."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimiser steps completed
    checkpoint: Path | None  # the newest complete checkpoint
    preempted: bool  # stopped by SIGTERM/SIGUSR1 after checkpointing
    probe: Any = None  # terrafm.eval.learning.ProbeResult of the end-of-run probe, when it ran (rank 0)
    interrupted: bool = False  # stopped by Ctrl-C after checkpointing


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    owns_process_group: bool


def init_distributed(cfg: Config) -> DistEnv:
    """Process group with the configured collective timeout, and the 2-D data-parallel mesh
    (dp_replicate x dp_shard, see terrafm.train.parallelize.mesh_shape); one process gets a world of 1.

    Under torchrun (RANK/WORLD_SIZE set) it joins the job's group: NCCL for CUDA tensors and gloo for
    CPU ones. A single process uses a HashStore, so FSDP2 and DCP run the same code path everywhere.
    """
    want = cfg.train.device
    use_cuda = want == "cuda" or (want == "auto" and backends.cuda().usable)
    if want == "cuda" and not backends.cuda().usable:
        raise SetupError(f"train.device=cuda but CUDA is not usable: {backends.cuda().detail}")
    if use_cuda and cfg.train.deterministic:  # refused at the first backward otherwise, after setup and compile
        raise SetupError("train.deterministic=true runs on the cpu only (bitwise resume, the tests): on CUDA torch has "
                         "no deterministic backward for the bicubic resize of the position embedding that local crops "
                         "take, nor for cuBLAS without CUBLAS_WORKSPACE_CONFIG, and stops the run at its first step; "
                         "drop it, or add train.device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:  # each rank of a node takes GPU LOCAL_RANK
        try:
            check_gpus_per_node(max(local_rank + 1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        except ValueError as err:
            raise SetupError(str(err)) from err
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    owns = False
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1:  # a rank that aborts (a C++ terminate, a segfault) prints every thread's Python stack
        faulthandler.enable(all_threads=True)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not cfg.train.fsdp and world > 1:
        raise SetupError("train.fsdp=false supports a single process only; set train.fsdp=true for torchrun")
    mesh = None
    if cfg.train.fsdp:  # always 2-D, so one code path (HSDP with 1 replica is FSDP)
        try:
            shape = mesh_shape(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, world,
                               int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        except ValueError as err:
            if owns:  # train()'s finally never sees this group
                dist.destroy_process_group()
            raise SetupError(f"parallel: {err}") from err
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    return DistEnv(rank, world, device, mesh, owns)


class PreemptionFlag:
    """Records SIGTERM / SIGUSR1 (SLURM preemption, --signal=USR1@120), Ctrl-C (SIGINT) and a hang-up (SIGHUP: the
    terminal or ssh session closed); acted on at the step end. Installed before setup, so a signal that arrives while
    the run is still starting stops it after its first step (checkpoint, exit 75, requeue) instead of killing it (exit
    143, no requeue). Ctrl-C and a hang-up stop the same way without the requeue (exit 130); a second Ctrl-C stops at
    once, without that checkpoint (a KeyboardInterrupt mid-save used to be a traceback, with the step's work since the
    last checkpoint lost). A hang-up killed the run without a checkpoint; under nohup (SIGHUP ignored) it still is
    ignored."""

    SIGNALS = stop_signals.SIGNALS
    INTERRUPTS = (signal.SIGINT, signal.SIGHUP)  # a person's stop, not the scheduler's: no requeue
    # a second SIGINT this soon after the first is the same stop delivered twice (`scancel --signal=INT` signals
    # every process of the step and torchrun forwards its own copy to the ranks), not a person's second Ctrl-C
    SAME_STOP_S = 1.0

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._stop_at = 0.0

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C or a hang-up: checkpoint, but no requeue."""
        return self.signum in self.INTERRUPTS

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                if time.monotonic() - self._stop_at < self.SAME_STOP_S:
                    return
                raise KeyboardInterrupt
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again, a second later, to stop now, "
                  "without it)", file=sys.stderr, flush=True)
            self.signum, self._stop_at = signum, time.monotonic()
        elif signum == signal.SIGHUP:
            _detach_from_terminal()
            if not self.interrupted:
                self.signum = signum
        elif not self.interrupted:  # torchrun answers the Ctrl-C it also got with SIGTERM: still no requeue
            self.signum = signum

    def install(self) -> None:
        for sig in self.SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive the terminal
            self._previous[sig] = stop_signals.original(sig, signal.signal(sig, self._handle))
        for signum in stop_signals.take():  # arrived while the command was still importing
            self._handle(signum, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that hung up: writing to it fails (EIO), and
    the progress line of the step still running would end the run before its checkpoint."""
    for fd in (1, 2):
        if os.isatty(fd):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


# Learned tokens and vectors that are not weight matrices, whatever their shape: the cls token, the position
# embedding, the per-sensor vectors added to every patch token (patch_embed.<modality>_embed, (1, attn_dim)) and
# the fusion's queries ((num_queries, attn_dim)). They are exempt as in timm's and MAE's ViTs (no_weight_decay);
# DINO and DINOv2 exempt only biases and norms, so they decay the cls token and position embedding (the
# difference measured negligible here: docs/training.md, stop 28).
NO_DECAY_SUFFIXES = ("cls_token", "_embed", "fusion.queries")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether a student parameter gets weight decay: weight matrices only, not biases, norms (ndim <= 1) or
    the learned tokens and vectors of NO_DECAY_SUFFIXES."""
    return param.ndim > 1 and not name.endswith(NO_DECAY_SUFFIXES)


def build_optimizer(student: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with two groups: weights decay (cosine schedule), biases/norms/tokens (`decays`) do not.

    implementation: apex FusedAdam (adam_w_mode) when usable, torch fused AdamW on CUDA, foreach on CPU.
    """
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]
    o = cfg.optim
    impl = o.implementation
    if impl == "auto":
        if backends.apex().usable and not cfg.train.fsdp:  # apex kernels take plain tensors, not DTensor shards
            impl = "apex"
        else:
            impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = dict(lr=0.0, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if impl == "apex":
        if not backends.apex().usable:
            raise SetupError(f"optim.implementation=apex but apex is not usable: {backends.apex().detail}")
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if impl == "fused" and device.type != "cuda":
        raise SetupError("optim.implementation=fused needs CUDA; use foreach or plain on CPU")
    return torch.optim.AdamW(groups, fused=impl == "fused" or None, foreach=impl == "foreach" or None, **kwargs)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, per_parameter: bool = True) -> float:
    """Clip the gradients across all ranks' shards; returns the global norm before clipping, read to the host
    (the step's one read: the trainer skips the update on a non-finite norm).

    per_parameter (DINO's clip_gradients, the method's recipe): each tensor's gradient is scaled to at most
    max_norm on its own; else all of them by one factor, to a global norm of at most max_norm (DINOv2 takes one
    such norm per module: backbone, each head). Each
    tensor's norm over its shards comes from one collective for all of them (a stack of partial norms). The
    per-tensor factors are applied from the host read as one foreach multiply by a list of numbers, which runs
    as a few fused kernels; a list of 0-d device tensors would be a kernel per tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack(torch._foreach_norm(grads))
    if isinstance(norms, DTensor):
        norms = norms.full_tensor()  # the shards' partial norms reduced over the mesh
    total = torch.linalg.vector_norm(norms)
    if not per_parameter:
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total.item()
    values = torch.cat([total[None], norms.float()]).tolist()
    if max_norm > 0:
        clipped = [(g, max_norm / (n + 1e-6)) for g, n in zip(grads, values[1:], strict=True) if n + 1e-6 > max_norm]
        if clipped:
            torch._foreach_mul_([g for g, _ in clipped], [s for _, s in clipped])
    return values[0]


def _value(loader: Any, name: str) -> Any:
    attr = getattr(loader, name)
    return attr() if callable(attr) else attr


def _views(views: list[View], device: torch.device) -> list[View]:
    """A ViewBatch's views on `device`."""
    return [{m: t.to(device, non_blocking=True) for m, t in v.items()} for v in views]


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB -> GB (process peak RSS)


def train(cfg: Config, resume: bool | str | Path = False, loader: Any = None) -> TrainResult:
    """Pretrain as configured. resume: False (fresh run; error if the run has checkpoints), True (the
    run's latest checkpoint when there is one) or a checkpoint path. `loader` replaces the configured
    one (tests); by default terrafm.data.loader.build_loader(cfg.data, rank, world_size, seed, device)."""
    stop = PreemptionFlag()  # from the start: a SLURM signal during setup (rendezvous, restore) must not kill the job
    stop.install()
    try:
        env = init_distributed(cfg)
        finished = False
        try:
            with contextlib.ExitStack() as held:  # what the run holds to its end: the run folder's lock
                result = _train(cfg, env, resume, loader, stop, held)
            finished = True
            return result
        finally:
            if env.owns_process_group:
                if finished and env.world_size > 1:
                    # the model, optimiser and FSDP state are reference cycles: free them (and any gloo work
                    # they hold) while the group and the interpreter are alive, then let no rank tear down
                    # its group while another still runs
                    gc.collect()
                    dist.barrier()
                dist.destroy_process_group()
    finally:
        stop.restore()


def resolve_ops(cfg: Config, device: torch.device) -> Config:
    """A copy of cfg with every op's backend decided for `device` (the one decision, recorded in the
    run's config.yaml, which --config takes back): `ops` gets a concrete backend per op, data.backend the
    view_rendering one; shard_decode is the loader's own choice (no config key), so it is not recorded."""
    cfg = copy.deepcopy(cfg)
    try:
        chosen = ops.resolve({**cfg.ops, "view_rendering": cfg.data.backend}, device.type)
    except (KeyError, ValueError, RuntimeError) as err:
        raise SetupError(f"ops: {err}") from err
    cfg.data.backend = chosen.pop("view_rendering")
    chosen.pop("shard_decode", None)
    cfg.ops = chosen
    return cfg


def export_profile(profiler: torch.profiler.profile, run_dir: Path, rank: int) -> None:
    """Stop the profiler and write its Chrome trace to RUN/profile/trace_rank<R>.json."""
    profiler.__exit__(None, None, None)
    (run_dir / "profile").mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(run_dir / "profile" / f"trace_rank{rank}.json"))


def check_run_dir(run_dir: Path) -> None:
    """Prove that the run folder can be written, before anything heavy is built, without creating it: a run
    that fails in its setup (bad data, bad resume) leaves no empty folder behind. A missing folder is probed
    in its nearest existing parent; so is its checkpoints/ folder (a file there, or a read-only one, used to stop
    the run at its first save, after the steps since were trained). A path that is not UTF-8 text (--out from bytes
    Linux allows in names) stopped the run with TensorBoard's traceback once the folder was made."""
    try:
        os.fsencode(run_dir).decode("utf-8")
    except UnicodeDecodeError as err:
        raise SetupError(f"cannot write the run folder {shown(run_dir)}: its path is not UTF-8 text (byte "
                         f"{hex(err.object[err.start])}), which TensorBoard cannot write to; choose another folder "
                         "with --out or train.out_dir / train.run_name") from err
    for folder in (run_dir, run_dir / "checkpoints"):
        probe = nearest_existing(folder)
        try:
            if not probe.is_dir():
                raise NotADirectoryError(20, f"{probe} is a file, not a folder", str(probe))
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            raise SetupError(f"cannot write the run folder {folder} ({err.strerror or err}); choose a writable "
                             "folder with --out or train.out_dir / train.run_name") from err


RUN_LOCK = ".lock"  # in the run folder: held (flock) by rank 0 of the run training there


def _claim(run_dir: Path, held: contextlib.ExitStack, env: DistEnv) -> None:
    """Rank 0 makes the run folder and holds its lock until `held` closes; every rank raises SetupError alike when
    it cannot (another live run holds it, or it cannot be written). Collective."""
    busy = None
    if env.rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            busy = lock_run_dir(run_dir, held)
        except OSError as err:
            busy = f"cannot write the run folder {run_dir}: {err.strerror or err}"
    busy = shared_failure(busy, env)  # every rank stops alike, before anything in the folder is changed
    if busy is not None:
        raise SetupError(busy)


def foreign_folder(run_dir: Path) -> str | None:
    """Why an existing run folder is not a terrafm run's, or None: a run writes config.yaml, metrics.jsonl and
    curves.png there, so a folder of the user's own files (a project folder given as --out) lost them. Empty, or
    holding the lock, checkpoints/ or a config.yaml with a model and a train section: a run's (one copied without
    its hidden .lock included)."""
    try:
        names = {p.name for p in run_dir.iterdir()}
    except OSError:
        return None  # the claim that follows names what is wrong with the folder
    if not names or RUN_LOCK in names or "checkpoints" in names:
        return None
    if "config.yaml" in names:
        try:
            found = yaml.safe_load(read_small(run_dir / "config.yaml"))
            if isinstance(found, dict) and {"model", "train"} <= set(found):
                return None
        except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: undecodable, too large
            pass  # unreadable: not shown to be a run's
    shown_names = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{run_dir} holds files that are not a terrafm run's ({shown_names}); a run would write its config.yaml, "
            "metrics.jsonl and curves.png there: choose an empty or new folder with --out / train.run_name")


def lock_run_dir(run_dir: Path, held: contextlib.ExitStack) -> str | None:
    """Claim the run folder for this run until `held` closes; None, or why not when another live run holds it.
    Two jobs on one folder (the same sbatch submitted twice: both pass --resume) deleted each other's checkpoints
    in progress and interleaved their metrics. The lock is flock's, so a killed run (kill -9, a lost node) holds
    nothing; a file system without flock (some Lustre and NFS mounts) is not locked."""
    handle = held.enter_context(open(run_dir / RUN_LOCK, "a+"))
    if not try_lock(handle.fileno()):
        handle.seek(0)
        return (f"{run_dir} is in use by another run ({handle.read().strip() or 'unknown'}); wait for it to end or "
                "stop it, or give this one another --out / train.run_name")
    handle.seek(0)
    handle.truncate()
    job = os.environ.get("SLURM_JOB_ID")
    # os.write, not the file object's buffer: on a full disk a buffered line was written again when `held` closed
    # the file, and that second error replaced the message about the first
    os.write(handle.fileno(), (f"host {socket.gethostname()}, pid {os.getpid()}" + (f", SLURM job {job}" if job else "")
                               + "\n").encode())
    return None


class DataError(SetupError):
    """A shard that cannot be read, met during training (checksums are verified when a chunk is first read)."""


class Batches:
    """The loader's batches across epochs: when one epoch runs out the next starts (set_epoch).

    A shard that cannot be read mid-run sets `failure` (the message) and the rank stands in its last good
    batch for the rest of the step, so every rank finishes the step's collectives; the trainer then learns
    of it from the step's status all-reduce, discards the step on all ranks, writes the checkpoint together
    and stops. (A rank that raised at once left the others blocked in the forward's collectives until the
    timeout, with the steps since the last checkpoint lost.) The first batch, with none to stand in, is read
    by `prime` before the first step, where the ranks agree on it."""

    def __init__(self, loader: Any, epoch: int):
        self.loader, self.epoch = loader, epoch
        self._iter = iter(loader)
        self.last: Any = None
        self.failure: str | None = None
        self._primed = False

    def prime(self) -> str | None:
        """Read the first batch ahead; returns the message of a shard that could not be read, else None."""
        try:
            self.last, self._primed = self._next(), True
        except ShardError as err:
            return str(err)
        return None

    def next(self) -> Any:
        if self._primed:
            self._primed = False
        elif self.failure is None:
            try:
                self.last = self._next()
            except ShardError as err:
                if self.last is None:
                    raise DataError(f"{err}") from err
                self.failure = str(err)
        return self.last

    def close(self) -> None:
        """Stop the loader's read-ahead (its render threads finish the batches in flight and exit), so no
        loader thread is at work while the ranks tear down their process group and exit."""
        close = getattr(self._iter, "close", None)  # a generator (terrafm's loaders); other iterators may lack it
        if close is not None:
            close()

    def _next(self) -> Any:
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self._iter = iter(self.loader)
            return next(self._iter)


@dataclass
class Throughput:
    """Optimiser steps, images, useful FLOPs, seconds spent waiting for batches and seconds spent writing
    checkpoints since the last log line: img/s, step time, MFU, data wait and checkpoint time. Steps are counted,
    not assumed to be train.log_every: the last interval of a run and the first after a resume that did not stop
    on a log step are shorter. Checkpoint writes are not training: their seconds are left out of the rates."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    images: int = 0
    flops: float = 0.0
    data_wait: float = 0.0
    checkpoint: float = 0.0

    def reset(self) -> None:
        self.start, self.steps, self.images, self.flops, self.data_wait = time.perf_counter(), 0, 0, 0.0, 0.0
        self.checkpoint = 0.0


def forward_backward(arch: SSLMetaArch, batches: Batches, grad_accum_steps: int, fsdp: bool, teacher_temp: float,
                     device: torch.device, throughput: Throughput) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimiser step (gradients are reduced on the last
    one only); returns the summed loss, a scalar on `device`."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum_steps):
        waited = time.perf_counter()
        batch = batches.next()
        throughput.data_wait += time.perf_counter() - waited
        global_views = _views(batch.global_views, device)
        local_views = _views(batch.local_views, device)
        majority_class = batch.majority_class.to(device, non_blocking=True)
        if fsdp:
            arch.student.set_requires_gradient_sync(micro == grad_accum_steps - 1)
        loss = arch(global_views, local_views, majority_class, teacher_temp)
        (loss / grad_accum_steps).backward()
        loss_sum += loss.detach()
        batch_size = majority_class.shape[0]
        throughput.images += batch_size
        throughput.flops += batch_size * arch.flops_per_sample(global_views, local_views)
    return loss_sum


def reduce_status(loss: torch.Tensor, stop: bool, data_failed: bool, env: DistEnv) -> tuple[float, bool, bool]:
    """One scalar all-reduce: (the loss averaged over ranks, whether any rank was asked to stop, whether any
    rank could not read its batches)."""
    status = torch.stack([loss, torch.tensor(float(stop), device=env.device),
                          torch.tensor(float(data_failed), device=env.device)])
    dist.all_reduce(status)
    loss_sum, stops, failed = status.tolist()  # one device-to-host read
    return loss_sum / env.world_size, stops > 0, failed > 0


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether `flag` holds on any rank (collective: every rank calls it at the same point)."""
    if env.world_size == 1:
        return flag
    found = torch.tensor(float(flag), device=env.device)
    dist.all_reduce(found)
    return found.item() > 0


def shared_failure(failure: str | None, env: DistEnv) -> str | None:
    """The first rank's data failure message (None: no rank has one), the same on every rank (collective)."""
    messages = [failure]
    if env.world_size > 1:
        messages = [None] * env.world_size
        dist.all_gather_object(messages, failure)
    found = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if found is None:
        return None
    return found[1] if env.world_size == 1 else f"rank {found[0]}: {found[1]}"


def optimizer_step(arch: SSLMetaArch, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   max_norm: float, per_parameter: bool, freeze_last_layer: bool) -> float:
    """Drop the frozen prototype layer's gradient, clip, and take the AdamW step unless the global gradient
    norm (the same on every rank) is non-finite; returns that norm, read to the host once (a second .item()
    after the step would wait for the AdamW kernels too). The gradients are cleared."""
    if freeze_last_layer:
        for p in arch.last_layer_parameters():
            p.grad = None
    grad_norm = clip_gradients(params, max_norm, per_parameter)
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def teacher_step(arch: SSLMetaArch, momentum: float, fsdp: bool) -> None:
    """After the student's step: the centre update (one all-reduce), then the EMA teacher update."""
    arch.loss.update_center()
    if fsdp:
        reshard_model(arch.teacher)  # the EMA works on shards (parallel.teacher_reshard_after_forward=false)
    arch.update_teacher(momentum)


def log_metrics(logger: MetricsLogger, record: dict, arch: SSLMetaArch, throughput: Throughput, env: DistEnv,
                peak: float | None, skipped_steps: int) -> dict[str, float]:
    """Complete `record` (the step's values) with the collapse monitors, throughput and memory, and log it;
    returns the monitors (none with ssl.fused_head_loss, which keeps no teacher probabilities).

    Global: loss (mean over ranks and micro-batches), grad_norm, img_per_s (all ranks' images), the schedules.
    Rank 0's: the monitors and koleo (its last micro-batch), step_time_s, data_wait_s (of a step, the seconds
    it waited for its batches: near step_time_s means the loader is the bottleneck), checkpoint_s (the seconds
    it spent writing checkpoints since the last record, left out of the rates), mfu (its FLOPs against one
    device's peak), mem_gb (its peak); skipped_steps is the same on every rank."""
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    elapsed = time.perf_counter() - throughput.start - throughput.checkpoint
    probs = arch.last_teacher_probs
    monitors = {k: v.item() for k, v in teacher_monitors(probs).items()} if probs is not None else {}
    koleo = {"koleo": arch.last_koleo.item()} if arch.last_koleo is not None else {}
    logger.log({
        **record, **monitors, **koleo,
        "img_per_s": throughput.images * env.world_size / elapsed, "step_time_s": elapsed / throughput.steps,
        "data_wait_s": throughput.data_wait / throughput.steps, "checkpoint_s": throughput.checkpoint,
        "mfu": throughput.flops / elapsed / peak if peak else None, "mem_gb": _memory_gb(env.device),
        "skipped_steps": skipped_steps,
    })
    return monitors


def restore(resume_from: Path, arch: SSLMetaArch, optimizer: torch.optim.Optimizer, loader: Any, cfg: Config,
            env: DistEnv) -> tuple[int, int, int, int, int | None]:
    """Load checkpoint `resume_from` into the parallelised model, optimiser and loader; returns (step, epoch,
    skipped steps, non-finite gradient norms in a row at that step, the step count its schedules were laid out
    over). Elastic (another world size or batch): the loader position is converted and the drop-path streams
    restart."""
    t = cfg.train
    try:
        try:
            saved_meta = checkpoint_io.read_meta(resume_from)
        except checkpoint_io.CheckpointError:
            checkpoint.check(resume_from)  # a meta.json its manifest disagrees with is corrupt: say so, and offer
            raise  # the previous checkpoint; one that matches its manifest was written so (another program's)
        if cfg.model.fusion:  # same shapes, another network: DCP would load the weights into it without a word
            saved = fusion_settings(saved_meta["model"], resume_from)
            now = {k: getattr(cfg.model, k) for k in FUSION_SETTINGS}
            if saved != now:
                raise ValueError("its fusion was trained with " + ", ".join(f"model.{k}={v}" for k, v in saved.items())
                                 + ", this run's config has " + ", ".join(f"model.{k}={v}" for k, v in now.items())
                                 + "; the same weights under other settings compute another network: resume with "
                                 + " ".join(f"model.{k}={v}" for k, v in saved.items()) + " or start a new run")
        elif saved_meta.get("model", {}).get("fusion") is True:  # DCP loads the subset and the next save drops the rest
            raise ValueError("it holds trained fusion weights (model.fusion=true) and this run has model.fusion=false, "
                             "which would leave them out of every later checkpoint: resume with model.fusion=true, or "
                             "start a new run")
        step, rank_state, saved_world = checkpoint.load(resume_from, arch, optimizer, reshard=t.elastic_resume)
        saved_steps = saved_meta.get("total_steps")
        saved_s1, s1 = saved_meta.get("data", {}).get("s1_scaling"), input_metadata(loader).get("s1_scaling")
        if None not in (saved_s1, s1) and saved_s1 != s1:
            raise ValueError(f"it was trained on S1 in {saved_s1}, data.shard_dir holds S1 in {s1}; convert "
                             f"with `terrafm prepare --s1-scaling {saved_s1}` or start a new run")
        counts = (rank_state.get("epoch"), rank_state.get("skipped_steps", 0), rank_state.get("nonfinite_streak", 0))
        if not (isinstance(rank_state.get("loader"), dict) and all(type(n) is int for n in counts)):
            raise ValueError("its rank state is not a trainer's (expected a loader object and integer epoch, "
                             "skipped_steps and nonfinite_streak)")
        # absent from rank files written before elastic resume existed: taken as this run's
        saved_batch = rank_state["loader"].get("batch_size", cfg.data.batch_size)
        if type(saved_batch) is not int or saved_batch < 1:
            raise ValueError(f"its rank state's loader batch_size is {saved_batch!r}, not a positive integer")
        epoch, skipped_steps = rank_state["epoch"], rank_state.get("skipped_steps", 0)
        nonfinite_streak = rank_state.get("nonfinite_streak", 0)
        loader.set_epoch(epoch)
        reshard = saved_world != env.world_size or (t.elastic_resume and saved_batch != cfg.data.batch_size)
        if reshard and "batch_size" not in rank_state["loader"]:  # the position cannot be converted without it
            raise ValueError(f"its loader state has no batch_size (written before elastic resume existed); resume "
                             f"it on {saved_world} ranks")
        try:
            if not reshard:
                loader.load_state_dict(rank_state["loader"])
            else:
                redrawn = loader.load_state_dict(rank_state["loader"], reshard=True)
        except (KeyError, TypeError) as err:  # a loader state field of another form, or no reshard parameter
            raise ValueError(f"its loader state does not restore into this loader ({type(err).__name__}: "
                             f"{err})") from err
    except (checkpoint.ResumeError, checkpoint_io.CheckpointError, ValueError) as err:
        raise SetupError(f"cannot resume from {resume_from}: {err}") from err
    except (RuntimeError, KeyError, EOFError, CheckpointException) as err:  # DCP: missing keys, shape mismatch
        if checkpoint.interrupted(err):  # a second Ctrl-C during the load: a stop, not a checkpoint that does not fit
            raise KeyboardInterrupt from err
        cause = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) and err.failures else err
        if isinstance(cause, (OSError, EOFError, pickle.UnpicklingError)):  # its files, not the model (DCP's shape
            # errors are ValueErrors and RuntimeErrors; a .distcp cut short ends in EOFError): say so
            raise SetupError(f"cannot resume from {resume_from}: its data does not read ({type(cause).__name__}: "
                             f"{str(cause)[:300] or 'the data ends early'}); "
                             f"{checkpoint_io.previous_checkpoint(resume_from)}") from err
        detail = _config_changes(resume_from, cfg) or (
            str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__)
        raise SetupError(f"cannot resume from {resume_from}: it does not fit this model and optimiser "
                         f"({detail}); resume with the model.* and ssl.* values it was written with "
                         f"(see {resume_from / 'meta.json'})") from err
    if reshard:
        torch.manual_seed(t.seed + step * 1009 + env.rank)  # fresh drop-path streams, distinct per rank
        if env.rank == 0:
            before = saved_batch * saved_world
            print(f"elastic resume: {saved_world} -> {env.world_size} ranks at step {step}; samples per "
                  f"loader step {before} -> {cfg.data.batch_size * env.world_size} (the peak lr follows the "
                  f"global batch); data resumes at epoch {epoch} batch {loader.step}, {redrawn} samples "
                  "drawn again", flush=True)
    return step, epoch, skipped_steps, nonfinite_streak, saved_steps


def _config_changes(resume_from: Path, cfg: Config, sections: tuple[str, ...] = ("model", "ssl")) -> str:
    """The values of `sections` that differ between a checkpoint's recorded config and this run's, e.g.
    "model.name: checkpoint terrafm_tiny, this run terrafm_small" (DCP's own shape errors name no key)."""
    try:
        saved = checkpoint_io.read_meta(resume_from).get("config", {})
    except (checkpoint_io.CheckpointError, OSError, ValueError):
        return ""
    if isinstance(saved.get("model"), dict):  # written before the fusion's build settings were recorded
        saved["model"] = {**LEGACY_FUSION, **saved["model"]}
    now = json.loads(json.dumps(to_dict(cfg)))  # tuples as the JSON lists meta.json holds
    where = {"train.out_dir", "train.run_name"}  # a run resumed into another folder is not a setting changed
    changes = [f"{section}.{key}: checkpoint {value!r}, this run {now[section].get(key)!r}"
               for section in sections if isinstance(saved.get(section), dict) and isinstance(now.get(section), dict)
               for key, value in saved[section].items()
               if key in now[section] and now[section][key] != value and f"{section}.{key}" not in where]
    return "; ".join(changes)


def _normalisation_changes(resume_from: Path, now: dict, tolerance: float = 1e-3) -> str:
    """How this run's per-band normalisation (input_metadata) differs from the checkpoint's, e.g.
    "s2_l2a B04: mean moved 0.31 std, std x1.1"; "" when within tolerance or either side does not record it."""
    try:
        saved = checkpoint_io.read_meta(resume_from).get("data", {})
    except (checkpoint_io.CheckpointError, OSError, ValueError):
        return ""
    changes = []
    for m in sorted(set(saved.get("mean", {})) & set(now.get("mean", {}))):
        try:
            old_mean, old_std = (np.asarray(saved[k][m], np.float64) for k in ("mean", "std"))
            new_mean, new_std = (np.asarray(now[k][m], np.float64) for k in ("mean", "std"))
            shift, scale = np.abs(new_mean - old_mean) / old_std, new_std / old_std
        except (KeyError, TypeError, ValueError):
            continue
        if shift.shape != scale.shape or shift.ndim != 1 or not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            continue
        bands = list(now.get("bands", {}).get(m) or range(len(shift)))
        worst = int(np.argmax(np.maximum(shift, np.abs(np.log(scale)))))
        if shift[worst] > tolerance or abs(np.log(scale[worst])) > tolerance:
            changes.append(f"{m} {bands[worst]}: mean moved {shift[worst]:.3g} std, std x{scale[worst]:.3g}")
    return "; ".join(changes)


def _resume_source(run_dir: Path, ckpt_root: Path, resume: bool | str | Path, held: contextlib.ExitStack,
                   env: DistEnv) -> tuple[bool, Path | None, bool, bool]:
    """Claim the run folder if it exists, then find the checkpoint to resume from. Returns (whether the folder
    existed, that checkpoint or None, whether it was complete when found, whether it is this run's own). Raises
    SetupError for a folder that is not a run's or is in use, a resume that cannot be resolved, and checkpoints
    that a fresh run or another run's checkpoint would mix with. Collective (any_rank, shared_failure, _claim)."""
    # a folder that exists may be another run's in progress: claim it before reading its checkpoints (a second job
    # restored a checkpoint the first was rotating out, and failed as "does not fit this model"); a new one is
    # claimed by _train once made, so that a run failing in setup leaves no empty folder. Rank 0's view decides for
    # every rank: _claim is collective
    existed = any_rank(env.rank == 0 and run_dir.is_dir(), env)
    if existed:
        foreign = shared_failure(foreign_folder(run_dir) if env.rank == 0 else None, env)
        if foreign is not None:
            raise SetupError(foreign)
        _claim(run_dir, held, env)
    resume_from = None
    try:
        if resume is True:
            resume_from = checkpoint.resume_point(ckpt_root)
        elif resume:
            resume_from = checkpoint_io.resolve(resume)
    except checkpoint_io.CheckpointError as err:
        raise SetupError(f"cannot resume: {err}") from err
    # --resume-from a run still training: its rotation may remove this checkpoint before it is read (in _train)
    source_complete = resume_from is not None and checkpoint_io.complete(resume_from)
    if not resume and checkpoint.has_checkpoints(ckpt_root):
        raise SetupError(f"{run_dir} already has checkpoints; pass --resume to continue it, or choose another "
                         "--out / train.run_name for a fresh run")
    own_history = resume_from is not None and resume_from.parent.resolve() == ckpt_root.resolve()
    # another run's checkpoint into a folder with its own: those would be set aside, then rotated out
    if resume_from is not None and not own_history and checkpoint.has_checkpoints(ckpt_root):
        raise SetupError(f"{run_dir} already has checkpoints of its own; --resume-from {resume_from} (another run's) "
                         "would mix the two runs in one folder: pass --resume to continue this run, or choose another "
                         "--out / train.run_name to start from that checkpoint")
    return existed, resume_from, source_complete, own_history


def _resume_notes(logger: MetricsLogger, cfg: Config, resume_from: Path, ckpt_root: Path, data: dict, step: int,
                  total_steps: int, saved_steps: int | None, peak_lr: float, warmup_steps: int) -> None:
    """After a resume, set aside the checkpoints of an abandoned later continuation and write to the log what differs
    from the run the checkpoint came from: settings, the bands' normalisation (`data`: this run's input_metadata),
    those checkpoints, a step at or past total_steps, and schedules re-stretched over another step count. Collective
    (checkpoint.set_aside_later); its failure is a SetupError."""
    o, s = cfg.optim, cfg.ssl
    changed = _config_changes(resume_from, cfg, tuple(to_dict(cfg)))
    if changed:
        logger.write(f"resume: settings changed since {resume_from.name} ({changed}); config.yaml now records "
                     f"this run's, {resume_from / 'meta.json'} the checkpoint's")
    renormalised = _normalisation_changes(resume_from, data)
    if renormalised:
        logger.write(f"warning: resume: data.shard_dir normalises the bands otherwise than when {resume_from.name} was "
                     f"written ({renormalised}); the model now sees its inputs shifted and rescaled. Shards "
                     "re-converted with other data do this: convert with the checkpoint's statistics "
                     f"({resume_from / 'meta.json'}, data.mean / data.std) or start a new run")
    try:
        later, aside = checkpoint.set_aside_later(ckpt_root, step)
    except checkpoint.CheckpointWriteError as err:
        raise SetupError(str(err)) from err
    if later:
        logger.write(f"resume: {resume_from.name} is not the newest checkpoint in {ckpt_root}: {', '.join(later)} "
                     f"are later steps of an earlier continuation; moved to {aside} (nothing deleted), so "
                     "retention and the fallback offered on errors see this run's checkpoints only")
    if step >= total_steps:
        logger.write(f"resume: {resume_from.name} is at step {step}, at or past this run's {total_steps} steps "
                     f"(train.max_steps / epochs): nothing to train; raise train.max_steps above {step} to continue")
    elif saved_steps not in (None, total_steps):
        old_lr = schedules.learning_rate(step, saved_steps, peak_lr, warmup_steps, o.min_lr)
        new_lr = schedules.learning_rate(step, total_steps, peak_lr, warmup_steps, o.min_lr)
        old_m = schedules.teacher_momentum(step, saved_steps, s.teacher_momentum, s.teacher_momentum_end)
        new_m = schedules.teacher_momentum(step, total_steps, s.teacher_momentum, s.teacher_momentum_end)
        logger.write(f"resume: the schedules were laid out over {saved_steps} steps, this run has {total_steps}; the "
                     f"lr, weight-decay and teacher-momentum cosines are re-stretched over {total_steps} steps from "
                     f"step {step} (lr {old_lr:.3e} -> {new_lr:.3e}, teacher momentum {old_m:.6f} -> {new_m:.6f}). "
                     f"Set train.max_steps={saved_steps} to keep the original schedules.")


def _nonfinite_loss_message(loss_value: float, step: int, lr: float, latest: Path | None) -> str:
    """NonFiniteLossError's message: where the loss went non-finite and where to start again from (the last
    checkpoint, or what to look at when there is none)."""
    if latest:
        where = (f"the last good checkpoint is {latest}. Resume from it with a lower optim.lr or more "
                 "warm-up")
    elif step == 0:  # no update has been made: the inputs or the initial weights, not the optimiser
        where = ("no checkpoint was written yet, and no step has updated the initial weights: look at "
                 "the inputs first (non-finite values in the shards pass unchecked with "
                 "data.verify_checksums=false), then at the model settings")
    else:
        where = ("no checkpoint was written yet. Start again with a lower optim.lr or more warm-up "
                 "(train.checkpoint_every sets how often a run checkpoints)")
    return (f"loss is {loss_value} at step {step} (0-based optimiser step, lr {lr:.3e}); stopped before "
            f"updating the weights; {where}.")


def _nonfinite_grad_message(streak: int, step: int, lr: float, max_steps: int, latest: Path | None) -> str:
    """NonFiniteGradError's message: `streak` non-finite gradient norms in a row reached
    train.max_nonfinite_grad_steps (`max_steps`) at `step`."""
    where = (f"the last good checkpoint is {latest}. Resume from it" if latest else
             "no checkpoint was written yet. Start again")
    return (f"gradient norm non-finite for {streak} steps in a row, the last at step {step} "
            f"(0-based optimiser step, lr {lr:.3e}); stopped (train.max_nonfinite_grad_steps="
            f"{max_steps}); {where} with a lower optim.lr, optim.clip_grad > 0 or train.precision=fp32.")


def _check_collapse(logger: MetricsLogger, monitors: dict[str, float], cfg: Config, env: DistEnv, step: int,
                    warmup_steps: int, last_state: str | None, latest: Path | None) -> str | None:
    """At a log step after warm-up: diagnose collapse from the logged monitors, warn once per change of state
    (`last_state`: the one warned of last) and, with train.stop_on_collapse, raise CollapseError. Returns the state
    to pass in at the next log step. Collective with train.stop_on_collapse on several ranks (rank 0's diagnosis
    is broadcast)."""
    t, s = cfg.train, cfg.ssl
    diagnosis = collapse_state(monitors, s.num_prototypes, t.collapse_gap) if step > warmup_steps else None
    if t.stop_on_collapse and env.world_size > 1:
        # rank 0's monitors (the logged ones) decide for all: a rank stopping alone hung the others
        shared = [diagnosis]
        dist.broadcast_object_list(shared, src=0)
        diagnosis = shared[0]
    state = diagnosis.split(":", 1)[0] if diagnosis else None  # its numbers change at every log
    if state and state != last_state:
        logger.write(f"warning at step {step}: {diagnosis} (docs/training.md, 'Reading the monitors')")
    if diagnosis and t.stop_on_collapse:
        where = f"the last checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise CollapseError(f"stopped at step {step} (train.stop_on_collapse): {diagnosis}; {where}")
    return state


def _train(cfg: Config, env: DistEnv, resume: bool | str | Path, loader: Any, stop: PreemptionFlag,
           held: contextlib.ExitStack) -> TrainResult:
    cfg = resolve_ops(cfg, env.device)
    t, o, s = cfg.train, cfg.optim, cfg.ssl
    run_dir = Path(t.out_dir) / t.run_name
    ckpt_root = run_dir / "checkpoints"
    existed, resume_from, source_complete, own_history = _resume_source(run_dir, ckpt_root, resume, held, env)
    check_run_dir(run_dir)  # every rank: each fails alike instead of waiting in a collective
    if t.deterministic:  # for this run only: a later run in the same process (the API, a sweep) gets its own
        held.callback(torch.use_deterministic_algorithms, torch.are_deterministic_algorithms_enabled(),
                      warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True)

    # -- data, model, optimiser (the same seed on every rank: identical initial weights) -----------
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    probe_sample = t.probe and loader is None and cfg.data.shard_dir is None  # held-out split of the same generator
    if loader is None:
        from terrafm.data.loader import build_loader

        try:
            loader = build_loader(cfg.data, env.rank, env.world_size, t.seed, device=env.device)
        except (ShardError, FileNotFoundError, ValueError) as err:
            raise SetupError(f"cannot read the training data: {err}") from err
    coverage = getattr(loader, "coverage", "")  # locations the loader leaves out, and why
    sampler = getattr(loader, "sampler", None)
    check_epoch(cfg, len(loader), env.world_size, coverage, len(sampler) if sampler is not None else None)
    high_classes = high_frequency_classes(_value(loader, "class_frequency"))
    arch = SSLMetaArch.from_config(cfg, _value(loader, "num_classes"), high_classes, env.device.type).to(env.device)
    arch.teacher.eval()
    par = cfg.parallel
    parallelize(arch, env.mesh, fsdp=t.fsdp, precision=t.precision, reduce_precision=t.reduce_precision,
                activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                forward_prefetch=par.forward_prefetch, backward_prefetch=par.backward_prefetch,
                teacher_reshard_after_forward=par.teacher_reshard_after_forward)
    optimizer = build_optimizer(arch.student, cfg, env.device)
    student_params = [p for p in arch.student.parameters() if p.requires_grad]
    torch.manual_seed(t.seed + env.rank)  # drop path differs per rank from here on

    # -- schedule lengths, in optimiser steps ----------------------------------------------------
    steps_per_epoch = t.steps_per_epoch or len(loader) // t.grad_accum_steps
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    global_batch = cfg.data.batch_size * env.world_size * t.grad_accum_steps
    peak_lr = schedules.scaled_lr(o.lr, global_batch)
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)
    temp_warmup_steps = round(s.warmup_teacher_temperature_epochs * steps_per_epoch)
    freeze_steps = round(s.freeze_last_layer_epochs * steps_per_epoch)
    peak = peak_flops(env.device, t.precision, t.peak_tflops)

    # -- resume ---------------------------------------------------------------------------------
    step, epoch, skipped_steps, nonfinite_streak, saved_steps = 0, 0, 0, 0, None
    if resume_from is not None:
        with checkpoint_io.kept_while_read(resume_from, lambda message: SetupError(f"cannot resume: {message}"),
                                           source_complete):
            step, epoch, skipped_steps, nonfinite_streak, saved_steps = restore(resume_from, arch, optimizer, loader,
                                                                                cfg, env)
    else:
        loader.set_epoch(epoch)
    if not existed:
        _claim(run_dir, held, env)
    try:
        if env.rank == 0:
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / "preempted").unlink(missing_ok=True)
        logger = MetricsLogger(run_dir, env.rank, total_steps, step, own_history)
        held.callback(logger.close)  # a setup error before the loop's own close left its writer thread running
    except OSError as err:  # a full disk or a vanished folder: one message; config.yaml and metrics are written whole
        raise SetupError(f"cannot write the run folder {run_dir}: {err.strerror or err}") from err
    mesh_text = ("no mesh (train.fsdp=false)" if env.mesh is None else
                 "mesh dp_replicate x dp_shard = {} x {}".format(*env.mesh.shape))
    meta = {"model": to_dict(cfg)["model"], "config": to_dict(cfg), "total_steps": total_steps,
            "data": input_metadata(loader),
            "mesh": None if env.mesh is None else dict(zip(MESH_DIMS, env.mesh.shape, strict=True))}
    logger.write(f"run {run_dir}: {total_steps} steps ({steps_per_epoch}/epoch), global batch {global_batch}, "
                 f"peak lr {peak_lr:.2e}, {env.world_size} rank(s) on {env.device.type}, {mesh_text}"
                 + (f", resumed from {resume_from} at step {step}" if resume_from else ""))
    if coverage:
        logger.write(f"data: {coverage}")
    if getattr(loader, "sampling_note", ""):
        logger.write(f"data: {loader.sampling_note}")
    if resume_from is not None:
        _resume_notes(logger, cfg, resume_from, ckpt_root, meta["data"], step, total_steps, saved_steps, peak_lr,
                      warmup_steps)

    batches = Batches(loader, epoch)
    throughput = Throughput()

    def save(position: dict | None = None) -> Path:
        """The checkpoint of `step`; position: the loader's state and epoch to record (default: now)."""
        started = time.perf_counter()
        position = position or {"loader": loader.state_dict(), "epoch": batches.epoch}
        try:
            rank_state = {**position, "skipped_steps": skipped_steps, "nonfinite_streak": nonfinite_streak}
            return checkpoint.save(ckpt_root, step, arch, optimizer, rank_state, meta, t.keep_checkpoints)
        except checkpoint.CheckpointWriteError as err:
            raise SetupError(str(err)) from err
        finally:
            throughput.checkpoint += time.perf_counter() - started

    profiler = None
    if t.profile and not step <= t.profile_steps[0] < total_steps:
        logger.write(f"warning: train.profile: this run trains steps {step} to {total_steps}, so it never reaches "
                     f"train.profile_steps={list(t.profile_steps)}'s first step: no trace will be written")
    latest = resume_from
    last_state = None  # "collapse" or "uniform targets" last logged: warned once per change
    hard_stop = False  # a second Ctrl-C: stop at once, without drawing the curves
    try:
        if step < total_steps:  # the ranks agree on the first batch before any collective of the forward
            waited = time.perf_counter()
            failure = shared_failure(batches.prime(), env)
            throughput.data_wait += time.perf_counter() - waited  # the first step's wait, as if read in it
            if failure is not None:
                raise DataError(failure + (f" (nothing was trained since {resume_from})" if resume_from else ""))
        while step < total_steps:
            if t.profile and step == t.profile_steps[0]:
                profiler = torch.profiler.profile(record_shapes=True, with_stack=False)
                profiler.__enter__()
            lr = schedules.learning_rate(step, total_steps, peak_lr, warmup_steps, o.min_lr)
            wd = schedules.weight_decay(step, total_steps, o.weight_decay, o.weight_decay_end)
            momentum = schedules.teacher_momentum(step, total_steps, s.teacher_momentum, s.teacher_momentum_end)
            teacher_temp = schedules.teacher_temperature(step, temp_warmup_steps, s.warmup_teacher_temperature,
                                                         s.teacher_temperature)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if group["decay"] else 0.0

            step_start = {"loader": loader.state_dict(), "epoch": batches.epoch}  # a discarded step reads again
            loss_sum = forward_backward(arch, batches, t.grad_accum_steps, t.fsdp, teacher_temp, env.device,
                                        throughput)
            loss_value, stop_requested, data_failed = reduce_status(loss_sum / t.grad_accum_steps,
                                                                    stop.signum is not None,
                                                                    batches.failure is not None, env)
            if data_failed:  # the step is discarded on every rank: the weights are intact, keep the steps done
                optimizer.zero_grad(set_to_none=True)
                message = shared_failure(batches.failure, env)
                if step > 0 and (latest is None or Path(latest).name != checkpoint.step_dir_name(step)):
                    try:
                        latest = save(step_start)
                    except SetupError as err:  # keep the shard's message: it is why the run stopped
                        raise DataError(f"{message}; and the checkpoint of the {step} steps done could not be "
                                        f"written: {err}") from err
                    message += (f" (checkpoint {latest} holds the {step} steps done; --resume continues from it "
                                "once the shard is fixed)")
                raise DataError(message)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(_nonfinite_loss_message(loss_value, step, lr, latest))

            grad_norm = optimizer_step(arch, optimizer, student_params, o.clip_grad, o.clip_mode == "per_parameter",
                                       schedules.last_layer_frozen(step, freeze_steps))
            if math.isfinite(grad_norm):
                nonfinite_streak = 0
            else:  # the update was skipped; the teacher outputs were finite, so centres and EMA still update
                skipped_steps += 1
                nonfinite_streak += 1
                logger.write(f"step {step + 1}: gradient norm is {grad_norm} with a finite loss; AdamW step skipped "
                             f"({nonfinite_streak} in a row, {skipped_steps} in all)")  # step as metrics.jsonl counts
                if nonfinite_streak >= t.max_nonfinite_grad_steps:
                    raise NonFiniteGradError(_nonfinite_grad_message(nonfinite_streak, step, lr,
                                                                     t.max_nonfinite_grad_steps, latest))
            teacher_step(arch, momentum, t.fsdp)
            step += 1
            throughput.steps += 1
            logger.advance()

            if step % t.log_every == 0 or step == total_steps:
                record = {"step": step, "loss": loss_value, "lr": lr, "weight_decay": wd, "teacher_momentum": momentum,
                          "teacher_temperature": teacher_temp, "grad_norm": grad_norm, "epoch": batches.epoch}
                monitors = log_metrics(logger, record, arch, throughput, env, peak, skipped_steps)
                last_state = _check_collapse(logger, monitors, cfg, env, step, warmup_steps, last_state, latest)
                throughput.reset()
            if profiler is not None and step == t.profile_steps[1]:
                export_profile(profiler, run_dir, env.rank)
                profiler = None
            if step % t.checkpoint_every == 0 or step == total_steps or stop_requested:
                latest = save()
                # a stop signal that arrived during this save: stop on it, not after one more step and its save
                # (inside SLURM's warning window a ViT-L save is a good part of the time left)
                stop_requested = stop_requested or (step < total_steps and any_rank(stop.signum is not None, env))
            if stop_requested and stop.interrupted:
                logger.write(f"interrupted: checkpoint {latest} written at step {step}; --resume continues from it")
                return TrainResult(run_dir, step, latest, preempted=False, interrupted=True)
            if stop_requested:
                if env.rank == 0:  # the marker the SLURM scripts requeue on (torchrun hides exit code 75)
                    (run_dir / "preempted").write_text(f"{step}\n")
                if env.world_size > 1:  # no rank leaves before the marker exists: a node whose ranks had exited
                    dist.barrier()  # could end the step (srun --kill-on-bad-exit) with rank 0 still writing it
                logger.write(f"stop signal received: checkpoint {latest} written at step {step}; exiting for requeue")
                return TrainResult(run_dir, step, latest, preempted=True)
    except KeyboardInterrupt:
        hard_stop = True
        raise
    finally:
        if profiler is not None:  # the run ended inside train.profile_steps: keep the steps it traced
            try:
                export_profile(profiler, run_dir, env.rank)
                logger.write(f"profile: the run ended at step {step}, inside train.profile_steps="
                             f"{list(t.profile_steps)}; the trace holds steps {t.profile_steps[0]} to {step}")
            except (OSError, RuntimeError) as err:  # e.g. a full disk: not what the run stops for
                logger.write(f"warning: the profiler trace of steps {t.profile_steps[0]} to {step} could not be "
                             f"written ({type(err).__name__}: {err})")
        batches.close()
        logger.close()
        # also when the run stops early (a signal, collapse, a NaN): metrics.jsonl has records the old PNG lacks
        png = _curves(run_dir) if env.rank == 0 and not hard_stop else None
    probe = None
    if probe_sample:
        last_temp = schedules.teacher_temperature(max(step - 1, 0), temp_warmup_steps, s.warmup_teacher_temperature,
                                                  s.teacher_temperature)
        probe = _probe(cfg, arch, loader, last_temp, env.device.type, env.rank, run_dir, step)
    if env.rank == 0:
        print(f"done: {step} steps. checkpoint {latest}\n  metrics {run_dir / 'metrics.jsonl'}\n"
              f"  tensorboard {run_dir / 'tensorboard'}\n  curves {png}"
              + (f"\n  {probe.summary()}" if probe is not None else ""))
    return TrainResult(run_dir, step, latest, preempted=False, probe=probe)


def _curves(run_dir: Path) -> Path | None:
    """run_dir/curves.png from metrics.jsonl, or None; a PNG that cannot be written (a full disk) is a warning, not
    what a run that has written its checkpoints and metrics fails for."""
    try:
        return plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    except (OSError, ValueError, RuntimeError) as err:
        print(f"warning: {run_dir / 'curves.png'} not written ({type(err).__name__}: {err})", file=sys.stderr,
              flush=True)
        return None


def _probe(cfg: Config, arch: SSLMetaArch, loader: Any, teacher_temp: float, device: str, rank: int,
           run_dir: Path, step: int) -> Any:
    """kNN of the final teacher on held-out generated tiles vs a random-init backbone and band statistics
    (terrafm.eval.learning); written to run_dir/probe.json. Every rank gathers the teacher, rank 0 probes."""
    from terrafm.eval.learning import HELDOUT_CELLS, heldout_split, probe
    from terrafm.ssl.head import DINOHead

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().float()
             for k, v in arch.teacher.state_dict().items()}
    if rank != 0:
        return None
    print(f"probe: kNN of the teacher on {4 * HELDOUT_CELLS} held-out generated tiles (generated on first use, "
          "then cached; under a minute on 2 cores)", flush=True)
    # on the run's device: its ops were chosen for it (cuda's compiled kernels refused the cpu tensors the probe fed
    # them, and a GPU run on the sample failed after its last checkpoint)
    backbone = backbone_factory(cfg, device)
    teacher = DINOModel(backbone(drop_path_rate=0.0), DINOHead(arch.teacher.backbone.embed_dim, **head_kwargs(cfg)))
    teacher.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state.items()})
    teacher.to(device)
    torch.manual_seed(cfg.train.seed)
    random_backbone = backbone(drop_path_rate=0.0).to(device)
    modality = "s2_l2a" if "s2_l2a" in loader.mean else next(iter(loader.mean))
    try:
        heldout = heldout_split((modality,), {modality: (loader.mean[modality], loader.std[modality])},
                                tile_size=loader.shards.tile_size)
    except (ShardError, OSError) as err:  # the run is done and checkpointed: its probe is not worth failing it
        print(f"probe skipped: {err}", file=sys.stderr, flush=True)
        return None
    loss = arch.loss
    center = (loss.alpha * loss.center + (1.0 - loss.alpha) * loss.center_high).detach().cpu()
    result = probe(teacher.backbone, teacher.head, random_backbone, heldout, modality, cfg.model.img_size, center,
                   teacher_temp)
    # the step it probed: a later run resumed with train.probe=false leaves this file as it was
    record = {"step": step, **result.to_dict()}
    atomic_write_bytes(run_dir / "probe.json", (json.dumps(record, indent=1) + "\n").encode())
    return result
