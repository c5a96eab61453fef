"""terrafm prepare on GeoTIFF folders as users have them: what discovery must not pass over in silence (folders it
cannot list, empty product folders, a product stacked in one file), which band or product a size error names, and
index counts of what was written (duplicates dropped, a sensor named twice)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from geotiff_folders import in_grid_cells, product_folders

from terrafm.data.prepare import convert
from terrafm.data.sources import PRODUCT_AS_FILE, BadInput

TILE = 60  # tests/data/conftest.py's sample set: 3 cells of 120 px
S1_FILE = ("Core-S1RTC", "part_00000.parquet")


def _convert(folder: Path, out: Path, **kw) -> dict:
    options = {"tile_size": TILE, "workers": 0, "progress": False, "modalities": ("s2_l2a",), **kw}
    return convert([folder], out, **options)


def test_an_empty_product_folder_is_a_product_missing_its_bands(sample_parquet, tmp_path):
    """An empty (or hidden-files-only) product folder was dropped with exit 0: a failed download lost in silence."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    for f in products[1].iterdir():
        f.unlink()
    (products[1] / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(BadInput, match=rf"{products[1].name}.*missing band B01 .*holds no \.tif at all"):
        _convert(folder, tmp_path / "out")
    summary = _convert(folder, tmp_path / "out", skip_bad=True)
    assert [s["record"] for s in summary["skipped"]] == [products[1].name]


def test_a_product_stacked_in_one_file_in_its_cell_folder_is_named(sample_parquet, tmp_path):
    """<grid_cell>/<product_id>.tif (a multi-band stack) was ignored like a thumbnail: its product lost in silence."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    stack = products[0].parent / f"{products[0].name}.tif"
    tifffile.imwrite(stack, np.ones((12, 8, 8), np.uint16))
    shutil.rmtree(products[0])
    with pytest.raises(BadInput, match=PRODUCT_AS_FILE.split(";")[0]):
        _convert(folder, tmp_path / "out")
    summary = _convert(folder, tmp_path / "out", skip_bad=True)
    assert [s["file"] for s in summary["skipped"]] == [str(stack)]


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(sample_parquet, tmp_path, monkeypatch):
    """os.walk drops a folder it cannot list: a grid cell at mode 0 went missing from the shards with exit 0."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    locked = products[1].parent
    scandir = os.scandir

    def deny(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(BadInput, match=rf"{locked} \(whole folder\): cannot be listed: Permission denied"):
        _convert(folder, tmp_path / "out")


def test_files_of_a_folder_that_cannot_be_entered_are_unreadable_input_not_a_write_error(sample_parquet, tmp_path,
                                                                                         monkeypatch):
    """A folder listed but not entered (chmod -R 644): stat of its files raised PermissionError, reported as
    `cannot write` with exit 2, which --skip-bad could not skip."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    is_file = Path.is_file

    def deny(self):
        if self.parent == products[1]:
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", deny)
    with pytest.raises(BadInput, match=r"\(whole file\): cannot be read: Permission denied \(13 such records"):
        _convert(folder, tmp_path / "out")
    summary = _convert(folder, tmp_path / "out", skip_bad=True)
    assert len(summary["skipped"]) == 13 and summary["num_records"] == 8  # 12 bands and the cloud mask; not also a
    # product missing every band


def test_the_index_counts_the_baselines_of_products_written_not_of_dropped_duplicates(sample_parquet, tmp_path):
    """A cell's later duplicates are never read, so a baseline-04.00 duplicate made `mixes` warnings about
    products no shard holds."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    for p in products[:2]:
        shutil.copytree(p, p.parent / p.name.replace("_N0301_", "_N0509_"))
    summary = _convert(folder, tmp_path / "out")
    assert summary["duplicates_dropped"] == 2
    assert summary["s2_baselines"]["s2_l2a"] == {"offset": 0, "no_offset": len(products), "unknown": 0}


def test_a_sensor_named_twice_is_converted_once(sample_parquet, tmp_path):
    once = _convert(sample_parquet, tmp_path / "once")
    twice = _convert(sample_parquet, tmp_path / "twice", modalities=("s2_l2a", "s2_l2a"))
    assert list(twice["modalities"]) == ["s2_l2a"] and twice["num_records"] == once["num_records"]
    assert twice["modalities"] == once["modalities"]  # tiles, nodata pixels and statistics counted once


def test_a_band_of_the_wrong_size_is_the_band_named(sample_parquet, tmp_path):
    """The largest band set the expected size, so one 10 m band at twice the size blamed B01 (a correct band)."""
    folder = tmp_path / "tifs"
    products = product_folders(sample_parquet, in_grid_cells(folder))
    tifffile.imwrite(products[0] / "B04.tif", np.ones((240, 240), np.uint16))
    with pytest.raises(BadInput, match=r"band B04 has size \(240, 240\), expected \(120, 120\)"):
        _convert(folder, tmp_path / "out")


@pytest.mark.parametrize("tile", [TILE, 50])
def test_a_cropped_s1_scene_is_named_whatever_the_tile_size(sample_parquet, tmp_path, tile):
    """An S1 scene of 100 px beside S2 of 120: at --tile-size 50 the S2 product was refused with a hint of 60, and
    at 60 the S1 with a hint of 50, each hint refused by the other run; --skip-bad at 50 kept the cropped scene."""
    folder = tmp_path / "tifs"
    s2 = product_folders(sample_parquet, in_grid_cells(folder))
    s1 = product_folders(sample_parquet, in_grid_cells(folder), S1_FILE)
    for band in ("vv", "vh"):
        tifffile.imwrite(s1[0] / f"{band}.tif", np.full((100, 100), 0.1, np.float32))
    with pytest.raises(BadInput, match=rf"{s1[0].name}.*product of 100 px where the other products of this cell "
                                       r"are 120 px"):
        _convert(folder, tmp_path / "out", tile_size=tile, modalities=("s2_l2a", "s1"))
    if tile == TILE:
        summary = _convert(folder, tmp_path / "out", tile_size=tile, modalities=("s2_l2a", "s1"), skip_bad=True)
        assert [s["record"] for s in summary["skipped"]] == [s1[0].name] and len(s2) == 3
