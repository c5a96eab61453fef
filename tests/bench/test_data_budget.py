"""`terrafm bench --only data --data-dir`: any prepared shard set, tiles/s per core and the node's core budget."""

import json

import pytest

from terrafm import backends
from terrafm.cli import main
from terrafm.data.prepare import convert
from terrafm.data.sample import write_sample_parquet
from terrafm.data.throughput import PATHS
from terrafm_bench import comm
from terrafm_bench import data as data_bench
from terrafm_bench.common import GPUS


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_sample_parquet(root / "parquet", seed=1, cells=3, tile_size=60)
    convert([root / "parquet"], root / "shards", tile_size=60, workers=0, progress=False,
            modalities=("s2_l2a", "s1"))
    return root / "shards"


def test_gpu_demand_is_the_roofline_step_rate_of_vit_b():
    backbone, batch = comm.MODELS["ViT-B"]
    step_s = comm.step_flops(comm.param_counts(backbone), batch) / (GPUS["H100 SXM"]["tflops_bf16"] * 1e12)
    full, half = data_bench.gpu_demand(1.0), data_bench.gpu_demand(0.5)
    assert full["tiles_per_s"] == pytest.approx(batch / step_s)
    assert half["tiles_per_s"] == pytest.approx(full["tiles_per_s"] / 2)
    with pytest.raises(ValueError, match="mfu"):
        data_bench.gpu_demand(0.0)


def test_budget_divides_the_gpu_demand_by_the_per_core_rate():
    demand = {"tiles_per_s": 600.0}
    rows = [{"path": "cpp", "tiles_per_core_s": 200.0},
            {"path": "gpu_decode_host", "tiles_per_core_s": 100.0, "bytes_per_tile": 1e6},
            {"path": "dali", "skipped": "not installed"}]
    plan = data_bench.budget(rows, demand, gpus_per_node=8)
    assert [b["path"] for b in plan] == ["cpp", "gpu_decode_host"]
    assert plan[0]["cores_per_gpu"] == pytest.approx(3.0) and plan[0]["cores_per_node"] == pytest.approx(24.0)
    assert plan[0]["within_goal"] and not plan[1]["within_goal"]  # 6 cores per GPU > the goal of 4
    assert plan[0]["h2d_gb_s"] is None and plan[1]["h2d_gb_s"] == pytest.approx(0.6)


def test_bench_measures_a_prepared_shard_set(shard_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--only", "data", "--data-dir", str(shard_dir), "--out", str(out)]) == 0
    section = json.loads((out / "bench.json").read_text())["sections"]["data"]
    assert section["shard_dir"] == str(shard_dir) and section["modalities"] == {"s2_l2a": 12, "s1": 2}
    measured = [r for r in section["rows"] if "skipped" not in r]
    # every path whose backend is usable here is measured (`>= {"numpy", "geotiff_baseline"}` let a C++ or DALI path
    # that failed into a skipped row pass)
    usable = {"cpp": backends.csrc().usable, "dali": backends.dali().usable}
    assert {r["path"] for r in measured} == {p for p in PATHS if usable.get(p, True)}, section["rows"]
    assert all(r["tiles_per_core_s"] > 0 and r["cpu_seconds"] > 0 for r in measured)
    assert {b["path"] for b in section["budget"]} == {r["path"] for r in measured}
    md = (out / "bench.md").read_text()
    assert "cores per GPU" in md and str(shard_dir) in md
    printed = capsys.readouterr().out
    assert "host cores per GPU" in printed
    # small tiles and --quick crops under a production demand: said, not passed off as the node's budget
    assert len(section["caveats"]) == 2 and "not Major-TOM's 534" in section["caveats"][0]
    assert "not the production budget: --quick renders" in printed and "Not the production budget: 60 px" in md


def test_a_folder_that_is_not_a_shard_set_exits_2(tmp_path, capsys):
    assert main(["bench", "--only", "data", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
