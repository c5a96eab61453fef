"""terrafm.fileio: a reader sees the old file or the whole new one, and a failed write leaves nothing behind."""

from pathlib import Path

import pytest

from terrafm.fileio import atomic_write, atomic_write_bytes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write_bytes(path, b"old")

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, full_disk)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_a_file_of_the_users_beside_the_target_is_never_the_temp_file(tmp_path):
    """The temp file was `<name>.tmp`: a user's own `model.safetensors.tmp` was replaced, then renamed away."""
    mine = tmp_path / "model.safetensors.tmp"
    mine.write_bytes(b"the user's")
    atomic_write_bytes(tmp_path / "model.safetensors", b"new")

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "model.safetensors", fails)
    assert mine.read_bytes() == b"the user's" and (tmp_path / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.safetensors.tmp"]


def test_temps_left_by_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """SIGTERM or kill -9 mid-write skips the clean-up, and nothing removed `<name>.<pid>-<random>.tmp` later: they
    piled up (75 MB per interrupted eval's feature cache). A live writer's temp and another host's stay."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from terrafm import fileio

    host = fileio._host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = tmp_path / f"features.npz.{host}-{dead}-0123abcd.tmp"
    live = tmp_path / f"features.npz.{host}-{os.getpid()}-0123abcd.tmp"
    other_host = tmp_path / f"features.npz.elsewhere_{socket.gethostname()[:3]}x-{dead}-0123abcd.tmp"
    mine = tmp_path / "features.npz.tmp"  # a user's file of a name no writer makes
    recent = tmp_path / f"features.npz.{host}-{dead}-4567abcd.tmp"  # written a minute ago: maybe a live writer's
    hour_ago = time.time() - 3600
    for path in (left, live, other_host, mine, recent):
        path.write_bytes(b"half")
        if path is not recent:
            os.utime(path, (hour_ago, hour_ago))
    atomic_write_bytes(tmp_path / "features.npz", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["features.npz", live.name, other_host.name, mine.name, recent.name])


def test_a_long_file_name_still_gets_a_temp_beside_it(tmp_path, monkeypatch):
    """The host in the temp name pushed names of ~170-236 bytes past the 255-byte limit (a 63-character pod name):
    `terrafm export CKPT <long name>` failed with 'File name too long', where it had written before."""
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 63)
    for name in ("x" * 230 + ".safetensors", "é" * 120 + ".json"):  # 242 and 245 bytes
        path = tmp_path / name
        atomic_write_bytes(path, b"whole")
        assert path.read_bytes() == b"whole" and sorted(p.name for p in tmp_path.iterdir()) == [name]
        path.unlink()


@pytest.mark.parametrize("links", [True, False])
def test_atomic_write_without_replace_keeps_a_file_that_appeared_meanwhile(tmp_path, monkeypatch, links):
    """replace=False publishes by a hard link, which fails where the name exists by then; on a file system without
    hard links (FAT, some network mounts) by a rename after one more check. Either way the temp goes."""
    import errno as errno_module

    from terrafm import fileio

    if not links:
        def no_links(src, dst):
            raise OSError(errno_module.EPERM, "Operation not permitted")
        monkeypatch.setattr(fileio.os, "link", no_links)
    target = tmp_path / "out.bin"
    fileio.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"first"), replace=False)
    assert target.read_bytes() == b"first"

    def another_writer_first(tmp):
        target.write_bytes(b"other")
        Path(tmp).write_bytes(b"second")

    target.unlink()
    with pytest.raises(FileExistsError):
        fileio.atomic_write(target, another_writer_first, replace=False)
    assert target.read_bytes() == b"other" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    fileio.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"third"))  # replace=True, the default
    assert target.read_bytes() == b"third"


def test_file_format_names_an_empty_file(tmp_path):
    """An empty .safetensors / .parquet / .h5 (a copy that failed) was 'unknown', and the readers' messages then
    said nothing about what the file is; eval's TIFF reader kept its own copy of the check that said "empty"."""
    from terrafm.fileio import file_format

    empty = tmp_path / "x.parquet"
    empty.write_bytes(b"")
    assert file_format(empty, "a Parquet file") == "empty (0 bytes)"
    png = tmp_path / "x.tif"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    assert file_format(png, "a TIFF image") == "a PNG image"
    assert file_format(tmp_path / "missing", "a TIFF image") is None


def test_read_small_reads_past_a_size_that_says_too_little(tmp_path):
    """A /proc file's size says 0 bytes: the first read took size + 1 = 1 byte and returned it as the whole file."""
    from terrafm.fileio import read_small

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs Linux procfs")
    data = read_small(status)
    assert data.startswith(b"Name:") and b"\nPid:" in data
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 3000)
    with pytest.raises(ValueError, match="is over"):
        read_small(big, limit=2048)
    assert read_small(big, limit=3000) == b" " * 3000


def test_an_os_error_is_named_a_write_only_where_the_command_writes(tmp_path):
    """A permission error on a checkpoint shard or a dataset folder (an input) was printed as 'cannot write'."""
    import errno

    from terrafm.fileio import os_error_message

    out = tmp_path / "out"
    denied = errno.EACCES, "Permission denied"
    assert os_error_message(OSError(*denied, str(tmp_path / "run" / "__0_0.distcp")), [out]) == \
        f"cannot read {tmp_path / 'run' / '__0_0.distcp'}: Permission denied"
    assert os_error_message(OSError(*denied, str(out / "cache" / "f.npz")), [out]) == \
        f"cannot write {out / 'cache' / 'f.npz'}: Permission denied"
    model = tmp_path / "m.safetensors"  # a file output: its temp file beside it is a write too
    assert os_error_message(OSError(*denied, f"{model}.vm-1-2.tmp"), [model]).startswith("cannot write")
    assert os_error_message(OSError(*denied, str(tmp_path / "outside")), [out]).startswith("cannot read")
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device"), [out]) == \
        f"cannot write {out}: No space left on device"
