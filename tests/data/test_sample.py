import numpy as np
import pyarrow.parquet as pq

from terrafm.data.landcover import WORLDCOVER_VALUES
from terrafm.data.sample import S2_L2A_COLUMNS, ensure_sample_shards, synthesize_cell, write_sample_parquet
from terrafm.data.shards import ShardSet


def test_synthesis_is_deterministic_and_seed_dependent():
    a, b, c = synthesize_cell(0, 1, 60), synthesize_cell(0, 1, 60), synthesize_cell(1, 1, 60)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["s2_l2a"], c["s2_l2a"])


def test_parquet_layout_matches_major_tom(tmp_path):
    paths = write_sample_parquet(tmp_path / "a", cells=2, tile_size=30)
    again = write_sample_parquet(tmp_path / "b", cells=2, tile_size=30)
    for p, q in zip(paths, again, strict=True):
        assert pq.read_table(p).equals(pq.read_table(q))
    l2a = pq.read_table(tmp_path / "a" / "Core-S2L2A" / "part_00000.parquet")
    assert {"product_id", "grid_cell", "timestamp", *S2_L2A_COLUMNS} <= set(l2a.column_names)
    assert all("MSIL2A" in p for p in l2a["product_id"].to_pylist())
    s1 = pq.read_table(tmp_path / "a" / "Core-S1RTC" / "part_00000.parquet")
    assert {"vv", "vh"} <= set(s1.column_names)


def test_band_statistics_and_landcover_are_plausible():
    cell = synthesize_cell(0, 0, 120)
    s2 = cell["s2_l2a"]
    assert 0 < s2.min() and s2.max() <= 10000
    # vegetation red edge: NIR (B08) brighter than red (B04) on average
    assert s2[7].mean() > s2[3].mean()
    assert (cell["s1"] > 0).all() and cell["s1"][0].mean() > cell["s1"][1].mean()  # VV > VH
    assert set(np.unique(cell["worldcover"]).tolist()) <= set(WORLDCOVER_VALUES)
    # S1/S2 follow the land cover: water is darker than land in NIR
    water = cell["worldcover"] == 80
    if water.any() and (~water).any():
        assert s2[7][water].mean() < s2[7][~water].mean()


def test_ensure_sample_shards_is_idempotent(tmp_path):
    d = ensure_sample_shards(tmp_path, cells=1, tile_size=30)
    mtime = (d / "index.json").stat().st_mtime_ns
    assert ensure_sample_shards(tmp_path, cells=1, tile_size=30) == d
    assert (d / "index.json").stat().st_mtime_ns == mtime
    s = ShardSet(d)
    assert len(s) == 4 and set(s.modalities) == {"s2_l2a", "s2_l1c", "s1"}
