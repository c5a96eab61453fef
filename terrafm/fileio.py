"""Crash-safe file writes: every file or folder terrafm publishes goes through here (shards, sample data,
checkpoints, exports, run files), so a crash leaves the old version or the whole new one, never a torn one;
the type of the commands' path options and how a path is printed; what a file's first bytes say it is; the lock
that keeps a second writer out of a folder; and how the commands name a failed read or write, or a full memory."""

import argparse
import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import secrets
import socket
import stat
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

# What np.load of a damaged .npz raises: OSError / EOFError / zipfile.BadZipFile a torn or truncated archive,
# ValueError and zlib.error damaged members, NotImplementedError a member whose compression-method field no longer
# names a method zipfile knows, RuntimeError a member flagged as encrypted.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, NotImplementedError, RuntimeError)


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


def os_error_message(err: OSError, outputs: list) -> str:
    """'cannot write F: reason' when the file F an OSError names is one of `outputs` (a command's output files and
    folders, or a temp file beside one) or names none, else 'cannot read F: reason': a permission error on an input
    (a checkpoint shard, a dataset folder) was reported as a write."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return f"cannot write {shown(outputs[0])}: {reason}"
    failed = os.path.abspath(os.fsdecode(err.filename))
    written = [os.path.abspath(os.fsdecode(o)) for o in outputs if o is not None]
    writes = any(failed == o or failed.startswith((o + os.sep, o + ".")) for o in written)
    return f"cannot {'write' if writes else 'read'} {shown(err.filename)}: {reason}"


def out_of_memory(err: BaseException) -> bool:
    """Whether an exception is the machine running out of memory: MemoryError, torch.OutOfMemoryError (CUDA), or the
    RuntimeError of torch's CPU allocator. The commands say so in one line (exit 2) instead of a traceback."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(
        text in str(err) for text in ("can't allocate memory", "Storage size calculation overflowed"))


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


def publish(tmp: Path, path: Path, replace: bool = True) -> None:
    """Move the finished temp file or folder `tmp` to `path` durably: fsync its data (every file of a
    folder), rename it over `path` (a folder: `path` must not exist), fsync the parent directory. A file with
    replace=False is published by a hard link, which fails (FileExistsError) where `path` exists, even one another
    process made since it was checked; on a file system without hard links, by a rename after one more check."""
    tmp, path = Path(tmp), Path(path)
    for f in sorted(tmp.iterdir()) if tmp.is_dir() else [tmp]:
        if f.is_file():
            _fsync_file(f)
    if replace or tmp.is_dir():
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError:  # no hard links here (FAT, some network file systems): the narrow window stays
            if path.exists():
                tmp.unlink(missing_ok=True)
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    fsync_dir(path.parent)


def utf8_path(path) -> bool:
    """Whether `path` is valid UTF-8: libraries that take only a str of UTF-8 (safetensors) refuse the rest (a
    folder named in Latin-1), which their callers then read or write through bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain_name(name) -> bool:
    """Whether `name`, read from a file (a manifest, an index, DCP metadata), is one file name of the folder it is
    joined to: not empty, not . or .., no separator. Joining anything else reads outside the folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_regular(path) -> None:
    """Raise OSError unless `path` is a regular file (after symlinks): opening a FIFO blocks until a writer comes
    (a hung run that a signal does not stop), a device such as /dev/zero never ends, and a folder is not a file."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise OSError(errno.EINVAL, f"is {kind}, not a regular file", str(path))


# Small files we read whole (manifests, indexes, partitions, meta.json): larger ones are refused before reading.
SMALL_FILE_LIMIT = 256 * 2**20


def read_small(path, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of regular file `path`, refused (ValueError) past `limit` bytes: a symlink to /dev/zero or a FIFO
    is an OSError (check_regular), not a hang or every byte of memory."""
    check_regular(path)
    with open(path, "rb") as f:
        # read(n) allocates n bytes first: read the file's size (+1, to see one that grew past the limit), then on
        # in 1 MiB pieces where the size said too little (/proc files say 0, a file may grow while it is read)
        data = bytearray()
        want = min(os.fstat(f.fileno()).st_size, limit) + 1
        while want > 0 and (chunk := f.read(want)):
            data += chunk
            want = min(1 << 20, limit + 1 - len(data))
    if len(data) > limit:
        raise ValueError(f"is over {limit // 2**20} MiB, far larger than such a file is")
    return bytes(data)


def load_json(path, limit: int = SMALL_FILE_LIMIT):
    """The JSON in regular file `path` (read_small). Malformed, non-UTF-8 or too deeply nested JSON is a
    ValueError (json raises RecursionError for nesting past the interpreter's stack, which no caller caught)."""
    data = read_small(path, limit)
    try:
        return json.loads(data)
    except RecursionError as err:
        raise ValueError("nests its JSON too deeply to be one of ours") from err


def _host() -> str:
    """This host's name as a temp file name carries it: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def _temp_prefix(name: str) -> str:
    """`name` as its temps begin: cut (at a byte; a name is bytes on Linux) so that a temp name stays within the
    255-byte limit, which the host part would have pushed a long file name past."""
    room = 255 - len(f".{_host()}-{'9' * 7}-{'0' * 8}.tmp")  # Linux pids have at most 7 digits
    data = os.fsencode(name)
    return name if len(data) <= room else os.fsdecode(data[:room])


def _temp_name(path: Path) -> Path:
    """`<name>.<host>-<pid>-<random>.tmp` beside path: unique per writer, and telling which process of which host
    wrote it (remove_stale_temps)."""
    return path.with_name(f"{_temp_prefix(path.name)}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


# A temp untouched this long whose writer is gone is left over (a writer in another pid namespace of the same
# host name looks gone, but it writes its temp, so its mtime is recent)
STALE_TEMP_S = 600


def remove_stale_temps(path: Path) -> None:
    """Remove the temp files of `path` left by writers of this host that are no longer running: SIGTERM or kill -9
    mid-write skips atomic_write's own clean-up, and nothing else ever removed them (a 75 MB feature cache per
    interrupted eval). Another host's temps, a live process's and any written in the last STALE_TEMP_S stay."""
    prefix = _temp_prefix(path.name)
    pattern = re.compile(re.escape(prefix) + r"\.(\w+)-(\d+)-[0-9a-f]{8}\.tmp")
    host, now = _host(), time.time()
    try:
        siblings = list(path.parent.glob(glob.escape(prefix) + ".*.tmp"))
    except OSError:
        return
    for sibling in siblings:
        found = pattern.fullmatch(sibling.name)
        if found is None or found[1] != host or _alive(int(found[2])):
            continue
        with contextlib.suppress(OSError):
            if now - sibling.stat().st_mtime > STALE_TEMP_S:
                sibling.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process
    return True


def atomic_write(path: Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Write `path` through `write(tmp)` (any writer that takes a file name) to a temp name beside it, then `publish`
    (replace=False: FileExistsError if `path` exists by then). The temp name is unique
    (`<name>.<host>-<pid>-<random>.tmp`): a fixed `<name>.tmp` replaced, then deleted, a user's own file of that name.
    Temps that earlier writers of this host left behind are removed after a write."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
    except BaseException:  # a full disk or Ctrl-C mid-write: leave the old file and no half-written .tmp
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path, replace)
    remove_stale_temps(path)
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
    """What a file's first bytes say it is (FORMAT_MAGIC, or "empty (0 bytes)"); None when unknown, or when it is
    `expected`, the caller's own format (a damaged one of those is the caller's to name)."""
    if not head:
        return "empty (0 bytes)"
    kind = next((kind for magic, kind in FORMAT_MAGIC if head.startswith(magic)), None)
    return None if kind == expected else kind


def file_format(path, expected: str) -> str | None:
    """format_from_magic of a file's first bytes, for a reader's refusal of a file that is not `expected` (a Git
    LFS pointer, which `git clone` without git-lfs leaves in place of the data); None when unknown or unreadable."""
    try:
        check_regular(path)  # a FIFO's open waits for a writer
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    return format_from_magic(head, expected=expected)
