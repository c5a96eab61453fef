"""Crash-safe file writes shared by the shard converter and the checkpointer."""

import os
from pathlib import Path


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so a reader sees the old file or the whole new one, never a torn one: temp file,
    fsync, rename over, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
