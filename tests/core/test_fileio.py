"""terrafm.fileio: a reader sees the old file or the whole new one, and a failed write leaves nothing behind."""

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
