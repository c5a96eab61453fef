"""DALI executor of the view plan: shard chunk bytes -> decode -> slice -> cast -> bilinear resize -> flip -> normalise.

One pipeline per modality (a DALI batch has one dtype and band count); a DALI sample is one record, so each tile
is decoded once and cut into every view of the batch:

    host    ShardSet.chunks: the configured bands' chunk bytes (one read of their span in the .bin)
            -> external_source(no_copy=True): DALI takes the arrays the host read, not a copy
    CUDA    .gpu(): the stored bytes (LZ4-compressed or raw) are what crosses PCIe
            decode: fn.decoders.inflate (GPU LZ4, chunk offsets/sizes, shape (T, T), storage dtype) when the op
                    registry's `shard_decode` is dali_inflate; fn.reinterpret for raw shards
            per view: slice (the plan's box) -> cast fp32 -> resize (linear, no antialias) -> flip
                    -> cast to the storage dtype  => CUDA tensors, normalised by the loader's DeviceStage
Without CUDA the same graph runs on DALI's CPU backend (device_id=None) with `shard_decode` = host: the host
inflates LZ4 chunks with the same offsets/sizes/shape/dtype (shards.decode_chunks) and reinterpret takes its
bytes, so CPU tests cover every operator but inflate. Views that do not draw the modality get a 1 px placeholder
crop (a DALI graph is static), dropped on output. Semantics match views.render_view_numpy (slice first, so the
resize clamps at the crop border like PyTorch's); tests check the tensors agree.
"""

import threading

import numpy as np
import torch

from terrafm import ops
from terrafm.data.shards import ChunkDecodeError


def dali_inflate():
    """The installed DALI's GPU LZ4 operator: fn.decoders.inflate, fn.experimental.inflate in older releases."""
    from nvidia.dali import fn

    for namespace in ("decoders", "experimental"):
        op = getattr(getattr(fn, namespace, None), "inflate", None)
        if op is not None:
            return op
    raise RuntimeError("this DALI release has no inflate operator (needs DALI >= 1.16)")


def _contiguous(data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The chunks back to back: a zero-copy view when they already are (all bands, in order), else a gather."""
    if offsets[0] == 0 and (offsets[1:] == np.cumsum(sizes)[:-1]).all():
        return data[:int(sizes.sum())]
    return np.concatenate([data[o:o + n] for o, n in zip(offsets, sizes, strict=True)])


class DaliRenderer:
    def __init__(self, loader):
        self.loader = loader
        self.gpu = loader.device.type == "cuda"  # DALI runs where the loader delivers
        self.inflate = loader.shards.codec == "lz4" and ops.choose("shard_decode", loader.device.type) == "dali_inflate"
        self.host_decode = ops.load("shard_decode", "host")
        # outputs are copied out on a stream of our own and complete when render() returns (a worker thread
        # waits for them), so the loader's side stream reads them without waiting on the compute stream
        self.stream = torch.cuda.Stream(loader.device) if self.gpu else None
        self._lock = threading.Lock()
        self.pipes = {}

    def _pipe(self, modality: str):
        if modality in self.pipes:
            return self.pipes[modality]
        from nvidia.dali import fn, pipeline_def, types

        ld, cfg = self.loader, self.loader.cfg
        c, t = len(ld.band_index[modality]), ld.shards.tile_size
        dtype = {np.dtype(np.uint16): types.UINT16, np.dtype(np.float16): types.FLOAT16}[
            np.dtype(ld.shards.modalities[modality].dtype)]
        n_views = cfg.n_global + cfg.n_local
        device_id = self.loader.device.index if self.gpu else None
        inflate = ops.load("shard_decode", "dali_inflate")() if self.inflate else None

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.cpp_threads or 2), device_id=device_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def views():
            # no_copy: DALI reads the tiles' bytes where _feeds put them (fresh arrays per call, alive until render
            # returns, after the outputs are consumed and, on CUDA, copied out and synchronised), not a copy of them
            data = fn.external_source(name="data", no_copy=True)
            if self.gpu:
                data = data.gpu()
            if inflate is not None:
                tile = inflate(data, chunk_offsets=fn.external_source(name="offsets"),
                               chunk_sizes=fn.external_source(name="sizes"), shape=[t, t], dtype=dtype, layout="HW",
                               sequence_axis_name="C")
            else:
                tile = fn.reinterpret(data, dtype=dtype, shape=[c, t, t], layout="CHW")
            outputs = []
            for v in range(n_views):
                start, shape = fn.external_source(name=f"start{v}"), fn.external_source(name=f"shape{v}")
                crop = fn.cast(fn.slice(tile, start, shape, axes=[1, 2]), dtype=types.FLOAT)
                x = fn.resize(crop, size=fn.external_source(name=f"size{v}"), interp_type=types.INTERP_LINEAR,
                              antialias=False, dtype=types.FLOAT)
                x = fn.flip(x, horizontal=fn.external_source(name=f"hflip{v}"),
                            vertical=fn.external_source(name=f"vflip{v}"))
                x = fn.cast(x, dtype=dtype)  # uint16 rounds half up and saturates, like views.to_storage
                # torch has no DALI uint16 conversion: hand the bits over as int16, viewed back in _to_torch
                outputs.append(fn.reinterpret(x, dtype=types.INT16) if dtype == types.UINT16 else x)
            return tuple(outputs)

        pipe = views()
        pipe.build()
        self.pipes[modality] = pipe
        return pipe

    def _feeds(self, plan, modality: str) -> dict[str, list[np.ndarray]]:
        """external_source inputs of one modality's pipeline for a batch plan (host work: reading and indexing)."""
        ld = self.loader
        shards, bi = ld.shards, ld.band_index[modality]
        t, dtype = shards.tile_size, np.dtype(shards.modalities[modality].dtype)
        feeds = {"data": [], "offsets": [], "sizes": []}
        for i in plan.indices:
            data, offsets, sizes = shards.chunks(int(i), modality, bi)
            if self.inflate:
                feeds["data"].append(data)
                feeds["offsets"].append(offsets)
                feeds["sizes"].append(sizes)
            elif shards.codec == "lz4":
                try:
                    decoded = self.host_decode(data, offsets, sizes, (t, t), dtype)
                except ChunkDecodeError:
                    shards.tile(int(i), modality)  # raises the ShardError naming the .bin, record and band, as tile()
                    raise
                feeds["data"].append(decoded.reshape(-1).view(np.uint8))
            else:
                feeds["data"].append(_contiguous(data, offsets, sizes))
        if not self.inflate:
            del feeds["offsets"], feeds["sizes"]
        b = len(plan.indices)
        placeholder = np.array([0, 0, 1, 1], np.int32)
        for v, view in enumerate(plan.views):
            used = modality in view.modalities
            boxes = view.boxes.astype(np.int32) if used else np.tile(placeholder, (b, 1))
            size = np.array([view.size] * 2 if used else [1, 1], np.float32)
            flips = view.flips.astype(np.int32) if used else np.zeros((b, 2), np.int32)
            feeds[f"start{v}"] = [boxes[k, :2] for k in range(b)]
            feeds[f"shape{v}"] = [boxes[k, 2:] for k in range(b)]
            feeds[f"size{v}"] = [size] * b
            feeds[f"hflip{v}"] = [np.array(flips[k, 0], np.int32) for k in range(b)]
            feeds[f"vflip{v}"] = [np.array(flips[k, 1], np.int32) for k in range(b)]
        return feeds

    def render(self, plan):
        """The plan's views: [View] with {modality: (B, C, s, s) storage dtype} on CUDA (the host without CUDA)."""

        tensors = [dict() for _ in plan.views]
        needed = sorted({m for v in plan.views for m in v.modalities})
        for m in needed:
            feeds = self._feeds(plan, m)
            with self._lock:
                pipe = self._pipe(m)
                for name, data in feeds.items():
                    pipe.feed_input(name, data)
                outputs = pipe.run()
                for v, view in enumerate(plan.views):
                    if m in view.modalities:
                        tensors[v][m] = self._to_torch(outputs[v], len(plan.indices), m, view.size)
                if self.stream is not None:  # the copies are done before DALI may reuse its output buffers
                    self.stream.synchronize()
        return [{m: t[m] for m in v.modalities} for t, v in zip(tensors, plan.views, strict=True)]

    def _to_torch(self, out, b: int, modality: str, s: int) -> torch.Tensor:
        dense, dtype = out.as_tensor(), self.loader.storage_dtype[modality]
        bits = torch.int16 if dtype == torch.uint16 else dtype
        shape = (b, len(self.loader.band_index[modality]), s, s)
        if not self.gpu:
            dst = self.loader._empty(*shape[:3], bits)
            dst.copy_(torch.from_numpy(np.asarray(dense)))
            return dst.view(dtype)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        with torch.cuda.stream(self.stream):  # allocated in the stream's order, so no pending reader of the block
            dst = torch.empty(shape, dtype=bits, device=self.loader.device)
            feed_ndarray(dense, dst, cuda_stream=self.stream)
        return dst.view(dtype)
