"""`terrafm pretrain` on shards converted from awkward but legitimate collections: S1 for some cells only, no
WorldCover at all, a band that is nodata in every tile. It trains and says which locations it leaves out; a
batch or a modality the shards cannot give is one message, exit code 2, and an existing run is left intact."""

import io
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from terrafm.cli import main
from terrafm.data.prepare import convert
from terrafm.data.sample import write_sample_parquet

TILE = 60
COVERAGE = ("4 of the 12 locations have all of data.modalities ['s2_l2a', 's2_l1c', 's1'] and are sampled "
            "(8 lack s1)")
RUN = ["data.batch_size=4", "train.probe=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def awkward_shards(tmp_path_factory):
    """3 cells x 4 tiles; S1 for the first cell only, no WorldCover collection, S2 L2A B01 all fill (0)."""
    root = tmp_path_factory.mktemp("awkward")
    write_sample_parquet(root / "in", seed=0, cells=3, tile_size=TILE)
    s1 = root / "in" / "Core-S1RTC" / "part_00000.parquet"
    pq.write_table(pq.read_table(s1).slice(0, 1), s1)
    for part in (root / "in" / "Core-WorldCover").iterdir():
        part.unlink()
    (root / "in" / "Core-WorldCover").rmdir()
    l2a = root / "in" / "Core-S2L2A" / "part_00000.parquet"
    table = pq.read_table(l2a)
    zeros = []
    for value in table["B01"].to_pylist():
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros_like(tifffile.imread(io.BytesIO(value))))
        zeros.append(buf.getvalue())
    pq.write_table(table.set_column(table.column_names.index("B01"), "B01", pa.array(zeros, pa.binary())), l2a)
    convert([root / "in"], root / "shards", tile_size=TILE, workers=0, progress=False)
    return root / "shards"


def test_a_batch_the_sampled_locations_cannot_fill_names_the_locations_left_out(awkward_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), f"data.shard_dir={awkward_shards}", "data.batch_size=8",
                 "train.probe=false"]) == 2
    err = capsys.readouterr().err
    # how many it gets, so the batch that fits needs no guess
    assert re.search(r"data.batch_size=8 is more than each of the 1 rank\(s\) gets from the dataset in an epoch "
                     rf"\(\d samples\) \({re.escape(COVERAGE)}\)", err), err
    assert "Traceback" not in err and not out.exists()


def test_steps_per_epoch_with_an_empty_epoch_is_refused_not_a_stop_iteration(awkward_shards, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), f"data.shard_dir={awkward_shards}", "data.batch_size=8",
                 "train.steps_per_epoch=5", "train.probe=false"]) == 2
    assert "data.batch_size=8 is more than each of the 1 rank(s) gets" in capsys.readouterr().err


def test_a_band_subset_is_refused_before_training_not_a_traceback_at_the_first_step(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), "data.bands={s2_l2a: [B02, B03, B04]}"]) == 2
    err = capsys.readouterr().err
    assert "data.bands.s2_l2a=['B02', 'B03', 'B04']: the model's s2_l2a patch embedding takes all of" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow  # two short pretrain runs on 2 cores (~30 s)
def test_partial_coverage_trains_says_so_and_a_bad_resume_keeps_the_run(awkward_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), f"data.shard_dir={awkward_shards}", "train.max_steps=2", *RUN]) == 0
    assert f"data: {COVERAGE}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # resumed on the raw Major-TOM folder (not shards) or on a batch the shards cannot fill: nothing is touched
    for data in ([f"data.shard_dir={awkward_shards.parent / 'in'}"], [f"data.shard_dir={awkward_shards}",
                                                                       "data.batch_size=8"]):
        assert main(["pretrain", "--out", str(out), "--resume", *RUN, "train.max_steps=4", *data]) == 2
    err = capsys.readouterr().err
    assert "is not a finished terrafm shard directory" in err and COVERAGE in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
