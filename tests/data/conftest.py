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


def _assert_same_host_views(ref_loader, other_loader, steps: int = 2) -> None:
    """Both loaders' host views (storage dtypes) of the same plans agree to one storage quantum: uint16 within
    1 DN (a float-error tie at x.5 may round either way: rare), float16 within one ulp, and near 0 within 1e-6 of
    the view's scale (docs/data.md: DALI's resize arithmetic; measured at most 5.5e-7 over 24 seeds)."""
    import torch

    for step in range(steps):
        plan = ref_loader.plan(0, step)
        a, b = ref_loader.render_host(plan), other_loader.render_host(plan)
        torch.testing.assert_close(a.index, b.index)
        for va, vb in zip(a.global_views + a.local_views, b.global_views + b.local_views, strict=True):
            assert list(va) == list(vb)
            for m in va:
                x, y = va[m], vb[m].cpu()
                assert x.dtype == y.dtype == ref_loader.storage_dtype[m] and x.shape == y.shape
                if x.dtype == torch.uint16:
                    diff = (x.to(torch.int32) - y.to(torch.int32)).abs()
                    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (m, diff.max(), diff.float().mean())
                else:
                    scale = x.float().abs().max().item()
                    torch.testing.assert_close(y.float(), x.float(), rtol=2e-3, atol=max(1e-7, 1e-6 * scale))


@pytest.fixture
def assert_same_host_views():
    return _assert_same_host_views
