"""Real upstream data: nodata, S1 in dB, metadata.parquet, compressed GeoTIFFs, --skip-bad that writes nothing.

Built on the synthetic Major-TOM parquet set (tests/data/conftest.py), edited the way real files differ:
S1 fill (-32768) and NaN pixels, S2 zero fill, a collection's metadata.parquet beside its parts, LZW /
deflate / zstd GeoTIFFs with .aux.xml / .ovr / README sidecars.
"""

import argparse
import io
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from terrafm.data import prepare
from terrafm.data.prepare import convert
from terrafm.data.shards import ShardSet
from terrafm.data.sources import BadInput
from terrafm.modalities import REFERENCE_STATS, s1_to_db

CELLS, TILE = 3, 60  # tests/data/conftest.py's sample set
S1_FILE = ("Core-S1RTC", "part_00000.parquet")
S2_FILE = ("Core-S2L2A", "part_00000.parquet")


def _tif(array: np.ndarray, compression: str | None = None) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression=compression)
    return buf.getvalue()


def _edit_band(root, parts, band, row, change) -> None:
    """Decode one band of one parquet row, change(array) in place, write it back."""
    path = root.joinpath(*parts)
    table = pq.read_table(path)
    column = table[band].to_pylist()
    array = tifffile.imread(io.BytesIO(column[row]))
    change(array)
    column[row] = _tif(array)
    pq.write_table(table.set_column(table.column_names.index(band), band, pa.array(column, pa.binary())), path)


def _copy(sample_parquet, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    return root


def _key_index(shards: ShardSet, key: str) -> int:
    return list(shards.keys).index(key)


def test_nodata_is_masked_counted_and_left_out_of_the_statistics(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    cell = pq.read_table(root.joinpath(*S1_FILE))["grid_cell"][0].as_py()

    def s1_fill(a):
        a[:10, :10] = -32768.0  # Major-TOM S1 fill
        a[20:25, 20:25] = np.nan

    def s2_fill(a):
        a[:7, :7] = 0  # S2 nodata

    _edit_band(root, S1_FILE, "vv", 0, s1_fill)
    _edit_band(root, S2_FILE, "B04", 0, s2_fill)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)  # no --skip-bad needed
    assert summary["num_records"] == CELLS * 4 and not summary["skipped"]
    s1, s2 = summary["modalities"]["s1"], summary["modalities"]["s2_l2a"]
    assert s1["nodata_pixels"] == [125, 0] and s1["tiles"] == CELLS * 4
    assert s2["nodata_pixels"] == [0, 0, 0, 49] + [0] * 8

    shards = ShardSet(tmp_path / "out")
    i = _key_index(shards, f"{cell}/0_0")
    vv, b04 = shards.tile(i, "s1")[0], shards.tile(i, "s2_l2a")[3]
    # masked pixels carry the reference mean (dB), so they normalise to about 0; no NaN, no -32768
    np.testing.assert_array_equal(vv[:10, :10], np.float16(REFERENCE_STATS["s1"]["mean"][0]))
    np.testing.assert_array_equal(vv[20:25, 20:25], np.float16(REFERENCE_STATS["s1"]["mean"][0]))
    np.testing.assert_array_equal(b04[:7, :7], round(REFERENCE_STATS["s2_l2a"]["mean"][3]))
    # the statistics are those of the valid pixels only
    for m, band in (("s1", 0), ("s2_l2a", 3)):
        values = []
        for k in range(len(shards)):
            px = shards.tile(k, m)[band].astype(np.float64)
            valid = np.ones_like(px, bool)
            if k == i and m == "s1":
                valid[:10, :10] = valid[20:25, 20:25] = False
            if k == i and m == "s2_l2a":
                valid[:7, :7] = False
            values.append(px[valid])
        values = np.concatenate(values)
        info = shards.modalities[m]
        np.testing.assert_allclose(info.mean[band], values.mean(), rtol=1e-5)
        np.testing.assert_allclose(info.std[band], values.std(), rtol=1e-4)


def test_a_tile_of_only_s1_fill_drops_s1_there_and_keeps_the_cells_s2(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    cell = pq.read_table(root.joinpath(*S1_FILE))["grid_cell"][0].as_py()
    for band in ("vv", "vh"):
        _edit_band(root, S1_FILE, band, 0, lambda a: a.__setitem__((slice(0, TILE), slice(0, TILE)), -32768.0))
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert not summary["skipped"] and summary["num_records"] == CELLS * 4
    assert summary["modalities"]["s1"]["empty_tiles"] == 1 and summary["modalities"]["s1"]["tiles"] == CELLS * 4 - 1
    shards = ShardSet(tmp_path / "out")
    i = _key_index(shards, f"{cell}/0_0")
    assert not shards.has(i, "s1") and shards.has(i, "s2_l2a") and shards.has(i, "s2_l1c")
    assert shards.has(_key_index(shards, f"{cell}/0_1"), "s1")


def test_s1_is_stored_in_db_by_default_and_linear_on_request(sample_parquet, sample_shards, tmp_path):
    row = pq.read_table(sample_parquet.joinpath(*S1_FILE)).slice(0, 1).to_pylist()[0]
    vv = tifffile.imread(io.BytesIO(row["vv"]))[:TILE, :TILE]
    db = ShardSet(sample_shards)
    assert db.s1_scaling == "db" and db.meta["modalities"]["s1"]["units"].startswith("dB")
    i = _key_index(db, f"{row['grid_cell']}/0_0")
    np.testing.assert_allclose(db.tile(i, "s1")[0].astype(np.float32), s1_to_db(vv), atol=0.02)
    # real-scene scale: z-scores of dB S1 stay small (linear power gives tens)
    z = (db.tile(i, "s1").astype(np.float32) - db.modalities["s1"].mean[:, None, None]) / \
        db.modalities["s1"].std[:, None, None]
    assert np.abs(z).max() < 8
    summary = convert([sample_parquet], tmp_path / "lin", tile_size=TILE, workers=0, progress=False,
                      s1_scaling="linear")
    assert summary["s1_scaling"] == "linear" and summary["modalities"]["s1"]["units"].startswith("linear")
    lin = ShardSet(tmp_path / "lin")
    np.testing.assert_array_equal(lin.tile(i, "s1")[0], vv.astype(np.float16))
    with pytest.raises(ValueError, match="s1_scaling must be one of"):
        convert([sample_parquet], tmp_path / "x", tile_size=TILE, workers=0, progress=False, s1_scaling="log")


def test_linear_s1_with_resampling_dips_below_0_is_kept_at_the_floor(sample_parquet, tmp_path):
    """Cubic resampling dips linear power a little below 0 beside bright targets: that product was refused as
    'looks like dB' (one negative pixel), and with --skip-bad its cell lost S1."""
    root = _copy(sample_parquet, tmp_path)
    cell = pq.read_table(root.joinpath(*S1_FILE))["grid_cell"][0].as_py()
    _edit_band(root, S1_FILE, "vv", 0, lambda a: a.__setitem__((slice(0, 3), slice(0, 3)), -3.6e-4))
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert not summary["skipped"]
    shards = ShardSet(tmp_path / "out")
    vv = shards.tile(_key_index(shards, f"{cell}/0_0"), "s1")[0].astype(np.float32)
    np.testing.assert_allclose(vv[:3, :3], s1_to_db(np.zeros((3, 3))), atol=0.05)  # power 0: the dB floor


def test_s1_in_db_is_still_refused_as_input(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S1_FILE, "vv", 1, lambda a: a.__setitem__(slice(None), s1_to_db(a)))
    with pytest.raises(BadInput, match="looks like dB"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)


def test_s1_in_db_with_untagged_0_fill_over_most_of_the_scene_is_refused_not_floored(sample_parquet, tmp_path):
    """A dB scene whose swath edge is untagged 0 over 60 % of it: the median, zeros included, was 0, so the scene was
    taken for linear power and every real pixel stored at the -50 dB floor (mean -50). Exact zeros are left out of
    that decision; a linear scene with the same fill still converts, its zeros at the floor as documented."""
    def fill(a):
        a[:, :72] = 0.0

    def db_with_fill(a):
        a[:] = s1_to_db(a)
        fill(a)

    root = _copy(sample_parquet, tmp_path / "db")
    _edit_band(root, S1_FILE, "vv", 1, db_with_fill)
    with pytest.raises(BadInput, match=r"row 1, .*S1 VV is mostly negative \(median -\d.*exact 0 left out\): looks "
                                       "like dB"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    root = _copy(sample_parquet, tmp_path / "linear")
    cell = pq.read_table(root.joinpath(*S1_FILE))["grid_cell"][1].as_py()
    vv = tifffile.imread(io.BytesIO(pq.read_table(root.joinpath(*S1_FILE))["vv"][1].as_py()))
    _edit_band(root, S1_FILE, "vv", 1, fill)
    summary = convert([root], tmp_path / "lin", tile_size=TILE, workers=0, progress=False)
    assert not summary["skipped"]
    shards = ShardSet(tmp_path / "lin")
    right = shards.tile(_key_index(shards, f"{cell}/0_1"), "s1")[0].astype(np.float32)
    np.testing.assert_allclose(right[:, :12], s1_to_db(np.zeros((TILE, 12))), atol=0.05)  # power 0: the floor
    np.testing.assert_allclose(right[:, 12:], s1_to_db(vv[:TILE, 72:]), atol=0.02)


def test_metadata_parquet_beside_the_parts_is_metadata_whatever_the_parts_folder(sample_parquet, tmp_path):
    """Major-TOM layout: Core-X/metadata.parquet + Core-X/<parts>/part_NNNNN.parquet."""
    root = tmp_path / "majortom"
    for collection in ("Core-S2L2A", "Core-S2L1C", "Core-S1RTC", "Core-WorldCover"):
        src = sample_parquet / collection / "part_00000.parquet"
        parts = root / collection / "parts_v2"  # not images/
        parts.mkdir(parents=True)
        shutil.copy(src, parts / "part_00001.parquet")
        table = pq.read_table(src)
        meta = table.select([c for c in table.column_names if not isinstance(table[c][0].as_py(), bytes)])
        meta = meta.append_column("parquet_url", pa.array(["parts_v2/part_00001.parquet"] * len(meta)))
        meta = meta.append_column("parquet_row", pa.array(range(len(meta))))
        meta = meta.append_column("nodata", pa.array([0.0] * len(meta)))
        pq.write_table(meta, root / collection / "metadata.parquet")
    (root / "README.md").write_text("Major-TOM Core\n")
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    assert summary["num_records"] == CELLS * 4 and summary["duplicates_dropped"] == 0
    assert len(summary["metadata_files"]) == 4 and all(f.endswith("metadata.parquet") for f in
                                                       summary["metadata_files"])
    # a genuine duplicate part is still counted, once per product
    shutil.copy(root / "Core-S1RTC" / "parts_v2" / "part_00001.parquet", root / "Core-S1RTC" / "part_copy.parquet")
    summary = convert([root], tmp_path / "out2", tile_size=TILE, workers=0, progress=False)
    assert summary["duplicates_dropped"] == CELLS


def _as_compressed_folder(parquet_root, out, codecs):
    """Major-TOM GeoTIFF layout <row>/<grid_cell>/<product_id>/<band>.tif, compressed, with sidecar files."""
    k = 0
    for f in sorted(parquet_root.rglob("*.parquet")):
        for rec in pq.read_table(f).to_pylist():
            d = out / rec["grid_cell"].split("_")[0] / rec["grid_cell"] / rec["product_id"]
            d.mkdir(parents=True, exist_ok=True)
            for name, value in rec.items():
                if isinstance(value, bytes):
                    array = tifffile.imread(io.BytesIO(value))
                    (d / f"{name}.tif").write_bytes(_tif(array, codecs[k % len(codecs)]))
                    (d / f"{name}.tif.aux.xml").write_text("<PAMDataset><Metadata/></PAMDataset>\n")
                    (d / f"{name}.tif.ovr").write_bytes(b"II*\x00 not a full overview")
                    k += 1
            (d / "README").write_text("product folder\n")
    return out


def test_compressed_geotiffs_with_sidecars_read_like_the_parquet(sample_parquet, sample_shards, tmp_path):
    folder = _as_compressed_folder(sample_parquet, tmp_path / "tifs", ["lzw", "deflate", "zstd"])
    head = tifffile.TiffFile(next(folder.rglob("B01.tif")))
    assert head.pages[0].compression.name in ("LZW", "ADOBE_DEFLATE", "DEFLATE", "ZSTD")
    convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    a, b = ShardSet(sample_shards), ShardSet(tmp_path / "out")
    assert list(a.keys) == list(b.keys)
    for m in a.modalities:
        for i in range(len(a)):
            np.testing.assert_array_equal(a.tile(i, m), b.tile(i, m))


def test_a_codec_without_its_package_says_what_to_install(sample_parquet, tmp_path, monkeypatch):
    folder = _as_compressed_folder(sample_parquet, tmp_path / "tifs", ["lzw"])
    # what tifffile does without imagecodecs: its LZW decoder lookup fails with "requires the 'imagecodecs' package"
    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", types.SimpleNamespace())
    monkeypatch.setattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", {1: tifffile.TIFF.DECOMPRESSORS[1]})
    with pytest.raises(BadInput, match=r"band \w+: .*needs the imagecodecs package \(pip install imagecodecs\)"):
        convert([folder], tmp_path / "out", tile_size=TILE, workers=0, progress=False)


def test_skip_bad_that_writes_nothing_fails_and_names_the_bad_file(sample_parquet, tmp_path, capsys):
    root = tmp_path / "only_s2"
    (root / "Core-S2L2A").mkdir(parents=True)
    path = root / "Core-S2L2A" / "part_00000.parquet"
    shutil.copy(sample_parquet / "Core-S2L2A" / "part_00000.parquet", path)
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("B04"), "B04",
                                    pa.array([b"not a tiff"] * len(table), pa.binary())), path)
    with pytest.raises(BadInput, match="nothing written") as err:
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert str(path) in str(err.value)
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args([str(root), "--out", str(tmp_path / "o"), "--tile-size", str(TILE), "--workers", "0",
                              "--no-progress", "--skip-bad"])
    assert prepare.run(args) == 2
    assert "nothing written" in capsys.readouterr().err


def test_skipped_s1_product_is_named_and_its_cell_keeps_s2(sample_parquet, tmp_path, capsys):
    root = _copy(sample_parquet, tmp_path)
    _edit_band(root, S1_FILE, "vh", 2, lambda a: a.__setitem__(slice(None), s1_to_db(a)))  # VH in dB
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    [entry] = summary["skipped"]
    assert entry["file"] == str(root.joinpath(*S1_FILE)) and entry["record"] == "row 2"
    assert "looks like dB" in entry["reason"]
    assert summary["num_records"] == CELLS * 4 and summary["modalities"]["s1"]["tiles"] == (CELLS - 1) * 4
    assert summary["modalities"]["s2_l2a"]["tiles"] == CELLS * 4


def test_worldcover_nodata_is_not_counted(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    wc_file = ("Core-WorldCover", "part_00000.parquet")
    cell = pq.read_table(root.joinpath(*wc_file))["grid_cell"][0].as_py()
    _edit_band(root, wc_file, "map", 0, lambda a: a.__setitem__((slice(0, 10), slice(0, TILE)), 0))  # no data
    convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    shards = ShardSet(tmp_path / "out")
    counts = shards.class_counts
    assert counts[_key_index(shards, f"{cell}/0_0")].sum() == TILE * TILE - 10 * TILE
    assert counts[_key_index(shards, f"{cell}/1_1")].sum() == TILE * TILE


def test_a_bad_worldcover_map_is_named_and_its_cell_keeps_the_imagery(sample_parquet, tmp_path):
    root = _copy(sample_parquet, tmp_path)
    wc_file = ("Core-WorldCover", "part_00000.parquet")
    cell = pq.read_table(root.joinpath(*wc_file))["grid_cell"][1].as_py()
    _edit_band(root, wc_file, "map", 1, lambda a: a.__setitem__((TILE + 5, TILE + 5), 7))  # not a WorldCover code
    with pytest.raises(BadInput, match=r"Core-WorldCover/part_00000.parquet \(row 1.*codes \[7\] outside the legend"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    [entry] = summary["skipped"]
    assert entry["file"] == str(root.joinpath(*wc_file)) and entry["record"] == "row 1"
    shards = ShardSet(tmp_path / "skip")
    i = _key_index(shards, f"{cell}/0_0")
    assert shards.has(i, "s2_l2a") and shards.class_counts[i].sum() == 0 and len(shards) == CELLS * 4
