"""`terrafm prepare` on input a user with real files brings: GeoTIFF nodata tags, parquet columns of the wrong type,
null grid cells, inputs or --out that are wrong, a stop mid-way (bad input, Ctrl-C) and the re-run after it.

Every case: one message, exit 2 (130 for Ctrl-C), no traceback, no temporary file left, finished shards kept."""

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tifffile
from geotiff_folders import S2_FILE, in_grid_cells, product_folders

from terrafm.data import prepare, sources
from terrafm.data.prepare import convert
from terrafm.data.sample import write_sample_parquet
from terrafm.data.shards import ShardError, ShardSet
from terrafm.data.sources import GDAL_NODATA, BadInput
from terrafm.modalities import REFERENCE_STATS

TILE = 60  # tests/data/conftest.py's sample set: 3 cells of 120 px
S1_FILE = ("Core-S1RTC", "part_00000.parquet")


def _copy(sample_parquet: Path, tmp_path: Path) -> Path:
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    return root


def _set_column(root: Path, parts: tuple[str, str], name: str, values: pa.Array) -> None:
    path = root.joinpath(*parts)
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index(name), name, values), path)


def _edit_band(root: Path, parts: tuple[str, str], band: str, row: int, make) -> None:
    """Replace one band of one parquet row by make(decoded array) -> GeoTIFF bytes."""
    column = pq.read_table(root.joinpath(*parts))[band].to_pylist()
    column[row] = make(tifffile.imread(io.BytesIO(column[row])))
    _set_column(root, parts, band, pa.array(column, pa.binary()))


def _tif_with_nodata(array: np.ndarray, nodata: str) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, extratags=[(GDAL_NODATA, "s", 0, nodata, False)])
    return buf.getvalue()


def _tif(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def _cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args([*args, "--tile-size", str(TILE), "--workers", "0", "--no-progress"]))


def test_a_geotiff_nodata_tag_is_masked_like_majortom_fill(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)

    def s2(a):  # a 16-bit product that declares 65535 as its fill (GDAL_NODATA), not Major-TOM's 0
        a = a.copy()
        a[:5, :5] = 65535
        return _tif_with_nodata(a, "65535")

    def s1(a):  # an RTC product whose fill is 0 linear power, declared in the tag
        a = a.copy()
        a[:4, :4] = 0.0
        return _tif_with_nodata(a, "0")

    _edit_band(root, S2_FILE, "B04", 0, s2)
    _edit_band(root, S1_FILE, "vv", 0, s1)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert summary["modalities"]["s2_l2a"]["nodata_pixels"] == [0, 0, 0, 25] + [0] * 8
    assert summary["modalities"]["s1"]["nodata_pixels"] == [16, 0]
    shards = ShardSet(tmp_path / "out")
    i = list(shards.keys).index(pq.read_table(root.joinpath(*S2_FILE))["grid_cell"][0].as_py() + "/0_0")
    fill = round(REFERENCE_STATS["s2_l2a"]["mean"][3])  # stored like Major-TOM's fill: the band's reference mean
    np.testing.assert_array_equal(shards.tile(i, "s2_l2a")[3][:5, :5], fill)
    assert (shards.tile(i, "s2_l2a")[3] != 65535).all()


def test_an_untagged_float32_max_fill_in_s1_is_nodata(sample_parquet, tmp_path):
    """float32's max (a common untagged fill) became a 385 dB pixel in the shards and their statistics."""
    root = _copy(sample_parquet, tmp_path)

    def s1(a):
        a = a.copy()
        a[:3, :3] = np.finfo(np.float32).max
        return _tif(a)

    _edit_band(root, S1_FILE, "vv", 0, s1)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert summary["modalities"]["s1"]["nodata_pixels"] == [9, 0]
    shards = ShardSet(tmp_path / "out")
    assert max(shards.tile(i, "s1").max() for i in range(len(shards))) < 50  # dB


@pytest.mark.parametrize("nodata", ["-9999", "nan", "none", "1e40"])
def test_a_nodata_tag_the_band_cannot_hold_marks_no_pixel(nodata):
    a = np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    product = sources.Product("s2_l2a", "1U_1R", "S2A_MSIL2A_x", "f.parquet", row=0)
    np.testing.assert_array_equal(sources.decode_band(_tif_with_nodata(a, nodata), "B04", product), a)


def test_metadata_columns_of_another_type_are_named_not_a_traceback(sample_parquet, tmp_path, capsys):
    root = _copy(sample_parquet, tmp_path)
    _set_column(root, S2_FILE, "product_id", pa.array([1, 2, 3]))
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "column product_id has type int64, expected string" in err and str(root.joinpath(*S2_FILE)) in err


def test_pandas_categorical_metadata_columns_are_read(sample_parquet, sample_shards, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    table = pq.read_table(root.joinpath(*S2_FILE))
    for name in ("product_id", "grid_cell"):
        _set_column(root, S2_FILE, name, table[name].dictionary_encode())
    assert pa.types.is_dictionary(pq.read_schema(root.joinpath(*S2_FILE)).field("grid_cell").type)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert summary["num_records"] == 12 and summary["modalities"]["s2_l2a"]["tiles"] == 12


@pytest.mark.parametrize("cell, reason", [(None, "null or empty grid_cell"),
                                          ("../../x", "grid_cell '../../x' is not a Major-TOM grid cell")])
def test_a_row_without_a_grid_cell_is_bad_input_or_skipped(sample_parquet, tmp_path, cell, reason):
    root = _copy(sample_parquet, tmp_path)
    cells = pq.read_table(root.joinpath(*S2_FILE))["grid_cell"].to_pylist()
    _set_column(root, S2_FILE, "grid_cell", pa.array([cell, *cells[1:]], pa.string()))
    with pytest.raises(BadInput, match=r"part_00000.parquet \(row 0\): " + re.escape(reason)):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [s["reason"][:len(reason)] for s in summary["skipped"]] == [reason]
    assert summary["modalities"]["s2_l2a"]["tiles"] == 2 * 4 and summary["num_records"] == 3 * 4


def test_a_band_column_of_another_type_is_named(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    _set_column(root, S2_FILE, "B04", pa.array(["a", "b", "c"]))
    with pytest.raises(BadInput, match="band B04 holds str, expected GeoTIFF bytes"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)


def test_a_missing_input_is_named_and_creates_no_out(tmp_path, capsys):
    assert _cli([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert f"input {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_named(sample_parquet, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert _cli([str(sample_parquet), "--out", str(tmp_path / "out")]) == 2
    assert "is a file; expected a directory" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "mine"


def test_an_unreadable_band_file_is_bad_input_not_a_write_error(sample_parquet, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tifs"
    product_folders(sample_parquet, in_grid_cells(folder))
    bad = sorted(folder.rglob("B04.tif"))[1]
    read_bytes = Path.read_bytes

    def deny(self):
        if self == bad:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert _cli([str(folder), "--out", str(tmp_path / "out"), "--modalities", "s2_l2a"]) == 2
    err = capsys.readouterr().err
    assert f"bad input: {bad.parent}" in err and f"cannot read {bad} (Permission denied)" in err


def test_a_stop_on_bad_input_leaves_no_temp_file_and_skip_bad_resumes(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S2_FILE, "B04", 1, lambda a: b"II*\x00 truncated")
    out = tmp_path / "out"
    with pytest.raises(BadInput, match="truncated or corrupt GeoTIFF"):
        convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.bin", "part-00000.npz"]  # shard 1 stopped
    summary = convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False, skip_bad=True)
    assert summary["resumed_shards"] == 1 and len(summary["skipped"]) == 1 and summary["num_records"] == 12
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_mid_way_keeps_finished_shards_and_the_rerun_resumes(sample_parquet, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    write_cells = prepare._write_cells

    def interrupted(writer, job, parquet, opts):
        if writer.stem.name == "part-00001":  # its part-00001.bin.tmp is open: Ctrl-C now
            raise KeyboardInterrupt
        return write_cells(writer, job, parquet, opts)

    monkeypatch.setattr(prepare, "_write_cells", interrupted)
    assert _cli([str(sample_parquet), "--out", str(out), "--cells-per-shard", "1"]) == 130
    assert "interrupted; the finished shards" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.bin", "part-00000.npz"]  # no index.json, no .tmp
    monkeypatch.setattr(prepare, "_write_cells", write_cells)
    summary = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert summary["resumed_shards"] == 1 and summary["num_records"] == 12


def test_an_input_that_cannot_be_read_is_named_as_a_read(sample_parquet, tmp_path, monkeypatch, capsys):
    """Every OSError was printed as 'cannot write', also one raised reading an input."""
    import errno

    def denied(inputs):
        raise OSError(errno.EACCES, "Permission denied", str(sample_parquet / "Core-S1RTC"))

    monkeypatch.setattr(sources, "discover", denied)
    assert _cli([str(sample_parquet), "--out", str(tmp_path / "out")]) == 2
    assert f"cannot read {sample_parquet / 'Core-S1RTC'}: Permission denied" in capsys.readouterr().err


def test_the_default_workers_are_the_cpus_this_process_may_run_on(sample_parquet, tmp_path, monkeypatch):
    """os.cpu_count() started a worker per core of the node, also under `taskset -c 0` or a SLURM job given 4 CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    started, real = [], prepare.ProcessPoolExecutor

    def recording(max_workers=None, **kwargs):
        started.append(max_workers)
        return real(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", recording)
    summary = convert([sample_parquet], tmp_path / "out", tile_size=TILE, cells_per_shard=1, progress=False)
    assert started == [1] and summary["num_records"] == 12


def test_negative_workers_is_named(sample_parquet, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args([str(sample_parquet), "--out", str(tmp_path / "out"), "--workers", "-1"])
    assert prepare.run(args) == 2
    assert "workers must be >= 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_shards_of_a_larger_earlier_conversion_are_refused_not_left_beside_the_index(sample_parquet, tmp_path):
    root, out = _copy(sample_parquet, tmp_path), tmp_path / "out"
    convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    for f in root.rglob("*.parquet"):  # the last cell gone: the first shards' jobs are unchanged
        table = pq.read_table(f)
        last = max(table["grid_cell"].to_pylist())
        pq.write_table(table.filter(pc.not_equal(table["grid_cell"], last)), f)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(BadInput, match="holds part-00002 beyond the 2 shards of this conversion"):
        convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert len(ShardSet(out)) == 12  # the earlier conversion is still whole


def test_a_partly_downloaded_parquet_is_named_and_skip_bad_skips_the_file(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    path = root.joinpath(*S1_FILE)
    path.write_bytes(path.read_bytes()[:1000])  # the footer is gone
    with pytest.raises(BadInput, match=r"part_00000.parquet \(whole file\): not a readable parquet file"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(path), "whole file")]
    assert summary["num_records"] == 12 and summary["modalities"]["s1"]["tiles"] == 0


def test_with_workers_the_first_bad_product_stops_the_run_without_converting_the_rest(tmp_path):
    root = tmp_path / "in"
    write_sample_parquet(root, seed=1, cells=24, tile_size=TILE)
    path = root.joinpath(*S2_FILE)
    first = min(pq.read_table(path)["grid_cell"].to_pylist())
    row = pq.read_table(path)["grid_cell"].to_pylist().index(first)
    _edit_band(root, S2_FILE, "B04", row, lambda a: b"not a tiff")  # shard 0's cell
    out = tmp_path / "out"
    with pytest.raises(BadInput, match="truncated or corrupt GeoTIFF"):
        convert([root], out, tile_size=TILE, cells_per_shard=1, workers=2, progress=False)
    finished = list(out.glob("part-*.npz"))
    assert len(finished) <= 12, f"{len(finished)} of 23 good shards converted after the error"  # before: all 23
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("shape", [(1, 4, 4), (4, 4, 1)])
def test_one_band_written_with_a_singleton_axis_is_read_as_the_band(shape):
    a = np.arange(1, 17, dtype=np.uint16).reshape(shape)
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric="minisblack", metadata={"axes": "SYX" if shape[0] == 1 else "YXS"})
    assert tifffile.imread(io.BytesIO(buf.getvalue())).ndim == 3  # what a file from another tool decodes to
    product = sources.Product("s2_l2a", "1U_1R", "S2A_MSIL2A_x", "f.parquet", row=0)
    np.testing.assert_array_equal(sources.decode_band(buf.getvalue(), "B04", product), a.reshape(4, 4))
    with pytest.raises(BadInput, match=r"expected one 2-D band, got shape \(2, 4, 4\)"):
        sources.decode_band(_tif_with_nodata(np.zeros((2, 4, 4), np.uint16), "none"), "B04", product)


def test_symlinked_folders_are_read_and_a_dangling_link_is_named(sample_parquet, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for folder in sample_parquet.iterdir():  # collections linked in from shared storage, as on an HPC scratch
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a cycle is walked once
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert summary["num_records"] == 12 and summary["duplicates_dropped"] == 0
    assert all(summary["modalities"][m]["tiles"] == 12 for m in ("s2_l2a", "s2_l1c", "s1"))
    (root / "part_00001.parquet").symlink_to(tmp_path / "gone.parquet")
    with pytest.raises(BadInput, match=r"part_00001.parquet \(whole file\): a symlink to nothing"):
        convert([root], tmp_path / "out2", tile_size=TILE, workers=0, progress=False)


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: p.symlink_to("/dev/zero")], ids=["fifo", "device"])
def test_a_fifo_or_device_under_a_data_name_is_named_not_dropped(sample_parquet, tmp_path, make):
    """A FIFO named part_00000.parquet was left out in silence: the conversion ended without that collection's
    products, exit 0 (a device read until memory ran out)."""
    root = _copy(sample_parquet, tmp_path)
    victim = root / "Core-S1RTC" / "part_00000.parquet"
    victim.unlink()
    make(victim)
    with pytest.raises(BadInput, match=r"Core-S1RTC/part_00000.parquet \(whole file\): not a regular file"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)


def test_a_changed_input_file_is_redone_not_resumed(sample_parquet, tmp_path, capsys):
    root, out = _copy(sample_parquet, tmp_path), tmp_path / "out"
    assert _cli([str(root), "--out", str(out)]) == 0
    cell = pq.read_table(root.joinpath(*S2_FILE))["grid_cell"][0].as_py()
    _edit_band(root, S2_FILE, "B04", 0, lambda a: _tif_with_nodata(np.full_like(a, 7), "none"))
    assert _cli([str(root), "--out", str(out)]) == 0
    out_text = capsys.readouterr().out
    assert "0 shards resumed" in out_text and "1 shards redone because their input files changed" in out_text
    shards = ShardSet(out)
    assert (shards.tile(list(shards.keys).index(f"{cell}/0_0"), "s2_l2a")[3] == 7).all()


def test_a_rerun_that_stops_midway_leaves_no_index_json_over_rewritten_shards(sample_parquet, tmp_path):
    """An edited input redid shard 0, then a bad product stopped the run at shard 1: the old index.json (its byte
    counts, tile counts and statistics) stayed beside the rewritten shard and pretrain trained on the mix, exit 0.
    The index is removed when a run starts rewriting; the shard reader also checks each shard's bytes against it."""
    root, out = _copy(sample_parquet, tmp_path), tmp_path / "out"
    convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    old_index = (out / "index.json").read_text()
    _edit_band(root, S2_FILE, "B04", 0, lambda a: _tif_with_nodata(np.full_like(a, 7), "none"))
    _edit_band(root, S2_FILE, "B04", 1, lambda a: b"II*\x00 truncated")
    with pytest.raises(BadInput, match="truncated or corrupt GeoTIFF"):
        convert([root], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert not (out / "index.json").exists()
    with pytest.raises(ShardError, match=r"no index\.json|index\.json"):
        ShardSet(out)
    index = json.loads(old_index)  # an index kept from before (a copy restored by hand) whose shard 0 had another size
    index["shards"][0]["bytes"] += 4800
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"part-00000\.bin has \d+ bytes, index\.json says \d+"):
        ShardSet(out)


def test_a_file_fixed_after_a_skip_bad_run_is_retried(sample_parquet, tmp_path):
    root, out = _copy(sample_parquet, tmp_path), tmp_path / "out"
    path = root.joinpath(*S2_FILE)
    good = path.read_bytes()
    _edit_band(root, S2_FILE, "B04", 1, lambda a: b"not a tiff")
    assert len(convert([root], out, tile_size=TILE, workers=0, progress=False, skip_bad=True)["skipped"]) == 1
    path.write_bytes(good)
    summary = convert([root], out, tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert summary["skipped"] == [] and summary["redone_shards"] == 1
    assert summary["modalities"]["s2_l2a"]["tiles"] == 12


def _corrupt_data_pages(path: Path) -> None:
    """Rewrite path uncompressed, one row per group, then overwrite its first data pages: the footer stays intact."""
    pq.write_table(pq.read_table(path), path, compression="none", row_group_size=1)
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xab" * 196
    path.write_bytes(bytes(data))


def test_inputs_that_overlap_read_each_file_once(sample_parquet, tmp_path):
    """The same parquet file reached through its folder and by name was read twice: its products were counted as
    duplicates dropped, and a bad record was skipped (and reported) once per way in."""
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S1_FILE, "vv", 0, lambda a: b"not a tiff")
    s1 = root.joinpath(*S1_FILE)
    once = convert([root], tmp_path / "once", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    overlapping = convert([root, s1.parent, s1, root], tmp_path / "overlap", tile_size=TILE, workers=0, progress=False,
                          skip_bad=True)
    assert overlapping["duplicates_dropped"] == once["duplicates_dropped"] == 0
    assert overlapping["skipped"] == once["skipped"] and len(once["skipped"]) == 1
    assert overlapping["num_records"] == once["num_records"] == 12


def test_the_same_input_spelled_otherwise_resumes_every_shard(sample_parquet, tmp_path, monkeypatch):
    """A re-run given the input as an absolute path, a relative one or through a symlink redid every shard, saying
    that its input files had changed."""
    root = _copy(sample_parquet, tmp_path)
    (tmp_path / "link").symlink_to(root)
    out = tmp_path / "out"
    first = convert([root], out, tile_size=TILE, workers=0, progress=False)
    monkeypatch.chdir(tmp_path)
    for spelled in (Path("in"), tmp_path / "link", Path("link/../in")):
        again = convert([spelled], out, tile_size=TILE, workers=0, progress=False)
        assert again["resumed_shards"] == len(first["shards"]) and again["redone_shards"] == 0, spelled


@pytest.mark.parametrize("content", ['{"my": "own catalogue"}', "not json", "[1, 2]"])
def test_an_index_json_prepare_did_not_write_is_refused_and_kept(sample_parquet, tmp_path, capsys, content):
    """A user's own index.json in --out was deleted at the start of the conversion (and lost for good when the run
    then stopped on bad input) or overwritten at its end."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text(content)
    assert _cli([str(sample_parquet), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'index.json'} is not a terrafm shard index" in err and "Traceback" not in err, err
    assert (out / "index.json").read_text() == content and sorted(p.name for p in out.iterdir()) == ["index.json"]


def test_a_rerun_replaces_the_index_json_of_its_own_conversion(sample_parquet, tmp_path):
    out = tmp_path / "out"
    first = convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)
    again = convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)
    assert again["resumed_shards"] == len(first["shards"]) and len(ShardSet(out)) == first["num_records"]


def test_a_product_id_that_is_not_utf8_is_bad_input_naming_the_file(sample_parquet, tmp_path, capsys):
    """A damaged data page can hold bytes that are not UTF-8: decoding the ids raised a bare 'utf-8 codec' error that
    named no file, and --skip-bad did not skip the file."""
    root = _copy(sample_parquet, tmp_path)
    path = root.joinpath(*S2_FILE)
    table = pq.read_table(path)
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=1, write_statistics=False)
    data = bytearray(path.read_bytes())
    at = data.find(table["product_id"][0].as_py().encode())
    assert at > 0
    data[at + 4] = 0xFF
    path.write_bytes(bytes(data))
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"bad input: {path} (whole file): not a readable parquet file" in err and "Traceback" not in err, err
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(path), "whole file")]


def test_a_parquet_with_corrupt_data_pages_is_bad_input_not_a_write_error(sample_parquet, tmp_path, capsys):
    root = _copy(sample_parquet, tmp_path)
    path = root.joinpath(*S1_FILE)
    _corrupt_data_pages(path)
    assert pq.read_schema(path).names  # the footer still reads
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"bad input: {path} (whole file): not a readable parquet file" in err and "cannot write" not in err
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(path), "whole file")]
    assert summary["num_records"] == 12 and summary["modalities"]["s1"]["tiles"] == 0


def test_a_footer_column_path_that_is_not_utf8_does_not_stop_the_row_group_check(sample_parquet, sample_shards,
                                                                                  tmp_path):
    """One byte changed in a footer's column-chunk path (its schema, data and band reads are intact): the check for
    large row groups, which reads those paths, raised UnicodeDecodeError before any file was read, --skip-bad too,
    naming no file. The data reads, so the file converts as the original does."""
    root = _copy(sample_parquet, tmp_path)
    path = root.joinpath(*S2_FILE)
    data = path.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    at = data.rindex(b"B04", footer)  # the row group's path_in_schema, after the schema's column name
    path.write_bytes(data[:at] + b"B\xa04" + data[at + 3:])
    assert "B04" in pq.read_schema(path).names
    group = pq.ParquetFile(path).metadata.row_group(0)
    with pytest.raises(UnicodeDecodeError):
        [group.column(c).path_in_schema for c in range(group.num_columns)]
    convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    ref, out = ShardSet(sample_shards), ShardSet(tmp_path / "out")
    assert list(out.keys) == list(ref.keys)
    for i in range(len(ref)):
        np.testing.assert_array_equal(out.tile(i, "s2_l2a"), ref.tile(i, "s2_l2a"))


def test_a_corrupt_band_page_is_bad_input_naming_the_row(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    path = root.joinpath(*S2_FILE)
    pq.write_table(pq.read_table(path), path, compression="none", row_group_size=1)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(pq.read_schema(path).names.index("B04"))
    data[start.data_page_offset:start.data_page_offset + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=r"part_00000.parquet \(row 1, .*cannot read the parquet row"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(path), "row 1")]


def _no_bits_per_sample(data: bytes) -> bytes:
    """BitsPerSample 0: tifffile decodes the image to a (0, H, W) array."""
    entry = b"\x02\x01\x03\x00\x01\x00\x00\x00\x10\x00"  # BitsPerSample (258), SHORT, 1 value: 16
    assert data.count(entry) == 1
    return data.replace(entry, entry[:8] + b"\x00\x00")


def _huge_size(data: bytes) -> bytes:
    """ImageWidth and ImageLength 2**20: a 2 TiB uint16 image, more than any test machine's memory."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for code in (256, 257):
            at = tif.pages.first.tags[code].valueoffset
            out[at:at + 4] = (1 << 20).to_bytes(4, "little")
    return bytes(out)


def _large_size(data: bytes) -> bytes:
    """ImageWidth and ImageLength 8000: a 128 MB image that memory holds, in one 60-row strip of 60 px."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for code in (256, 257):
            at = tif.pages.first.tags[code].valueoffset
            out[at:at + 4] = (8000).to_bytes(4, "little")
    return bytes(out)


@pytest.mark.parametrize("damage, reason", [
    # was "terrafm prepare: cannot reshape array of size 0 into shape (60,60)", naming no file; --skip-bad stopped too
    (_no_bits_per_sample, r"the image decodes to no pixel \(shape \(0, 60, 60\)"),
    # was a MemoryError: "ran out of memory; nothing was skipped for it. Lower --workers ...", which no rerun cures
    (_huge_size, r"its header declares a 1048576 x 1048576 image \(2048 GiB\), more than this machine's"),
    # was decoded into a mostly empty image first (40000 px: 3.2 GB, out of memory under a memory limit)
    (_large_size, r"its header declares a 8000 x 8000 image in 134 strips but lists 1: a damaged header"),
])
def test_a_band_with_a_damaged_header_is_bad_input_naming_the_band(sample_parquet, tmp_path, capsys, damage, reason):
    """One GeoTIFF cell of a Major-TOM parquet whose header was damaged (a byte changed in a download)."""
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S2_FILE, "B05", 1, lambda a: damage(_tif(a)))
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "memory;" not in err
    assert re.search(r"part_00000\.parquet \(row 1, grid_cell \S+, product \S+MSIL2A\S+\): band B05: truncated or "
                     r"corrupt GeoTIFF \(ValueError: " + reason, err), err
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(root.joinpath(*S2_FILE)), "row 1")]
    assert summary["num_records"] == 12 and summary["modalities"]["s2_l2a"]["tiles"] == 8


def test_thumbnails_and_hidden_folders_beside_geotiff_products_are_ignored(sample_parquet, tmp_path):
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    thumb = _tif_with_nodata(np.zeros((4, 4), np.uint8), "none")
    (products[0].parent / "thumbnail.tif").write_bytes(thumb)
    (products[0].parent.parent / "overview.tif").write_bytes(thumb)
    (products[0] / ".ipynb_checkpoints").mkdir()
    (products[0] / ".ipynb_checkpoints" / "B04-checkpoint.tif").write_bytes(thumb)
    (products[1] / "._B04.tif").write_bytes(b"macOS resource fork")
    summary = convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["num_records"] == 12 and summary["skipped"] == []
    (products[0].parent / "renamed_product").mkdir()
    (products[0].parent / "renamed_product" / "B04.tif").write_bytes(thumb)
    with pytest.raises(BadInput, match=r"renamed_product \(renamed_product\): product id names no modality"):
        convert([folder], tmp_path / "out2", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))


def test_band_file_names_in_any_case_are_read(sample_parquet, tmp_path):
    """B8a.tif or b04.TIF: the band lookup tried the exact and the lower-case name only, so mixed case was a
    missing band (twins in two cases are refused by name, below)."""
    folders = {}
    for name, case in (("upper", str), ("mixed", lambda b: b[:-1] + b[-1].lower() if b[-1].isalpha() else b.lower())):
        folder = tmp_path / name
        for product in product_folders(sample_parquet, in_grid_cells(folder)):
            for f in product.glob("*.tif"):
                f.rename(f.with_name(case(f.stem) + ".tif"))
        assert name == "upper" or (product / "B8a.tif").exists()
        folders[name] = convert([folder], tmp_path / f"out_{name}", tile_size=TILE, workers=0, progress=False,
                                modalities=("s2_l2a",))
    assert folders["mixed"]["num_records"] == folders["upper"]["num_records"] == 12
    a, b = ShardSet(tmp_path / "out_upper"), ShardSet(tmp_path / "out_mixed")
    for i in range(len(a)):
        np.testing.assert_array_equal(a.tile(i, "s2_l2a"), b.tile(i, "s2_l2a"))


@pytest.mark.parametrize("twin", ["B04.tiff", "b04.tif"])
def test_two_files_for_one_band_in_a_product_folder_are_named(sample_parquet, tmp_path, twin):
    """B04.tif beside B04.tiff or b04.tif: one of them was read, which one depended on the listing order (the
    case-variant one in silence)."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    (products[0] / twin).write_bytes((products[1] / "B04.tif").read_bytes())  # another place's band
    with pytest.raises(BadInput, match=rf"{products[0].name}.*two files for one band \(B04\.tif and "
                                       rf"{re.escape(twin)}\)"):
        convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    summary = convert([folder], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",),
                      skip_bad=True)
    assert [s["record"] for s in summary["skipped"]] == [products[0].name]


def test_band_columns_that_differ_only_in_case_are_two_for_one_band(sample_parquet, tmp_path):
    """Parquet columns B04 and b04 or vv and VV: one of them was read in silence."""
    root = _copy(sample_parquet, tmp_path)
    for parts, band, twin in ((S2_FILE, "B04", "b04"), (S1_FILE, "vv", "VV")):
        table = pq.read_table(root.joinpath(*parts))
        pq.write_table(table.append_column(twin, table[band]), root.joinpath(*parts))
    s1, s2 = str(root.joinpath(*S1_FILE)), str(root.joinpath(*S2_FILE))
    with pytest.raises(BadInput, match=rf"{re.escape(s1)} \(whole file\): two columns for one band \(vv and VV\): "
                                       r"keep one \(2 such records"):
        convert([root], tmp_path / "out2", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(s1, "whole file"), (s2, "whole file")]
    assert "two columns for one band (B04 and b04)" in summary["skipped"][1]["reason"]
    assert {m: s["tiles"] for m, s in summary["modalities"].items()} == {"s2_l2a": 0, "s2_l1c": 12, "s1": 0}


def test_a_column_name_written_twice_is_the_file_named_not_a_traceback(sample_parquet, tmp_path):
    """Raw pyarrow writes two columns of one name (pandas and Spark cannot): which one holds the data is a guess, so
    the file is refused by name (exit 2), and --skip-bad skips it whole; it was a KeyError from the schema."""
    root = _copy(sample_parquet, tmp_path)
    s2 = root.joinpath(*S2_FILE)
    table = pq.read_table(s2)
    pq.write_table(table.append_column("product_id", table["product_id"]), s2)
    with pytest.raises(BadInput, match=rf"{re.escape(str(s2))} \(whole file\): column name\(s\) \['product_id'\] "
                                       "appear more than once: keep one of each"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(s2), "whole file")]
    assert summary["modalities"]["s2_l2a"]["tiles"] == 0 and summary["modalities"]["s1"]["tiles"] > 0

def test_an_index_json_of_another_conversion_is_refused_by_its_statistics(sample_parquet, tmp_path):
    """The index.json of a --s1-scaling linear conversion copied over dB shards has the same record counts, so it
    passed every check and the model saw S1 at mean -91 std; its band means are now checked against the sums each
    shard carries."""
    convert([sample_parquet], tmp_path / "db", tile_size=TILE, workers=0, progress=False)
    convert([sample_parquet], tmp_path / "linear", tile_size=TILE, workers=0, progress=False, s1_scaling="linear")
    ShardSet(tmp_path / "db")
    shutil.copy(tmp_path / "linear" / "index.json", tmp_path / "db" / "index.json")
    with pytest.raises(ShardError, match=r"index\.json gives s1 VV mean .*, its shards' pixels .* \(2 band\(s\) "
                                         r"differ: an index of another conversion\?\)"):
        ShardSet(tmp_path / "db")


def _edited_index(sample_shards: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(sample_shards, out)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(edit(index)))
    return out


def _drop(index: dict, *keys: str) -> dict:
    parent = index
    for k in keys[:-1]:
        parent = parent[k]
    del parent[keys[-1]]
    return index


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i: [i], "holds a JSON list, expected an object"),
    (lambda i: _drop(i, "codec"), "codec is missing or not one of"),
    (lambda i: _drop(i, "modalities", "s1", "mean"), r"modalities\.s1\.mean is missing or not a list of 2 numbers"),
    (lambda i: {**i, "tile_size": "60"}, "tile_size is missing or not a positive integer"),
    (lambda i: {**i, "shards": {"part-00000": 12}}, "shards is missing or not a list"),
    (lambda i: {**i, "shards": []}, "lists no shards"),  # was numpy's "need at least one array to concatenate"
])
def test_a_foreign_or_edited_index_json_is_named_not_a_traceback(sample_shards, tmp_path, edit, message):
    out = _edited_index(sample_shards, tmp_path, edit)
    with pytest.raises(ShardError, match=rf"{out / 'index.json'}: .*{message}"):
        ShardSet(out)


def _set(index: dict, value, *keys) -> dict:
    parent = index
    for k in keys[:-1]:
        parent = parent[k]
    parent[keys[-1]] = value
    return index


@pytest.mark.parametrize(("edit", "message"), [
    # an edited std was used as it was: B04 normalised to values up to 5737 with no word
    (lambda i: _set(i, 1.0, "modalities", "s2_l2a", "std", 3),
     r"shard directory .* does not match its index\.json .*index\.json gives s2_l2a B04 std 1, its shards' pixels"),
    # s1_scaling says linear over dB statistics: the nodata fill, checkpoints and eval's conversion followed it
    (lambda i: {**i, "s1_scaling": "linear"}, r"index\.json: s1_scaling is 'linear' but its s1 statistics say "
                                              r"otherwise \(units 'dB"),
    # raw chunks read as LZ4: the first read called the intact .bin corrupt
    (lambda i: {**i, "codec": "lz4"}, r"part-00000\.npz was written with codec 'raw', but index\.json says 'lz4'"),
])
def test_index_json_values_that_contradict_the_shards_are_refused_when_opened(sample_shards, tmp_path, edit,
                                                                             message):
    out = _edited_index(sample_shards, tmp_path, edit)
    with pytest.raises(ShardError, match=message):
        ShardSet(out)


def test_a_tile_size_that_does_not_match_the_chunks_is_named_not_a_reshape_error(sample_shards, tmp_path):
    out = _edited_index(sample_shards, tmp_path, lambda i: {**i, "tile_size": TILE + 1})
    with pytest.raises(ShardError, match=rf"part-00000\.npz: s2_l2a chunks of {TILE * TILE * 2} bytes, but "
                                         rf"index\.json's tile_size {TILE + 1} and dtype uint16 make"):
        ShardSet(out)


def test_a_band_coarser_than_its_native_resolution_is_named_and_a_finer_one_is_read(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S2_FILE, "B05", 0, lambda a: _tif(np.repeat(np.repeat(a, 2, 0), 2, 1)))
    convert([root], tmp_path / "finer", tile_size=TILE, workers=0, progress=False)  # B05 resampled to 10 m
    _edit_band(root, S2_FILE, "B02", 0, lambda a: _tif(a[::2, ::2]))
    with pytest.raises(BadInput, match=r"band B02 is a 10 m band but has 60 px where the finest band has 120 "
                                       r"\(20 m\): the product was resampled or its bands are mislabelled"):
        convert([root], tmp_path / "coarser", tile_size=TILE, workers=0, progress=False)


def test_a_tiff_with_damaged_tags_is_one_message_without_tifffile_log_lines(caplog):
    data = bytearray(_tif(np.arange(100, dtype=np.uint16).reshape(10, 10)))
    data[4:8] = b"\xff\xff\xff\x00"  # the first page's offset points past the end
    product = sources.Product("s2_l2a", "1U_1R", "S2A_MSIL2A_x", "f.parquet", row=0)
    with caplog.at_level("DEBUG"), pytest.raises(BadInput, match="band B04: truncated or corrupt GeoTIFF"):
        sources.decode_band(bytes(data), "B04", product)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tifffile")] == []


@pytest.mark.parametrize(("data", "kind"), [
    (b"\xffO\xffQ\x00\x29", "a JPEG2000 codestream"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", r"a JPEG2000 \(JP2\) file"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff\xe0", "a JPEG image"), (b"PK\x03\x04", "a ZIP archive"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"", r"empty \(0 bytes\)")])
def test_another_format_where_a_geotiff_belongs_is_named_as_such(data, kind):
    """A band exported as JPEG2000 or PNG, an archive or an empty download was 'truncated or corrupt GeoTIFF
    (TiffFileError: not a TIFF file ...)'; its leading bytes say what it is."""
    product = sources.Product("s2_l2a", "1U_1R", "S2A_MSIL2A_x", "f.parquet", row=0)
    with pytest.raises(BadInput, match=rf"\(row 0, grid_cell 1U_1R, product S2A_MSIL2A_x\): band B04 is {kind}, not a "
                                       "GeoTIFF$"):
        sources.decode_band(data + bytes(64) if data else data, "B04", product)
    with pytest.raises(BadInput, match="band B04: truncated or corrupt GeoTIFF"):  # TIFF bytes cut short stay that
        sources.decode_band(_tif(np.zeros((8, 8), np.uint16))[:12], "B04", product)


def test_no_products_says_what_the_inputs_hold_instead(sample_parquet, tmp_path):
    dem = tmp_path / "dem" / "Core-DEM"
    dem.mkdir(parents=True)
    pq.write_table(pa.table({"grid_cell": ["1U_1R"], "product_id": ["DEM_x"], "DEM": [_tif(np.zeros((4, 4)))]}),
                   dem / "part_00000.parquet")
    with pytest.raises(BadInput, match=r"found 1 parquet file\(s\) with no S2, S1 or WorldCover band column .*"
                                       r"Core-DEM/part_00000\.parquet"):
        convert([dem.parent], tmp_path / "o1", tile_size=TILE, workers=0, progress=False)
    jp2 = tmp_path / "raw" / "S2A_MSIL2A_20200101.SAFE" / "GRANULE" / "IMG_DATA" / "T32TQM_B02_10m.jp2"
    jp2.parent.mkdir(parents=True)
    jp2.write_bytes(b"\x00\x00\x00\x0cjP  ")
    with pytest.raises(BadInput, match=r"found 1 raw Sentinel file\(s\) such as .*B02_10m\.jp2: convert products "
                                       r"to GeoTIFF band folders"):
        convert([tmp_path / "raw"], tmp_path / "o2", tile_size=TILE, workers=0, progress=False)
    s1_only = _copy(sample_parquet, tmp_path)
    with pytest.raises(BadInput, match=r"no products of \['s2_l1c'\] found .*; found products of .*'s1'.* only "
                                       r"\(--modalities chooses\)"):
        convert([s1_only / S1_FILE[0]], tmp_path / "o3", tile_size=TILE, workers=0, progress=False,
                modalities=("s2_l1c",))


def test_parquet_files_with_band_columns_and_0_rows_are_named_as_empty(sample_parquet, tmp_path):
    """Files with Major-TOM's columns and no row read 'no products of [...] found under [...]', as if nothing were
    there."""
    root = tmp_path / "empty" / S2_FILE[0]
    root.mkdir(parents=True)
    table = pq.read_table(sample_parquet.joinpath(*S2_FILE))
    for name in ("part_00000.parquet", "part_00001.parquet"):
        pq.write_table(table.slice(0, 0), root / name)
    with pytest.raises(BadInput, match=r"no products of .* found under .*; found 2 parquet file\(s\) with band columns "
                                       r"but 0 rows .*, e.g. .*Core-S2L2A/part_00000\.parquet$"):
        convert([root.parent], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_git_lfs_pointer_saved_as_parquet_is_named_with_how_to_fetch_it(sample_parquet, tmp_path, capsys):
    """`git clone` of Major-TOM without git-lfs leaves pointer files named .parquet: 'not a readable parquet file
    (Parquet magic bytes not found in footer ...)'."""
    root = _copy(sample_parquet, tmp_path)
    root.joinpath(*S2_FILE).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64
                                       + "\nsize 123456789\n")
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"terrafm prepare: bad input: .*Core-S2L2A/part_00000\.parquet \(whole file\): not a parquet "
                        r"file: it is a Git LFS pointer, not the data \(run `git lfs pull` where it was cloned\) .*\n",
                        err), err
    assert not (tmp_path / "out").exists()


def test_paths_that_are_not_utf8_are_read_and_printed_escaped(sample_parquet, tmp_path, capsys):
    """Linux file names may hold any byte: pyarrow could not open such a parquet file ('not a readable parquet
    file'), and printing the --out or a skipped file raised UnicodeEncodeError after the shards were written."""
    root = tmp_path / os.fsdecode(b"in\xff")
    _edit_band(_copy(sample_parquet, tmp_path), S1_FILE, "vv", 0, lambda a: b"not a tiff")  # pyarrow: a UTF-8 path
    (tmp_path / "in").rename(root)
    out = tmp_path / os.fsdecode(b"out\xff")
    assert _cli([str(root), "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert f"shards to {tmp_path}/out\\xff (" in printed
    assert f"  {tmp_path}/in\\xff/Core-S1RTC/part_00000.parquet [row 0]: " in printed
    assert len(ShardSet(out)) == 12
    assert json.loads((out / "index.json").read_text())["inputs"] == [str(root)]
    # and on stderr: the bad-input message without --skip-bad printed the byte as \udcff
    assert _cli([str(root), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert f"bad input: {tmp_path}/in\\xff/Core-S1RTC/part_00000.parquet" in err and "udcff" not in err, err


def test_out_of_memory_is_not_a_corrupt_tiff_and_skips_nothing(sample_parquet, tmp_path, monkeypatch, capsys):
    """A MemoryError while decoding was reported as 'truncated or corrupt GeoTIFF'; with --skip-bad the good
    product was skipped and recorded, so the re-run resumed the shard without it for good."""
    read_tiff, calls = sources.read_tiff, []

    def short_of_memory(source):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("Unable to allocate 3.4 MiB")
        return read_tiff(source)

    monkeypatch.setattr(sources, "read_tiff", short_of_memory)
    out = tmp_path / "out"
    assert _cli([str(sample_parquet), "--out", str(out), "--skip-bad"]) == 2
    err = capsys.readouterr().err
    # it names the band being decoded: a file that declares a huge image is found without a debugger
    assert re.search(r"ran out of memory \(decoding \S+part_00000.parquet \(row \d+, .*\): band \w+\); nothing "
                     "was skipped", err) and "Traceback" not in err, err
    assert not (out / "index.json").exists()
    monkeypatch.setattr(sources, "read_tiff", read_tiff)
    summary = convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)
    assert not summary["skipped"] and summary["num_records"] == 12


_REAL_RUN_JOB = prepare.run_job


def _run_job_killed_on_shard_1(index, *args):
    """prepare.run_job in a forked worker that dies (SIGKILL, as the out-of-memory killer does) on shard 1."""
    import os
    import signal

    if index == 1 and os.environ.get("TERRAFM_TEST_PARENT") != str(os.getpid()):
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_RUN_JOB(index, *args)


def test_a_killed_worker_is_one_message_and_the_rerun_resumes(sample_parquet, tmp_path, monkeypatch, capsys):
    """A worker killed by the out-of-memory killer surfaced as a BrokenProcessPool traceback."""
    import os

    monkeypatch.setenv("TERRAFM_TEST_PARENT", str(os.getpid()))  # never kill the test process itself
    monkeypatch.setattr(prepare, "run_job", _run_job_killed_on_shard_1)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args([str(sample_parquet), "--out", str(out), "--cells-per-shard", "1", "--workers", "2",
                              "--tile-size", str(TILE), "--no-progress"])
    assert prepare.run(args) == 2
    err = capsys.readouterr().err
    assert "lost a worker process" in err and "Lower --workers" in err and "Traceback" not in err, err
    monkeypatch.setattr(prepare, "run_job", _REAL_RUN_JOB)
    summary = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert summary["num_records"] == 12 and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("band, scale, refused", [
    ("B04", 10.0, False), ("B05", 20.0, False), ("B01", 60.0, False),  # each band at its native grid
    ("B04", 20.0, True), ("B05", 60.0, True),  # Sen2Cor's R20m / R60m folder exported as a product
    ("B04", 8.983e-5, False),  # a geographic CRS: degrees, not metres
])
def test_a_band_on_a_coarser_grid_than_its_native_one_is_refused(band, scale, refused):
    """A product whose bands were all resampled to 20 m was taken as 10 m imagery: the size check compares a
    product's bands with each other only. The GeoTIFF's ModelPixelScale tag says the pixel size."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ones((4, 4), np.uint16), extratags=[(33550, "d", 3, (scale, scale, 0.0), False)])
    product = sources.Product("s2_l2a", "1U_1R", "S2A_MSIL2A_x", "f.parquet", row=0)
    if refused:
        with pytest.raises(BadInput, match=f"band {band} has {scale:g} m pixels .* native resolution"):
            sources.decode_band(buf.getvalue(), band, product)
    else:
        assert sources.decode_band(buf.getvalue(), band, product).shape == (4, 4)


KILLED_WITH_WORKERS = """
import os, sys, time
from terrafm.data import prepare

real_run_job = prepare.run_job


def slow_run_job(index, *args):
    open(os.path.join(sys.argv[3], f"worker-{os.getpid()}"), "w").close()
    time.sleep(20)  # the parent is killed meanwhile
    return real_run_job(index, *args)


prepare.run_job = slow_run_job
prepare.convert([sys.argv[1]], sys.argv[2], tile_size=60, cells_per_shard=1, workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


STOPPED_MID_SHARD = """
import os, signal, sys, time
from terrafm import cli
from terrafm.data import prepare

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal: CI runs under nohup, whose ignored SIGHUP is kept
signal.signal(signal.SIGINT, signal.default_int_handler)  # and a shell's background job ignores SIGINT

real_write_cells = prepare._write_cells


def slow_write_cells(writer, *args):
    open(os.path.join(sys.argv[3], f"worker-{os.getpid()}"), "w").close()  # its part-*.bin.tmp is open now
    time.sleep(30)  # the stop comes meanwhile
    return real_write_cells(writer, *args)


prepare._write_cells = slow_write_cells
sys.exit(cli.main(["prepare", sys.argv[1], "--out", sys.argv[2], "--tile-size", "60", "--cells-per-shard", "1",
                   "--workers", sys.argv[4], "--no-progress"]))
"""


@pytest.mark.parametrize("sig, whom", [("SIGTERM", "parent"), ("SIGTERM", "group"), ("SIGHUP", "group"),
                                       ("SIGKILL", "parent"), ("SIGTERM", "in-process"), ("SIGINT", "group"),
                                       ("SIGINT", "parent"), ("SIGINT", "in-process")])
def test_a_stopped_prepare_leaves_no_temporary_file_and_the_rerun_completes(sample_parquet, sample_shards, tmp_path,
                                                                            sig, whom):
    """SIGTERM (scancel, a SLURM time limit: to the parent, or to every process of the job) or SIGHUP took prepare's
    default action: the shards being written stayed as part-*.{bin,npz}.tmp in --out until a re-run, and the command
    said nothing. kill -9 of the parent left them too: its workers exited without removing them. Ctrl-C (SIGINT to the
    whole group, as a terminal sends it) printed a KeyboardInterrupt traceback from each worker, and the workers went on
    to the jobs queued for them (SIGINT to the parent alone: the running jobs too)."""
    import signal
    import subprocess
    import sys
    import time

    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    n = 1 if whom == "in-process" else 2  # shards being written at the stop
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_MID_SHARD, str(sample_parquet), str(out), str(pids),
                             str(2 * (n - 1))], stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            workers = [int(p.name.split("-")[1]) for p in pids.iterdir()]
        assert len(workers) == n, f"workers did not start (exit {proc.poll()})"
        assert len(list(out.glob("part-*.bin.tmp"))) == n
        signum = getattr(signal, sig)
        os.killpg(proc.pid, signum) if whom == "group" else proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "the stopped prepare's workers still run"
    finally:
        for pid in filter(_alive, workers + [proc.pid]):
            os.kill(pid, signal.SIGKILL)
    if sig != "SIGKILL":
        assert proc.returncode == 128 + signum, err
        said = "interrupted" if sig == "SIGINT" else f"stopped by {sig}"
        assert f"terrafm prepare: {said}; the finished shards in {out} are kept" in err, err
        assert "Traceback" not in err, err
    assert not list(out.glob("*.tmp"))
    summary = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert summary["num_records"] == 12 and summary["resumed_shards"] == 0
    a, b = ShardSet(sample_shards), ShardSet(out)
    assert list(a.keys) == list(b.keys)
    for m in a.modalities:
        for i in range(len(a)):
            np.testing.assert_array_equal(a.tile(i, m), b.tile(i, m))


def test_workers_of_a_killed_prepare_end_with_it_and_the_rerun_completes(sample_parquet, sample_shards, tmp_path):
    """kill -9 of `terrafm prepare --workers N` left its workers running: they converted the jobs queued for them into
    the folder a re-run was writing (the same part-*.tmp files), then waited forever, each holding its row groups."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", KILLED_WITH_WORKERS, str(sample_parquet), str(out), str(pids)])
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            workers = [int(p.name.split("-")[1]) for p in pids.iterdir()]
        assert len(workers) == 2, f"workers did not start (exit {parent.poll()})"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "the killed prepare's workers still run"
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
    summary = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert summary["num_records"] == 12 and not list(out.glob("*.tmp"))
    a, b = ShardSet(sample_shards), ShardSet(out)
    assert list(a.keys) == list(b.keys)
    for m in a.modalities:
        for i in range(len(a)):
            np.testing.assert_array_equal(a.tile(i, m), b.tile(i, m))


def test_a_second_prepare_into_the_same_out_is_refused_while_the_first_runs(sample_parquet, tmp_path, capsys):
    """Two runs into one --out (a re-run while the first still converts, two jobs of an array) wrote the same
    part-*.tmp files: a shard could be published with a .bin that mixes both."""
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    first = os.open(out, os.O_RDONLY)  # what the running prepare holds
    try:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _cli([str(sample_parquet), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"terrafm prepare: another `terrafm prepare` is writing into {out}; wait for it to finish" in err, err
        assert "bad input" not in err  # nothing is wrong with the inputs
        assert list(out.iterdir()) == []
    finally:
        os.close(first)
    assert _cli([str(sample_parquet), "--out", str(out)]) == 0  # once the first one is done


def test_a_full_disk_at_a_shard_index_leaves_no_bin_without_it_and_the_rerun_completes(sample_parquet, tmp_path,
                                                                                        monkeypatch, capsys):
    """The .bin was published before its .npz was written: a full disk there left a whole shard's .bin (GBs on real
    tiles) without the index that makes it a shard, on the disk that was full."""
    import errno

    savez = np.savez

    def full_disk_at_shard_1(f, **arrays):
        if "part-00001" in f.name:
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(f, **arrays)

    monkeypatch.setattr(np, "savez", full_disk_at_shard_1)
    out = tmp_path / "out"
    assert _cli([str(sample_parquet), "--out", str(out), "--cells-per-shard", "1"]) == 2
    err = capsys.readouterr().err
    assert (f"cannot write {out}: No space left on device; free space there and run the same command: it keeps the "
            f"finished shards in {out} and resumes from them") in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.bin", "part-00000.npz"]
    monkeypatch.setattr(np, "savez", savez)
    summary = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert summary["resumed_shards"] == 1 and summary["num_records"] == 12 and not list(out.glob("*.tmp"))


def _tif_with_mask(array: np.ndarray, valid: np.ndarray, bits: int) -> bytes:
    """A GeoTIFF as GDAL writes one with an internal nodata mask: the image, then a page of NewSubfileType 4 (1-bit
    by default, 8-bit on request), 0 where the image has no data; no tifffile metadata."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(array, metadata=None, compression="deflate")
        mask = valid if bits == 1 else valid.astype(np.uint8) * 255
        tif.write(mask, metadata=None, compression="deflate", extratags=[(254, "I", 1, 4, True)])
    return buf.getvalue()


@pytest.mark.parametrize("bits", [1, 8])
def test_a_geotiff_internal_mask_is_nodata(sample_parquet, tmp_path, bits):
    """GDAL's internal mask was not read: the pixels it marks as nodata went into the shards and their statistics as
    data, and an 8-bit mask beside an 8-bit band (a WorldCover map) was read as a second band and refused."""
    root = _copy(sample_parquet, tmp_path)

    def masked(a, rows):
        valid = np.ones(a.shape, bool)
        valid[:rows] = False
        a = a.copy()
        a[:rows] = {"u": 10, "f": 0.5}[a.dtype.kind]  # what sits under the mask: valid values, no fill of their own
        return _tif_with_mask(a, valid, bits)

    _edit_band(root, S2_FILE, "B04", 0, lambda a: masked(a, 2))
    _edit_band(root, S1_FILE, "vv", 0, lambda a: masked(a, 3))
    _edit_band(root, ("Core-WorldCover", "part_00000.parquet"), "map", 0, lambda a: masked(a, 1))
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    side = 2 * TILE  # one cell: 2 x 2 tiles
    assert summary["modalities"]["s2_l2a"]["nodata_pixels"] == [0, 0, 0, 2 * side] + [0] * 8
    assert summary["modalities"]["s1"]["nodata_pixels"] == [3 * side, 0]
    shards = ShardSet(tmp_path / "out")
    cell = pq.read_table(root.joinpath(*S2_FILE))["grid_cell"][0].as_py()
    i = list(shards.keys).index(f"{cell}/0_0")
    np.testing.assert_array_equal(shards.tile(i, "s2_l2a")[3][:2], round(REFERENCE_STATS["s2_l2a"]["mean"][3]))
    np.testing.assert_array_equal(shards.tile(i, "s1")[0][:3], np.float16(REFERENCE_STATS["s1"]["mean"][0]))
    assert shards.class_counts[i].sum() == TILE * TILE - TILE  # the map's first row is nodata, not a class


@pytest.mark.parametrize("ext", [".msk", ".MSK"])
def test_a_geotiff_msk_sidecar_is_nodata_and_one_of_another_size_is_named(sample_parquet, tmp_path, ext):
    """GDAL before 3.9 writes a band's nodata mask beside it (B04.tif.msk: a TIFF, 0 at nodata), not inside it: its
    pixels went into the shards and their statistics as data. GDAL also reads B04.tif.MSK (upper-cased folders)."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    valid = np.ones((2 * TILE, 2 * TILE), np.uint8) * 255
    valid[:2] = 0
    sidecar = products[0] / f"B04.tif{ext}"
    tifffile.imwrite(sidecar, valid, compression="deflate", metadata=None)
    summary = convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["modalities"]["s2_l2a"]["nodata_pixels"] == [0, 0, 0, 2 * 2 * TILE] + [0] * 8
    valid[:3] = 0  # the sidecar edited: its shard is redone, not resumed
    tifffile.imwrite(sidecar, valid, compression="deflate", metadata=None)
    summary = convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["redone_shards"] == 1 and summary["modalities"]["s2_l2a"]["nodata_pixels"][3] == 3 * 2 * TILE
    tifffile.imwrite(sidecar, valid[:TILE, :TILE], metadata=None)
    with pytest.raises(BadInput, match=r"band B04 is 120x120 px but its \.msk sidecar 60x60: not this band's mask"):
        convert([folder], tmp_path / "out2", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    tifffile.imwrite(sidecar, np.stack([valid] * 3), photometric="minisblack",
                     planarconfig="separate", metadata=None)  # per-band masks of a 3-band image
    with pytest.raises(BadInput, match=r"band B04: its \.msk sidecar holds 3 per-band masks, where a one-band file"):
        convert([folder], tmp_path / "out3", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))


@pytest.mark.parametrize("band, far", [("B09", True), ("B04", False)])
def test_nodata_far_from_the_shards_own_mean_is_named_when_the_shards_open(sample_parquet, tmp_path, band, far):
    """Masked pixels hold the band's reference (Major-TOM) mean; on data whose statistics differ (the synthetic
    sample's B09: +7.4 std) the model saw nodata areas as a constant block, while the docs said they normalise to
    about 0. The shard reader now names such bands (B04, +1.1 std, passes)."""
    import warnings

    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    size = tifffile.imread(products[0] / f"{band}.tif").shape
    valid = np.full(size, 255, np.uint8)
    valid[:1] = 0
    tifffile.imwrite(products[0] / f"{band}.tif.msk", valid, metadata=None)
    convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ShardSet(tmp_path / "out")
    named = [str(w.message) for w in caught if "masked (nodata) pixels hold the reference mean" in str(w.message)]
    assert bool(named) == far, named
    if far:
        assert re.search(rf"s2_l2a {band} \+\d+\.\d std \(\d+ pixels\)", named[0]), named[0]


def _pam(*nodata: str | None, stats: bool = True, hex_equiv: str | None = None) -> str:
    """A GDAL PAM sidecar (B04.tif.aux.xml) as GDAL writes one: dataset metadata, then per band (band="1", ...) its
    NoDataValue where given (None: none), a histogram and statistics."""
    bands = []
    for i, value in enumerate(nodata, 1):
        attr = f' le_hex_equiv="{hex_equiv}"' if hex_equiv and i == 1 else ""
        nd = f"    <NoDataValue{attr}>{value}</NoDataValue>\n" if value is not None else ""
        extra = ("    <Histograms><HistItem><HistMin>-0.5</HistMin><HistMax>255.5</HistMax><BucketCount>2</BucketCount>"
                 "<HistCounts>3|4</HistCounts></HistItem></Histograms>\n"
                 '    <Metadata><MDI key="STATISTICS_MEAN">1200</MDI></Metadata>\n') if stats else ""
        bands.append(f'  <PAMRasterBand band="{i}">\n{nd}{extra}  </PAMRasterBand>\n')
    return ('<PAMDataset>\n  <Metadata><MDI key="AREA_OR_POINT">Area</MDI></Metadata>\n' + "".join(bands)
            + "</PAMDataset>\n")


def test_a_nodata_value_declared_only_in_a_gdal_pam_sidecar_is_masked_and_a_statistics_one_changes_nothing(
        sample_parquet, tmp_path):
    """GDAL records a band's nodata in B04.tif.aux.xml when it cannot write the file (SetNoDataValue on a read-only
    one): prepare read the sidecar's fill as data, into the shards and their statistics."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    band = tifffile.imread(products[0] / "B04.tif")
    band[:2] = 65535
    tifffile.imwrite(products[0] / "B04.tif", band, metadata=None)
    (products[0] / "B04.tif.aux.xml").write_text(_pam(None, stats=True))  # statistics only: no nodata
    summary = convert([folder], tmp_path / "out0", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["modalities"]["s2_l2a"]["nodata_pixels"] == [0] * 12
    (products[0] / "B04.tif.aux.xml").write_text(_pam("6.55350000000000E+04", "7"))  # band 2's is not this band's
    summary = convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["modalities"]["s2_l2a"]["nodata_pixels"] == [0, 0, 0, 2 * 2 * TILE] + [0] * 8
    shards = ShardSet(tmp_path / "out")
    i = list(shards.keys).index(f"{products[0].parent.name}/0_0")
    np.testing.assert_array_equal(shards.tile(i, "s2_l2a")[3][:2], round(REFERENCE_STATS["s2_l2a"]["mean"][3]))


def _decode_with_pam(tmp_path: Path, array: np.ndarray, sidecar: str, tag: str | None = None,
                     modality: str = "s2_l2a") -> np.ndarray:
    path = tmp_path / "B04.tif"
    path.write_bytes(_tif(array) if tag is None else _tif_with_nodata(array, tag))
    path.with_name("B04.tif.aux.xml").write_text(sidecar)
    product = sources.Product(modality, "1U_1R", "S2A_MSIL2A_x" if modality != "s1" else "S1A_IW_x", str(tmp_path))
    return sources.decode_band(path.read_bytes(), "B04", product, pam=sources.pam_nodata(path))


def test_a_pam_nodata_value_wins_over_the_tag_and_reads_like_it(tmp_path):
    """GDAL's GeoTIFF driver asks PAM first (GTiffRasterBand::GetNoDataValue): the sidecar's value replaces the tag's,
    NaN too, and is then compared in the band's dtype like the tag's (a value the dtype cannot hold marks none)."""
    a = np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    a[0] = 65535
    out = _decode_with_pam(tmp_path, a, _pam("5"), tag="65535")
    assert (out[0] == 65535).all() and out[1, 0] == 0 and (out[1, 1:] == a[1, 1:]).all()
    for value in ("nan", "-inf", "1e+20", "-9999", "5.5"):  # in a uint16 band, none marks a pixel; the tag's gave way
        np.testing.assert_array_equal(_decode_with_pam(tmp_path, a, _pam(value), tag="65535"), a)
    np.testing.assert_array_equal(_decode_with_pam(tmp_path, a, _pam(None), tag="65535")[0], 0)  # none: the tag's
    s1 = np.full((4, 4), 0.5, np.float32)
    s1[:1] = 0.1
    out = _decode_with_pam(tmp_path, s1, _pam("1.00000000000000E-01"), modality="s1")
    assert np.isnan(out[0]).all() and (out[1:] == 0.5).all()
    exact = struct.pack("<d", 0.5).hex()  # GDAL's le_hex_equiv, the exact double, wins over the text
    out = _decode_with_pam(tmp_path, s1, _pam("0", hex_equiv=exact), modality="s1")
    assert np.isnan(out[1:]).all() and (out[0] == np.float32(0.1)).all()


@pytest.mark.parametrize("text, what", [
    ("GDAL was here", r"not XML \(syntax error"),
    ('<?xml version="1.0"?>\n<!DOCTYPE PAMDataset [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>\n'
     "<PAMDataset><PAMRasterBand band=\"1\"><NoDataValue>&b;</NoDataValue></PAMRasterBand></PAMDataset>",
     r"it holds a DOCTYPE"),
    ("<VRTDataset/>", r"its root element is <VRTDataset>, not GDAL's <PAMDataset>"),
    (_pam("minus one"), r"band 1's NoDataValue 'minus one' names no number"),
    ("<PAMDataset>" + " " * (1 << 20) + "</PAMDataset>", r"it is larger than 1 MiB"),
])
def test_a_damaged_pam_sidecar_is_bad_input_naming_it(sample_parquet, tmp_path, text, what):
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    (products[0] / "B04.tif.aux.xml").write_text(text)
    summary = convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",),
                      skip_bad=True)
    assert [s["record"] for s in summary["skipped"]] == [products[0].name]
    assert re.search(rf"band B04: its GDAL sidecar {re.escape(str(products[0]))}/B04\.tif\.aux\.xml does not read "
                     rf"\({what}", summary["skipped"][0]["reason"]), summary["skipped"][0]["reason"]


def test_a_pam_nodata_added_or_edited_redoes_its_shard_and_statistics_keep_the_fingerprint(sample_parquet, tmp_path):
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    (products[1] / "B03.tif.msk").write_bytes(_tif(np.full((2 * TILE, 2 * TILE), 255, np.uint8)))

    def run() -> dict:
        return convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False,
                       modalities=("s2_l2a",))

    found, _, _ = sources.discover([folder])
    stamps = {}

    def masks(p) -> list:  # the .msk sidecars, the only ones hashed before .aux.xml was read
        return sorted((f"{b}.msk", f"{f}.msk") for b, f in p.band_files.items() if Path(f"{f}.msk").is_file())

    before = [(p.modality, p.grid_cell, p.product_id, p.source, p.row,
               sorted((b, prepare._stamp(f, stamps)) for b, f in p.band_files.items())
               + [(b, prepare._stamp(f, stamps)) for b, f in masks(p)]) for p in found]
    plan = [found[0].grid_cell]
    digest = [hashlib.sha1(json.dumps([x, {}], sort_keys=True).encode()).hexdigest() for x in (plan, [before])]
    assert prepare._job_fingerprint([found], {}, {}) == ":".join(digest)  # no .aux.xml: the fingerprint of before
    assert run()["resumed_shards"] == 0 and run()["resumed_shards"] == 1
    sidecar = products[0] / "B04.tif.aux.xml"
    sidecar.write_text(_pam(None))
    assert run()["resumed_shards"] == 1  # statistics only (QGIS, gdalinfo -stats write them): no pixel changes
    sidecar.write_text(_pam("1"))
    assert run()["redone_shards"] == 1  # a nodata value added
    assert run()["resumed_shards"] == 1
    sidecar.write_text(_pam("2"))
    assert run()["redone_shards"] == 1  # edited
    sidecar.write_text("<PAMDataset>")  # damaged after a conversion: redone, and named
    with pytest.raises(BadInput, match=r"B04\.tif\.aux\.xml does not read \(not XML"):
        run()
    sidecar.unlink()
    assert run()["redone_shards"] == 1  # removed
