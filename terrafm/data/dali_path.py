"""DALI executor of the view plan: slice -> cast -> bilinear resize -> flip -> normalise.

One pipeline run per storage dtype (uint16 S2, float16 S1: a DALI batch has one dtype) renders a whole
batch: every (view, modality, sample) triple is one DALI sample of varying shape. With CUDA the crop leaves the host
(`.gpu()`) right after slicing, so only the crop crosses PCIe, and resize / flip / normalise run on the
GPU, producing CUDA tensors; without CUDA the same graph runs on DALI's CPU backend (device_id=None).
Decoding stays on the host: raw chunks are zero-copy memory maps and DALI has no LZ4 operator.
Semantics match views.render_view_numpy (slice first, so the resize clamps at the crop border like
PyTorch's); tests check the tensors agree.
"""

import threading

import numpy as np
import torch

from terrafm import backends


class DaliRenderer:
    def __init__(self, loader):
        from nvidia.dali import fn, pipeline_def, types

        cfg = loader.cfg
        self.loader = loader
        self.gpu = backends.cuda().usable
        n_views = cfg.n_global + cfg.n_local
        self.max_batch = cfg.batch_size * n_views * len(cfg.modalities)
        self._lock = threading.Lock()
        self._fn, self._types, self._pipeline_def = fn, types, pipeline_def
        self.pipes = {}

    def _pipe(self, dtype: np.dtype):
        if dtype in self.pipes:
            return self.pipes[dtype]
        fn, types, cfg = self._fn, self._types, self.loader.cfg
        device_id = torch.cuda.current_device() if self.gpu else None

        @self._pipeline_def(batch_size=self.max_batch, num_threads=max(1, cfg.cpp_threads or 2), device_id=device_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def views():
            tile = fn.external_source(name="tile", layout="CHW")
            start = fn.external_source(name="start")
            shape = fn.external_source(name="shape")
            size = fn.external_source(name="size")
            mean = fn.external_source(name="mean")
            inv_std = fn.external_source(name="inv_std")
            hflip = fn.external_source(name="hflip")
            vflip = fn.external_source(name="vflip")
            crop = fn.cast(fn.slice(tile, start, shape, axes=[1, 2]), dtype=types.FLOAT)
            if self.gpu:
                crop, mean, inv_std = crop.gpu(), mean.gpu(), inv_std.gpu()
            x = fn.resize(crop, size=size, interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
            x = fn.flip(x, horizontal=hflip, vertical=vflip)
            return (x - mean) * inv_std

        pipe = views()
        pipe.build()
        self.pipes[dtype] = pipe
        return pipe

    def render(self, plan, tiles: dict[str, list[np.ndarray]]):
        from terrafm.data.views import View

        tensors = [dict() for _ in plan.views]
        for dtype in sorted({t[0].dtype for t in tiles.values()}, key=str):
            self._render_dtype(plan, {m: t for m, t in tiles.items() if t[0].dtype == dtype}, dtype, tensors)
        return [View({m: t[m] for m in v.modalities}) for t, v in zip(tensors, plan.views, strict=True)]

    def _render_dtype(self, plan, tiles: dict[str, list[np.ndarray]], dtype: np.dtype, tensors: list[dict]) -> None:
        ld = self.loader
        feeds = {k: [] for k in ("tile", "start", "shape", "size", "mean", "inv_std", "hflip", "vflip")}
        layout = []  # (view number, modality, first item, channels, size)
        for v_i, view in enumerate(plan.views):
            for m in view.modalities:
                if m not in tiles:
                    continue
                bi = ld.band_index[m]
                mean = ld.mean[m].reshape(-1, 1, 1)
                inv = (1.0 / ld.std[m]).astype(np.float32).reshape(-1, 1, 1)
                layout.append((v_i, m, len(feeds["tile"]), len(bi), view.size))
                for b, tile in enumerate(tiles[m]):
                    feeds["tile"].append(tile if len(bi) == tile.shape[0] and (bi == np.arange(len(bi))).all()
                                         else np.ascontiguousarray(tile[bi]))
                    feeds["start"].append(view.boxes[b, :2].astype(np.int32))
                    feeds["shape"].append(view.boxes[b, 2:].astype(np.int32))
                    feeds["size"].append(np.array([view.size, view.size], np.float32))
                    feeds["mean"].append(mean)
                    feeds["inv_std"].append(inv)
                    feeds["hflip"].append(np.array(view.flips[b, 0], np.int32))
                    feeds["vflip"].append(np.array(view.flips[b, 1], np.int32))
        if len(feeds["tile"]) > self.max_batch:
            raise RuntimeError(f"DALI batch of {len(feeds['tile'])} crops exceeds the pipeline's {self.max_batch}")
        with self._lock:
            pipe = self._pipe(dtype)
            for name, data in feeds.items():
                pipe.feed_input(name, data)
            (out,) = pipe.run()
            for v_i, m, first, c, s in layout:
                b = len(tiles[m])
                dst = (torch.empty((b, c, s, s), dtype=torch.float32, device="cuda") if self.gpu
                       else ld._empty(b, c, s))
                for k in range(b):
                    if self.gpu:
                        from nvidia.dali.plugin.pytorch import feed_ndarray

                        feed_ndarray(out[first + k], dst[k], cuda_stream=torch.cuda.current_stream())
                    else:
                        dst[k] = torch.from_numpy(np.asarray(out[first + k]))
                tensors[v_i][m] = dst
