"""Reading a checkpoint folder: its files read without running code, checked against a checksum manifest.

The lowest layer of checkpointing: models/ and eval/ read trained backbones through `resolve` and
`load_backbone_state` here, train/checkpoint.py (saving and resuming) builds on it; nothing here needs a
process group.

Trust boundary: nothing read from a checkpoint folder may execute code.
- per-rank state (loader position, epoch, RNG states) is JSON (`rank_NNNNN.json`), not a pickle;
- DCP's `.metadata` is a pickle: it is read by `MetadataUnpickler`, which resolves only DCP's own
  metadata classes (plus torch.Size, dtypes, layouts and paths) and refuses any other name;
- DCP stores non-tensor values (optimizer hyper-parameters) with torch.save; `SafeLoadPlanner` reads
  them with torch.load(weights_only=True) instead of DCP's default weights_only=False.
Integrity: `manifest.json` lists every file with its size and sha256; `verify` checks them on resume and
on export, so a flipped byte is refused by file name instead of loading silently.
`load_backbone_state(path)` reads the TEACHER backbone (as DINO evaluates its teacher: the EMA
weights are smoother and transfer better) on one process without any process group.
"""

import contextlib
import hashlib
import io
import math
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from terrafm.fileio import check_regular, load_json, plain_name, read_small

LATEST = "latest"
MANIFEST = "manifest.json"
METADATA = ".metadata"
_CHUNK = 1 << 22

_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class CheckpointError(ValueError):
    """A checkpoint file is untrusted, unreadable or corrupt; the message names the file."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata`, resolving only the classes DCP itself writes there."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused to load {module}.{name}; DCP metadata may only name DCP's own "
                              "metadata classes, so this file was not written by terrafm and is not trusted")


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of checkpoint folder `path`, through the restricted unpickler."""
    path = Path(path) / METADATA
    try:
        check_regular(path)
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable DCP metadata file ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        # DCP opens folder / relative_path: an absolute path or "../" read another folder's (or any) file past the
        # checksum manifest, which covers only this folder's files
        name = getattr(info, "relative_path", None)
        if not plain_name(name):
            raise CheckpointError(f"{path}: names the data file {name!r}, which is not a file of this checkpoint "
                                  "folder; this file was not written by terrafm and is not trusted")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through `MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads DCP's non-tensor values with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def write_hashed(path: Path, data: bytes) -> dict:
    """Write and fsync `data` to `path`; returns its manifest entry, hashed from the bytes written."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def hash_file(path: Path) -> dict:
    """Manifest entry of a file on disk: size and sha256."""
    digest, size = hashlib.sha256(), 0
    check_regular(path)  # a FIFO in the folder hung the check
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def read_manifest(folder: Path) -> dict[str, dict]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder} has no {MANIFEST} (written by an older terrafm, or not a complete checkpoint)"
                              "; its files cannot be checked")
    try:
        files = load_json(path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable checksum manifest ({err})") from err
    entry_ok = lambda e: (isinstance(e, dict) and isinstance(e.get("bytes"), int)  # noqa: E731
                          and isinstance(e.get("sha256"), str))
    if not isinstance(files, dict) or not all(plain_name(k) and entry_ok(e) for k, e in files.items()):
        raise CheckpointError(f"{path}: not a checksum manifest (expected files: {{name: {{bytes, sha256}}}}, each "
                              "name a file of this folder)")
    return files


def verify(folder: str | Path, names: list[str] | None = None) -> list[str]:
    """Problems (one line per bad file) found checking `names` (default: all) against the manifest.

    Every file a load reads (DCP files, rank states, meta.json) must be in the manifest too, so nothing
    unchecked is read; other files (e.g. NFS's .nfsXXXX) are ignored."""
    folder = Path(folder)
    files = read_manifest(folder)
    problems = [f"{p.name}: not in {MANIFEST}" for p in sorted(folder.iterdir())
                if p.name not in files and (p.suffix == ".distcp" or p.name.startswith("rank_")
                                            or p.name in (METADATA, "meta.json"))]
    for name in sorted(files) if names is None else names:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        got, want = hash_file(path), files[name]
        if got["bytes"] != want["bytes"]:
            problems.append(f"{name}: {got['bytes']} bytes, the manifest says {want['bytes']}")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{name}: sha256 {got['sha256'][:16]}..., the manifest says {want['sha256'][:16]}...")
    return problems


def complete(path: Path) -> bool:
    """Whether `path` is a published checkpoint folder (its DCP metadata, meta.json and manifest are there)."""
    return path.is_dir() and all((path / n).exists() for n in (METADATA, "meta.json", MANIFEST))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint `root/latest` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:  # read_small: a FIFO or a device in its place is refused, not waited on or read without end
        name = read_small(pointer, 4096).decode("utf-8").strip()
    except (OSError, ValueError) as err:  # ValueError: too long, or not UTF-8
        raise CheckpointError(f"{pointer} is not a readable pointer to a checkpoint ({err}); pass a step_N folder "
                              "instead") from err
    if not plain_name(name):
        raise CheckpointError(f"{pointer} does not name a checkpoint folder (it holds {name!r}); pass a step_N "
                              "folder instead")
    path = root / name
    if not complete(path):
        lacks = "is not there" if not path.is_dir() else \
            f"lacks {', '.join(n for n in (METADATA, 'meta.json', MANIFEST) if not (path / n).exists())}"
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint (it {lacks}); "
                              f"{previous_checkpoint(path)}")
    return path


def previous_checkpoint(path: Path) -> str:
    """A sentence offering the newest complete checkpoint before `path` in its folder, for error messages."""
    path = Path(path)
    earlier = sorted(p for p in path.parent.glob("step_*") if complete(p) and p.name < path.name)
    if not earlier:
        return f"there is no earlier checkpoint in {path.parent}"
    return (f"the previous checkpoint is {earlier[-1]}: pass it instead (`terrafm pretrain --resume-from`, "
            f"`terrafm export`, `terrafm eval --checkpoint`)")


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete step_N checkpoint in `folder`, or None."""
    found = sorted(p for p in Path(folder).glob("step_*") if complete(p))
    return found[-1] if found else None


@contextlib.contextmanager
def kept_while_read(path: Path, error=None, was_complete: bool | None = None):
    """Reads of checkpoint folder `path`: a failure because the folder went away meanwhile (a run still writing into
    its parent removes its older checkpoints: train.keep_checkpoints) is raised as that, `error(message)` (default
    CheckpointError), naming the newest checkpoint now; its missing files were blamed on the checkpoint (corrupt,
    not fitting the model) and the message said there was none earlier. was_complete: what the caller saw when it
    chose `path` (default: now)."""
    path = Path(path)
    was_complete = complete(path) if was_complete is None else was_complete
    try:
        yield
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        if not was_complete or complete(path):
            raise
        newest = newest_checkpoint(path.parent)
        message = (f"checkpoint {path} was removed while it was read: the run writing into {path.parent} keeps only "
                   "its newest checkpoints (train.keep_checkpoints)"
                   + (f"; the newest now is {newest}: run the command again, or copy that folder first" if newest
                      else ""))
        raise (error or CheckpointError)(message) from err


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint: step, world size, model constructor arguments, config, schedule length.
    A file without what every reader needs (an edited or foreign meta.json) is one CheckpointError."""
    path = Path(path) / "meta.json"
    try:
        meta = load_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable meta.json ({type(err).__name__}: {err})") from err
    model = meta.get("model") if isinstance(meta, dict) else None
    count = lambda v, least: type(v) is int and v >= least  # noqa: E731
    if (not isinstance(model, dict) or not isinstance(model.get("name"), str)
            or not count(meta.get("step"), 0) or not count(meta.get("world_size"), 1)
            or not all(type(model.get(k, 1)) is int for k in ("img_size", "patch_size"))
            # read on resume and export: a list there, or a string step count, was a traceback
            or not all(isinstance(meta.get(k, {}), dict) for k in ("data", "config"))
            or not (meta.get("total_steps") is None or count(meta["total_steps"], 0))):
        raise CheckpointError(f"{path}: not a terrafm checkpoint's meta.json (expected an object with integer step "
                              "and world_size, model: {name, img_size, patch_size, ...} and, where present, data "
                              "and config objects and an integer total_steps)")
    return meta


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, a run's `checkpoints/` folder or its `latest` pointer, or a run folder -> the complete
    checkpoint."""
    path = Path(path)
    if path.name == LATEST and os.path.lexists(path) and not path.is_dir():  # a FIFO there too: latest_checkpoint
        path = path.parent                                                     # refuses it by name
    if (path / METADATA).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    if path.is_dir() and ((path / "meta.json").exists() or next(path.glob("*.distcp"), None) is not None):
        raise CheckpointError(f"{path} holds a checkpoint's files but not its {METADATA} (a copy that skipped hidden "
                              f"files, such as `cp {path.name}/* ...`? copy the folder itself: `cp -r`)")
    raise CheckpointError(f"{path} is not a checkpoint, a checkpoints/ folder or a run folder with one")


def load_backbone_state(path: str | Path, which: str = "teacher") -> tuple[str, dict[str, torch.Tensor]]:
    """(model name, backbone state_dict in the published TerraFM key layout, plus fusion.* if trained).

    Reads one model's backbone from a DCP checkpoint on a single process, no process group needed:
    tensors are allocated from the checkpoint's metadata and filled by `dcp.load(no_dist=True)`,
    which reassembles the shards of every rank.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = resolve(path)
    with kept_while_read(path):
        return _load_backbone_state(path, which)


def _load_backbone_state(path: Path, which: str) -> tuple[str, dict[str, torch.Tensor]]:
    problems = verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt ({'; '.join(problems)}); {previous_checkpoint(path)}")
    meta = read_meta(path)
    prefix = f"{which}.backbone."
    metadata = read_metadata(path)
    items = {key: item for key, item in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    bad = [key for key, item in items.items() if any(type(d) is not int or d < 0 for d in item.size)]
    if bad:  # a negative size passed the check below (a negative product) and failed in torch.empty
        size = tuple(items[bad[0]].size)
        raise CheckpointError(f"checkpoint {path}: its .metadata declares {bad[0]} of size {size}, which no tensor "
                              f"has (an edited or damaged .metadata); {previous_checkpoint(path)}")
    declared = sum(math.prod(item.size) * item.properties.dtype.itemsize for item in items.values())
    on_disk = sum(f.stat().st_size for f in path.glob("*.distcp"))
    if declared > on_disk:  # DCP stores tensors uncompressed (and allocating them first would be a traceback)
        raise CheckpointError(f"checkpoint {path}: its tensors do not read back: its .metadata declares "
                              f"{declared / 1e9:.3g} GB of {which} backbone tensors, more than its {on_disk / 1e9:.3g} "
                              f"GB of data files (a data file cut short, or an edited .metadata); "
                              f"{previous_checkpoint(path)}")
    state = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in items.items()}
    if not state:
        raise ValueError(f"{path} holds no {which} backbone (no keys starting with {prefix!r})")
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError, CheckpointException) as err:
        # a .distcp cut short or overwritten after the manifest was written (a copy, not a crash of ours); DCP
        # wraps a reader's error in CheckpointException, a BaseException, whose first line names no cause
        cause = next(iter(getattr(err, "failures", {}).values()), err)
        cause = cause[0] if isinstance(cause, tuple) else cause  # DCP keeps (exception, stack) per rank
        raise CheckpointError(f"checkpoint {path}: its tensors do not read back ({type(cause).__name__}"
                              f"{': ' + str(cause).splitlines()[0][:200] if str(cause) else ', the data ends early'}"
                              f"); {previous_checkpoint(path)}") from err
    return meta["model"]["name"], {k.removeprefix(prefix): v for k, v in state.items()}
