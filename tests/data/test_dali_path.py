"""The DALI GPU decode path: the LZ4 chunk layout `terrafm prepare` writes is the one fn.decoders.inflate takes,
and the DALI graph (everything but inflate on CPU) renders the same views as the numpy reference."""

import io

import lz4.block
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch

from terrafm import backends, ops
from terrafm.data.config import DataConfig
from terrafm.data.loader import build_loader
from terrafm.data.prepare import convert
from terrafm.data.shards import ShardSet, decode_chunks
from terrafm.data.views import to_storage

TILE = 60  # tests/data/conftest.py's sample set

LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"  # lz4.frame output starts with it; nvCOMP's batched LZ4 wants bare blocks
needs_dali = pytest.mark.skipif(not backends.dali().usable, reason="needs DALI (pip install terrafm[dali])")


@pytest.fixture(scope="module")
def lz4_shards(sample_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("lz4")
    convert([sample_parquet], out, tile_size=TILE, codec="lz4", workers=0, progress=False)
    return out


def _inflate_on_cpu(data, offsets, sizes, shape, dtype):
    """What fn.decoders.inflate computes, with python-lz4's block API: one bare LZ4 block per chunk -> (k, *shape)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.stack([np.frombuffer(lz4.block.decompress(bytes(data[o:o + n]), uncompressed_size=nbytes), dtype)
                     .reshape(shape) for o, n in zip(offsets, sizes, strict=True)])


def test_lz4_chunks_are_the_layout_inflate_takes(lz4_shards, sample_shards):
    """Per record and modality: offsets/sizes (int32) into one byte sample, shape (T, T), the storage dtype."""
    lz, raw = ShardSet(lz4_shards), ShardSet(sample_shards)
    assert list(lz.keys) == list(raw.keys)
    for m, info in lz.modalities.items():
        for i in range(len(lz)):
            data, offsets, sizes = lz.chunks(i, m)
            assert data.dtype == np.uint8 and data.ndim == 1
            assert offsets.dtype == np.int32 and sizes.dtype == np.int32  # DALI's chunk argument type
            assert (offsets >= 0).all() and (offsets + sizes <= len(data)).all() and (sizes > 0).all()
            for o in offsets:
                assert bytes(data[o:o + 4]) != LZ4_FRAME_MAGIC
            decoded = _inflate_on_cpu(data, offsets, sizes, (TILE, TILE), info.dtype)
            np.testing.assert_array_equal(decoded, raw.tile(i, m))


def test_lz4_chunks_decode_to_the_source_pixels(lz4_shards, sample_parquet):
    """B04 (a 10 m band) of every S2 L2A record against the GeoTIFF in the Major-TOM parquet it came from."""
    s = ShardSet(lz4_shards)
    band = s.modalities["s2_l2a"].bands.index("B04")
    checked = 0
    for f in sorted(sample_parquet.rglob("*.parquet")):
        if "L2A" not in str(f):
            continue
        table = pq.read_table(f, columns=["grid_cell", "B04"]).to_pylist()
        for row in table:
            cell = tifffile.imread(io.BytesIO(row["B04"]))
            for i in np.flatnonzero([k.startswith(row["grid_cell"] + "/") for k in s.keys]):
                r, c = (int(x) for x in s.keys[i].split("/")[1].split("_"))
                data, offsets, sizes = s.chunks(int(i), "s2_l2a", np.array([band]))
                got = _inflate_on_cpu(data, offsets, sizes, (TILE, TILE), np.uint16)[0]
                np.testing.assert_array_equal(got, cell[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE])
                checked += 1
    assert checked == len(s)


def test_band_subset_reads_only_those_chunks(lz4_shards):
    s = ShardSet(lz4_shards)
    bands = np.array([3, 2, 1])
    data, offsets, sizes = s.chunks(5, "s2_l1c", bands)
    np.testing.assert_array_equal(offsets, s.offset["s2_l1c"][5, bands] - s.offset["s2_l1c"][5].min())
    np.testing.assert_array_equal(decode_chunks(data, offsets, sizes, (TILE, TILE), np.uint16),
                                  s.tile(5, "s2_l1c")[bands])


def test_the_registry_picks_the_chunk_decoder_once():
    assert ops.choose("shard_decode", "cpu") == "host"
    assert ops.load("shard_decode", "host") is decode_chunks
    assert "dali_inflate" not in ops.usable("shard_decode", "cpu")
    with pytest.raises(RuntimeError, match="runs on cuda only"):
        ops.choose("shard_decode", "cpu", "dali_inflate")
    if not backends.cuda().usable:
        assert ops.choose("shard_decode", "cuda") == "host" and not backends.dali_inflate().usable


def _cfg(shards, **kw):
    base = dict(shard_dir=str(shards), batch_size=4, global_size=40, local_size=16, n_local=2, num_workers=0,
                backend="numpy", seed=3, p_fused=0.6)
    return DataConfig(**{**base, **kw})


@needs_dali
@pytest.mark.parametrize("bands", [{}, {"s2_l2a": ("B04", "B03", "B02")}])
def test_dali_renders_lz4_shards_like_the_reference(lz4_shards, bands, assert_same_host_views):
    """CPU: DALI takes the host-inflated bytes through reinterpret; with CUDA the same graph runs inflate."""
    assert_same_host_views(build_loader(_cfg(lz4_shards, bands=bands)),
                           build_loader(_cfg(lz4_shards, backend="dali", bands=bands)))


@pytest.mark.gpu
@pytest.mark.skipif(not backends.dali_inflate().usable, reason="needs CUDA and DALI's GPU inflate operator")
def test_gpu_inflate_renders_like_the_reference(lz4_shards, assert_same_host_views):
    dali = build_loader(_cfg(lz4_shards, backend="dali"), device="cuda")
    plan = dali.plan(0, 0)
    assert dali.render_host(plan).global_views[0][plan.views[0].modalities[0]].is_cuda and dali._dali.inflate
    assert_same_host_views(build_loader(_cfg(lz4_shards)), dali)


@needs_dali
def test_to_storage_rounds_like_dalis_cast():
    """Ties (frequent: bilinear weights are often 1/4, 3/4) must round the same way on every path."""
    from nvidia.dali import fn, pipeline_def, types

    x = np.array([0.5, 1.5, 2.5, 3.49, 3.5, 65534.5, 65535.6, 70000.0, 1234.25], np.float32)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def cast():
        return fn.cast(fn.external_source(name="x"), dtype=types.UINT16)

    pipe = cast()
    pipe.build()
    pipe.feed_input("x", [x])
    dali = np.asarray(pipe.run()[0].as_tensor())[0]
    ours = to_storage(torch.from_numpy(x), torch.uint16).numpy()
    np.testing.assert_array_equal(ours, dali)
    np.testing.assert_array_equal(ours, [1, 2, 3, 3, 4, 65535, 65535, 65535, 1234])
