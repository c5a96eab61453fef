"""Checkpoints: torch.distributed.checkpoint (DCP) for sharded state, written atomically.

Layout of a run's checkpoint folder:
    checkpoints/step_00000100/      one complete checkpoint
        .metadata, __*_*.distcp     DCP: student, teacher, optimizer (sharded), loss (centres)
        rank_00000.json ...         per rank: the trainer's rank state (data-loader state, epoch) and
                                    RNG states (torch, cuda, numpy, python), as JSON (no pickle)
        meta.json                   step, world size, model constructor arguments
        manifest.json               size and sha256 of every other file, checked on resume and export
    checkpoints/latest              text file naming the newest complete checkpoint ("step_00000100")
Writing goes to `step_N.tmp/`; only when every rank has finished is it renamed to `step_N/` and then
`latest` replaced atomically (terrafm.fileio: write `latest.tmp`, fsync, rename over). A crash at any point leaves
`latest` naming a complete checkpoint (a crash between the rename and `latest` leaves a newer complete folder,
which `resume_point` takes); stale `*.tmp` folders are removed at the next save.
Nothing read back executes code and every file is checked first (terrafm.checkpoint_io: the trust boundary).
A full disk while writing raises CheckpointWriteError("no space left ...") and leaves `latest` as it was.
Exact resume needs the same world size (the loader and RNG states are per rank); `load(reshard=True)`
continues on another world size (train.elastic_resume).

Reading a checkpoint without training (`resolve`, `load_backbone_state`, used by models/ and eval/)
lives below in terrafm.checkpoint_io, so nothing outside train/ imports train/.
"""

import copy
import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from terrafm.checkpoint_io import (
    LATEST,
    MANIFEST,
    METADATA,
    CheckpointError,
    SafeLoadPlanner,
    SafeReader,
    complete,
    hash_file,
    latest_checkpoint,
    previous_checkpoint,
    read_manifest,
    read_meta,
    read_metadata,
    verify,
    write_hashed,
)
from terrafm.fileio import atomic_write_bytes, load_json, publish


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run as configured; the message says what would work."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is untouched."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _all_gather(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def saved_steps(root: Path) -> dict[int, Path]:
    """{step: folder} of the complete checkpoint folders under root (step_N; not step_N.tmp)."""
    return {int(p.name[5:]): p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()}


def has_checkpoints(root: Path) -> bool:
    """Whether a run's checkpoints folder holds a checkpoint of its own: `latest`, or a published step folder (a run
    killed after publishing its first one and before pointing `latest` at it)."""
    return (Path(root) / LATEST).exists() or bool(saved_steps(Path(root)))


def resume_point(root: Path) -> Path | None:
    """The checkpoint `--resume` continues: the one `latest` names, or a newer step folder when the run was killed
    after `save` published it and before it pointed `latest` at it (with no `latest` yet, the run's first one).
    A published folder is complete (it was renamed whole from step_N.tmp); `load` checks its manifest. A newer
    step folder without one is not ours (a partial copy): a CheckpointError names it."""
    named = latest_checkpoint(root)
    newer = sorted((n, p) for n, p in saved_steps(root).items() if named is None or p.name > named.name)
    foreign = [p.name for _, p in newer if not (p / MANIFEST).is_file()]
    if foreign:  # never one of ours (save publishes a folder whole): resuming past it, or from scratch, loses it
        raise CheckpointError(f"{root} holds {', '.join(foreign)} without {MANIFEST}, so not a checkpoint this run "
                              f"published whole (a partial copy?): restore it, or move it out of {root} to resume "
                              f"from {named.name if named else 'the start'}")
    return newer[-1][1] if newer else named


def set_aside_later(root: Path, step: int) -> tuple[list[str], Path | None]:
    """Move the checkpoints after `step` out of `root` (rank 0; collective): a resume from `step` abandons that
    continuation. Left among the run's own they counted towards train.keep_checkpoints once the run passed
    their steps (pushing out its own) and were offered as the "previous checkpoint" of its next failure.
    Nothing is deleted: they go to root/abandoned_after_step_N/; `latest` is repointed first if it named one.
    Returns (their names, that folder), rank 0's on every rank (the others never list the folder: one that
    listed it after rank 0's move saw nothing and skipped the collective)."""
    outcome = ([], None, None)
    if _rank() == 0:
        later = sorted((n, p) for n, p in saved_steps(root).items() if n > step)
        target = root / f"abandoned_after_{step_dir_name(step)}"
        for again in range(2, 1000):  # a second resume from the same step abandons another continuation
            if not target.exists():
                break
            target = root / f"abandoned_after_{step_dir_name(step)}.{again}"
        names = [path.name for _, path in later]
        failure = None
        try:
            latest = root / LATEST
            if later and latest.is_file() and latest.read_text().strip() in names:
                kept = sorted((n, p) for n, p in saved_steps(root).items() if n <= step)
                if kept:
                    atomic_write_bytes(latest, kept[-1][1].name.encode())
                else:
                    latest.unlink()
            if later:
                target.mkdir()
                for _, path in later:
                    path.rename(target / path.name)
        except OSError as err:
            failure = f"cannot move the checkpoints after step {step} in {root} aside ({type(err).__name__}: {err})"
        outcome = (names, str(target) if later else None, failure)
    names, target, failure = _all_gather(outcome)[0]
    if failure is not None:
        raise CheckpointWriteError(failure)
    return names, None if target is None else Path(target)


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON values (byte states as hex strings)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state().numpy().tobytes().hex(),
             "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
    return state


def _byte_state(hexed: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(hexed), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_state(state["torch"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(n["keys"], np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_state(state["cuda"]))


def _sharded_state(arch, optimizer) -> dict[str, Any]:
    return {
        "student": get_model_state_dict(arch.student),
        "teacher": get_model_state_dict(arch.teacher),
        "optimizer": get_optimizer_state_dict(arch.student, optimizer),
        "loss": arch.loss.state_dict(),
    }


def _local_bytes(state: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, DTensor):
        state = state.to_local()
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def _nested(err: Any) -> list[BaseException]:
    """`err` and every exception inside it, each once, depth first: causes, contexts, args and DCP's per-rank failures
    ((exception, traceback) pairs)."""
    found, stack, seen = [], [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseException):
            found.append(e)
            inner = [e.__cause__, e.__context__, *e.args, *getattr(e, "failures", {}).values()]
        elif isinstance(e, tuple | list):
            inner = list(e)
        else:
            continue
        stack += reversed(inner)
    return found


def interrupted(err: Any) -> bool:
    """Whether a KeyboardInterrupt (a second Ctrl-C) is inside `err`: DCP catches it in a save or load and raises a
    CheckpointException holding it, which is then no stop but a traceback or a "corrupt" checkpoint."""
    return any(isinstance(e, KeyboardInterrupt) for e in _nested(err))


def _disk_full(err: Any) -> str | None:
    """The ENOSPC error inside `err` (itself, DCP's per-rank failures, causes) as one line, or None."""
    return _os_error(err, full_only=True)


def _os_error(err: Any, full_only: bool = False) -> str | None:
    """The OSError inside `err` (itself, DCP's per-rank failures, causes) as one line, or None; full_only: only
    ENOSPC / EDQUOT (and torch's zip writer's 'unexpected pos', its ENOSPC)."""
    nested = _nested(err)
    for e in nested:
        if isinstance(e, OSError) and (not full_only or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return f"{type(e).__name__}: {e}"
    for e in reversed(nested):  # the innermost: torch's zip writer on ENOSPC (or a file-size limit: save() tells)
        if "unexpected pos" in str(e):
            return str(e).splitlines()[0][:200]
    return None


def save(root: str | Path, step: int, arch, optimizer, rank_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root` on every rank; returns the final folder. Collective.

    rank_state: this rank's JSON-serialisable extra state (loader position, epoch), returned by `load`.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    setup_failure = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:  # a read-only file system, `checkpoints` a file, permissions: every rank stops
            setup_failure = f"{type(err).__name__}: {err}"
    setup_failure = _first_failure(setup_failure)
    if setup_failure is not None:
        raise CheckpointWriteError(f"cannot write checkpoint {final.name} in {root} ({setup_failure}); make it a "
                                   f"writable folder; {previous_checkpoint(final)} (untouched)")
    state = _sharded_state(arch, optimizer)
    failure, entries = None, {}
    try:
        dcp.save(state, checkpoint_id=tmp, no_dist=not _dist())
        record = {"step": step, "state": rank_state, "rng": rng_state()}
        entries[rank_file(_rank())] = write_hashed(tmp / rank_file(_rank()), json.dumps(record).encode())
        for f in sorted(tmp.glob(f"__{_rank()}_*.distcp")):  # the DCP files this rank wrote, still in page cache
            entries[f.name] = hash_file(f)
        if _rank() == 0:
            meta = dict(meta, step=step, world_size=_world())
            entries["meta.json"] = write_hashed(tmp / "meta.json", json.dumps(meta, indent=2).encode())
            entries[METADATA] = hash_file(tmp / METADATA)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        if interrupted(err):  # a second Ctrl-C: the stop it is (the .tmp folder stays; `latest` is untouched)
            raise KeyboardInterrupt from err
        full = _disk_full(err)
        failure = (full is not None, full or _os_error(err))
        if failure[1] is None:
            raise
    gathered = _all_gather((entries, failure))
    failures = [f for _, f in gathered if f is not None]
    if failures and _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures and not any(full for full, _ in failures):  # e.g. EROFS, EIO, EFBIG (a file-size limit)
        raise CheckpointWriteError(f"cannot write checkpoint {final.name} in {root} ({failures[0][1]}); "
                                   f"{previous_checkpoint(final)} (untouched)")
    if failures:
        failures = [line for full, line in failures if full]
        need = _local_bytes(state) * _world()
        free = shutil.disk_usage(root).free
        if free > 2 * need and all("unexpected pos" in line for line in failures):  # no errno to tell: the room does
            raise CheckpointWriteError(
                f"cannot write checkpoint {final.name} in {root}: a write stopped short ({failures[0]}) with "
                f"{free / 1e9:.3f} GB free for the {need / 1e9:.3f} GB it needs, so a file-size limit (`ulimit -f`), a "
                f"quota or exhausted inodes stopped it; {previous_checkpoint(final)} (untouched)")
        raise CheckpointWriteError(
            f"no space left on the device of {root} writing checkpoint {final.name}: it needs about "
            f"{need / 1e9:.3f} GB ({free / 1e9:.3f} GB free now); free space or set train.out_dir to a larger file "
            f"system; {previous_checkpoint(final)} (untouched). ({failures[0]})")
    publish_failure = None
    if _rank() == 0:
        try:
            files = {name: entry for e, _ in gathered for name, entry in e.items()}
            write_hashed(tmp / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=1).encode())
            if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            publish(tmp, final)
            atomic_write_bytes(root / LATEST, final.name.encode())
        except OSError as err:  # `latest` is replaced atomically: it names the new folder or the old one
            shutil.rmtree(tmp, ignore_errors=True)
            publish_failure = f"{type(err).__name__}: {err}"
        else:
            # Only checkpoints before this one count, so the folder just published is never the one removed
            # (a resume from an earlier step moves the later ones aside, set_aside_later, but a folder copied in
            # by hand may still be numbered above it).
            earlier = sorted((n, p) for n, p in saved_steps(root).items() if n < step)
            for _, old in earlier[:max(0, len(earlier) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    publish_failure = _first_failure(publish_failure)
    if publish_failure is not None:
        if complete(final):  # published; only `latest` was not moved to it
            raise CheckpointWriteError(f"checkpoint {final} is complete, but {root / LATEST} could not name it "
                                       f"({publish_failure}); --resume takes the newest complete checkpoint, this one")
        raise CheckpointWriteError(f"cannot finish checkpoint {final.name} in {root} ({publish_failure}); "
                                   f"{previous_checkpoint(final)}")
    return final


def _first_failure(failure: str | None) -> str | None:
    """The first rank's failure, on every rank (collective: a rank that stopped alone would hang the others)."""
    return next((f for f in _all_gather(failure) if f is not None), None)


def check(path: str | Path) -> None:
    """Refuse a checkpoint whose files do not match its manifest, naming them and offering the previous one.

    Collective when distributed: each rank hashes a share of the files."""
    path = Path(path)
    names = sorted(read_manifest(path))
    problems = sorted({p for found in _all_gather(verify(path, names[_rank()::_world()])) for p in found})
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt ({'; '.join(problems)}); {previous_checkpoint(path)}")


def _drop_unsaved_optimizer_state(optimizer_state: dict, saved_keys) -> set[str]:
    """Leave out of the load template the parameters the checkpoint has no AdamW state for; their names.

    A parameter gets AdamW state at its first update; the prototype layer, frozen for the first epoch,
    has none in a checkpoint written then. The fresh optimiser's template has state for every parameter,
    so without this DCP refuses the checkpoint ("Missing key"). A parameter with only part of its state
    saved is kept, so DCP reports the missing entry. Loaded with strict=False, the optimiser then has no
    state for them: it starts at their first update, as it would have without the interruption.
    """
    dropped = set()
    for fqn, fields in list(optimizer_state["state"].items()):
        if not any(f"optimizer.state.{fqn}.{field}" in saved_keys for field in fields):
            del optimizer_state["state"][fqn]
            dropped.add(fqn)
    return dropped


def load(path: str | Path, arch, optimizer, reshard: bool = False) -> tuple[int, dict, int]:
    """Restore what `save` wrote into the already parallelised objects; returns (step, rank_state, saved_world).

    The files are checked against the manifest first. With the same world size this is exact (each rank
    gets its own rank state and RNG states back). A different world size needs reshard=True: DCP reshards
    student, teacher and optimiser; every rank gets rank 0's rank state (the caller converts the loader
    position) and keeps its current RNG.
    Only the optimiser's per-parameter state (AdamW moments, step) is read back; its parameter groups (which
    parameters decay, betas, eps, implementation) stay this run's, as built from its config: a checkpoint
    written with other groups (an older rule for which parameters decay) would otherwise leave a group
    without its settings, and a changed optim.betas would be silently undone. lr and weight decay are set
    every step from the schedules.
    """
    path = Path(path)
    check(path)
    saved_keys = read_metadata(path).state_dict_metadata  # refuses a crafted .metadata before DCP reads it
    meta = read_meta(path)
    saved_world = int(meta["world_size"])
    world = _world()
    if saved_world != world and not reshard:
        raise ResumeError(
            f"{path} was written by {saved_world} ranks, this run has {world}; exact resume needs the same "
            "number (the loader and RNG states are per rank). To continue on this many ranks anyway (not "
            "bitwise: the data position rounds to a whole step, random streams restart), set "
            "train.elastic_resume=true"
        )
    state = _sharded_state(arch, optimizer)
    unsaved = _drop_unsaved_optimizer_state(state["optimizer"], saved_keys)
    groups = copy.deepcopy(state["optimizer"]["param_groups"])
    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=not _dist())
    state["optimizer"]["param_groups"] = groups  # this run's groups and settings; see the docstring
    set_model_state_dict(arch.student, state["student"])
    set_model_state_dict(arch.teacher, state["teacher"])
    set_optimizer_state_dict(arch.student, optimizer, state["optimizer"], options=StateDictOptions(strict=not unsaved))
    arch.loss.load_state_dict(state["loss"])
    record = path / rank_file(_rank() if saved_world == world else 0)
    saved = read_rank_file(record)
    if saved["step"] != meta["step"]:  # an edited -3 resumed into step_-0000001 folders
        raise CheckpointError(f"{record}: its step {saved['step']} is not the checkpoint's ({meta['step']} in "
                              "meta.json): not this checkpoint's rank state")
    if saved_world == world:
        try:
            set_rng_state(saved["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # torch's set_rng_state: RuntimeError
            raise CheckpointError(f"{path / rank_file(_rank())}: its RNG states do not restore ({type(err).__name__}: "
                                  f"{err})") from err
    return saved["step"], saved["state"], saved_world


def read_rank_file(path: Path) -> dict:
    """A rank's JSON record as `save` writes it ({step, state, rng}); anything else (edited, or written by another
    tool) is one CheckpointError naming the file, where a list or a string step was a traceback."""
    try:
        saved = load_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable rank state ({type(err).__name__}: {err})") from err
    if not (isinstance(saved, dict) and type(saved.get("step")) is int
            and all(isinstance(saved.get(k), dict) for k in ("state", "rng"))):
        raise CheckpointError(f"{path}: not a terrafm rank state (expected an object with an integer step and state "
                              "and rng objects)")
    return saved
