import argparse
import io
import json
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from terrafm.data import prepare
from terrafm.data.prepare import convert
from terrafm.data.shards import ChecksumError, ShardError, ShardSet
from terrafm.data.sources import BadInput

CELLS, TILE = 3, 60  # tests/data/conftest.py's sample set


def _tif(array) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def test_parquet_end_to_end(sample_parquet, sample_shards):
    s = ShardSet(sample_shards)
    assert len(s) == CELLS * 4 and s.tile_size == TILE
    assert set(s.modalities) == {"s2_l2a", "s2_l1c", "s1"}
    assert (s.class_counts.sum(axis=1) == TILE * TILE).all()
    np.testing.assert_allclose(s.class_frequency.sum(), 1.0)
    row = pq.read_table(sample_parquet / "Core-S2L2A" / "part_00000.parquet").slice(0, 1).to_pylist()[0]
    key = f"{row['grid_cell']}/0_1"
    i = list(s.keys).index(key)
    tile = s.tile(i, "s2_l2a")
    b04 = tifffile.imread(io.BytesIO(row["B04"]))
    np.testing.assert_array_equal(tile[3], b04[:TILE, TILE:2 * TILE])
    b05 = np.repeat(np.repeat(tifffile.imread(io.BytesIO(row["B05"])), 2, 0), 2, 1)  # 20 m -> 10 m
    np.testing.assert_array_equal(tile[4], b05[:TILE, TILE:2 * TILE])
    assert s.tile(i, "s1").dtype == np.float16
    # normalisation statistics of the index equal the statistics of the stored pixels
    for m, info in s.modalities.items():
        pixels = np.stack([s.tile(k, m).astype(np.float64) for k in range(len(s))])
        np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(info.std, pixels.std(axis=(0, 2, 3)), rtol=1e-4)


def _as_folder(parquet_root, out):
    """Major-TOM local layout: <row>/<grid_cell>/<product_id>/<band>.tif"""
    for f in parquet_root.rglob("*.parquet"):
        for rec in pq.read_table(f).to_pylist():
            d = out / rec["grid_cell"].split("_")[0] / rec["grid_cell"] / rec["product_id"]
            d.mkdir(parents=True, exist_ok=True)
            for k, v in rec.items():
                if isinstance(v, bytes):
                    (d / f"{k}.tif").write_bytes(v)
    return out


def test_geotiff_folder_matches_parquet(sample_parquet, sample_shards, tmp_path):
    folder = _as_folder(sample_parquet, tmp_path / "tifs")
    convert([folder], tmp_path / "out", tile_size=TILE, codec="lz4", workers=0, progress=False)
    a, b = ShardSet(sample_shards), ShardSet(tmp_path / "out")
    assert list(a.keys) == list(b.keys) and b.codec == "lz4"
    np.testing.assert_array_equal(a.class_counts, b.class_counts)
    for m in a.modalities:
        for i in range(len(a)):
            np.testing.assert_array_equal(a.tile(i, m), b.tile(i, m))


def _corrupt(sample_parquet, tmp_path, edit):
    root = tmp_path / "bad"
    shutil.copytree(sample_parquet, root)
    path = root / "Core-S2L2A" / "part_00000.parquet"
    table = pq.read_table(path)
    pq.write_table(edit(table), path)
    return root, path, table["grid_cell"][1].as_py()


def _set_band(band, value):
    def edit(table):
        col = table[band].to_pylist()
        col[1] = value
        return table.set_column(table.column_names.index(band), band, pa.array(col, pa.binary()))
    return edit


BAD = {
    "missing band (null)": (_set_band("B05", None), "missing band B05"),
    "missing column": (lambda t: t.drop_columns(["B05"]), "missing band B05"),
    "wrong size": (_set_band("B04", _tif(np.zeros((50, 50), np.uint16))), "size"),
    "wrong dtype": (_set_band("B04", _tif(np.zeros((2 * TILE, 2 * TILE), np.float32))), "dtype float32"),
    "truncated": (lambda t: _set_band("B04", t["B04"][1].as_py()[:60])(t), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_and_record(sample_parquet, tmp_path, case):
    edit, what = BAD[case]
    root, path, cell = _corrupt(sample_parquet, tmp_path, edit)
    with pytest.raises(BadInput) as err:
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    msg = str(err.value)
    assert str(path) in msg and what in msg
    assert "row 0" in msg if case == "missing column" else ("row 1" in msg and cell in msg)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    expected_bad = CELLS if case == "missing column" else 1
    # only the bad S2 L2A product is skipped: its cell keeps its S1, L1C and land cover
    assert len(summary["skipped"]) == expected_bad and summary["num_records"] == CELLS * 4
    assert summary["modalities"]["s2_l2a"]["tiles"] == (CELLS - expected_bad) * 4
    assert summary["modalities"]["s1"]["tiles"] == CELLS * 4
    entry = ShardSet(tmp_path / "skip").meta["skipped"][0]
    assert entry["file"] == str(path) and entry["reason"]


def test_cli_reports_bad_input(sample_parquet, tmp_path, capsys):
    root, path, _ = _corrupt(sample_parquet, tmp_path, _set_band("B04", b"not a tiff"))
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    assert prepare.run(parser.parse_args([str(root), "--out", str(tmp_path / "o"), "--tile-size", str(TILE),
                                          "--workers", "0", "--no-progress"])) == 2
    assert str(path) in capsys.readouterr().err
    args = parser.parse_args([str(root), "--out", str(tmp_path / "o2"), "--tile-size", str(TILE), "--workers", "0",
                              "--no-progress", "--skip-bad"])
    assert prepare.run(args) == 0
    assert "skipped 1 bad records" in capsys.readouterr().out


def test_checksum_mismatch_at_read(sample_shards, tmp_path):
    shutil.copytree(sample_shards, tmp_path / "s")
    s = ShardSet(tmp_path / "s")
    off = int(s.offset["s2_l2a"][5, 2]) + 7
    with open(tmp_path / "s" / "part-00000.bin", "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    s = ShardSet(tmp_path / "s")
    s.tile(4, "s2_l2a")
    part = tmp_path / "s" / "part-00000"
    with pytest.raises(ChecksumError, match=rf"part-00000\.bin: record 5 .* s2_l2a band B03: .*; the shard is corrupt, "
                                            rf"delete {part}\.bin and {part}\.npz and re-run the same"):
        s.tile(5, "s2_l2a")


def test_following_the_checksum_message_repairs_the_shard(sample_parquet, tmp_path):
    """The message said to re-run prepare, which resumed the corrupt shard (its .bin had its length): the same
    error again mid-run. Deleting the named files first, as it now says, redoes that shard."""
    out = tmp_path / "s"
    convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)
    off = int(ShardSet(out).offset["s2_l2a"][5, 2]) + 7
    with open(out / "part-00000.bin", "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)["resumed_shards"] == 1
    with pytest.raises(ChecksumError):
        ShardSet(out).tile(5, "s2_l2a")
    (out / "part-00000.bin").unlink()
    (out / "part-00000.npz").unlink()
    assert convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)["resumed_shards"] == 0
    ShardSet(out).tile(5, "s2_l2a")


def test_resume_parallel_and_atomic(sample_parquet, sample_shards, tmp_path):
    out = tmp_path / "out"
    first = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=2, progress=False)
    assert len(first["shards"]) == CELLS and first["resumed_shards"] == 0
    assert not list(out.glob("*.tmp"))
    stamp = (out / "part-00000.bin").stat().st_mtime_ns
    (out / "part-00001.npz").unlink()                  # as if killed before the rename of shard 1
    (out / "part-00001.bin.tmp").write_bytes(b"half-written")
    again = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert again["resumed_shards"] == CELLS - 1
    assert (out / "part-00000.bin").stat().st_mtime_ns == stamp
    a, b = ShardSet(sample_shards), ShardSet(out)
    assert list(a.keys) == list(b.keys)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.tile(i, "s1"), b.tile(i, "s1"))
    np.testing.assert_allclose(a.modalities["s2_l2a"].mean, b.modalities["s2_l2a"].mean, rtol=1e-12)
    with pytest.raises(BadInput, match="different conversion"):
        convert([sample_parquet], out, tile_size=TILE // 2, cells_per_shard=1, workers=0, progress=False)


def test_shards_of_an_earlier_terrafm_are_refused_as_such(sample_parquet, tmp_path):
    out = tmp_path / "old"
    convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    with np.load(out / "part-00000.npz") as z:
        arrays = dict(z)
    arrays["fingerprint"] = np.asarray("0" * 40)  # the one-part form of before: one hash of plan and content
    np.savez(out / "part-00000.npz", **arrays)
    with pytest.raises(BadInput, match=r"part-00000\.npz was written by an earlier terrafm.*empty --out"):
        convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)


def _split_shards(sample_parquet, tmp_path):
    out = tmp_path / "split"
    convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    return out


def test_a_shard_dropped_from_the_index_is_an_error_or_a_warning_with_counts(sample_parquet, tmp_path):
    out = _split_shards(sample_parquet, tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["shards"] = index["shards"][:-1]  # part-00002 still on disk, no longer listed
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"part-00002\.npz is on disk but not in index\.json.*allow_index_mismatch"):
        ShardSet(out)
    with pytest.warns(UserWarning, match=r"2 shards / 8 records listed.*training on the 8 listed records"):
        assert len(ShardSet(out, allow_index_mismatch=True)) == 8


def test_record_counts_and_part_sizes_are_cross_checked(sample_parquet, tmp_path):
    out = _split_shards(sample_parquet, tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["records"] = 3
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"part-00000: index\.json says 3 records, the \.npz has 4"):
        ShardSet(out)
    with pytest.raises(ShardError, match=r"shard directory .*missing.* does not exist; set data\.shard_dir"):
        ShardSet(tmp_path / "missing")


def test_rerunning_prepare_rewrites_a_truncated_bin_instead_of_keeping_it(sample_parquet, tmp_path):
    out = _split_shards(sample_parquet, tmp_path)
    part = out / "part-00001.bin"
    size = part.stat().st_size
    with open(part, "r+b") as f:
        f.truncate(size - 100)  # as if the disk filled while writing, then the .npz was renamed
    with pytest.raises(ShardError, match=rf"part-00001\.bin has {size - 100} bytes, its \.npz needs {size}"):
        ShardSet(out)
    again = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert again["resumed_shards"] == CELLS - 1 and again["rewritten_shards"] == 1
    assert part.stat().st_size == size
    s = ShardSet(out)
    for i in range(len(s)):
        s.tile(i, "s2_l2a")  # every checksum holds


def test_an_undecodable_lz4_chunk_names_the_file(sample_parquet, tmp_path):
    out = tmp_path / "lz4"
    convert([sample_parquet], out, tile_size=TILE, codec="lz4", workers=0, progress=False)
    s = ShardSet(out, verify_checksums=False)
    off, nbytes = int(s.offset["s1"][2, 0]), int(s.nbytes["s1"][2, 0])
    with open(out / "part-00000.bin", "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * nbytes)  # a literal run longer than the block
    with pytest.raises(ShardError, match=r"part-00000\.bin: record 2 .* s1 band VV does not decode"):
        ShardSet(out, verify_checksums=False).tile(2, "s1")


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "bad_crc":
        path.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    elif how == "zip_header_only":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    elif how in ("unknown_method", "encrypted"):  # 2 bytes of the first member, in both its headers
        data = bytearray(data)
        entry = data.find(b"PK\x01\x02")  # its central-directory entry
        local = struct.unpack_from("<I", data, entry + 42)[0]
        if how == "unknown_method":  # 9 (deflate64): zipfile raises NotImplementedError
            struct.pack_into("<H", data, entry + 10, 9)
            struct.pack_into("<H", data, local + 8, 9)
        else:  # the encrypted flag: zipfile raises RuntimeError (password required)
            struct.pack_into("<H", data, entry + 8, 1)
            struct.pack_into("<H", data, local + 6, 1)
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "bad_crc", "zip_header_only", "empty", "unknown_method", "encrypted"])
def test_a_damaged_npz_is_named_on_read_and_rewritten_by_prepare(sample_parquet, tmp_path, how):
    out = _split_shards(sample_parquet, tmp_path)
    _damage(out / "part-00001.npz", how)
    with pytest.raises(ShardError, match=r"part-00001\.npz"):
        ShardSet(out)
    again = convert([sample_parquet], out, tile_size=TILE, cells_per_shard=1, workers=0, progress=False)
    assert again["resumed_shards"] == CELLS - 1 and again["rewritten_shards"] == 1
    assert len(ShardSet(out)) == 4 * CELLS


@pytest.mark.parametrize("edit", ["float_offsets", "float_crc", "narrow_class_counts", "negative_class_counts",
                                  "class_counts_as_text"])
def test_npz_arrays_of_the_wrong_kind_are_named(sample_parquet, tmp_path, edit):
    out = _split_shards(sample_parquet, tmp_path)
    path = out / "part-00000.npz"
    with np.load(path) as z:
        arrays = dict(z)
    if edit == "float_offsets":
        arrays["s2_l2a.offset"] = arrays["s2_l2a.offset"].astype(np.float64) + 0.5
    elif edit == "float_crc":
        arrays["s1.crc32"] = arrays["s1.crc32"].astype(np.float32)
    elif edit == "narrow_class_counts":
        arrays["class_counts"] = arrays["class_counts"][:, :5]
    elif edit == "negative_class_counts":
        arrays["class_counts"] = -arrays["class_counts"] - 1
    else:
        arrays["class_counts"] = arrays["class_counts"].astype(str)
    np.savez(path, **arrays)
    with pytest.raises(ShardError, match=r"part-00000\.npz: .*re-run `terrafm prepare`"):
        ShardSet(out)


def _with_baselines(sample_parquet, tmp_path, first: str):
    """The sample with the first S2 L2A product of processing baseline `first` (the others 03.01)."""
    root = tmp_path / "baselines"
    shutil.copytree(sample_parquet, root)
    path = root / "Core-S2L2A" / "part_00000.parquet"
    table = pq.read_table(path)
    ids = table["product_id"].to_pylist()
    ids[0] = ids[0].replace("_N0301_", f"_{first}_")
    pq.write_table(table.set_column(table.column_names.index("product_id"), "product_id", pa.array(ids)), path)
    return root


def test_s2_offset_remove_takes_1000_dn_from_products_of_baseline_04_and_later(sample_parquet, tmp_path):
    """From baseline 04.00 a Sentinel-2 product stores reflectance x 1e4 + 1000. remove puts those products on the
    earlier scale: DN - 1000, at least 1 (a dark pixel is not nodata), nodata kept; earlier products untouched."""
    from terrafm.data import sources

    assert sources.processing_baseline("S2B_MSIL2A_20220301T101031_N0400_R022_T33TUL_20220301T120000") == 400
    assert sources.processing_baseline("S1A_IW_GRDH_1SDV_20210110T053000_20210110T053025_000001_RTC") is None
    # N9999 (products made outside ESA's chain; Major-TOM's 2018-2021 L2A has them) names no baseline: not shifted
    assert sources.processing_baseline("S2B_MSIL2A_20181219T162339_N9999_R040_T16RGV_20181219T181100") is None
    np.testing.assert_array_equal(sources.remove_s2_offset(np.array([0, 500, 1000, 1001, 3000], np.uint16)),
                                  np.array([0, 1, 1, 1, 2000], np.uint16))
    products, _, _ = sources.discover([_with_baselines(sample_parquet, tmp_path, "N0400")])
    l2a = sorted((p for p in products if p.modality == "s2_l2a"), key=lambda p: p.row)
    parquet = sources.ParquetRows()
    for p, shifted in ((l2a[0], True), (l2a[1], False)):
        keep, keep_mask = prepare._read_product(p, parquet, {"s1_scaling": "db", "s2_offset": "keep"})
        removed, mask = prepare._read_product(p, parquet, {"s1_scaling": "db", "s2_offset": "remove"})
        np.testing.assert_array_equal(mask, keep_mask)
        want = np.maximum(keep[~mask].astype(np.int64) - 1000, 1) if shifted else keep[~mask]
        np.testing.assert_array_equal(removed[~mask], want)


@pytest.mark.parametrize("s2_offset", ["keep", "remove"])
def test_prepare_counts_s2_baselines_and_warns_when_they_mix(sample_parquet, tmp_path, capsys, s2_offset):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    out = tmp_path / "o"
    args = parser.parse_args([str(_with_baselines(sample_parquet, tmp_path, "N0509")), "--out", str(out),
                              "--tile-size", str(TILE), "--workers", "0", "--no-progress", "--modalities", "s2_l2a",
                              "--s2-offset", s2_offset])
    assert prepare.run(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["s2_baselines"] == {"s2_l2a": {"offset": 1, "no_offset": CELLS - 1, "unknown": 0}}
    assert index["s2_offset"] == s2_offset
    warned = "s2_l2a mixes 1 products of processing baseline 04.00 or later" in capsys.readouterr().err
    assert warned == (s2_offset == "keep")
    with pytest.raises(SystemExit):
        parser.parse_args([str(out), "--out", str(out), "--s2-offset", "subtract"])


def test_n9999_products_are_counted_unknown_and_kept_as_stored(sample_parquet, tmp_path):
    """A N9999 product (no baseline named) is neither shifted by --s2-offset remove nor counted as carrying it."""
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    out = tmp_path / "o"
    args = parser.parse_args([str(_with_baselines(sample_parquet, tmp_path, "N9999")), "--out", str(out),
                              "--tile-size", str(TILE), "--workers", "0", "--no-progress", "--modalities", "s2_l2a",
                              "--s2-offset", "remove"])
    assert prepare.run(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["s2_baselines"] == {"s2_l2a": {"offset": 0, "no_offset": CELLS - 1, "unknown": 1}}
