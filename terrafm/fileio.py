"""Crash-safe file writes: every file or folder terrafm publishes goes through here (shards, sample data,
checkpoints, exports, run files), so a crash leaves the old version or the whole new one, never a torn one;
the type of the commands' path options and how a path is printed; what a file's first bytes say it is; and the lock
that keeps a second writer out of a folder."""

import argparse
import errno
import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def path_arg(text: str) -> str:
    """argparse type of the commands' path options (prepare, eval, export): an empty one (an unset shell
    variable) is refused with exit 2, where it used to be taken as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset variable?); give a path")
    return text


def shown(path) -> str:
    """A path (or a name from one) as text any output takes: Linux allows bytes that are not UTF-8 in file names,
    os.fsdecode keeps them as lone surrogates, and a strict UTF-8 stdout or a font cannot encode those (printing such a
    path raised after the work was done); they become escapes (byte 0xff: the text \\xff). Other paths unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def try_lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting: False when another process holds it. True also where the file
    system has no locks (ENOLCK, EOPNOTSUPP, ENOSYS: some Lustre and NFS mounts), which then runs unguarded. A killed
    process holds nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return True


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where a missing folder would be created."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (created if missing), or None: probed in its nearest existing
    parent, without creating anything, so that a command can refuse before its heavy work."""
    probe = nearest_existing(folder)
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_shared(path: Path) -> None:
    """Give a file written through a private temp file the mode a plain open() would have (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~umask())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp: Path, path: Path) -> None:
    """Move the finished temp file or folder `tmp` to `path` durably: fsync its data (every file of a
    folder), rename it over `path` (a folder: `path` must not exist), fsync the parent directory."""
    tmp, path = Path(tmp), Path(path)
    for f in sorted(tmp.iterdir()) if tmp.is_dir() else [tmp]:
        if f.is_file():
            _fsync_file(f)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def utf8_path(path) -> bool:
    """Whether `path` is valid UTF-8: libraries that take only a str of UTF-8 (safetensors) refuse the rest (a
    folder named in Latin-1), which their callers then read or write through bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(tmp)` (any writer that takes a file name) to a temp name beside it, then `publish`.
    The temp name is unique (`<name>.<pid>-<random>.tmp`): a fixed `<name>.tmp` replaced, then deleted, a user's own
    file of that name."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
    except BaseException:  # a full disk or Ctrl-C mid-write: leave the old file and no half-written .tmp
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees the old file or the whole new one, never a torn one."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# Leading bytes of formats met where another was expected (a download gone wrong, a band exported as PNG, an
# archive), so that a refusal says what the file is instead of what it failed to be.
FORMAT_MAGIC = (
    (b"version https://git-lfs", "a Git LFS pointer, not the data (run `git lfs pull` where it was cloned)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"\x93NUMPY", "a NumPy .npy array"), (b"PAR1", "a Parquet file"), (b"\xffO\xffQ", "a JPEG2000 codestream"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG2000 (JP2) file"), (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip file"))


def format_from_magic(head: bytes, expected: str | None = None) -> str | None:
    """What a file's first bytes say it is (FORMAT_MAGIC); None when unknown, or when it is `expected`, the
    caller's own format (a damaged one of those is the caller's to name)."""
    kind = next((kind for magic, kind in FORMAT_MAGIC if head.startswith(magic)), None)
    return None if kind == expected else kind


def file_format(path, expected: str) -> str | None:
    """format_from_magic of a file's first bytes, for a reader's refusal of a file that is not `expected` (a Git
    LFS pointer, which `git clone` without git-lfs leaves in place of the data); None when unknown or unreadable."""
    try:
        with open(path, "rb") as f:
            return format_from_magic(f.read(64), expected=expected)
    except OSError:
        return None
