"""`terrafm prepare` on files in the layouts real upstream tools write, beyond what our generator writes: parquet
rewritten by polars (string_view / binary_view columns), GeoTIFF product folders not inside a grid cell folder or
holding only their thumbnail (download scripts), an S1 scene cropped to another size than its cell's S2.

Built on the synthetic Major-TOM parquet set (tests/data/conftest.py); each case checks the stored tiles or the one
message, not only the exit code."""

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from geotiff_folders import S2_FILE, in_grid_cells, product_folders

from terrafm.data import prepare
from terrafm.data.prepare import convert
from terrafm.data.shards import ShardSet
from terrafm.data.sources import BadInput

TILE = 60  # tests/data/conftest.py's sample set: 3 cells of 120 px


def _cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args([*args, "--tile-size", str(TILE), "--workers", "0", "--no-progress"]))


def _assert_same_tiles(a: ShardSet, b: ShardSet) -> None:
    assert list(a.keys) == list(b.keys)
    for m in a.modalities:
        for i in range(len(a)):
            assert a.has(i, m) == b.has(i, m)
            if a.has(i, m):
                np.testing.assert_array_equal(a.tile(i, m), b.tile(i, m))


def test_parquet_with_view_columns_as_polars_writes_reads_like_the_original(sample_parquet, sample_shards, tmp_path):
    """Polars (1.38+) writes strings and binaries as Arrow view types, which pyarrow reads back as string_view /
    binary_view: a Major-TOM subset filtered and re-written with polars is the same data."""
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    for path in root.rglob("*.parquet"):
        table = pq.read_table(path)
        views = {pa.string(): pa.string_view(), pa.binary(): pa.binary_view()}
        pq.write_table(table.cast(pa.schema([pa.field(f.name, views.get(f.type, f.type)) for f in table.schema])), path)
    schema = pq.read_schema(root.joinpath(*S2_FILE))
    assert schema.field("grid_cell").type == pa.string_view() and schema.field("B04").type == pa.binary_view()
    convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    _assert_same_tiles(ShardSet(sample_shards), ShardSet(tmp_path / "out"))


def test_product_folders_outside_a_grid_cell_folder_are_named_not_merged_into_one_place(sample_parquet, tmp_path,
                                                                                        capsys):
    """<collection>/<product_id>/<band>.tif (no <row>/<grid_cell>/ folders): the parent's name is no grid cell, so
    three products of three places used to become one location keyed by the folder name and two "duplicates"."""
    root = tmp_path / "tifs" / "Core-S2L2A"
    products = product_folders(sample_parquet, lambda rec: root)
    assert _cli([str(root), "--out", str(tmp_path / "out"), "--modalities", "s2_l2a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(products[0]) in err and "not inside a grid cell folder" in err and "3 such records" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadInput, match="no products of"):  # --skip-bad: listed and skipped, nothing merged
        convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)



def _resize_s1(root: Path, row: int, pad: int) -> str:
    """Pad both S1 bands of one parquet row by `pad` px (a scene cropped to another size); returns its grid cell."""
    path = root.joinpath("Core-S1RTC", S2_FILE[1])
    table = pq.read_table(path)
    for band in ("vv", "vh"):
        column = table[band].to_pylist()
        array = np.pad(tifffile.imread(io.BytesIO(column[row])), ((0, pad), (0, pad)), mode="edge")
        buf = io.BytesIO()
        tifffile.imwrite(buf, array)
        column[row] = buf.getvalue()
        table = table.set_column(table.column_names.index(band), band, pa.array(column, pa.binary()))
    pq.write_table(table, path)
    return table["grid_cell"][row].as_py()


@pytest.mark.parametrize("pad", [6, 60])  # 126 px: not a multiple of the tile; 180 px: one, but not the cell's size
def test_an_s1_scene_of_another_size_is_the_product_named_and_skipped_not_its_cells_s2(sample_parquet, sample_shards,
                                                                                       tmp_path, pad):
    """S1 sorts first among a cell's modalities: its size used to become the cell's, so the good S2 L1C, L2A and
    WorldCover products were blamed, and with --skip-bad the whole cell was lost (S1 listed once per product)."""
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    cell = _resize_s1(root, 0, pad)
    s1_file = str(root.joinpath("Core-S1RTC", S2_FILE[1]))
    with pytest.raises(BadInput, match=rf"Core-S1RTC.*\(row 0, grid_cell {cell}, product S1A_\S+\): product of "
                                       rf"{120 + pad} px (is not a multiple of tile_size 60|where the other products "
                                       r"of this cell are 120 px)"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True)
    assert [(s["file"], s["record"], s["grid_cell"]) for s in summary["skipped"]] == [(s1_file, "row 0", cell)]
    assert {m: s["tiles"] for m, s in summary["modalities"].items()} == {"s2_l2a": 12, "s2_l1c": 12, "s1": 8}
    ref, out = ShardSet(sample_shards), ShardSet(tmp_path / "skip")
    assert list(ref.keys) == list(out.keys)
    for i, key in enumerate(ref.keys):
        assert out.has(i, "s1") == (not key.startswith(cell + "/"))
        for m in ("s2_l2a", "s2_l1c"):
            np.testing.assert_array_equal(ref.tile(i, m), out.tile(i, m))
    np.testing.assert_array_equal(ref.class_counts, out.class_counts)


def test_a_product_folder_with_only_its_thumbnail_is_a_product_missing_its_bands(sample_parquet, tmp_path, capsys):
    """Download scripts built on Major-TOM's filter_download write <product_id>/thumbnail.png and only the band
    columns asked for (none by default): such a product used to be passed over in silence, its cell short of it."""
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    for d in products:
        (d / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for band in products[1].glob("*.tif"):
        band.unlink()
    assert _cli([str(root), "--out", str(tmp_path / "out"), "--modalities", "s2_l2a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{products[1]} (grid_cell {products[1].parent.name}, product {products[1].name}): missing band B01" in err
    assert "it holds no .tif at all" in err
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True,
                      modalities=("s2_l2a",))
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(products[1]), products[1].name)]
    assert summary["num_records"] == 2 * 4


def test_on_a_size_tie_the_s1_scene_is_the_product_skipped(sample_parquet, tmp_path):
    """A cell of one S1 and one S2 product of different sizes: the S1 scene (the one cropped) is named."""
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root, ignore=shutil.ignore_patterns("Core-S2L1C", "Core-WorldCover"))
    cell = _resize_s1(root, 0, 60)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, skip_bad=True,
                      modalities=("s1", "s2_l2a"))
    assert [(s["record"], s["grid_cell"]) for s in summary["skipped"]] == [("row 0", cell)]
    assert "product of 180 px where the other products of this cell are 120 px" in summary["skipped"][0]["reason"]
    assert {m: s["tiles"] for m, s in summary["modalities"].items()} == {"s2_l2a": 12, "s1": 8}


@pytest.mark.parametrize(("size", "tile", "hint"), [(1056, 534, "--tile-size 528 splits it into 2 x 2"),
                                                    (126, 60, "--tile-size 63 splits it into 2 x 2"),
                                                    (97, 60, "--tile-size 97 splits it into 1 x 1")])
def test_a_tile_size_that_does_not_divide_the_product_names_one_that_does(size, tile, hint):
    """Major-TOM cells are 1068 px (2 x 534); a grid of 1056 px cells needs --tile-size 528: the message says so."""
    assert prepare._tile_size_hint(size, tile) == f" ({hint} tiles)"


def test_an_upper_case_parquet_suffix_is_read(sample_parquet, sample_shards, tmp_path):
    """Files copied from a case-insensitive file system may come as part_00000.PARQUET."""
    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    for path in list(root.rglob("*.parquet")):
        path.rename(path.with_suffix(".PARQUET"))
    convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False)
    _assert_same_tiles(ShardSet(sample_shards), ShardSet(tmp_path / "out"))


def test_a_parquet_file_of_one_big_row_group_is_warned_about_before_converting(sample_parquet, sample_shards, tmp_path,
                                                                              capsys, monkeypatch):
    """pandas / polars write one row group for all rows; prepare holds a whole group per file in each worker, so
    the run says so before it starts (here with the size bar lowered to 1000 bytes), and converts the same tiles.
    One product per row group, as Major-TOM writes, is never warned about."""
    from terrafm.data import sources

    root = tmp_path / "in"
    shutil.copytree(sample_parquet, root)
    for path in root.rglob("*.parquet"):
        pq.write_table(pq.read_table(path), path, row_group_size=1_000_000 if path.parts[-2] == S2_FILE[0] else 1)
    monkeypatch.setattr(sources, "LARGE_ROW_GROUP_BYTES", 1000)
    assert _cli([str(root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "row_group_size=1" in err
    assert f"warning: {root.joinpath(*S2_FILE)} has row groups of up to 3 products" in err
    _assert_same_tiles(ShardSet(sample_shards), ShardSet(tmp_path / "out"))


def test_band_files_in_a_subfolder_of_the_product_folder_are_named_not_passed_over(sample_parquet, tmp_path, capsys):
    """<product_id>/IMG_DATA/B04.tif (a SAFE-like export): the subfolder is no product folder, so the product was
    passed over in silence (exit 0, its cell missing and counted nowhere), or, beside a thumbnail.png, reported as
    missing every band."""
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    nested = products[1] / "IMG_DATA"
    nested.mkdir()
    for band in products[1].glob("*.tif"):
        band.rename(nested / band.name)
    n = len(list(nested.glob("*.tif")))
    for thumbnail in (False, True):
        if thumbnail:
            (products[1] / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        assert _cli([str(root), "--out", str(tmp_path / "out"), "--modalities", "s2_l2a"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (f"{products[1]} ({products[1].name}): band files are in the subfolder IMG_DATA ({n} .tif files, "
                "e.g. B01.tif); expected <product_id>/<band>.tif") in err
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True,
                      modalities=("s2_l2a",))
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(products[1]), products[1].name)]
    assert summary["num_records"] == 2 * 4


def test_a_flat_folder_of_band_files_says_what_it_holds(sample_parquet, tmp_path):
    """<product_id>_B04.tif files side by side, no product folders: "no products found" alone did not say why."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for product in product_folders(sample_parquet, lambda rec: tmp_path / "tifs" / rec["grid_cell"]):
        for band in product.glob("*.tif"):
            band.rename(flat / f"{product.name}_{band.name}")
    n = len(list(flat.glob("*.tif")))
    first = sorted(flat.glob("*.tif"))[0]
    with pytest.raises(BadInput, match=rf"no products of .* found .*; found {n} \.tif file\(s\) outside "
                                       rf"<grid_cell>/<product_id>/ folders, e.g. {first}: the layout is "
                                       r"<row>/<grid_cell>/<product_id>/<band>\.tif"):
        convert([flat], tmp_path / "out", tile_size=TILE, workers=0, progress=False)


def test_a_bad_duplicate_product_gives_way_to_the_next_under_skip_bad(sample_parquet, tmp_path):
    """Two L2A products of one cell, the first by product id incomplete: the plan kept only the first before reading,
    so with --skip-bad the cell ended with no L2A at all though a good one was there. Without --skip-bad the message
    says a duplicate exists; the duplicates count stays true (a product skipped as bad is not also dropped)."""
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    ref = convert([root], tmp_path / "ref", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    good = products[0]
    bad = good.with_name(good.name.replace("_2021", "_2020", 1))  # sorts first
    shutil.copytree(good, bad)
    summary = convert([root], tmp_path / "both_good", tile_size=TILE, workers=0, progress=False,
                      modalities=("s2_l2a",))
    assert summary["duplicates_dropped"] == 1 and summary["skipped"] == []
    (bad / "B8A.tif").unlink()
    with pytest.raises(BadInput, match=rf"{bad.name}\): missing band B8A .* \(this cell has 1 more s2_l2a "
                                       rf"product\(s\), e.g. {good.name}, which --skip-bad tries instead\)"):
        convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    summary = convert([root], tmp_path / "skip", tile_size=TILE, workers=0, progress=False, skip_bad=True,
                      modalities=("s2_l2a",))
    assert [(s["file"], s["record"]) for s in summary["skipped"]] == [(str(bad), bad.name)]
    assert summary["duplicates_dropped"] == 0 and summary["modalities"]["s2_l2a"]["tiles"] == 12
    _assert_same_tiles(ShardSet(tmp_path / "ref"), ShardSet(tmp_path / "skip"))
    (good / "B8A.tif").unlink()  # both bad: both skipped, none dropped, the cell left out
    summary = convert([root], tmp_path / "all_bad", tile_size=TILE, workers=0, progress=False, skip_bad=True,
                      modalities=("s2_l2a",))
    assert len(summary["skipped"]) == 2 and summary["duplicates_dropped"] == 0
    assert summary["num_records"] == ref["num_records"] - 4


def _blank_rows(product: Path, fraction: float) -> None:
    """Zero (S2's nodata) the top `fraction` of every band of a product folder, as a product at a swath edge."""
    for band in product.glob("*.tif"):
        with tifffile.TiffFile(band) as tif:
            page = tif.pages[0]
            data = page.asarray()
            tags = [(code, page.tags[code].dtype, page.tags[code].count, page.tags[code].value, False)
                    for code in (33550, 33922) if code in page.tags]
        data[:round(data.shape[0] * fraction)] = 0
        tifffile.imwrite(band, data, compression="zlib", extratags=tags)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_of_duplicate_products_the_one_with_the_least_nodata_is_used(sample_parquet, tmp_path, fraction):
    """Two L2A products of one cell, the first by product id outside the swath (all nodata) or half in it: the first
    that read was used, so its cell lost the tiles the other product holds, with exit 0 and nothing said."""
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    ref = tmp_path / "ref"
    convert([root], ref, tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    good = products[0]
    edge = good.with_name(good.name.replace("_2021", "_2020", 1))  # sorts first
    shutil.copytree(good, edge)
    _blank_rows(edge, fraction)
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["duplicates_dropped"] == 1 and summary["skipped"] == []
    assert summary["modalities"]["s2_l2a"]["empty_tiles"] == 0 and summary["modalities"]["s2_l2a"]["nodata_pixels"] == \
        [0] * 12
    _assert_same_tiles(ShardSet(ref), ShardSet(tmp_path / "out"))
    assert summary["s2_baselines"] == {"s2_l2a": {"offset": 0, "no_offset": 3, "unknown": 0}}


def test_a_duplicate_after_a_product_without_nodata_is_not_read(sample_parquet, tmp_path):
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    good = products[0]
    later = good.with_name(good.name.replace("_2021", "_2022", 1))  # sorts after the whole product
    shutil.copytree(good, later)
    (later / "B8A.tif").unlink()  # would be bad input, were it read
    summary = convert([root], tmp_path / "out", tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert summary["duplicates_dropped"] == 1 and summary["skipped"] == []


def test_shards_of_an_earlier_terrafm_resume_with_the_products_it_used(sample_parquet, tmp_path):
    """Shards written before a shard recorded its `used` products: a resume counts them in plan order, as written."""
    root = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(root))
    shutil.copytree(products[0], products[0].with_name(products[0].name.replace("_2021", "_2022", 1)))
    out = tmp_path / "out"
    first = convert([root], out, tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    for npz in out.glob("part-*.npz"):
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files if k != "used"}
        with open(npz, "wb") as f:
            np.savez(f, **arrays)
    again = convert([root], out, tile_size=TILE, workers=0, progress=False, modalities=("s2_l2a",))
    assert again["resumed_shards"] == len(again["shards"]) > 0
    assert (again["duplicates_dropped"], again["s2_baselines"]) == (first["duplicates_dropped"], first["s2_baselines"])
    assert first["duplicates_dropped"] == 1
