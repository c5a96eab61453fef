"""Data-path throughput for `terrafm bench`: tiles/s and views/s of each read path, side by side.

Paths: "numpy" (torch reference executor), "cpp" (csrc twin), "dali" (DALI pipeline; CPU backend
without CUDA), "gpu_decode_host" (the host's whole share of the DALI GPU decode path: read the chunks the
batch's views need and copy them once into a staging buffer, as external_source does into pinned memory;
decoding and views run on the GPU and are not part of it), and "geotiff_baseline": what a user would
write without terrafm, i.e. decode the Major-TOM GeoTIFF bytes of every band with tifffile, replicate 20/60 m
bands to 10 m, then crop, resize and normalise each view with torch ops (torchvision does not import beside
the CPU torch wheel here, so its RandomResizedCrop is replaced by the same F.interpolate call it makes).
A tile is one sampled location; views/s counts (n_global + n_local) views per tile. tiles_per_core_s divides
the tiles by the CPU seconds the process spent (all threads: workers, the C++ pool, DALI's), so it is the
per-core rate whatever the thread counts, the figure a node's core budget needs.
"""

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tifffile
import torch
import torch.nn.functional as F

from terrafm import backends
from terrafm.data.config import DataConfig
from terrafm.data.sources import open_parquet
from terrafm.data.views import make_plan

PATHS = ("geotiff_baseline", "numpy", "cpp", "dali", "gpu_decode_host")


def _check_batches(loader, cfg: DataConfig) -> None:
    if len(loader) == 0:  # the measuring loops would wait forever for a first batch, or divide by 0
        raise ValueError(f"the loader yields no batch: data.batch_size={cfg.batch_size} is larger than the "
                         "data set per rank; lower data.batch_size or point it at more data")


def _measure_loader(cfg: DataConfig, seconds: float, device: str) -> dict:
    from terrafm.data.loader import build_loader

    loader = build_loader(cfg, device=device)  # as training: on cuda, H2D included
    _check_batches(loader, cfg)
    n_views = cfg.n_global + cfg.n_local
    batches, start, cpu_start = 0, None, None
    while start is None or time.perf_counter() - start < seconds:
        for _ in loader:
            if start is None:  # the first batch warms up (pipeline build, page cache, threads)
                start, cpu_start = time.perf_counter(), time.process_time()
            else:
                batches += 1
            if start is not None and time.perf_counter() - start >= seconds:
                break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tiles = batches * cfg.batch_size
    return {"tiles_per_s": tiles / elapsed, "views_per_s": tiles * n_views / elapsed, "batches": batches,
            "seconds": elapsed, "cpu_seconds": cpu, "tiles_per_core_s": tiles / max(cpu, 1e-9),
            "backend": loader.backend, "device": device}


def _measure_host_read(cfg: DataConfig, seconds: float) -> dict:
    """What the host does per batch on the DALI GPU decode path: ShardSet.chunks of every record and modality the
    batch's views draw, each span copied once into a reused staging buffer."""
    from terrafm.data.loader import build_loader

    loader = build_loader(cfg)  # for its sampler, plans and band selection; nothing is rendered
    _check_batches(loader, cfg)
    staging = np.empty(0, np.uint8)
    n_views = cfg.n_global + cfg.n_local
    nbytes = 0

    def read(step: int) -> int:
        nonlocal staging, nbytes
        plan = loader.plan(0, step % len(loader))
        for m in sorted({m for v in plan.views for m in v.modalities}):
            for i in plan.indices:
                data, _, _ = loader.shards.chunks(int(i), m, loader.band_index[m])
                if len(staging) < len(data):
                    staging = np.empty(len(data), np.uint8)
                np.copyto(staging[:len(data)], data)
                nbytes += len(data)
        return len(plan.indices)

    read(0)  # warm-up: page cache, checksums (verified once per process)
    nbytes = 0
    tiles, step, start, cpu_start = 0, 1, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or tiles == 0:
        tiles += read(step)
        step += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tiles_per_s": tiles / elapsed, "views_per_s": tiles * n_views / elapsed, "batches": step - 1,
            "seconds": elapsed, "cpu_seconds": cpu, "tiles_per_core_s": tiles / max(cpu, 1e-9),
            "bytes_per_tile": nbytes / tiles, "backend": "host reads only (GPU decode not measured)"}


def _measure_geotiff(cfg: DataConfig, parquet_file: Path, seconds: float) -> dict:
    """Decode S2 L2A GeoTIFF bytes per tile with tifffile, crop/resize/normalise with torch (one modality)."""
    from terrafm.modalities import MODALITIES

    bands = MODALITIES["s2_l2a"].bands
    table = pq.read_table(open_parquet(parquet_file), columns=list(bands))  # by bytes: a path need not be UTF-8
    rows = [{b: table[b][r].as_py() for b in bands} for r in range(table.num_rows)]
    n_views = cfg.n_global + cfg.n_local
    mean, std = torch.full((len(bands), 1, 1), 1500.0), torch.full((len(bands), 1, 1), 1200.0)
    tiles, start, cpu_start, step = 0, time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds or tiles == 0:
        row = rows[step % len(rows)]
        planes = [tifffile.imread(io.BytesIO(row[b])) for b in bands]
        size = max(p.shape[0] for p in planes)
        cell = torch.from_numpy(np.stack([np.repeat(np.repeat(p, size // p.shape[0], 0), size // p.shape[1], 1)
                                          for p in planes]).astype(np.float32))
        plan = make_plan(cfg, np.zeros(1, np.int64), size, 0, step, 0)
        for view in plan.views:
            top, left, h, w = (int(v) for v in view.boxes[0])
            x = F.interpolate(cell[None, :, top:top + h, left:left + w], size=(view.size, view.size),
                              mode="bilinear", align_corners=False)[0]
            x = (x - mean) / std
            if view.flips[0, 0]:
                x = x.flip(2)
        tiles += 1
        step += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tiles_per_s": tiles / elapsed, "views_per_s": tiles * n_views / elapsed, "batches": tiles,
            "seconds": elapsed, "cpu_seconds": cpu, "tiles_per_core_s": tiles / max(cpu, 1e-9),
            "backend": "tifffile+torch"}


def shared_modalities(shards) -> tuple[str, ...]:
    """The modalities the benchmark draws views of: every one the shards hold tiles of, less the rarest while no
    location holds all of them (S2 and S1 converted for different cells: the loader needs locations with all)."""
    present = {m: shards.offset[m][:, 0] >= 0 for m in shards.modalities}
    held = [m for m, has in present.items() if has.any()]
    while len(held) > 1 and not np.logical_and.reduce([present[m] for m in held]).any():
        held.remove(min(held, key=lambda m: int(present[m].sum())))
    return tuple(held)


def measure_paths(shard_dir: str | Path, seconds: float = 5.0, paths: tuple[str, ...] = PATHS,
                  parquet_dir: str | Path | None = None, batch_size: int = 16, n_local: int = 8,
                  global_size: int = 224, local_size: int = 96, num_workers: int = 2,
                  on_row: Callable[[dict], None] | None = None, device: str | None = None) -> list[dict]:
    """One dict per path: {path, tiles_per_s, views_per_s, tiles_per_core_s, batches, seconds, cpu_seconds,
    backend} or {path, skipped}. on_row(row) is called as each path's row is done (a caller under a deadline
    keeps the rows it has). device: where the loader paths deliver their batches, as training's `train.device`
    (None: cuda where usable, else cpu).

    The loader paths draw views from every modality the shards hold a tile of. parquet_dir (baseline input) defaults to
    <shard_dir>/../parquet, where ensure_sample_shards puts it.
    """
    from terrafm.data.shards import ShardSet

    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown throughput paths {unknown}; expected a subset of {PATHS}")
    shards = ShardSet(shard_dir, verify_checksums=False)  # shards of some collections list the rest with no tile
    modalities = shared_modalities(shards)
    device = device or ("cuda" if backends.cuda().usable else "cpu")
    results = []
    for path in paths:
        row = {"path": path}
        if path == "geotiff_baseline":
            pdir = Path(parquet_dir) if parquet_dir else Path(shard_dir).parent / "parquet"
            files = sorted(pdir.rglob("*.parquet")) if pdir.exists() else []
            files = [f for f in files if "L2A" in str(f)] or files
            if not files:
                row["skipped"] = (f"no Major-TOM S2L2A parquet under {pdir}, where this baseline reads the parquet "
                                  "the shards were converted from")
            else:
                cfg = DataConfig(shard_dir=str(shard_dir), batch_size=1, n_local=n_local, global_size=global_size,
                                 local_size=local_size, modalities=("s2_l2a",))
                row.update(_measure_geotiff(cfg, files[0], seconds))
            results.append(row)
            if on_row is not None:
                on_row(row)
            continue
        avail = {"numpy": backends.Availability(True, ""), "cpp": backends.csrc(), "dali": backends.dali(),
                 "gpu_decode_host": backends.Availability(True, "")}[path]
        if not avail.usable:
            row["skipped"] = avail.detail
        else:
            cfg = DataConfig(shard_dir=str(shard_dir), batch_size=batch_size, n_local=n_local, global_size=global_size,
                             local_size=local_size, backend="numpy" if path == "gpu_decode_host" else path,
                             num_workers=num_workers, modalities=modalities)
            if path == "gpu_decode_host":
                row.update(_measure_host_read(cfg, seconds))
            else:
                row.update(_measure_loader(cfg, seconds, device))
        results.append(row)
        if on_row is not None:
            on_row(row)
    return results
