"""The DALI GPU decode path: the LZ4 chunk layout `terrafm prepare` writes is the one fn.decoders.inflate takes,
and the DALI graph (everything but inflate on CPU) renders the same views as the numpy reference."""

import io
import shutil
import time

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


def test_band_subset_reads_only_those_chunks(lz4_shards, monkeypatch):
    """The read was the record's whole span (all 12 bands: read, checksummed and, with inflate, sent over PCIe) for
    3 configured bands; now it is the span of those chunks alone."""
    import os

    s = ShardSet(lz4_shards)
    bands = np.array([3, 2, 1])
    read, preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, pos: read.append(sum(map(len, bufs))) or preadv(fd, bufs, pos))
    data, offsets, sizes = s.chunks(5, "s2_l1c", bands)
    assert sum(read) == len(data) == sizes.sum() < s.nbytes["s2_l1c"][5].sum()
    np.testing.assert_array_equal(offsets, s.offset["s2_l1c"][5, bands] - s.offset["s2_l1c"][5, bands].min())
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


@needs_dali
def test_the_inflate_branch_runs_on_cpu_with_a_stand_in(lz4_shards, monkeypatch, assert_same_host_views):
    """Everything around the GPU-only inflate on CPU: the compressed bytes, chunk offsets/sizes and the op's shape,
    dtype and layout arguments go to a stand-in that inflates with the host decoder; the views match the reference."""
    from nvidia.dali import fn, types

    calls = []

    def inflate(data, chunk_offsets, chunk_sizes, shape, dtype, layout, sequence_axis_name):
        np_dtype = {types.UINT16: np.uint16, types.FLOAT16: np.float16}[dtype]
        calls.append((tuple(shape), np.dtype(np_dtype).name, sequence_axis_name + layout))
        return fn.python_function(data, chunk_offsets, chunk_sizes, output_layouts=sequence_axis_name + layout,
                                  function=lambda d, o, n: decode_chunks(d, o, n, tuple(shape), np_dtype))

    choose, load = ops.choose, ops.load
    monkeypatch.setattr(ops, "choose", lambda op, *a: "dali_inflate" if op == "shard_decode" else choose(op, *a))
    monkeypatch.setattr(ops, "load", lambda op, b: (lambda: inflate) if b == "dali_inflate" else load(op, b))
    dali = build_loader(_cfg(lz4_shards, backend="dali", bands={"s2_l2a": ("B08", "B02")}))
    assert_same_host_views(build_loader(_cfg(lz4_shards, bands={"s2_l2a": ("B08", "B02")})), dali)
    assert dali._dali.inflate and len(calls) == len(dali._dali.pipes) == 3
    assert sorted(calls) == [((TILE, TILE), "float16", "CHW")] + [((TILE, TILE), "uint16", "CHW")] * 2


@needs_dali
def test_a_chunk_that_does_not_inflate_is_named_like_on_the_other_paths(lz4_shards, tmp_path):
    """The DALI path's host inflate raised a bare ChunkDecodeError (no file, record or band); now tile()'s error."""
    from terrafm.data.shards import ShardError

    bad = tmp_path / "bad"
    shutil.copytree(lz4_shards, bad)
    s = ShardSet(bad)
    with open(bad / "part-00000.bin", "r+b") as f:
        for m in s.modalities:
            for o, n in zip(s.offset[m][s.shard_of == 0].ravel(), s.nbytes[m][s.shard_of == 0].ravel(), strict=True):
                if o >= 0:
                    f.seek(int(o))
                    f.write(b"\xff" * int(n))
    for backend in ("numpy", "dali"):
        loader = build_loader(_cfg(bad, backend=backend, verify_checksums=False))
        with pytest.raises(ShardError, match=r"part-00000\.bin: record \d+ .* band \w+ does not decode"):
            loader.render_host(loader.plan(0, 0))


def test_a_chunk_that_inflates_to_another_size_is_a_decode_error():
    """The inflate contract's size check on the CPU: python-lz4 returns a block that inflates short as it is (its
    uncompressed_size is a bound) and refuses one that inflates long; both are ChunkDecodeError naming the chunk."""
    from terrafm.data.shards import ChunkDecodeError

    tile = np.arange(TILE * TILE, dtype=np.uint16).reshape(TILE, TILE)
    good = lz4.block.compress(tile.tobytes(), store_size=False)
    for wrong in (tile[:-1], np.tile(tile, (2, 1))):
        bad = lz4.block.compress(wrong.tobytes(), store_size=False)
        data = np.frombuffer(good + bad, np.uint8)
        offsets, sizes = np.array([0, len(good)], np.int32), np.array([len(good), len(bad)], np.int32)
        with pytest.raises(ChunkDecodeError) as err:
            decode_chunks(data, offsets, sizes, (TILE, TILE), np.uint16)
        assert err.value.chunk == 1


@needs_dali
def test_the_worker_threads_share_one_renderer(lz4_shards, monkeypatch):
    """Each worker thread that met no renderer yet built its own (and its own pipelines, device memory and all)."""
    from terrafm.data import dali_path

    built, init = [], dali_path.DaliRenderer.__init__

    def slow_init(self, loader):
        built.append(self)
        time.sleep(0.2)  # the window in which another worker thread also found none
        init(self, loader)

    monkeypatch.setattr(dali_path.DaliRenderer, "__init__", slow_init)
    loader = build_loader(_cfg(lz4_shards, backend="dali", batch_size=2, num_workers=3))
    assert len(list(loader)) == len(loader) >= 3
    assert built == [loader._dali]
