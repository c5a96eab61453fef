import os
import shutil

import pytest

from terrafm.data.throughput import measure_paths


def test_measure_paths_reports_each_path(sample_shards, sample_parquet, tmp_path):
    done = []  # gpu_check's data stage saves each row as it comes: killed at its limit, it keeps them
    rows = measure_paths(sample_shards, seconds=0.2, paths=("geotiff_baseline", "numpy", "cpp", "gpu_decode_host"),
                         parquet_dir=sample_parquet, batch_size=2, n_local=1, global_size=32, local_size=16,
                         num_workers=0, on_row=lambda row: done.append(dict(row)))
    assert [r["path"] for r in rows] == ["geotiff_baseline", "numpy", "cpp", "gpu_decode_host"]
    assert done == rows
    for r in rows:  # every path runs on a CPU (terrafm._C is built in a test environment): none may be skipped
        assert "skipped" not in r, r
        assert r["tiles_per_s"] > 0 and r["views_per_s"] == pytest.approx(3 * r["tiles_per_s"])
    missing = measure_paths(sample_shards, seconds=0.1, paths=("geotiff_baseline",), parquet_dir=sample_shards)
    assert "no Major-TOM S2L2A parquet" in missing[0]["skipped"]
    odd = tmp_path / os.fsdecode(b"parquet\xff")  # a name that is not UTF-8: the baseline's str path raised
    shutil.copytree(sample_parquet, odd)
    [baseline] = measure_paths(sample_shards, seconds=0.1, paths=("geotiff_baseline",), parquet_dir=odd, n_local=1,
                               global_size=32, local_size=16)
    assert baseline["tiles_per_s"] > 0, baseline
    with pytest.raises(ValueError, match="unknown throughput paths"):
        measure_paths(sample_shards, paths=("torchvision",))


@pytest.mark.parametrize("path", ["numpy", "gpu_decode_host"])  # the host-read path divided by zero
def test_measure_paths_refuses_a_batch_larger_than_the_data_instead_of_waiting_forever(sample_shards, path):
    with pytest.raises(ValueError, match="yields no batch: data.batch_size=100000"):
        measure_paths(sample_shards, seconds=0.1, paths=(path,), batch_size=100000, n_local=1, global_size=32,
                      local_size=16, num_workers=0)


def test_measure_paths_on_shards_of_some_collections_measures_what_they_hold(sample_parquet, tmp_path):
    """Shards converted from S2 L2A alone list the other modalities with no tile: measuring them asked for every
    listed modality and refused ('set data.modalities', which `terrafm bench` has no option for)."""
    from terrafm.data.prepare import convert

    convert([sample_parquet / "Core-S2L2A", sample_parquet / "Core-WorldCover"], tmp_path / "l2a", tile_size=60,
            workers=0, progress=False)
    [row] = measure_paths(tmp_path / "l2a", seconds=0.1, paths=("numpy",), batch_size=2, n_local=1,
                          global_size=32, local_size=16, num_workers=0)
    assert row["tiles_per_s"] > 0, row


def test_the_benchmark_draws_modalities_some_location_holds_together():
    """S2 and S1 converted for different cells: no location has both, and the bench's loader stopped with `set
    data.modalities to a subset`, an option `terrafm bench` does not have. It now leaves out the rarest modality."""
    from types import SimpleNamespace

    import numpy as np

    from terrafm.data.throughput import shared_modalities

    def shards(**tiles):
        return SimpleNamespace(modalities=dict.fromkeys(tiles), offset={
            m: np.array([[0] if t else [-1] for t in has]) for m, has in tiles.items()})

    assert shared_modalities(shards(s2_l2a=[1, 1, 0], s1=[0, 0, 1])) == ("s2_l2a",)
    assert shared_modalities(shards(s2_l2a=[1, 1, 0], s2_l1c=[1, 0, 0], s1=[0, 1, 1])) == ("s2_l2a", "s1")
    assert shared_modalities(shards(s2_l2a=[1, 1], s1=[1, 0], s2_l1c=[0, 0])) == ("s2_l2a", "s1")


def test_the_loader_paths_deliver_on_the_device_asked_for_even_where_cuda_is_usable(sample_shards, monkeypatch):
    """`terrafm bench --device cpu` on a GPU node: the data section built its loader for cuda all the same."""
    from terrafm import backends

    monkeypatch.setattr(backends, "cuda", lambda: backends.Availability(True, "pretended for this test"))
    [row] = measure_paths(sample_shards, seconds=0.1, paths=("numpy",), batch_size=2, n_local=1, global_size=32,
                          local_size=16, num_workers=0, device="cpu")
    assert row["device"] == "cpu" and row["tiles_per_s"] > 0, row
    # the default follows backends.cuda(): here it claims a GPU, so the loader asks torch for cuda, which this CPU
    # build refuses
    with pytest.raises(AssertionError, match="Torch not compiled with CUDA enabled"):
        measure_paths(sample_shards, seconds=0.1, paths=("numpy",), batch_size=2, n_local=1, global_size=32,
                      local_size=16, num_workers=0)
