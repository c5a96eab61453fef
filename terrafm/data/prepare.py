"""`terrafm prepare`: convert Major-TOM parquet shards / GeoTIFF folders into terrafm shards.

Plan: discover every product, group them by grid cell, sort the cells and cut them into jobs of
`cells_per_shard`; job i writes shard i. Jobs run in parallel processes; a job whose shard already
exists with the same fingerprint is skipped (resume). Each cell is split into tiles of tile_size px
(Major-TOM: 1068 px cells -> 4 tiles of 534). Bad input raises BadInput naming the file and record,
or with skip_bad the whole cell is skipped and counted in the summary and in index.json.
"""

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from terrafm.data import shards, sources
from terrafm.data.landcover import NUM_CLASSES
from terrafm.data.sources import WORLDCOVER, BadInput, Product
from terrafm.modalities import MODALITIES, MODALITY_NAMES


def _job_fingerprint(job: list[list[Product]], opts: dict) -> str:
    spec = [[(p.modality, p.grid_cell, p.product_id, p.source, p.row) for p in cell] for cell in job]
    return hashlib.sha1(json.dumps([spec, opts], sort_keys=True).encode()).hexdigest()


def _read_cell(products: list[Product], parquet: sources.ParquetRows) -> dict[str, np.ndarray]:
    """modality -> (C, S, S) 10 m array for one grid cell (worldcover: (1, S, S) uint8)."""
    cell, size = {}, None
    for p in products:
        if p.row >= 0:
            try:
                raw = parquet.bands(p)
            except BadInput:
                raise
            except Exception as err:
                raise BadInput(f"{p.where}: cannot read the parquet row ({type(err).__name__}: {err})") from err
            for value in raw.values():
                if isinstance(value, BadInput):
                    raise value
            arrays = {b: sources.decode_band(v, b, p) for b, v in raw.items()}
        else:
            arrays = {}
            for b in sources.expected_bands(p.modality):
                path = p.band_files.get(b) or p.band_files.get(b.lower())
                if path is None:
                    raise BadInput(f"{p.where}: missing band {b} (no {b}.tif in the product folder)")
                arrays[b] = sources.decode_band(Path(path).read_bytes(), b, p)
        data, s = sources.to_10m(p, arrays)
        if size is not None and s != size:
            raise BadInput(f"{p.where}: cell is {s} px but other products of this cell are {size} px")
        size = s
        cell[p.modality] = data if p.modality == WORLDCOVER else sources.storage_tile(p.modality, data, p)
    return cell


def run_job(index: int, job: list[list[Product]], out_dir: str, opts: dict, fingerprint: str) -> dict:
    """Convert the cells of one job into shard `index`; returns {records, skipped}."""
    modalities = opts["modalities"]
    bands = {m: MODALITIES[m].bands for m in modalities}
    parquet = sources.ParquetRows()
    t = opts["tile_size"]
    writer = shards.ShardWriter(Path(out_dir), index, bands, t, opts["codec"], fingerprint)
    skipped = []
    for cell_products in job:
        try:
            cell = _read_cell(cell_products, parquet)
            size = next(iter(cell.values())).shape[-1]
            if size % t:
                raise BadInput(f"{cell_products[0].where}: cell of {size} px is not a multiple of tile_size {t}")
            wc = cell.get(WORLDCOVER)
            for r in range(size // t):
                for c in range(size // t):
                    win = (slice(None), slice(r * t, (r + 1) * t), slice(c * t, (c + 1) * t))
                    counts = (sources.worldcover_counts(wc[0][win[1:]], cell_products[0]) if wc is not None
                              else np.zeros(NUM_CLASSES, np.int64))
                    tiles = {m: np.ascontiguousarray(cell[m][win]) for m in modalities if m in cell}
                    writer.add(f"{cell_products[0].grid_cell}/{r}_{c}", tiles, counts)
        except BadInput as err:
            if not opts["skip_bad"]:
                writer._file.close()
                raise
            p = cell_products[0]
            skipped.append({"file": p.source, "record": p.grid_cell, "reason": str(err)})
    writer.skipped = skipped
    writer.close()
    return {"records": len(writer.keys), "skipped": skipped}


def _plan(products: list[Product], modalities: tuple[str, ...], cells_per_shard: int) -> tuple[list, int]:
    """Jobs (lists of cells, each a list of products) and the number of duplicate products dropped."""
    cells = defaultdict(dict)
    duplicates = 0
    for p in sorted(products, key=lambda p: (p.grid_cell, p.modality, p.product_id, p.source, p.row)):
        if p.modality not in (*modalities, WORLDCOVER):
            continue
        if p.modality in cells[p.grid_cell]:
            duplicates += 1
            continue
        cells[p.grid_cell][p.modality] = p
    ordered = [list(cells[k].values()) for k in sorted(cells)
               if any(m in cells[k] for m in modalities)]
    return [ordered[i:i + cells_per_shard] for i in range(0, len(ordered), cells_per_shard)], duplicates


def convert(inputs: list[Path], out: Path, tile_size: int = 534, codec: str = "raw", cells_per_shard: int = 64,
            workers: int | None = None, skip_bad: bool = False, progress: bool = True,
            modalities: tuple[str, ...] = MODALITY_NAMES) -> dict:
    """Convert inputs into a shard directory at `out`; returns the summary also stored in index.json."""
    if tile_size <= 0 or cells_per_shard <= 0:
        raise ValueError(f"tile_size and cells_per_shard must be positive, got {tile_size}, {cells_per_shard}")
    for m in modalities:
        if m not in MODALITIES:
            raise ValueError(f"unknown modality {m!r}; expected a subset of {MODALITY_NAMES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    products, unknown = sources.discover([Path(i) for i in inputs])
    if unknown and not skip_bad:
        u = unknown[0]
        raise BadInput(f"{u['file']} ({u['record']}): {u['reason']}; expected MSIL2A / MSIL1C / S1* / WorldCover "
                       f"product ids ({len(unknown)} such records; --skip-bad skips them)")
    jobs, duplicates = _plan(products, modalities, cells_per_shard)
    if not jobs:
        raise BadInput(f"no products of {list(modalities)} found under {[str(i) for i in inputs]}")
    opts = {"tile_size": tile_size, "codec": codec, "modalities": list(modalities), "skip_bad": skip_bad}
    fps = [_job_fingerprint(job, opts) for job in jobs]
    pending, resumed, rewritten = [], 0, 0
    for i, fp in enumerate(fps):
        found = shards.finished_fingerprint(out, i)  # None also when the .bin is shorter than its .npz says
        if found == fp:
            resumed += 1
        elif found is None:
            rewritten += (out / f"{shards.shard_name(i)}.npz").exists()
            pending.append(i)
        else:
            raise BadInput(f"{out}/{shards.shard_name(i)}.npz was written by a different conversion "
                           "(other inputs or options); use an empty --out directory")
    bar = tqdm(total=len(jobs), initial=resumed, desc="terrafm prepare", unit="shard", disable=not progress)
    if workers == 0 or len(pending) <= 1:
        for i in pending:
            run_job(i, jobs[i], str(out), opts, fps[i])
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run_job, i, jobs[i], str(out), opts, fps[i]) for i in pending]
            for f in as_completed(futures):
                f.result()
                bar.update()
    bar.close()
    return _write_index(out, len(jobs), opts, unknown, duplicates, resumed, rewritten, [str(i) for i in inputs])


def _write_index(out: Path, n_shards: int, opts: dict, unknown: list, duplicates: int, resumed: int, rewritten: int,
                 inputs: list[str]) -> dict:
    sums = {m: [0.0, 0.0, 0] for m in opts["modalities"]}
    class_total = np.zeros(NUM_CLASSES, np.int64)
    shard_list, skipped, records, present = [], list(unknown), 0, dict.fromkeys(opts["modalities"], 0)
    for i in range(n_shards):
        name = shards.shard_name(i)
        with np.load(out / f"{name}.npz") as z:
            n = len(z["keys"])
            for m in opts["modalities"]:
                s = sums[m]
                s[0], s[1], s[2] = s[0] + z[f"{m}.sum"], s[1] + z[f"{m}.sumsq"], s[2] + int(z[f"{m}.count"])
                present[m] += int((z[f"{m}.offset"][:, 0] >= 0).sum())
            class_total += z["class_counts"].sum(axis=0)
            skipped += json.loads(str(z["skipped"]))
        shard_list.append({"name": name, "records": n, "bytes": (out / f"{name}.bin").stat().st_size})
        records += n
    stats = {}
    for m, (s, sq, count) in sums.items():
        mean = np.asarray(s) / max(count, 1)
        std = np.sqrt(np.maximum(np.asarray(sq) / max(count, 1) - mean ** 2, 0.0))
        info = MODALITIES[m]
        stats[m] = {"bands": list(info.bands), "dtype": info.dtype, "tiles": present[m],
                    "units": "linear power (sigma0)" if m == "s1" else "reflectance x 1e4",
                    "mean": np.broadcast_to(mean, (info.channels,)).tolist(),
                    "std": np.where(np.broadcast_to(std, (info.channels,)) > 0, std, 1.0).tolist()}
    summary = {"tile_size": opts["tile_size"], "codec": opts["codec"], "modalities": stats,
               "classes": {"frequency": (class_total / max(class_total.sum(), 1)).tolist(),
                           "pixels": class_total.tolist()},
               "shards": shard_list, "num_records": records, "skipped": skipped,
               "duplicates_dropped": duplicates, "resumed_shards": resumed, "rewritten_shards": rewritten,
               "inputs": inputs}
    shards.write_index(out, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="Major-TOM parquet files/folders or GeoTIFF folders")
    parser.add_argument("--out", type=Path, required=True, help="shard directory to write")
    parser.add_argument("--tile-size", type=int, default=534, help="px per location (Major-TOM cell 1068 = 2 x 534)")
    parser.add_argument("--codec", choices=shards.CODECS, default="raw", help="per-band chunk compression")
    parser.add_argument("--cells-per-shard", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count; 0 = in-process)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITY_NAMES), choices=MODALITY_NAMES)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        summary = convert(args.inputs, args.out, args.tile_size, args.codec, args.cells_per_shard, args.workers,
                          args.skip_bad, not args.no_progress, tuple(args.modalities))
    except BadInput as err:
        print(f"terrafm prepare: bad input: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"terrafm prepare: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"terrafm prepare: cannot write {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['num_records']} locations in {len(summary['shards'])} shards to {args.out} "
          f"({summary['resumed_shards']} shards resumed, {summary['rewritten_shards']} incomplete shards rewritten, "
          f"{summary['duplicates_dropped']} duplicate products dropped)")
    for m, s in summary["modalities"].items():
        print(f"  {m}: {s['tiles']} tiles")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} bad records:")
        for s in summary["skipped"][:20]:
            print(f"  {s['file']} [{s['record']}]: {s['reason']}")
    return 0
