"""Shared fixtures: a small synthetic Major-TOM parquet set and its shards (3 cells x 4 tiles of 60 px)."""

from pathlib import Path

import pytest

from terrafm.data.prepare import convert
from terrafm.data.sample import write_sample_parquet

CELLS, TILE = 3, 60


@pytest.fixture(scope="session")
def sample_parquet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    write_sample_parquet(root, seed=0, cells=CELLS, tile_size=TILE)
    return root


@pytest.fixture(scope="session")
def sample_shards(sample_parquet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    convert([sample_parquet], out, tile_size=TILE, workers=0, progress=False)
    return out
