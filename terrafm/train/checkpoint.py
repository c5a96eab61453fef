"""Checkpoints: torch.distributed.checkpoint (DCP) for sharded state, written atomically.

Layout of a run's checkpoint folder:
    checkpoints/step_00000100/      one complete checkpoint
        .metadata, __*_*.distcp     DCP: student, teacher, optimizer (sharded), loss (centres)
        rank_00000.pt ...           per rank: the trainer's rank state (data-loader state, epoch) and
                                    RNG states (torch, cuda, numpy, python)
        meta.json                   step, world size, model constructor arguments
    checkpoints/latest              text file naming the newest complete checkpoint ("step_00000100")
Writing goes to `step_N.tmp/`; only when every rank has finished is it renamed to `step_N/` and then
`latest` replaced atomically (write `latest.tmp`, fsync, os.replace). A crash at any point leaves
`latest` naming a complete checkpoint; stale `*.tmp` folders are removed at the next save.
Exact resume needs the same world size (the loader and RNG states are per rank); `load(reshard=True)`
continues on another world size (train.elastic_resume).

`load_backbone_state(path)` reads the TEACHER backbone (as DINO evaluates its teacher: the EMA
weights are smoother and transfer better) on one process without any process group.
"""

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from terrafm.fileio import atomic_write_bytes, fsync_dir

LATEST = "latest"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run as configured; the message says what would work."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint `root/latest` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / ".metadata").exists() or not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(arch, optimizer) -> dict[str, Any]:
    return {
        "student": get_model_state_dict(arch.student),
        "teacher": get_model_state_dict(arch.teacher),
        "optimizer": get_optimizer_state_dict(arch.student, optimizer),
        "loss": arch.loss.state_dict(),
    }


def save(root: str | Path, step: int, arch, optimizer, rank_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` on every rank; returns the final folder. Collective.

    rank_state: this rank's picklable extra state (loader position, epoch), returned by `load`.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dcp.save(_sharded_state(arch, optimizer), checkpoint_id=tmp, no_dist=not _dist())
    torch.save({"step": step, "state": rank_state, "rng": rng_state()}, tmp / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        meta = dict(meta, step=step, world_size=dist.get_world_size() if _dist() else 1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _barrier()
    if _rank() == 0:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_bytes(root / LATEST, final.name.encode())
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, arch, optimizer, reshard: bool = False) -> tuple[int, dict, int]:
    """Restore what `save` wrote into the already parallelised objects; returns (step, rank_state, saved_world).

    With the same world size this is exact (each rank gets its own rank state and RNG states back).
    A different world size needs reshard=True: DCP reshards student, teacher and optimiser; every rank
    gets rank 0's rank state (the caller converts the loader position) and keeps its current RNG.
    """
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    saved_world = int(meta["world_size"])
    world = dist.get_world_size() if _dist() else 1
    if saved_world != world and not reshard:
        raise ResumeError(
            f"{path} was written by {saved_world} ranks, this run has {world}; exact resume needs the same "
            "number (the loader and RNG states are per rank). To continue on this many ranks anyway (not "
            "bitwise: the data position rounds to a whole step, random streams restart), set "
            "train.elastic_resume=true"
        )
    state = _sharded_state(arch, optimizer)
    dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    set_model_state_dict(arch.student, state["student"])
    set_model_state_dict(arch.teacher, state["teacher"])
    set_optimizer_state_dict(arch.student, optimizer, state["optimizer"])
    arch.loss.load_state_dict(state["loss"])
    saved = torch.load(path / f"rank_{_rank() if saved_world == world else 0:05d}.pt", weights_only=False)
    if saved_world == world:
        set_rng_state(saved["rng"])
    return int(saved["step"]), saved["state"], saved_world


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, a run's `checkpoints/` folder, or a run folder -> the complete checkpoint."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"{path} is not a checkpoint, a checkpoints/ folder or a run folder with one")


def load_backbone_state(path: str | Path, which: str = "teacher") -> tuple[str, dict[str, torch.Tensor]]:
    """(model name, backbone state_dict in the published TerraFM key layout, plus fusion.* if trained).

    Reads one model's backbone from a DCP checkpoint on a single process, no process group needed:
    tensors are allocated from the checkpoint's metadata and filled by `dcp.load(no_dist=True)`,
    which reassembles the shards of every rank.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = resolve(path)
    meta = json.loads((path / "meta.json").read_text())
    prefix = f"{which}.backbone."
    metadata = dcp.FileSystemReader(path).read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path} holds no {which} backbone (no keys starting with {prefix!r})")
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return meta["model"]["name"], {k.removeprefix(prefix): v for k, v in state.items()}
