"""The read side on awkward but legitimate shards and on shard folders damaged or written by another tool:
legitimate data reaches the model finite and normalised, anything else is one ShardError / ValueError naming
the file and the key to change.

Built from tests/data/conftest.py's synthetic Major-TOM parquet set (3 cells x 4 tiles of 60 px), edited the
way real collections differ (a band that is nodata everywhere, a collection missing, S1 for some cells only).
"""

import io
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import torch

from terrafm.data.config import DataConfig
from terrafm.data.loader import build_loader
from terrafm.data.prepare import convert
from terrafm.data.shards import ShardError, ShardSet, nodata_fill

TILE = 60


def _cfg(shard_dir, **kw) -> DataConfig:
    return DataConfig(**{"shard_dir": str(shard_dir), "batch_size": 4, "global_size": 32, "local_size": 16,
                         "n_local": 2, "num_workers": 0, "backend": "numpy", **kw})


def _convert(root, out, **kw):
    convert([root], out, tile_size=TILE, workers=0, progress=False, **kw)
    return out


def _zero_band(root, collection: str, band: str) -> None:
    """Every row's `band` set to 0, Major-TOM's S2 fill: the band is nodata in every tile."""
    path = root / collection / "part_00000.parquet"
    table = pq.read_table(path)
    column = []
    for value in table[band].to_pylist():
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros_like(tifffile.imread(io.BytesIO(value))))
        column.append(buf.getvalue())
    pq.write_table(table.set_column(table.column_names.index(band), band, pa.array(column, pa.binary())), path)


def _views(loader, steps: int = 2):
    for step in range(steps):
        batch = loader.render(loader.plan(0, step))
        yield from batch.global_views + batch.local_views


def test_a_band_that_is_nodata_in_every_tile_reaches_the_model_as_zero(sample_parquet, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    _zero_band(root, "Core-S2L2A", "B01")
    out = _convert(root, tmp_path / "out")
    # no valid pixel: prepare records the fill its pixels hold as the mean (shards of before recorded 0, which
    # the loader mends the same way)
    index = json.loads((out / "index.json").read_text())
    assert index["modalities"]["s2_l2a"]["mean"][0] == 1390.0
    index["modalities"]["s2_l2a"]["mean"][0] = 0.0  # as shards of before recorded it
    (out / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"s2_l2a band\(s\) \['B01'\] have no valid pixel in any tile"):
        loader = build_loader(_cfg(out, modalities=("s2_l2a",)))
    assert loader.mean["s2_l2a"][0] == nodata_fill("s2_l2a", "db")[0] == 1390.0  # what the masked pixels hold
    seen = 0
    for view in _views(loader):
        x = view["s2_l2a"]
        assert torch.isfinite(x).all() and x[:, 1:].abs().max() < 20  # the other bands as before
        assert (x[:, 0] == 0).all()  # was (1390 - 0) / 1: a constant of 1390 fed to the model
        seen += 1
    assert seen


@pytest.mark.parametrize("scaling", ["db", "linear"])
def test_the_nodata_fill_is_what_prepare_stores_in_a_masked_pixel(sample_parquet, tmp_path, scaling):
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    path = root / "Core-S1RTC" / "part_00000.parquet"
    table = pq.read_table(path)
    nan = io.BytesIO()
    tifffile.imwrite(nan, np.full_like(tifffile.imread(io.BytesIO(table["vh"][0].as_py())), np.nan))
    column = [nan.getvalue() if i == 0 else v for i, v in enumerate(table["vh"].to_pylist())]
    pq.write_table(table.set_column(table.column_names.index("vh"), "vh", pa.array(column, pa.binary())), path)
    shards = ShardSet(_convert(root, tmp_path / "out", s1_scaling=scaling))
    i = int(np.flatnonzero(shards.offset["s1"][:, 0] >= 0)[0])  # a tile of the first cell, VH all NaN
    assert (shards.tile(i, "s1")[1].astype(np.float32) == nodata_fill("s1", scaling)[1]).all()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["s1"].update(dtype="float32"), r"modalities\.s1\.dtype is missing or not 'float16'.*says 'float32'"),
    (lambda m: m["s1"].update(std=[float("nan"), 1.0]), r"modalities\.s1\.std is missing or not a list of 2 .*finite"),
    (lambda m: m["s2_l2a"].update(mean=[float("inf")] * 12), r"modalities\.s2_l2a\.mean is missing or not .*finite"),
    (lambda m: m["s1"].update(std=[0.0, 1.0]), r"modalities\.s1\.std is missing or not positive"),
])
@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_an_index_json_of_another_tool_with_other_dtypes_or_statistics_is_named(sample_parquet, tmp_path, edit,
                                                                                 message, codec):
    out = _convert(sample_parquet, tmp_path / "out", codec=codec)
    index = json.loads((out / "index.json").read_text())
    edit(index["modalities"])
    (out / "index.json").write_text(json.dumps(index))  # NaN / Infinity: what Python's json writes for them
    with pytest.raises(ShardError, match=rf"{out / 'index.json'}: {message}"):
        build_loader(_cfg(out))  # was: a KeyError from the loader (lz4), or NaN / inf views


def test_shards_whose_bands_are_named_otherwise_are_named(sample_shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sample_shards, out)
    index = json.loads((out / "index.json").read_text())
    index["modalities"]["s1"]["bands"] = ["vv", "vh"]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"hold s1 bands \['vv', 'vh'\], not \['VV', 'VH'\]"):  # was tuple.index
        build_loader(_cfg(out))


def test_a_collection_missing_from_the_conversion_names_data_modalities(sample_parquet, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    shutil.rmtree(root / "Core-S2L1C")
    out = _convert(root, tmp_path / "out")
    with pytest.raises(ValueError, match=r"hold no s2_l1c tile \(tiles: s2_l2a 12, s1 12\); set data\.modalities to "
                                         r"a subset of \['s2_l2a', 's1'\]"):
        build_loader(_cfg(out))
    assert build_loader(_cfg(out, modalities=("s2_l2a", "s1"))).coverage == ""


def test_locations_left_out_for_a_missing_modality_are_counted(sample_parquet, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    s1 = root / "Core-S1RTC" / "part_00000.parquet"
    pq.write_table(pq.read_table(s1).slice(0, 1), s1)  # S1 for the first cell only
    out = _convert(root, tmp_path / "out")
    loader = build_loader(_cfg(out))
    assert loader.coverage == ("4 of the 12 locations have all of data.modalities ['s2_l2a', 's2_l1c', 's1'] and "
                               "are sampled (8 lack s1)")
    assert all(loader.shards.has(int(i), "s1") for i in loader.records)
    assert build_loader(_cfg(out, modalities=("s2_l2a", "s2_l1c"))).coverage == ""


@pytest.mark.parametrize("damage", ["deleted", "emptied", "truncated"])
@pytest.mark.parametrize("verify", [True, False])
def test_allow_index_mismatch_trains_on_the_records_whose_bytes_are_on_disk(sample_parquet, tmp_path, damage, verify):
    out = _convert(sample_parquet, tmp_path / "out", cells_per_shard=1)
    part = out / "part-00001.bin"
    if damage == "deleted":
        part.unlink()
    else:
        with open(part, "r+b") as f:
            f.truncate(0 if damage == "emptied" else part.stat().st_size - 100)
    with pytest.raises(ShardError, match=r"part-00001\.bin (is missing|has \d+ bytes)"):
        build_loader(_cfg(out))
    lost = 1 if damage == "truncated" else 4  # the last record's S1 chunk, or the whole cell
    with pytest.warns(UserWarning, match=rf"training on the 12 listed records .* {lost} of them without the tiles"):
        loader = build_loader(_cfg(out, allow_index_mismatch=True, verify_checksums=verify))
    assert len(loader.records) == 12 - lost
    for epoch in range(3):  # was: FileNotFoundError, "cannot mmap an empty file" or a ChecksumError mid-run
        loader.set_epoch(epoch)
        batches = list(loader)  # an empty loader passed the loop below
        assert len(batches) == len(loader) > 0
        for batch in batches:
            assert all(torch.isfinite(x).all() for v in batch.global_views + batch.local_views for x in v.values())


@pytest.mark.parametrize("change, message", [("delete", "cannot read .*part-00000.bin"),
                                             ("shorten", "part-00000.bin has 100 bytes, its chunks need")])
def test_a_bin_changed_after_the_shards_were_opened_is_one_shard_error(sample_shards, tmp_path, change, message):
    """A .bin is mapped when first read, maybe hours into a run: deleted it was a FileNotFoundError traceback,
    shortened a ValueError from mmap (or, once mapped, a bus error)."""
    root = tmp_path / "shards"
    shutil.copytree(sample_shards, root)
    shards = ShardSet(root)
    bin_path = root / "part-00000.bin"
    if change == "delete":
        bin_path.unlink()
    else:
        bin_path.write_bytes(bin_path.read_bytes()[:100])
    with pytest.raises(ShardError, match=message):
        shards.tile(0, "s2_l2a")


TRUNCATE_WHILE_READING = """
import sys
from terrafm.data.config import DataConfig
from terrafm.data.loader import build_loader
from terrafm.data.shards import ShardError

root, backend = sys.argv[1], sys.argv[2]
loader = build_loader(DataConfig(shard_dir=root, batch_size=4, global_size=32, local_size=16, n_local=2,
                                 num_workers=0, backend=backend))
loader.render(loader.plan(0, 0))  # every .bin of the batch opened and read
with open(root + "/part-00000.bin", "r+b") as f:
    f.truncate(100)
for read in (lambda: loader.render(loader.plan(0, 0)), lambda: loader.shards.chunks(0, "s1")):
    try:
        read()
        print("read past the end")
    except ShardError as err:
        print("ShardError:", err)
"""


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_a_bin_truncated_while_a_run_reads_it_is_a_shard_error_not_a_bus_error(sample_shards, tmp_path, backend):
    """A .bin truncated under a running loader (a copy over the folder in use) killed the process with SIGBUS: the
    tiles were views of a memory map, and the pages past the new end were gone. It runs in a subprocess, so that a
    signal death is seen as such."""
    import subprocess
    import sys

    root = tmp_path / "shards"
    shutil.copytree(sample_shards, root)
    run = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_READING, str(root), backend], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode} (a negative one is a signal): {run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("ShardError:") for line in lines), run.stdout
    assert all(re.search(r"part-00000\.bin has 100 bytes, its chunks need \d+: it changed after the run opened the "
                         r"shards \(a copy over a folder in use\? Re-run `terrafm prepare` into a new folder\)", line)
               for line in lines), run.stdout


def test_a_bin_rewritten_in_place_after_its_first_read_is_a_shard_error(sample_shards, tmp_path):
    """The same size, other bytes: a checksum is verified on the first read only, so a record read before the
    rewrite was handed over as whatever the new bytes held."""
    root = tmp_path / "shards"
    shutil.copytree(sample_shards, root)
    shards = ShardSet(root)
    before = shards.tile(0, "s2_l2a").copy()
    bin_path = root / "part-00000.bin"
    stat = bin_path.stat()
    with open(bin_path, "r+b") as f:
        f.write(bytes(len(before.tobytes())))
    os.utime(bin_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ShardError, match=r"part-00000\.bin was modified \(now \d+ bytes\) after the run first read "
                                         r"it; record 0 \(\S+\) is bytes 0-\d+ \(a copy over a folder in use\?"):
        shards.tile(0, "s2_l2a")


def test_a_bin_replaced_by_a_rename_is_read_as_it_was_while_open_and_named_once_reopened(sample_parquet, tmp_path,
                                                                                      monkeypatch):
    """A new conversion renamed over a folder in use: an open .bin still reads the bytes its index describes; one
    reopened (OPEN_BINS stay open) is another file, named, not read as if the index described it."""
    from terrafm.data import shards as shards_module

    out = _convert(sample_parquet, tmp_path / "out", cells_per_shard=1)  # 3 shards of 4 records
    monkeypatch.setattr(shards_module, "OPEN_BINS", 1)
    fds = len(os.listdir("/proc/self/fd"))
    shards = ShardSet(out)
    expected = [shards.tile(i, "s2_l2a").copy() for i in range(12)]  # every shard opened, two of them closed again
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    shards.tile(0, "s2_l2a")  # part-00000.bin open again
    bin_path = out / "part-00000.bin"
    (out / "new.bin").write_bytes(bytes(bin_path.stat().st_size))
    os.replace(out / "new.bin", bin_path)
    np.testing.assert_array_equal(shards.tile(1, "s2_l2a"), expected[1])
    np.testing.assert_array_equal(shards.tile(4, "s2_l2a"), expected[4])  # part-00001.bin: part-00000.bin closed
    with pytest.raises(ShardError, match=r"part-00000\.bin was replaced by another file after the run first read it; "
                                         r"record 2 "):
        shards.tile(2, "s2_l2a")


def test_an_aborted_shard_leaves_no_temp_file_when_its_last_flush_fails(tmp_path):
    """On a full disk abort() flushed the buffered chunks again, failed the same way, and left part-N.bin.tmp
    behind (a whole shard: GBs on real tiles, the disk still full)."""
    import errno

    from terrafm.data.shards import ShardWriter

    writer = ShardWriter(tmp_path, 0, {"s1": ("VV", "VH")}, 60)
    real = writer._file

    class FullDisk:
        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = FullDisk()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_sample_cache_says_to_delete_it(sample_shards, tmp_path, monkeypatch):
    """The bundled sample's damage said 'Re-run terrafm prepare into this folder', which its user never ran."""
    from terrafm.data import sample

    root = tmp_path / "sample" / "v1" / "shards"
    shutil.copytree(sample_shards, root)
    (root / "part-00000.bin").unlink()
    monkeypatch.setattr(sample, "ensure_sample_shards", lambda *a, **k: root)
    with pytest.raises(ShardError, match=r"the bundled sample's cache is damaged .*; delete .*v1 and run again"):
        build_loader(DataConfig(batch_size=2, n_local=1, global_size=32, local_size=16, num_workers=0))


def test_a_loader_state_of_other_seeds_names_the_settings():
    """It said 'loader state is for seed 0, this loader has 7000021': the internal combined seed, no setting named."""
    def loader(seed):
        return build_loader(DataConfig(batch_size=2, n_local=1, global_size=32, local_size=16, num_workers=0,
                                       seed=seed))

    with pytest.raises(ValueError, match="data.seed or train.seed differs from the checkpoint's run"):
        loader(7).load_state_dict(loader(0).state_dict())


def test_a_shard_set_that_has_read_pickles_and_forks_into_a_worker(sample_shards):
    """ShardSet keeps open .bin descriptors and a lock since it reads instead of mapping: a lock does not pickle (a
    spawned loader worker), and a forked worker must not share the parent's lock."""
    import multiprocessing
    import pickle

    shards = ShardSet(sample_shards)
    tile = shards.tile(0, "s2_l2a").copy()
    copy = pickle.loads(pickle.dumps(shards))
    np.testing.assert_array_equal(copy.tile(0, "s2_l2a"), tile)
    shards._bins_lock.acquire()  # as if another thread were reading at the fork
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply_async(shards.tile, (0, "s2_l2a")).get(timeout=60), tile)
    finally:
        shards._bins_lock.release()


def test_a_worker_whose_read_hangs_is_a_shard_error_within_the_timeout(sample_shards, monkeypatch):
    """A read that never returns (a stalled network file system) left the rank waiting for ever, and every other
    rank in its collectives; now the batch's wait ends at data.timeout_s in the ShardError the trainer stops on."""
    import threading
    import time

    loader = build_loader(_cfg(sample_shards, num_workers=2, timeout_s=0.5))
    release, render = threading.Event(), loader.render_host
    hang = {int(i) for i in loader.plan(0, 2).indices}  # batch 2 hangs (batch 1 is in flight when 0 is handed out)

    def render_host(plan):
        if {int(i) for i in plan.indices} == hang:
            release.wait(60)
        return render(plan)

    monkeypatch.setattr(loader, "render_host", render_host)
    it, start = iter(loader), time.monotonic()
    try:
        assert next(it).index.tolist() == loader.plan(0, 0).indices.tolist()
        with pytest.raises(ShardError, match=r"batch 2 of epoch 0 was not rendered within data.timeout_s=0.5 s: a "
                                             r"read of the shards at .* hangs"):
            next(it)
        assert time.monotonic() - start < 10 and loader.step == 1  # a resume reads batches 1 and 2 again
    finally:
        release.set()
    with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds >= 0"):
        _cfg(sample_shards, timeout_s=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_host_memory_running_out_in_a_render_is_a_shard_error(sample_shards, monkeypatch, workers):
    """A MemoryError in a render (a render thread's, or the rank's own) went up on this rank alone: the others
    waited in their collectives until train.collective_timeout_s and the steps since the checkpoint were lost.
    As a ShardError the trainer discards the step on every rank, writes the checkpoint and stops."""
    loader = build_loader(_cfg(sample_shards, num_workers=workers))
    render, fail = loader.render_host, {int(i) for i in loader.plan(0, 2).indices}  # 1 is in flight at 0

    def render_host(plan):
        if {int(i) for i in plan.indices} == fail:
            raise MemoryError
        return render(plan)

    monkeypatch.setattr(loader, "render_host", render_host)
    it = iter(loader)
    assert next(it).index.tolist() == loader.plan(0, 0).indices.tolist()
    with pytest.raises(ShardError, match=rf"batch 2 of epoch 0: host memory ran out while rendering it; lower "
                                         rf"data.num_workers \(now {workers}\) or data.batch_size"):
        next(it)


@pytest.mark.parametrize("name", ["../elsewhere/part-00000", "/abs/part-00000"])
def test_an_index_naming_shards_outside_its_folder_is_refused(sample_shards, tmp_path, name):
    """Shard names were only checked to be strings: '../victim/part-00000' trained on another folder's shards."""
    index = json.loads((sample_shards / "index.json").read_text())
    index["shards"][0]["name"] = name
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shards.*each name a shard of this folder \(no path\)"):
        ShardSet(tmp_path)


def test_a_fifo_or_deeply_nested_index_is_one_shard_error(tmp_path):
    """A FIFO in place of index.json hung the run in open() (a stop signal only recorded), and JSON nested past the
    stack was a RecursionError traceback."""
    os.mkfifo(tmp_path / "index.json")
    with pytest.raises(ShardError, match=r"index\.json is not readable \(is a FIFO \(named pipe\), not a regular file"):
        ShardSet(tmp_path)
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.json").write_text("[" * 100000)
    with pytest.raises(ShardError, match=r"index\.json is not valid JSON \(nests its JSON too deeply"):
        ShardSet(tmp_path)


def test_a_loader_for_cuda_on_a_machine_without_it_says_so(sample_shards):
    """docs/data.md's loader example (device="cuda") run on a CPU machine ended in torch's bare AssertionError."""
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not usable here \(.+\); build the loader for device "
                                         "'cpu'"):
        build_loader(_cfg(sample_shards), rank=0, world_size=1, seed=0, device="cuda")


@pytest.mark.parametrize("tile_size", [1000, 8])
def test_an_lz4_index_whose_tile_size_its_chunks_cannot_hold_is_refused(sample_parquet, tmp_path, tile_size):
    """Only raw chunks were checked against tile_size: an lz4 index.json edited to a larger tile allocated what it
    declared at the first read and was blamed on the machine ('host memory ran out ... lower data.num_workers'), and
    a smaller one blamed the .bin."""
    out = _convert(sample_parquet, tmp_path / "lz4", codec="lz4")
    ShardSet(out)  # as written
    index = json.loads((out / "index.json").read_text())
    index["tile_size"] = tile_size
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=rf"index.json's tile_size {tile_size} and dtype \w+ make tiles that LZ4 "
                                         r"chunks of that size cannot hold: \d+; index.json does not belong"):
        ShardSet(out)
