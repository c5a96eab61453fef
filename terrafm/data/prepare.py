"""`terrafm prepare`: convert Major-TOM parquet shards / GeoTIFF folders into terrafm shards.

Plan: discover every product, group them by grid cell, sort the cells and cut them into jobs of
`cells_per_shard`; job i writes shard i. Jobs run in parallel processes; a job whose shard already
exists with the same fingerprint is skipped (resume). Each cell is split into tiles of tile_size px
(Major-TOM: 1068 px cells -> 4 tiles of 534). S1 is stored in dB by default (s1_scaling). Nodata
pixels are masked (sources.py), counted per band and left out of the statistics. Bad input raises
BadInput naming the file and record, or with skip_bad the bad product is skipped (the cell keeps its
other products) and counted in the summary and in index.json; a run that writes nothing fails.
"""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import signal
import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from terrafm import stop_signals
from terrafm.data import shards, sources
from terrafm.data.landcover import NUM_CLASSES, class_counts
from terrafm.data.sources import WORLDCOVER, BadInput, Product
from terrafm.fileio import load_json, os_error_message, path_arg, shown, try_lock
from terrafm.modalities import MODALITIES, MODALITY_NAMES, S1_SCALINGS


def _stamp(path: str, stamps: dict) -> list | None:
    """[size, mtime_ns] of a source file (None when it cannot be read), once per file."""
    if path not in stamps:
        try:
            st = Path(path).stat()
            stamps[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamps[path] = None
    return stamps[path]


def _mask_stamps(p: Product, stamps: dict) -> list:
    """[(band.msk, stamp)] of a folder product's .msk sidecars and [(band.aux.xml, nodata)] of the GDAL PAM ones that
    declare a nodata value (or do not read): a mask added, edited or removed, or a declared value changed, redoes its
    shard. A PAM sidecar is hashed by the value it declares, not its stamp: QGIS and `gdalinfo -stats` write
    statistics-only ones beside the data, which change no pixel. Empty without such sidecars, so the fingerprints of
    conversions without them stay as they were."""
    masks = {b: sources.mask_sidecar(f) for b, f in p.band_files.items()}
    found = [(f"{b}.msk", _stamp(str(m), stamps)) for b, m in masks.items() if m is not None]
    for b, f in p.band_files.items():
        try:
            declared = sorted(sources.pam_nodata(f).items())
        except (OSError, ValueError) as err:
            declared = f"does not read: {err}"  # redone, and named as bad input there
        if declared:
            found.append((f"{b}.aux.xml", declared))
    return sorted(found)


def _job_fingerprint(job: list[list[Product]], opts: dict, stamps: dict) -> str:
    """"<plan>:<content>": plan hashes the job's grid cells and options, content its products and the real path, size
    and mtime of their source files, so a job whose inputs changed is redone and another conversion is refused. The
    real path: the same input given as a relative, absolute or symlinked path is the same input."""
    plan = [cell[0].grid_cell for cell in job]
    content = [[(p.modality, p.grid_cell, p.product_id, os.path.realpath(p.source), p.row,
                 [_stamp(p.source, stamps)] if p.row >= 0 else
                 sorted((b, _stamp(f, stamps)) for b, f in p.band_files.items()) + _mask_stamps(p, stamps))
                for p in cell] for cell in job]
    digest = [hashlib.sha1(json.dumps([x, opts], sort_keys=True).encode()).hexdigest() for x in (plan, content)]
    return ":".join(digest)


def _read_product(p: Product, parquet: sources.ParquetRows, opts: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored (C, S, S) 10 m array, nodata mask or None for worldcover) of one product; BadInput names it."""
    if p.row >= 0:
        try:
            raw = parquet.bands(p)
        except (BadInput, MemoryError):
            raise
        except Exception as err:
            raise BadInput(f"{p.where}: cannot read the parquet row ({type(err).__name__}: {err})") from err
        for value in raw.values():
            if isinstance(value, BadInput):
                raise value
        arrays = {b: sources.decode_band(v, b, p) for b, v in raw.items()}
    else:
        arrays = {}
        by_name = {name.lower(): f for name, f in p.band_files.items()}  # B8a.tif too; discover refuses twins
        for b in sources.expected_bands(p.modality):
            path = by_name.get(b.lower())
            if path is None:
                held = ", ".join(f"{name}.tif" for name in sorted(p.band_files)) or "no .tif at all"
                raise BadInput(f"{p.where}: missing band {b} (no {b}.tif in the product folder; it holds {held})")
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise BadInput(f"{p.where}: cannot read {path} ({err.strerror or err})") from err
            try:
                sidecar = sources.external_mask(path)
            except (OSError, ValueError) as err:
                raise BadInput(f"{p.where}: band {b}: its mask {sources.mask_sidecar(path)} does not read ({err})") \
                    from err
            try:
                pam = sources.pam_nodata(path)
            except (OSError, ValueError) as err:
                raise BadInput(f"{p.where}: band {b}: its GDAL sidecar {path}.aux.xml does not read ({err})") from err
            arrays[b] = sources.decode_band(data, b, p, sidecar, pam)
    data, _ = sources.to_10m(p, arrays)
    if p.modality == WORLDCOVER:
        sources.worldcover_counts(data[0], p)  # codes outside the legend name this product, before any tile is written
        return data, None
    if opts["s2_offset"] == "remove" and _s2_offset_kind(p.modality, p.product_id) == "offset":
        data = sources.remove_s2_offset(data)
    return sources.storage_tile(p.modality, data, p, opts["s1_scaling"])


def _s2_offset_kind(modality: str, product_id: str) -> str | None:
    """"offset" for an S2 product of baseline >= 04.00 (stored + 1000 DN), "no_offset" for an earlier one,
    "unknown" when its id names no baseline; None for the other modalities."""
    if modality not in ("s2_l2a", "s2_l1c"):
        return None
    baseline = sources.processing_baseline(product_id)
    return "unknown" if baseline is None else "offset" if baseline >= sources.S2_OFFSET_BASELINE else "no_offset"


def _s2_baselines(used: list[dict]) -> dict:
    """Per S2 modality, how many of the products written are of each _s2_offset_kind (not the duplicates dropped
    or the products skipped as bad: a mix only matters in what was written)."""
    counts: dict = {}
    for u in used:
        kind = _s2_offset_kind(u["modality"], u["product_id"])
        if kind is not None:
            counts.setdefault(u["modality"], {"offset": 0, "no_offset": 0, "unknown": 0})[kind] += 1
    return counts


def _record(p: Product) -> str:
    """How a skipped entry names the product in its file: its parquet row, or its folder's product id."""
    return f"row {p.row}" if p.row >= 0 else p.product_id


def _skip_entry(p: Product, err: BadInput) -> dict:
    return {"file": p.source, "record": _record(p), "grid_cell": p.grid_cell, "reason": str(err)}


def _tile_size_hint(size: int, tile_size: int) -> str:
    """For a product size that tile_size does not divide: the nearest tile size that does (Major-TOM's 1068 px
    cells take 534; a 1056 px cell takes 528)."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    best = min(divisors, key=lambda d: (abs(d - tile_size), -d))
    return f" (--tile-size {best} splits it into {size // best} x {size // best} tiles)"


def _read_cell(products: list[Product], parquet: sources.ParquetRows, opts: dict, skipped: list[dict]) -> dict:
    """modality -> (stored (C, S, S) array, nodata mask, product) for one grid cell. A bad product raises BadInput,
    or with skip_bad is left out (its entry names its own file) and the cell keeps its other products: the next
    duplicate of its modality, when there is one, takes its place. Duplicates after the one used are read only
    while it has nodata: of those of its size, the one with the fewest nodata pixels is used (the first on a tie),
    so a product outside the swath, or half in it, does not stand in for a whole one of another date.

    Size is checked per product, so that one product of another size (a cropped S1 scene) is the one named and
    skipped, whatever order the modalities are read in: its size must be the size most products of the cell have
    (on a tie, an S2 or WorldCover product's: S1 scenes are the ones cropped), and that size a multiple of
    tile_size (checked after, so a cropped scene is named as one, not given a tile size that fits it alone)."""
    t = opts["tile_size"]
    queues = defaultdict(list)  # modality -> its products not read yet, in plan order
    for p in products:
        queues[p.modality].append(p)

    def refuse(p: Product, err: BadInput) -> None:
        if not opts["skip_bad"]:
            rest = queues[p.modality]
            if rest:
                raise BadInput(f"{err} (this cell has {len(rest)} more {p.modality} product(s), e.g. "
                               f"{rest[0].product_id}, which --skip-bad tries instead)") from err
            raise err
        skipped.append(_skip_entry(p, err))

    def first_good(modality: str, size: int | None = None) -> tuple | None:
        """(product, data, mask) of the first product of `modality` that reads (and has `size` px, when given)."""
        while queues[modality]:
            p = queues[modality].pop(0)
            try:
                data, mask = _read_product(p, parquet, opts)
                if size is not None and data.shape[-1] != size:
                    raise BadInput(f"{p.where}: product of {data.shape[-1]} px where the other products of this "
                                   f"cell are {size} px")
            except BadInput as err:
                refuse(p, err)
                continue
            return p, data, mask
        return None

    def least_nodata(p: Product, data: np.ndarray, mask: np.ndarray | None) -> tuple:
        """(product, data, mask): `p`'s, or a later duplicate's of the same size with fewer nodata pixels."""
        nodata = int(mask.sum()) if mask is not None else 0
        while nodata and queues[p.modality]:
            q = queues[p.modality].pop(0)
            try:
                q_data, q_mask = _read_product(q, parquet, opts)
            except BadInput as err:
                refuse(q, err)
                continue
            q_nodata = int(q_mask.sum())
            if q_data.shape == data.shape and q_nodata < nodata:
                p, data, mask, nodata = q, q_data, q_mask, q_nodata
        return p, data, mask

    read = [r for r in map(first_good, list(queues)) if r is not None]
    sizes = Counter(data.shape[-1] for p, data, _ in sorted(read, key=lambda r: r[0].modality == "s1"))
    size = sizes.most_common(1)[0][0] if read else None
    cell = {}
    for p, data, mask in read:
        if data.shape[-1] != size:
            refuse(p, BadInput(f"{p.where}: product of {data.shape[-1]} px where the other products of this cell "
                               f"are {size} px"))
            found = first_good(p.modality, size)
            if found is None:
                continue
            p, data, mask = found
        if size % t:
            refuse(p, BadInput(f"{p.where}: product of {size} px is not a multiple of tile_size {t}"
                               f"{_tile_size_hint(size, t)}"))
            continue
        p, data, mask = least_nodata(p, data, mask)
        cell[p.modality] = (data, mask, p)
    return cell


class Stopped(BaseException):
    """SIGTERM or SIGHUP (scancel, a SLURM time limit, a closed terminal) during `terrafm prepare`: raised in the main
    process, so the shard being written is dropped as on Ctrl-C; the default action left its part-*.tmp files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_writing: list[shards.ShardWriter] = []  # the shard this process is writing, for a stop that comes from outside


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def run_job(index: int, job: list[list[Product]], out_dir: str, opts: dict, fingerprint: str) -> dict:
    """Convert the cells of one job into shard `index`; returns {records, skipped}.

    A modality whose tile is all nodata is left out of that location (counted in the shard as empty tiles)."""
    modalities = opts["modalities"]
    bands = {m: MODALITIES[m].bands for m in modalities}
    parquet = sources.ParquetRows()
    t = opts["tile_size"]
    writer = shards.ShardWriter(Path(out_dir), index, bands, t, opts["codec"], fingerprint)
    _writing.append(writer)
    try:
        writer.skipped = _write_cells(writer, job, parquet, opts)
        writer.close()
    except BaseException:  # bad input, Ctrl-C, SIGTERM, a full disk: no half-written file is left behind
        writer.abort()
        raise
    finally:
        _writing.remove(writer)
    return {"records": len(writer.keys), "skipped": writer.skipped}


def _write_cells(writer: shards.ShardWriter, job: list[list[Product]], parquet: sources.ParquetRows,
                 opts: dict) -> list[dict]:
    """Add every tile of the job's cells to `writer`; returns the skipped products' entries."""
    modalities, t = opts["modalities"], opts["tile_size"]
    skipped = []
    for cell_products in job:
        cell = _read_cell(cell_products, parquet, opts, skipped)
        images = [m for m in modalities if m in cell]
        if not images:
            continue
        writer.used += [{"file": p.source, "record": _record(p), "modality": p.modality, "product_id": p.product_id}
                        for _, _, p in cell.values()]
        size = cell[images[0]][0].shape[-1]
        wc = cell.get(WORLDCOVER, (None,))[0]
        for r in range(size // t):
            for c in range(size // t):
                win = (slice(None), slice(r * t, (r + 1) * t), slice(c * t, (c + 1) * t))
                counts = class_counts(wc[0][win[1:]]) if wc is not None else np.zeros(NUM_CLASSES, np.int64)
                tiles, nodata = {}, {}
                for m in images:
                    mask = cell[m][1][win]
                    if mask.all():
                        writer.empty_tiles[m] += 1
                        continue
                    tiles[m], nodata[m] = np.ascontiguousarray(cell[m][0][win]), mask
                if tiles:
                    writer.add(f"{cell_products[0].grid_cell}/{r}_{c}", tiles, counts, nodata)
    return skipped


def _plan(products: list[Product], modalities: tuple[str, ...], cells_per_shard: int) -> list:
    """Jobs: lists of cells, each the list of its products (duplicates of a modality too, by product id: the
    first that reads is used, the next ones stand in for it under --skip-bad or where it has nodata: _read_cell)."""
    cells = defaultdict(list)
    for p in sorted(products, key=lambda p: (p.grid_cell, p.modality, p.product_id, p.source, p.row)):
        if p.modality in (*modalities, WORLDCOVER):
            cells[p.grid_cell].append(p)
    ordered = [cells[k] for k in sorted(cells) if any(p.modality in modalities for p in cells[k])]
    return [ordered[i:i + cells_per_shard] for i in range(0, len(ordered), cells_per_shard)]


def _plan_order_used(job: list, skipped: list[dict]) -> list[dict]:
    """A shard's `used` entries as terrafm before stop 43 chose them, for a shard it wrote (resumed, it records none):
    per cell and modality the first product in plan order not skipped as bad."""
    bad = {(s["file"], s["record"]) for s in skipped}
    used = []
    for cell in job:
        done = set()
        for p in cell:
            if p.modality not in done and (p.source, _record(p)) not in bad:
                done.add(p.modality)
                used.append({"file": p.source, "record": _record(p), "modality": p.modality,
                             "product_id": p.product_id})
    return used


def _duplicates_dropped(jobs: list, skipped: list[dict], used: list[dict]) -> int:
    """Products of the planned cells neither used nor skipped as bad: another product of their cell and modality
    was used instead (or their cell wrote no tile)."""
    bad = {(s["file"], s["record"]) for s in skipped}
    kept = sum((p.source, _record(p)) not in bad for job in jobs for cell in job for p in cell)
    return kept - len(used)


def _what_was_found(products: list[sources.Product], metadata: list[str], inputs: list[Path]) -> str:
    """What the inputs hold instead, for the no-products message: other modalities, parquet files without a band
    column (another Major-TOM collection, metadata) or with band columns and 0 rows, raw Sentinel products (.SAFE,
    .jp2)."""
    found = []
    other = sorted({p.modality for p in products})
    if other:
        found.append(f"products of {other} only (--modalities chooses)")
    if metadata:
        found.append(f"{len(metadata)} parquet file(s) with no S2, S1 or WorldCover band column (metadata, or "
                     f"another collection such as Core-DEM), e.g. {metadata[0]}")
    files = [p for i in inputs for p in sources.list_files(Path(i))]
    empty = [p for p in files if p.suffix.lower() == ".parquet" and str(p) not in metadata
             and sources.parquet_rows(p) == 0]
    if empty:
        found.append(f"{len(empty)} parquet file(s) with band columns but 0 rows (a write or a filter that kept no "
                     f"product), e.g. {empty[0]}")
    raw = [p for p in files if p.suffix.lower() == ".jp2" or any(part.upper().endswith(".SAFE") for part in p.parts)]
    if raw:
        found.append(f"{len(raw)} raw Sentinel file(s) such as {raw[0]}: convert products to GeoTIFF band folders "
                     "(<grid_cell>/<product_id>/<band>.tif) or use Major-TOM parquet (docs/data.md)")
    loose = [p for p in files if p.suffix.lower() in (".tif", ".tiff") and not sources.in_product_folder(p)]
    if loose:
        found.append(f"{len(loose)} .tif file(s) outside <grid_cell>/<product_id>/ folders, e.g. {loose[0]}: the "
                     "layout is <row>/<grid_cell>/<product_id>/<band>.tif, one folder per product (docs/data.md)")
    return "; found " + "; ".join(found) if found else ""


def convert(inputs: list[Path], out: Path, tile_size: int = 534, codec: str = "raw", cells_per_shard: int = 64,
            workers: int | None = None, skip_bad: bool = False, progress: bool = True,
            modalities: tuple[str, ...] = MODALITY_NAMES, s1_scaling: str = "db", s2_offset: str = "keep") -> dict:
    """Convert inputs into a shard directory at `out`; returns the summary also stored in index.json.

    Raises BadInput when nothing could be written (every record skipped)."""
    if tile_size <= 0 or cells_per_shard <= 0:
        raise ValueError(f"tile_size and cells_per_shard must be positive, got {tile_size}, {cells_per_shard}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
    if s1_scaling not in S1_SCALINGS:
        raise ValueError(f"s1_scaling must be one of {S1_SCALINGS}, got {s1_scaling!r}")
    if s2_offset not in sources.S2_OFFSETS:
        raise ValueError(f"s2_offset must be one of {sources.S2_OFFSETS}, got {s2_offset!r}")
    for m in modalities:
        if m not in MODALITIES:
            raise ValueError(f"unknown modality {m!r}; expected a subset of {MODALITY_NAMES}")
    modalities = tuple(dict.fromkeys(modalities))  # a sensor named twice is converted once
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a directory to write the shards into")
    products, unknown, metadata = sources.discover([Path(i) for i in inputs])
    if unknown and not skip_bad:
        u = unknown[0]
        raise BadInput(f"{u['file']} ({u['record']}): {u['reason']} ({len(unknown)} such records; --skip-bad "
                       "skips them)")
    jobs = _plan(products, modalities, cells_per_shard)
    if not jobs:
        raise BadInput(f"no products of {list(modalities)} found under {[str(i) for i in inputs]}"
                       + _what_was_found(products, metadata, inputs))
    out.mkdir(parents=True, exist_ok=True)
    with _only_writer(out):  # this process alone writes `out`
        foreign = _foreign_index(out)
        if foreign:
            raise BadInput(f"{out / shards.INDEX_NAME} is not a terrafm shard index ({foreign}); prepare writes its "
                           "own there: move that file away or use an empty --out directory")
        opts = {"tile_size": tile_size, "codec": codec, "modalities": list(modalities), "skip_bad": skip_bad,
                "s1_scaling": s1_scaling, "s2_offset": s2_offset}
        # skip_bad is not part of what a shard holds (a finished shard lists its skips), so a re-run that adds
        # --skip-bad after a stop on bad input resumes the shards already written; s2_offset at its default leaves
        # the fingerprint of shards written before the option existed
        held = {k: v for k, v in opts.items() if k != "skip_bad" and (k, v) != ("s2_offset", "keep")}
        stamps = {}
        fps = [_job_fingerprint(job, held, stamps) for job in jobs]
        names = {shards.shard_name(i) for i in range(len(jobs))}
        stale = sorted({p.name.split(".")[0] for p in out.glob("part-*.*")} - names)  # a shard index.json would miss
        if stale:
            raise BadInput(f"{out} holds {', '.join(stale)} beyond the {len(jobs)} shards of this conversion, written "
                           "by a different conversion (other inputs or options); use an empty --out directory")
        pending, resumed, rewritten, redone = [], 0, 0, 0
        for i, fp in enumerate(fps):
            found = shards.finished_fingerprint(out, i)  # None also when the .bin is shorter than its .npz says
            if found == fp:
                resumed += 1
            elif found is None:
                rewritten += (out / f"{shards.shard_name(i)}.npz").exists()
                pending.append(i)
            elif ":" not in found:  # terrafm before the two-part fingerprint: cannot tell a resume from another run
                raise BadInput(f"{out}/{shards.shard_name(i)}.npz was written by an earlier terrafm, whose shards "
                               "cannot be checked against these inputs; use an empty --out directory (or delete "
                               "its part-* files and index.json to redo them here)")
            elif found.split(":")[0] == fp.split(":")[0]:  # same cells and options, a source file changed since
                redone += 1
                pending.append(i)
            else:
                raise BadInput(f"{out}/{shards.shard_name(i)}.npz was written by a different conversion: other "
                               "options, or other grid cells (inputs added or removed, or a whole file skipped as "
                               "unreadable that now reads: shards are cut from the sorted list of all cells); use "
                               "an empty --out directory")
        for path, rows, size in sources.large_row_groups({p.source for i in pending for cell in jobs[i] for p in cell
                                                          if p.row >= 0}):
            _error(f"warning: {path} has row groups of up to {rows} products ({size / 2**30:.1f} GiB of band data); "
                   "each worker holds one such group in memory (--workers lowers it). Major-TOM writes one product per "
                   "row group: pyarrow.parquet.write_table(table, path, row_group_size=1)")
        if pending:  # a run that stops midway must not leave the old index.json over rewritten shards
            (out / shards.INDEX_NAME).unlink(missing_ok=True)
        bar = tqdm(total=len(jobs), initial=resumed, desc="terrafm prepare", unit="shard", disable=not progress)
        if workers == 0 or len(pending) <= 1:
            for i in pending:
                run_job(i, jobs[i], str(out), opts, fps[i])
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers or usable_cpus(), initializer=_worker_setup) as pool:
                futures = [pool.submit(run_job, i, jobs[i], str(out), opts, fps[i]) for i in pending]
                try:
                    for f in as_completed(futures):
                        f.result()
                        bar.update()
                except BaseException as err:  # stop at the first error: queued jobs are not started
                    if isinstance(err, (Stopped, KeyboardInterrupt)):  # the workers drop their shard and end too
                        _signal_workers(pool, err.signum if isinstance(err, Stopped) else signal.SIGINT)
                    pool.shutdown(cancel_futures=True)
                    raise
        bar.close()
        return _write_index(out, jobs, opts, unknown, (resumed, rewritten, redone), [str(i) for i in inputs], metadata)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a SLURM job's --cpus-per-task), not the machine's:
    os.cpu_count() started a worker per core of the node under a job given 4 of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def _foreign_index(out: Path) -> str | None:
    """Why the index.json in `out` is not one prepare wrote (which it may replace), or None (none there, or ours).
    A user's own index.json in --out was deleted at the start of the run, and overwritten at its end."""
    path = out / shards.INDEX_NAME
    if not os.path.lexists(path):
        return None
    try:
        meta = load_json(path)
    except (OSError, ValueError) as err:
        return f"it does not read as JSON: {err}"
    if not isinstance(meta, dict) or meta.get("format") != shards.FORMAT:
        return f"it has no \"format\": \"{shards.FORMAT}\""
    return None


@contextlib.contextmanager
def _only_writer(out: Path):
    """Hold an exclusive lock on the --out folder while converting into it: two runs into one folder (a re-run while
    the first still runs, two jobs of an array) write the same part-*.tmp files and can leave a shard whose .bin
    mixes both. Best effort: a file system without locks (Lustre mounted without flock) runs unguarded."""
    fd = os.open(out, os.O_RDONLY)
    try:
        if not try_lock(fd):
            raise ValueError(f"another `terrafm prepare` is writing into {out}; wait for it to finish (or end it) and "
                             "run this command again, or use another --out")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _stopped_on_signals():
    """`terrafm prepare`'s SIGTERM / SIGHUP raise Stopped (a SIGHUP ignored under nohup stays ignored); the previous
    handlers are restored after. The command's alone: convert() called from a program leaves its handlers be."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        if previous[sig] != signal.SIG_IGN:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_workers(pool: ProcessPoolExecutor, signum: int) -> None:
    """Hand a stop signal that reached only this process (kill PID, not the whole job) on to the pool's workers."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError):
            os.kill(process.pid, signum)


def _drop_shard_and_exit(code: int) -> None:
    """End this worker at once, removing the part-*.tmp files of the shard it is writing: after a stop it must not
    go on to the job queued for it (the pool hands each worker one in advance, which cancel cannot take back)."""
    for writer in list(_writing):
        writer.abort()
    os._exit(code)


def _worker_stop(signum, frame) -> None:
    """A worker's SIGTERM / SIGHUP / SIGINT (its own, or handed on by the main process, which says why it stopped)."""
    _drop_shard_and_exit(128 + signum)


def _worker_setup() -> None:
    """Worker initializer: a stop signal, or the parent's death (kill -9, the out-of-memory killer), ends the worker
    without a part-*.tmp left, where an orphan went on to convert its queued jobs into a folder a re-run now writes,
    then waited forever. Ctrl-C reaches every worker too (the terminal signals the whole process group): an idle
    worker printed a KeyboardInterrupt traceback, a busy one went on to the job queued for it."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _worker_stop)
    stop_signals.when_orphaned(lambda: _drop_shard_and_exit(1), 0.2, "terrafm-prepare-parent-watch")


def _write_index(out: Path, jobs: list, opts: dict, unknown: list, reruns: tuple[int, int, int],
                 inputs: list[str], metadata: list[str]) -> dict:
    """Merge the shard indexes of `jobs` into index.json; reruns: (resumed, rewritten, redone) shard counts."""
    n_shards = len(jobs)
    sums = {m: [0.0, 0.0, 0, 0, 0] for m in opts["modalities"]}  # sum, sumsq, valid px, nodata px, empty tiles
    class_total = np.zeros(NUM_CLASSES, np.int64)
    shard_list, skipped, used, records, present = [], list(unknown), [], 0, dict.fromkeys(opts["modalities"], 0)
    for i in range(n_shards):
        name = shards.shard_name(i)
        with np.load(out / f"{name}.npz") as z:
            n = len(z["keys"])
            for m in opts["modalities"]:
                s = sums[m]
                s[0], s[1], s[2] = s[0] + z[f"{m}.sum"], s[1] + z[f"{m}.sumsq"], s[2] + z[f"{m}.count"]
                s[3], s[4] = s[3] + z[f"{m}.nodata"], s[4] + int(z[f"{m}.empty_tiles"])
                present[m] += int((z[f"{m}.offset"][:, 0] >= 0).sum())
            class_total += z["class_counts"].sum(axis=0)
            shard_skipped = json.loads(str(z["skipped"]))
            skipped += shard_skipped
            used += json.loads(str(z["used"])) if "used" in z else _plan_order_used(jobs[i], shard_skipped)
        shard_list.append({"name": name, "records": n, "bytes": (out / f"{name}.bin").stat().st_size})
        records += n
    if records == 0:
        first = "; ".join(f"{s['file']} [{s['record']}]: {s['reason']}" for s in skipped[:3])
        empty = sum(s[4] for s in sums.values())
        raise BadInput(f"nothing written from {inputs}: {len(skipped)} records skipped as bad, {empty} tiles all "
                       f"nodata" + (f" (first bad: {first})" if first else ""))
    stats = {}
    for m, (s, sq, count, nodata, empty) in sums.items():
        info = MODALITIES[m]
        count = np.broadcast_to(np.asarray(count, np.float64), (info.channels,))
        mean = np.asarray(s) / np.maximum(count, 1)
        std = np.sqrt(np.maximum(np.asarray(sq) / np.maximum(count, 1) - mean ** 2, 0.0))
        # a band with no valid pixel: its stored pixels all hold the fill, which normalises to 0 as its mean
        mean = np.where(count > 0, mean, shards.nodata_fill(m, opts["s1_scaling"]))
        units = ("reflectance x 1e4" if m != "s1" else
                 "dB (10 log10 sigma0)" if opts["s1_scaling"] == "db" else "linear power (sigma0)")
        nodata = np.broadcast_to(np.asarray(nodata, np.int64), (info.channels,))
        stats[m] = {"bands": list(info.bands), "dtype": info.dtype, "tiles": present[m], "units": units,
                    "mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist(),
                    "nodata_pixels": nodata.tolist(), "empty_tiles": int(empty)}
    summary = {"tile_size": opts["tile_size"], "codec": opts["codec"], "modalities": stats,
               "classes": {"frequency": (class_total / max(class_total.sum(), 1)).tolist(),
                           "pixels": class_total.tolist()},
               "s1_scaling": opts["s1_scaling"], "s2_offset": opts["s2_offset"],
               "s2_baselines": _s2_baselines(used),
               "metadata_files": metadata,
               "shards": shard_list, "num_records": records, "skipped": skipped,
               "duplicates_dropped": _duplicates_dropped(jobs, skipped, used), "resumed_shards": reruns[0],
               "rewritten_shards": reruns[1], "redone_shards": reruns[2],
               "inputs": inputs}
    shards.write_index(out, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=lambda t: Path(path_arg(t)),
                        help="Major-TOM parquet files/folders or GeoTIFF folders")
    parser.add_argument("--out", type=lambda t: Path(path_arg(t)), required=True, help="shard directory to write")
    parser.add_argument("--tile-size", type=int, default=534,
                        help="px per location (default: 534; a Major-TOM cell of 1068 px = 2 x 2 locations)")
    parser.add_argument("--codec", choices=shards.CODECS, default="raw",
                        help="per-band chunk compression (default: raw)")
    parser.add_argument("--cells-per-shard", type=int, default=64,
                        help="grid cells per shard file, the unit of parallel work and of resume (default: 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: the CPUs this process may run on, e.g. a SLURM job's "
                             "--cpus-per-task; 0 = in-process)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITY_NAMES), choices=MODALITY_NAMES,
                        help="sensors to convert (default: all three)")
    parser.add_argument("--s1-scaling", choices=S1_SCALINGS, default="db",
                        help="store S1 as dB (10 log10 sigma0, floor -50 dB; default) or linear power")
    parser.add_argument("--s2-offset", choices=sources.S2_OFFSETS, default="keep",
                        help="Sentinel-2 of processing baseline 04.00 and later (from 25 Jan 2022; the product id's "
                             "_N0400_) stores reflectance x 1e4 + 1000: keep the values as the products hold them "
                             "(default) or remove the offset from those products, so that every S2 tile has the "
                             "earlier scale (for products that still carry it: Copernicus SAFE, Planetary "
                             "Computer, Earth Search; not for a distribution that removed it already)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip and count bad products and unreadable parquet files instead of stopping (a cell "
                             "keeps its good products; fails when nothing is left to write); a re-run with it "
                             "resumes the shards a stopped run finished")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch logs)")


def _error(message: str) -> None:
    """One line on stderr; the bytes of a path that are not UTF-8 print as \\xff escapes (shown), not as \\udcff."""
    print(f"terrafm prepare: {shown(message)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        with _stopped_on_signals():
            summary = convert(args.inputs, args.out, args.tile_size, args.codec, args.cells_per_shard,
                              args.workers, args.skip_bad, not args.no_progress, tuple(args.modalities),
                              args.s1_scaling, args.s2_offset)
    except BadInput as err:
        _error(f"bad input: {err}")
        return 2
    except ValueError as err:
        _error(str(err))
        return 2
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        _error(os_error_message(err, [args.out])
               + (f"; free space there and run the same command: it keeps the finished shards in "
                  f"{args.out} and resumes from them" if full else ""))
        return 2
    except (MemoryError, BrokenProcessPool) as err:
        what = (f"ran out of memory{f' ({err})' if str(err) else ''}" if isinstance(err, MemoryError) else
                "lost a worker process (killed, most often by the out-of-memory killer)")
        _error(f"{what}; nothing was skipped for it. Lower --workers (each holds one row group of every input file) "
               f"and run the same command: it resumes from the finished shards in {args.out}")
        return 2
    except KeyboardInterrupt:
        _error(f"interrupted; the finished shards in {args.out} are kept and the same command resumes from them")
        return 130
    except Stopped as err:
        _error(f"stopped by {signal.Signals(err.signum).name}; the finished shards in {args.out} are kept and the same "
               "command resumes from them")
        return 128 + err.signum
    print(f"wrote {summary['num_records']} locations in {len(summary['shards'])} shards to {shown(args.out)} "
          f"({summary['resumed_shards']} shards resumed, {summary['rewritten_shards']} incomplete shards rewritten, "
          f"{summary['redone_shards']} shards redone because their input files changed, "
          f"{summary['duplicates_dropped']} duplicate products dropped, "
          f"{len(summary['metadata_files'])} metadata files read as metadata)")
    for m, s in summary["modalities"].items():
        share = sum(s["nodata_pixels"]) / max(1, s["tiles"] * summary["tile_size"] ** 2 * len(s["bands"]))
        print(f"  {m}: {s['tiles']} tiles ({s['units']}), {sum(s['nodata_pixels'])} nodata pixels ({share:.2%}, "
              f"masked), {s['empty_tiles']} all-nodata tiles left out")
    for m, n in summary["s2_baselines"].items():
        if n["offset"] and n["no_offset"] and summary["s2_offset"] == "keep":
            print(f"warning: {m} mixes {n['offset']} products of processing baseline 04.00 or later, which store "
                  f"reflectance x 1e4 + 1000, with {n['no_offset']} earlier ones: unless the distribution removed "
                  "the offset, the same ground reads 1000 higher in the later ones; --s2-offset remove aligns them",
                  file=sys.stderr)
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} bad records:")
        for s in summary["skipped"][:20]:
            print(f"  {shown(s['file'])} [{shown(s['record'])}]: {shown(s['reason'])}")
    return 0
