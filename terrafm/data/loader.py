"""build_loader: shards -> land-cover-aware sampler -> per-batch plan -> views (numpy | cpp | dali).

The loader is an iterable of ViewBatch. One epoch = this rank's share of the sampler's draws, cut
into batches; batch `step` of `epoch` is a pure function of (seed, epoch, step, rank), so resuming
from `state_dict()` (epoch, step) reproduces the rest of the epoch exactly, whatever the path.
Batches are prepared `num_workers` ahead on threads (the C++ twin and DALI release the GIL).

Host -> device: the renderers produce views in the modalities' storage dtype (uint16 S2, float16 S1; half the
bytes of float32), in pinned memory when the device is CUDA. The DeviceStage copies them non_blocking on a side
stream and normalises and casts them there, IN_FLIGHT batches deep, so the copy of batch k + 1 overlaps the step
on batch k. On CPU the stage runs the same code with no stream; the stream and pinning are the only things that
depend on the device, chosen once when the loader is built.
"""

import contextlib
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from terrafm import backends, ops
from terrafm.data.config import DataConfig
from terrafm.data.dali_path import DaliRenderer
from terrafm.data.landcover import NUM_CLASSES
from terrafm.data.sampler import LandCoverSampler, open_water, region_strata
from terrafm.data.shards import ShardError, ShardSet
from terrafm.data.views import BatchPlan, View, ViewBatch, make_plan, normalise, render_view_numpy, to_storage
from terrafm.modalities import MODALITY_NAMES

IN_FLIGHT = 2  # batches on their way to the device (copied / normalised) while the trainer steps on another
TORCH_STORAGE = {np.dtype(np.uint16): torch.uint16, np.dtype(np.float16): torch.float16}


def resolve_backend(name: str, device: str = "cpu") -> str:
    """The op registry's `view_rendering` choice for data.backend `name` on the loader's device: 'auto' -> dali
    on CUDA (when installed), else cpp (when built), else numpy; an explicit name that cannot run here raises."""
    return ops.choose("view_rendering", device, name)


class DeviceStage:
    """Host ViewBatch in storage dtypes -> ViewBatch on `device`, normalised, in `dtype`.

    start() issues the copy and the normalisation (on a side stream with CUDA) and returns at once; finish()
    makes the caller's stream wait for them before the tensors are used."""

    def __init__(self, device: torch.device, mean: dict, std: dict, dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.mean = {m: torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for m, v in mean.items()}
        self.inv_std = {m: (1.0 / torch.as_tensor(v, dtype=torch.float32)).view(-1, 1, 1).to(device)
                        for m, v in std.items()}

    def _normalise(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        y = x.to(self.device, non_blocking=True)
        if y is x and self.stream is not None:  # already on the GPU (DALI, complete): read on the side stream
            x.record_stream(self.stream)
        return normalise(y, self.mean[modality], self.inv_std[modality], self.dtype)

    def start(self, batch: ViewBatch) -> tuple[ViewBatch, object]:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            def move(views: list[View]) -> list[View]:
                return [{m: self._normalise(x, m) for m, x in v.items()} for v in views]

            out = ViewBatch(move(batch.global_views), move(batch.local_views),
                            batch.majority_class.to(self.device, non_blocking=True),
                            batch.index.to(self.device, non_blocking=True))
            done = self.stream.record_event() if self.stream is not None else None
        return out, done

    def finish(self, started: tuple[ViewBatch, object]) -> ViewBatch:
        batch, done = started
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in [t for v in batch.global_views + batch.local_views for t in v.values()] + [
                    batch.majority_class, batch.index]:
                t.record_stream(current)  # allocated on the side stream, used on this one
        return batch


class Loader:
    """Iterable of ViewBatch for one rank; see module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu"):
        from terrafm.data.sample import ensure_sample_shards

        cfg.validate()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.seed = (cfg.seed * 1_000_003 + seed) % (2 ** 63)
        shard_dir = cfg.shard_dir or ensure_sample_shards()
        try:
            self.shards = ShardSet(shard_dir, cfg.verify_checksums, cfg.allow_index_mismatch)
        except ShardError as err:
            if cfg.shard_dir:
                raise
            raise ShardError(f"the bundled sample's cache is damaged ({err}); delete {Path(shard_dir).parent} and "
                             "run again to generate it anew") from err
        present = {m: self.shards.offset[m][:, 0] >= 0 for m in self.shards.modalities}
        tiles = {m: int(has.sum()) for m, has in present.items()}
        missing = [m for m in cfg.modalities if not tiles.get(m)]
        if missing:
            held = [m for m in MODALITY_NAMES if tiles.get(m)]
            counts = ", ".join(f"{m} {tiles[m]}" for m in held) or "none"
            raise ValueError(f"shards at {self.shards.root} hold no {' or '.join(missing)} tile (tiles: {counts}); "
                             f"set data.modalities to a subset of {held} or convert with those modalities")
        self.records = np.flatnonzero(np.logical_and.reduce([present[m] for m in cfg.modalities]))
        if len(self.records) == 0:
            counts = ", ".join(f"{m} {tiles[m]}" for m in cfg.modalities)
            raise ValueError(f"no location in {self.shards.root} has all of data.modalities {list(cfg.modalities)} "
                             f"(tiles: {counts}); set data.modalities to a subset the locations share")
        self.coverage = self._coverage(tiles)
        counts, keys = self.shards.class_counts[self.records], self.shards.keys[self.records]
        strata = region_strata(keys) if cfg.region_beta > 0 else None
        self.sampler = LandCoverSampler(counts, cfg.beta, rank, world_size, self.seed, strata=strata,
                                        region_beta=cfg.region_beta, ocean_keep=cfg.ocean_keep)
        self.sampling_note = _sampling_note(counts, keys, strata, cfg)
        # what the epoch's draws depend on besides the seed, so a resume can tell that they changed
        crc = zlib.crc32(self.records.astype(np.int64).tobytes())
        crc = zlib.crc32(counts.astype(np.int64).tobytes(), crc)
        self.sampling = {"locations": len(self.records), "beta": cfg.beta, "region_beta": cfg.region_beta,
                         "ocean_keep": cfg.ocean_keep, "crc32": crc}
        self.band_index, self.mean, self.std = {}, {}, {}
        for m in cfg.modalities:
            info = self.shards.modalities[m]
            absent = [b for b in cfg.band_list(m) if b not in info.bands]
            if absent:
                raise ValueError(f"shards at {self.shards.root} hold {m} bands {list(info.bands)}, not {absent} "
                                 "(data.bands); re-run `terrafm prepare` into this folder")
            idx = np.array([info.bands.index(b) for b in cfg.band_list(m)], np.int64)
            self.band_index[m], self.mean[m], self.std[m] = idx, info.mean[idx].copy(), info.std[idx].copy()
        self.storage_dtype = {m: TORCH_STORAGE[np.dtype(self.shards.modalities[m].dtype)] for m in cfg.modalities}
        self.device = torch.device(device)
        if self.device.type == "cuda" and not backends.cuda().usable:  # torch's own words: an AssertionError
            raise ValueError(f"device {device!r}: CUDA is not usable here ({backends.cuda().detail}); build the "
                             "loader for device 'cpu'")
        if self.device.type == "cuda" and self.device.index is None:  # pin the index: worker threads start on cuda:0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = resolve_backend(cfg.backend, self.device.type)
        self.pin = cfg.pin_memory and self.device.type == "cuda"
        self.stage = DeviceStage(self.device, self.mean, self.std)
        # one renderer for all worker threads (made on first use, every thread that found none built its own)
        self._dali = DaliRenderer(self) if self.backend == "dali" else None
        self.epoch, self.step = 0, 0

    def _coverage(self, tiles: dict[str, int]) -> str:
        """'' when every location is sampled, else how many are and why the others are not (locations lacking
        one of data.modalities are left out: a run on partial coverage should say so)."""
        n = len(self.shards)
        if len(self.records) == n:
            return ""
        lacking = ", ".join(f"{n - tiles[m]} lack {m}" for m in self.cfg.modalities if tiles[m] < n)
        return (f"{len(self.records)} of the {n} locations have all of data.modalities {list(self.cfg.modalities)} "
                f"and are sampled ({lacking})")

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def class_frequency(self) -> torch.Tensor:
        """(num_classes,) float32 global WorldCover pixel frequency over the sampled locations."""
        counts = self.shards.class_counts[self.records].sum(axis=0).astype(np.float64)
        return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()

    def __len__(self) -> int:
        n, b = len(self.sampler), self.cfg.batch_size
        return n // b if self.cfg.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size, "sampling": self.sampling}

    def load_state_dict(self, state: dict, reshard: bool = False) -> int:
        """Resume mid-epoch; returns how many of the epoch's samples will be drawn a second time (0 when exact).
        A state written for other sampled locations, land-cover counts or beta resumes at its position with a
        warning: that epoch's order cannot be the run's.

        reshard=True takes any rank's state written by a different number of ranks or batch size: every
        rank consumes the epoch's global draw stream in order (rank r takes draws r, r + W, ...), so the
        position is the number of samples consumed, rounded down to a whole step of this world's global
        batch (the remainder is drawn again).
        """
        if state["seed"] != self.seed:
            raise ValueError(f"loader state is for another data order (combined seed {state['seed']}, this loader's "
                             f"is {self.seed}): data.seed or train.seed differs from the checkpoint's run; resume "
                             "with the run's own seeds")
        if not reshard:
            if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
                raise ValueError(f"loader state is for world_size/rank {state['world_size']}/{state['rank']}, "
                                 f"this loader has {self.world_size}/{self.rank}")
            if state.get("batch_size", self.cfg.batch_size) != self.cfg.batch_size:
                raise ValueError(f"loader state is for batch size {state['batch_size']}, this loader has "
                                 f"{self.cfg.batch_size}; set train.elastic_resume=true to convert the position")
        elif "batch_size" not in state:
            raise ValueError("this loader state predates resharding support (no batch_size); resume it on "
                             f"{state['world_size']} ranks")
        saved, now = state.get("sampling"), self.sampling
        if saved is not None:  # states written before region and open-water weights sampled as these values do
            saved = {"region_beta": 0.0, "ocean_keep": 1.0, **saved}
        if saved is not None and saved != now:
            changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k]]
            warnings.warn(f"the loader state is for another sampling than this loader's ({', '.join(changed)}): "
                          "data.shard_dir, data.modalities, data.beta, data.region_beta or data.ocean_keep differ from "
                          f"the checkpoint's run, or its shards were rewritten; the rest of epoch {state['epoch']} is "
                          "drawn in this loader's order, not the run's", stacklevel=2)
        if not reshard:
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            return 0
        consumed = int(state["step"]) * int(state["batch_size"]) * int(state["world_size"])
        per_step = self.cfg.batch_size * self.world_size
        self.epoch, self.step = int(state["epoch"]), consumed // per_step
        return consumed - self.step * per_step

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        draws = self.sampler.epoch_indices(epoch)
        b = self.cfg.batch_size
        return self.records[draws[step * b:(step + 1) * b]]

    def plan(self, epoch: int, step: int) -> BatchPlan:
        return make_plan(self.cfg, self.batch_indices(epoch, step), self.shards.tile_size, epoch, step, self.rank,
                         self.seed)

    def __iter__(self):
        """Device batches, IN_FLIGHT deep; self.step counts the batches handed out (what a resume continues from)."""
        epoch, n = self.epoch, len(self)
        in_flight: deque = deque()
        for batch in self._host_batches(epoch, self.step, n):
            in_flight.append(self.stage.start(batch))
            if len(in_flight) == IN_FLIGHT:
                self.step += 1
                yield self.stage.finish(in_flight.popleft())
        while in_flight:
            self.step += 1
            yield self.stage.finish(in_flight.popleft())
        self.epoch, self.step = epoch + 1, 0

    def _host_batches(self, epoch: int, first: int, n: int):
        """Host batches first..n-1 of `epoch`, rendered `num_workers` ahead on threads. A batch not rendered within
        data.timeout_s is a ShardError (a read that hangs, as on a stalled network file system, would otherwise stop
        this rank for ever, and the others in their collectives); its thread is left to finish on its own."""
        workers, timeout = self.cfg.num_workers, self.cfg.timeout_s or None
        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        pending: deque = deque()
        next_step, hung = first, False
        try:
            for step in range(first, n):
                if pool is None:
                    yield self._rendered(epoch, step, self.render_host, self.plan(epoch, step))
                    continue
                while next_step < n and len(pending) < 2 * workers:
                    pending.append(pool.submit(self.render_host, self.plan(epoch, next_step)))
                    next_step += 1
                future = pending.popleft()
                hung = not wait([future], timeout).done
                if hung:
                    raise ShardError(f"batch {step} of epoch {epoch} was not rendered within data.timeout_s="
                                     f"{self.cfg.timeout_s:g} s: a read of the shards at {self.shards.root} hangs (a "
                                     "stalled network file system?); raise data.timeout_s if the reads are only slow")
                yield self._rendered(epoch, step, future.result)
        finally:
            for f in pending:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=not hung)

    def _rendered(self, epoch: int, step: int, render, *args) -> ViewBatch:
        """render(*args), with host memory running out as the ShardError the trainer stops every rank on, checkpoint
        written (a MemoryError raised on this rank alone and left the others in their collectives until
        train.collective_timeout_s, the steps since the last checkpoint lost)."""
        try:
            return render(*args)
        except MemoryError as err:
            raise ShardError(f"batch {step} of epoch {epoch}: host memory ran out while rendering it; lower "
                             f"data.num_workers (now {self.cfg.num_workers}) or data.batch_size (now "
                             f"{self.cfg.batch_size}), or free memory on this node") from err

    def _empty(self, b: int, c: int, s: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((b, c, s, s), dtype=dtype, pin_memory=self.pin)

    def render(self, plan: BatchPlan) -> ViewBatch:
        """Execute a plan with this loader's backend, then the device stage: what iterating yields for it."""
        return self.stage.finish(self.stage.start(self.render_host(plan)))

    def render_host(self, plan: BatchPlan) -> ViewBatch:
        """Execute a plan with this loader's backend: views in the storage dtypes (on CUDA already with DALI)."""
        idx = plan.indices
        if self._dali is not None:  # reads the stored chunks itself: decoding may happen on the GPU
            views = self._dali.render(plan)
        else:
            needed = {m for v in plan.views for m in v.modalities}
            tiles = {m: [self.shards.tile(int(i), m) for i in idx] for m in sorted(needed)}
            views = [{m: self._render_one(tiles[m], m, v) for m in v.modalities} for v in plan.views]
        counts = self.shards.class_counts[idx]
        majority = np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), -1)
        ng = len(plan.global_views)
        return ViewBatch(views[:ng], views[ng:], torch.from_numpy(majority.astype(np.int64)),
                         torch.from_numpy(idx.astype(np.int64)))

    def _render_one(self, tiles: list[np.ndarray], m: str, view) -> torch.Tensor:
        c = len(self.band_index[m])
        out = self._empty(len(tiles), c, view.size, self.storage_dtype[m])
        if self.backend == "cpp":
            from terrafm import _C

            half = tiles[0].dtype == np.float16
            src = [t.view(np.uint16) if half else t for t in tiles]
            resized = torch.empty((len(tiles), c, view.size, view.size), dtype=torch.float32)
            _C.render_view(src, half, self.band_index[m], np.zeros(c, np.float32), np.ones(c, np.float32),
                           view.boxes, view.flips, resized.numpy(), self.cfg.cpp_threads)
            out.copy_(to_storage(resized, out.dtype))
        else:
            render_view_numpy(tiles, self.band_index[m], view, out)
        return out


def _sampling_note(class_counts: np.ndarray, keys: np.ndarray, strata: np.ndarray | None, cfg: DataConfig) -> str:
    """What the region and open-water factors of the sampling weights do here ('' when nothing): a run whose keys
    are not Major-TOM grid cells, or that has open water, should say how it is sampled."""
    notes = []
    if strata is not None:
        known = strata >= 0
        if not known.any():
            notes.append(f"data.region_beta {cfg.region_beta} has no effect: no location key is a Major-TOM grid "
                         f"cell name (e.g. {keys[0]!r})")
        else:
            outside = f", {int((~known).sum())} locations outside them (keys not grid cells)" if not known.all() else ""
            notes.append(f"region balancing (data.region_beta {cfg.region_beta}) over {len(np.unique(strata[known]))} "
                         f"strata of latitude band x 30 deg longitude{outside}")
    water = int(open_water(class_counts).sum())
    if water and cfg.ocean_keep < 1:
        notes.append(f"{water} of {len(keys)} locations are open water, drawn at data.ocean_keep {cfg.ocean_keep}")
    return "; ".join(notes)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu") -> Loader:
    """The data loader of one rank: iterable of ViewBatch on `device` with set_epoch / state_dict / class_frequency."""
    return Loader(cfg, rank=rank, world_size=world_size, seed=seed, device=device)
