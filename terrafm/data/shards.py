"""terrafm shard format: co-registered multi-modality tiles, per-band chunks, a numpy index per shard.

A shard directory holds
    index.json          format version, tile size, codec, S1 scaling (db | linear), per-modality
                        bands/dtype/units/normalisation statistics/nodata counts, WorldCover class
                        frequency, the list of shards, skipped inputs, metadata files seen
    part-NNNNN.bin      the payload: per record, per modality present, one chunk per band (C-order
                        (T, T) array of the storage dtype: S2 uint16 reflectance x 1e4, S1 float16
                        dB or linear power), raw or LZ4-block compressed; a record's chunks are contiguous;
                        nodata pixels hold the band's reference mean (sources.py)
    part-NNNNN.npz      the shard's index: keys (N,), class_counts (N, 11) int64 WorldCover pixel counts,
                        per modality m: m.offset / m.nbytes (N, C) int64 (-1 / 0 where absent),
                        m.crc32 (N, C) uint32 of the stored bytes, m.sum / m.sumsq (C,) float64 and
                        m.count (C,) int64 statistics of the valid pixels, m.nodata (C,) int64 masked
                        pixels, m.empty_tiles () all-nodata tiles left out; fingerprint (the job)
Files are written to a temporary name and renamed; a shard counts as finished once its .npz exists,
which is renamed last, and its .bin is as long as the .npz says. Record ids are positions in the
concatenation of shards in index order. Opening a ShardSet cross-checks index.json, each .npz and the
part files on disk (record counts, .bin sizes, parts missing from the index) before any training.
"""

import json
import math
import os
import threading
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terrafm.data.landcover import NUM_CLASSES, WORLDCOVER_NAMES, WORLDCOVER_VALUES
from terrafm.fileio import NPZ_READ_ERRORS, atomic_write_bytes, check_regular, load_json, plain_name, publish
from terrafm.modalities import MODALITIES, REFERENCE_STATS, S1_SCALINGS

FORMAT = "terrafm-shards"
VERSION = 1
INDEX_NAME = "index.json"
CODECS = ("raw", "lz4")
LZ4_MAX_RATIO = 255  # the most an LZ4 block expands: bytes out per byte in


def _lz4():
    """lz4.block, imported only for lz4 shards: raw shards (the default) read and write without the package."""
    try:
        import lz4.block
    except ImportError as err:
        raise RuntimeError("lz4-compressed shards need the lz4 package (pip install lz4)") from err
    return lz4.block


CHANGED_HINT = "a copy over a folder in use? Re-run `terrafm prepare` into a new folder"
OPEN_BINS = 64  # .bin files a ShardSet keeps open: one per shard would pass the open-file limit on a big set, an open
#                 per read would load the metadata servers of a cluster file system


class ShardError(RuntimeError):
    """A shard directory is incomplete, inconsistent or corrupt; the message names the file."""


class ChecksumError(ShardError):
    """Stored bytes of a band chunk do not match the checksum written by the converter."""


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


class ShardWriter:
    """Accumulates records of one shard; `close()` writes .bin then .npz atomically."""

    def __init__(self, directory: Path, index: int, bands: dict[str, tuple[str, ...]], tile_size: int,
                 codec: str = "raw", fingerprint: str = ""):
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        self.stem = Path(directory) / shard_name(index)
        self.bands, self.tile_size, self.codec, self.fingerprint = bands, tile_size, codec, fingerprint
        self._tmp_bin = self.stem.with_suffix(".bin.tmp")
        self._file = open(self._tmp_bin, "wb")
        self._pos = 0
        self.keys: list[str] = []
        self.skipped: list[dict] = []
        self.used: list[dict] = []  # the product each cell's tiles were cut from, per modality (prepare)
        self.class_counts: list[np.ndarray] = []
        self._offset = {m: [] for m in bands}
        self._nbytes = {m: [] for m in bands}
        self._crc = {m: [] for m in bands}
        self._sum = {m: np.zeros(len(b)) for m, b in bands.items()}
        self._sumsq = {m: np.zeros(len(b)) for m, b in bands.items()}
        self._count = {m: np.zeros(len(b), np.int64) for m, b in bands.items()}
        self._nodata = {m: np.zeros(len(b), np.int64) for m, b in bands.items()}
        self.empty_tiles = dict.fromkeys(bands, 0)

    def add(self, key: str, tiles: dict[str, np.ndarray], class_counts: np.ndarray,
            nodata: dict[str, np.ndarray] | None = None) -> None:
        """tiles: modality -> (C, T, T) array in the storage dtype; class_counts (11,) pixel counts; nodata:
        modality -> (C, T, T) bool mask of pixels left out of the statistics (default: none)."""
        t = self.tile_size
        for m, bands in self.bands.items():
            c = len(bands)
            off, nb, crc = np.full(c, -1, np.int64), np.zeros(c, np.int64), np.zeros(c, np.uint32)
            tile = tiles.get(m)
            if tile is not None:
                want = np.dtype(MODALITIES[m].dtype)
                if tile.shape != (c, t, t) or tile.dtype != want:
                    raise ValueError(f"record {key}: {m} tile must be ({c}, {t}, {t}) {want}, "
                                     f"got {tile.shape} {tile.dtype}")
                values = tile.astype(np.float64).reshape(c, -1)
                valid = ~nodata[m].reshape(c, -1) if nodata and m in nodata else np.ones_like(values, bool)
                self._sum[m] += np.where(valid, values, 0.0).sum(axis=1)
                self._sumsq[m] += np.where(valid, np.square(values), 0.0).sum(axis=1)
                self._count[m] += valid.sum(axis=1)
                self._nodata[m] += t * t - valid.sum(axis=1)
                for b in range(c):
                    data = np.ascontiguousarray(tile[b]).tobytes()
                    if self.codec == "lz4":
                        data = _lz4().compress(data, store_size=False)
                    off[b], nb[b], crc[b] = self._pos, len(data), zlib.crc32(data)
                    self._file.write(data)
                    self._pos += len(data)
            self._offset[m].append(off)
            self._nbytes[m].append(nb)
            self._crc[m].append(crc)
        self.keys.append(key)
        self.class_counts.append(np.asarray(class_counts, np.int64).reshape(NUM_CLASSES))

    def abort(self) -> None:
        """Drop the unfinished shard: close and remove its temporary files, so a failed job leaves none (closing
        flushes what is buffered, which fails again on a full disk: the files go all the same)."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self._tmp_bin.unlink(missing_ok=True)
            self.stem.with_suffix(".npz.tmp").unlink(missing_ok=True)

    def close(self) -> Path:
        """Write the .npz beside the .bin as temporary files, then publish both, .npz last. Both are written first, so
        a full disk leaves no .bin without its index; a shard being redone loses its old .npz first, so no crash
        leaves the new .bin beside the old index as if finished."""
        self._file.close()
        n = len(self.keys)
        arrays = {"keys": np.asarray(self.keys, dtype=str),
                  "class_counts": np.asarray(self.class_counts, np.int64).reshape(n, NUM_CLASSES),
                  "fingerprint": np.asarray(self.fingerprint), "codec": np.asarray(self.codec),
                  "skipped": np.asarray(json.dumps(self.skipped)), "used": np.asarray(json.dumps(self.used))}
        for m, bands in self.bands.items():
            c = len(bands)
            arrays[f"{m}.offset"] = np.asarray(self._offset[m], np.int64).reshape(n, c)
            arrays[f"{m}.nbytes"] = np.asarray(self._nbytes[m], np.int64).reshape(n, c)
            arrays[f"{m}.crc32"] = np.asarray(self._crc[m], np.uint32).reshape(n, c)
            arrays[f"{m}.sum"], arrays[f"{m}.sumsq"] = self._sum[m], self._sumsq[m]
            arrays[f"{m}.count"], arrays[f"{m}.nodata"] = self._count[m], self._nodata[m]
            arrays[f"{m}.empty_tiles"] = np.asarray(self.empty_tiles[m], np.int64)

        tmp_npz = self.stem.with_suffix(".npz.tmp")
        with open(tmp_npz, "wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
            np.savez(f, **arrays)
        self.stem.with_suffix(".npz").unlink(missing_ok=True)
        publish(self._tmp_bin, self.stem.with_suffix(".bin"))
        publish(tmp_npz, self.stem.with_suffix(".npz"))
        return self.stem.with_suffix(".npz")


def payload_end(z) -> int:
    """Bytes the .bin of an opened .npz must hold: the end of its last chunk."""
    ends = [(z[k] + z[k.replace(".offset", ".nbytes")]).max(initial=0) for k in z if k.endswith(".offset")]
    return int(max(ends, default=0))


def finished_fingerprint(directory: Path, index: int) -> str | None:
    """The fingerprint of a finished shard, or None when it is missing, unreadable (every array of its .npz is
    read, so a damaged member is found here, not when the index is merged) or its .bin is not as long as its
    index says (a truncated write: to be rewritten)."""
    stem = Path(directory) / shard_name(index)
    if not (stem.with_suffix(".npz").exists() and stem.with_suffix(".bin").exists()):
        return None
    try:
        with np.load(stem.with_suffix(".npz")) as z:
            arrays = {k: z[k] for k in z.files}
        if stem.with_suffix(".bin").stat().st_size != payload_end(arrays):
            return None
        return str(arrays["fingerprint"])
    except (*NPZ_READ_ERRORS, KeyError, TypeError):
        return None


@dataclass
class ModalityInfo:
    bands: tuple[str, ...]
    dtype: str
    mean: np.ndarray  # (C,) float32, over all pixels of all tiles
    std: np.ndarray   # (C,) float32


class ShardSet:
    """Read side of a shard directory: index arrays for all records and tile reads (raw or decoded)."""

    def __init__(self, shard_dir: str | Path, verify_checksums: bool = True, allow_index_mismatch: bool = False):
        self.root = Path(shard_dir)
        path = self.root / INDEX_NAME
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise ShardError(f"shard directory {self.root} {what}; set data.shard_dir to the --out folder of "
                             "`terrafm prepare` (or leave it unset for the bundled sample tiles)")
        if not path.exists():
            raise ShardError(f"{path} not found: {self.root} is not a finished terrafm shard directory "
                             "(run `terrafm prepare INPUT... --out DIR`)")
        try:
            self.meta = load_json(path)
        except OSError as err:
            raise ShardError(f"{path} is not readable ({err.strerror or err}); re-run `terrafm prepare` into this "
                             "folder") from err
        except ValueError as err:
            raise ShardError(f"{path} is not valid JSON ({err}); re-run `terrafm prepare` into this folder") from err
        if not isinstance(self.meta, dict):
            raise ShardError(f"{path}: holds a JSON {type(self.meta).__name__}, expected an object; re-run "
                             "`terrafm prepare` into this folder")
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ShardError(f"{path}: expected format {FORMAT} version {VERSION}, got "
                             f"{self.meta.get('format')} {self.meta.get('version')}")
        _check_index(path, self.meta)
        self.tile_size = int(self.meta["tile_size"])
        self.codec = self.meta["codec"]
        self.s1_scaling = self.meta.get("s1_scaling", "linear")  # shards written before dB was the default
        self.verify_checksums = verify_checksums
        self.modalities = {m: ModalityInfo(tuple(v["bands"]), v["dtype"], np.asarray(v["mean"], np.float32),
                                           np.asarray(v["std"], np.float32))
                           for m, v in self.meta["modalities"].items()}
        if not self.meta["shards"]:
            raise ShardError(f"{self.root / INDEX_NAME}: lists no shards (the conversion wrote no record); re-run "
                             "`terrafm prepare` into this folder")
        parts = [self._open_part(s) for s in self.meta["shards"]]
        for entry, part in zip(self.meta["shards"], parts, strict=True):
            self._check_chunks(entry["name"], part)
        self._cross_check(parts, allow_index_mismatch)
        self._bin_needed = [payload_end(p) for p in parts]  # bytes each .bin must still hold when first read
        self._normalise_empty_bands(parts)
        self._warn_far_fill()
        self.keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, str)
        self.class_counts = np.concatenate([p["class_counts"] for p in parts]).reshape(-1, NUM_CLASSES)
        self.shard_of = np.concatenate([np.full(len(p["keys"]), i, np.int32) for i, p in enumerate(parts)])
        self.offset = {m: np.concatenate([p[f"{m}.offset"] for p in parts]) for m in self.modalities}
        self.nbytes = {m: np.concatenate([p[f"{m}.nbytes"] for p in parts]) for m in self.modalities}
        self.crc32 = {m: np.concatenate([p[f"{m}.crc32"] for p in parts]) for m in self.modalities}
        self._bin_names = [self.root / f"{s['name']}.bin" for s in self.meta["shards"]]
        self._bin_stat: dict[int, tuple] = {}  # shard -> (device, inode, size, mtime_ns) at its first read
        self._no_open_bins()
        self._verified = {m: np.zeros(self.nbytes[m].shape, bool) for m in self.modalities}  # (record, band)

    def _open_part(self, entry: dict) -> dict[str, np.ndarray]:
        path = self.root / f"{entry['name']}.npz"
        try:
            check_regular(path)
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except NPZ_READ_ERRORS as err:
            raise ShardError(f"{path}: unreadable shard index ({type(err).__name__}: {err}); the shard is "
                             "corrupt or missing, re-run `terrafm prepare` into this folder") from err

    def _check_chunks(self, name: str, part: dict[str, np.ndarray]) -> None:
        """Each .npz has the arrays of index.json's modalities, and raw chunks are T*T*itemsize bytes."""
        path = self.root / f"{name}.npz"
        for key in ("keys", "class_counts"):
            if key not in part:
                raise ShardError(f"{path}: no {key!r} array; the shard is not a terrafm shard, re-run "
                                 "`terrafm prepare` into this folder")
        n = len(part["keys"]) if part["keys"].ndim == 1 else -1
        counts = part["class_counts"]
        if n < 0 or not np.issubdtype(counts.dtype, np.integer) or counts.size != n * NUM_CLASSES:
            raise ShardError(f"{path}: 'class_counts' is {counts.dtype} of shape {counts.shape}, not integer counts "
                             f"of the {NUM_CLASSES} land-cover classes for each of its {max(n, 0)} records; the shard "
                             "is corrupt or not a terrafm shard, re-run `terrafm prepare` into this folder")
        if (counts < 0).any():
            raise ShardError(f"{path}: negative land-cover pixel counts in 'class_counts'; the shard is corrupt, "
                             "re-run `terrafm prepare` into this folder")
        written = str(part["codec"]) if "codec" in part else self.codec
        if written != self.codec:  # raw chunks read as LZ4 (or back) failed at the first read, blaming the .bin
            raise ShardError(f"{path} was written with codec {written!r}, but {INDEX_NAME} says {self.codec!r}: an "
                             f"edited or mixed {INDEX_NAME}; re-run `terrafm prepare` into this folder")
        for m, info in self.modalities.items():
            for key in (f"{m}.offset", f"{m}.nbytes", f"{m}.crc32"):
                if key not in part or part[key].shape != (n, len(info.bands)):
                    raise ShardError(f"{path}: no {key!r} array of {len(info.bands)} bands per record, as "
                                     f"{INDEX_NAME} lists for {m}; re-run `terrafm prepare` into this folder")
                if not np.issubdtype(part[key].dtype, np.integer):
                    raise ShardError(f"{path}: {key!r} holds {part[key].dtype}, not integers; the shard is corrupt "
                                     "or not a terrafm shard, re-run `terrafm prepare` into this folder")
            want = self.tile_size ** 2 * np.dtype(info.dtype).itemsize
            sizes = part[f"{m}.nbytes"][part[f"{m}.offset"] >= 0]
            # an LZ4 block holds at most 255 bytes per byte (a match grows by 255 a byte) and grows its input by at
            # most 1/255 + 16 bytes: a tile_size edited past either allocated gigabytes, blamed on the machine
            wrong = (sizes != want if self.codec == "raw" else
                     (sizes * LZ4_MAX_RATIO + 16 < want) | (sizes > want + want // 255 + 16))
            if wrong.any():
                what = "make" if self.codec == "raw" else "make tiles that LZ4 chunks of that size cannot hold:"
                raise ShardError(f"{path}: {m} chunks of {int(sizes[wrong][0])} bytes, but {INDEX_NAME}'s tile_size "
                                 f"{self.tile_size} and dtype {info.dtype} {what} {want}; {INDEX_NAME} does not "
                                 "belong to these shards, re-run `terrafm prepare` into this folder")

    def _cross_check(self, parts: list[dict], allow_mismatch: bool) -> None:
        """index.json vs each .npz vs the files on disk; any difference is an error, or a warning with counts."""
        listed = {s["name"] for s in self.meta["shards"]}
        problems = [f"{p.name} is on disk but not in {INDEX_NAME}" for p in sorted(self.root.glob("part-*.npz"))
                    if p.stem not in listed]
        for entry, z in zip(self.meta["shards"], parts, strict=True):
            n = len(z["keys"])
            if entry.get("records", n) != n:
                problems.append(f"{entry['name']}: {INDEX_NAME} says {entry['records']} records, the .npz has {n}")
            bin_path = self.root / f"{entry['name']}.bin"
            size = bin_path.stat().st_size if bin_path.exists() else None
            if size is None:
                problems.append(f"{bin_path.name} is missing")
            elif size != payload_end(z):
                problems.append(f"{bin_path.name} has {size} bytes, its .npz needs {payload_end(z)}")
            elif entry.get("bytes", size) != size:  # a shard rewritten since index.json was written
                problems.append(f"{bin_path.name} has {size} bytes, {INDEX_NAME} says {entry['bytes']}")
        total = sum(len(z["keys"]) for z in parts)
        if self.meta.get("num_records", total) != total:
            problems.append(f"{INDEX_NAME} says {self.meta['num_records']} records, its shards hold {total}")
        problems += self._statistics_problems(parts)
        if not problems:
            return
        message = (f"shard directory {self.root} does not match its {INDEX_NAME} ({len(problems)} problem(s), "
                   f"{len(parts)} shards / {total} records listed): {'; '.join(problems)}")
        if not allow_mismatch:
            raise ShardError(f"{message}. Re-run `terrafm prepare` into this folder, or (terrafm pretrain) set "
                             "data.allow_index_mismatch=true to train on the listed records anyway")
        lost = self._drop_chunks_not_on_disk(parts)
        warnings.warn(f"{message}; training on the {total} listed records (data.allow_index_mismatch=true)"
                      + (f", {lost} of them without the tiles their missing or short .bin held" if lost else ""),
                      stacklevel=3)

    def _redo(self, i: int) -> str:
        """How to rewrite record i's shard: a re-run of prepare resumes a shard whose .bin has its length, so the
        corrupt one must go first."""
        stem = self._bin_names[self.shard_of[i]].with_suffix("")
        return (f"delete {stem}.bin and {stem}.npz and re-run the same `terrafm prepare` command (it redoes that shard "
                "only; a re-run alone resumes it, corrupt)")

    def _statistics_problems(self, parts: list[dict]) -> list[str]:
        """index.json's band means and stds against the sums each .npz carries: an index.json of another conversion
        with the same record counts (say --s1-scaling linear over dB shards), a part copied in from one, or an edited
        std normalised every tile with the wrong statistics in silence (S1 at mean -91 std; B04 up to 5737)."""
        problems = []
        for m, info in self.modalities.items():
            keys = (f"{m}.sum", f"{m}.count")
            if not parts or not all(k in z for z in parts for k in keys):
                continue  # shards written before these were stored
            total = sum(np.asarray(z[f"{m}.sum"], np.float64) for z in parts)
            if np.shape(total) != info.mean.shape:
                continue
            count = sum(np.broadcast_to(np.asarray(z[f"{m}.count"], np.float64), total.shape) for z in parts)
            mean = total / np.maximum(count, 1)
            off = [b for b in range(len(info.bands)) if count[b] > 0
                   and abs(mean[b] - info.mean[b]) > 1e-3 * max(float(info.std[b]), 1e-6) + 1e-5 * abs(mean[b])]
            if off:
                b = off[0]
                problems.append(f"{INDEX_NAME} gives {m} {info.bands[b]} mean {info.mean[b]:.6g}, its shards' pixels "
                                f"{mean[b]:.6g} ({len(off)} band(s) differ: an index of another conversion?)")
                continue
            if not all(f"{m}.sumsq" in z for z in parts):
                continue
            sumsq = sum(np.asarray(z[f"{m}.sumsq"], np.float64) for z in parts)
            std = np.sqrt(np.maximum(sumsq / np.maximum(count, 1) - mean ** 2, 0.0))
            std = np.where(std > 0, std, 1.0)  # as prepare writes it
            off = [b for b in range(len(info.bands)) if count[b] > 0
                   and abs(std[b] - info.std[b]) > 1e-3 * std[b] + 1e-6]
            if off:
                b = off[0]
                problems.append(f"{INDEX_NAME} gives {m} {info.bands[b]} std {info.std[b]:.6g}, its shards' pixels "
                                f"{std[b]:.6g} ({len(off)} band(s) differ: an edited index or one of another "
                                "conversion?)")
        return problems

    def _drop_chunks_not_on_disk(self, parts: list[dict]) -> int:
        """Mark a record's modality absent where its chunks end past its .bin (missing, emptied, truncated), so
        no read meets the missing bytes; returns how many records lost a modality."""
        lost = np.zeros(sum(len(z["keys"]) for z in parts), bool)
        start = 0
        for entry, z in zip(self.meta["shards"], parts, strict=True):
            bin_path = self.root / f"{entry['name']}.bin"
            size = bin_path.stat().st_size if bin_path.exists() else 0
            n = len(z["keys"])
            for m in self.modalities:
                offset, nbytes = z[f"{m}.offset"], z[f"{m}.nbytes"]
                gone = (offset[:, 0] >= 0) & ((offset + nbytes).max(axis=1, initial=0) > size)
                offset[gone], nbytes[gone] = -1, 0
                lost[start:start + n] |= gone
            start += n
        return int(lost.sum())

    def _normalise_empty_bands(self, parts: list[dict]) -> None:
        """A band with no valid pixel in any tile: its stored pixels all hold the nodata fill (the band's reference
        mean, ~1390 for S2 B01); normalise it with the fill as its mean and std 1, so those pixels reach the model
        as 0, and say so. prepare records these statistics itself; shards written before recorded mean 0."""
        for m, info in self.modalities.items():
            if m not in MODALITIES or not all(f"{m}.count" in z for z in parts):
                continue
            tiles = sum(int((z[f"{m}.offset"][:, 0] >= 0).sum()) for z in parts)
            valid = sum((np.asarray(z[f"{m}.count"], np.int64) for z in parts), np.zeros(len(info.bands), np.int64))
            empty = [b for b, band in enumerate(info.bands) if valid[b] == 0 and band in MODALITIES[m].bands]
            if tiles == 0 or not empty:
                continue
            fill = nodata_fill(m, self.s1_scaling)
            for b in empty:
                info.mean[b], info.std[b] = fill[MODALITIES[m].bands.index(info.bands[b])], 1.0
            warnings.warn(f"{self.root}: {m} band(s) {[info.bands[b] for b in empty]} have no valid pixel in any "
                          "tile (all nodata); they are normalised to 0", stacklevel=3)

    def _warn_far_fill(self, limit: float = 3.0) -> None:
        """Masked pixels hold the band's reference mean (nodata_fill), which normalises to about 0 only where the
        shards' own statistics are near the reference ones (global Major-TOM); say which bands put them more than
        `limit` std away, where the model sees nodata areas as a constant block with an edge."""
        far = []
        for m, info in self.modalities.items():
            counts = self.meta.get("modalities", {}).get(m, {}).get("nodata_pixels")
            if m not in MODALITIES or not isinstance(counts, list) or len(counts) != len(info.bands):
                continue
            fill = nodata_fill(m, self.s1_scaling)
            for b, band in enumerate(info.bands):
                if not counts[b] or band not in MODALITIES[m].bands:
                    continue
                z = (fill[MODALITIES[m].bands.index(band)] - info.mean[b]) / info.std[b]
                if abs(z) > limit:
                    far.append(f"{m} {band} {z:+.1f} std ({counts[b]} pixels)")
        if far:
            warnings.warn(f"{self.root}: masked (nodata) pixels hold the reference mean, which these shards' own "
                          f"statistics put far from the band mean: {', '.join(far)}; the model sees those areas as a "
                          "constant block with an edge (docs/data.md, nodata)", stacklevel=3)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def class_frequency(self) -> np.ndarray:
        """(11,) float64 share of each WorldCover class over all pixels of all tiles."""
        total = self.class_counts.sum(axis=0).astype(np.float64)
        return total / max(total.sum(), 1.0)

    def has(self, i: int, modality: str) -> bool:
        return modality in self.offset and bool(self.offset[modality][i, 0] >= 0)

    def _read(self, i: int, modality: str, band_index: np.ndarray) -> np.ndarray:
        """The bytes of record i's `modality` chunks `band_index` (the span from the first to the last of them), read
        from its .bin.

        Read, not memory-mapped: a mapped file truncated or rewritten in place under a run (a copy over a folder in
        use), or an I/O error of a network file system, killed the process with SIGBUS; a read comes back short or
        raises instead. It costs more host time than a copy out of a mapping (docs/bench.md, data paths). The file's
        identity, size and mtime must stay what they were at the run's first read of it (maybe hours after the shards
        were opened)."""
        shard = int(self.shard_of[i])
        path, needed = self._bin_names[shard], self._bin_needed[shard]
        off, nb = self.offset[modality][i, band_index], self.nbytes[modality][i, band_index]
        start, end = int(off.min()), int((off + nb).max())
        buf = np.empty(end - start, np.uint8)
        view, pos = memoryview(buf), start
        try:
            entry = self._open_bin(shard)
            try:
                while pos < end and (got := os.preadv(entry[0], [view[pos - start:]], pos)):
                    pos += got
                st = os.fstat(entry[0])
            finally:
                self._close_bin(entry)
        except OSError as err:
            raise ShardError(f"cannot read {path} ({err.strerror or err}); it was readable when the run opened the "
                             "shards") from err
        if st.st_size < needed:
            raise ShardError(f"{path} has {st.st_size} bytes, its chunks need {needed}: it changed after the run "
                             f"opened the shards ({CHANGED_HINT})")
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        first = self._bin_stat.setdefault(shard, seen)
        if pos < end or seen != first:
            what = "replaced by another file" if seen[:2] != first[:2] else f"modified (now {st.st_size} bytes)"
            raise ShardError(f"{path} was {what} after the run first read it; record {i} ({self.keys[i]}) is bytes "
                             f"{start}-{end} ({CHANGED_HINT})")
        return buf

    def _no_open_bins(self) -> None:
        """This process's open .bin files: none yet."""
        self._bins: OrderedDict[int, list] = OrderedDict()  # shard -> [fd, readers, evicted], least recent first
        self._bins_lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Pickled for a spawned loader worker: without this process's descriptors and lock (a lock does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_bins", "_bins_lock", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._no_open_bins()

    def _open_bin(self, shard: int) -> list:
        """[descriptor, readers, evicted] of a shard's .bin for one read: OPEN_BINS stay open, the least recently read
        is closed once no read uses it. A forked loader worker starts its own (the parent's lock may have been held by
        another thread at the fork; the inherited descriptors are its copies to close)."""
        if self._pid != os.getpid():
            for fd, _, _ in self._bins.values():
                os.close(fd)
            self._no_open_bins()
        with self._bins_lock:
            # O_NONBLOCK: a FIFO in place of a .bin opens at once (and fails its first read) instead of blocking
            # until a writer comes; reads of a regular file ignore the flag
            entry = self._bins.pop(shard, None) or [os.open(self._bin_names[shard], os.O_RDONLY | os.O_NONBLOCK), 0,
                                                    False]
            entry[1] += 1
            self._bins[shard] = entry
            while len(self._bins) > OPEN_BINS:
                old = self._bins.popitem(last=False)[1]
                old[2] = True
                if old[1] == 0:
                    os.close(old[0])
            return entry

    def _close_bin(self, entry: list) -> None:
        with self._bins_lock:
            entry[1] -= 1
            if entry[2] and entry[1] == 0:
                os.close(entry[0])

    def __del__(self):
        for fd, _, _ in getattr(self, "_bins", {}).values():
            os.close(fd)

    def _verify(self, i: int, modality: str, data: np.ndarray, band_index: np.ndarray, offsets: np.ndarray,
                sizes: np.ndarray) -> None:
        """crc32 of record i's `modality` chunks `band_index` (read as `data`), each once per process."""
        if not self.verify_checksums:
            return
        for b, o, n in zip(band_index, offsets, sizes, strict=True):
            if self._verified[modality][i, b]:
                continue
            got = zlib.crc32(data[o:o + n])
            if got != self.crc32[modality][i, b]:
                raise ChecksumError(
                    f"{self._bin_names[self.shard_of[i]]}: record {i} ({self.keys[i]}) {modality} band "
                    f"{self.modalities[modality].bands[b]}: crc32 {got:#010x} != stored "
                    f"{int(self.crc32[modality][i, b]):#010x}; the shard is corrupt, {self._redo(i)}")
            self._verified[modality][i, b] = True

    def chunks(self, i: int, modality: str, band_index: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """The stored chunks of record i's `modality` bands `band_index` (default all), as DALI's inflate takes them.

        Returns (data, offsets, sizes): data a uint8 array of the span from the first to the last of these chunks
        (one read of the .bin: the other bands' chunks are read only where they lie between them), offsets / sizes
        (C,) int32 of each chunk in `data`, in band_index order. Decoded,
        chunk k is a C-order (T, T) array of the modality's storage dtype (raw: the bytes themselves; lz4:
        one LZ4 block without size prefix or frame, what nvCOMP's batched LZ4 decodes).
        """
        if not self.has(i, modality):
            raise KeyError(f"record {i} ({self.keys[i]}) has no {modality!r} tile")
        band_index = np.arange(self.offset[modality].shape[1]) if band_index is None else np.asarray(band_index)
        data = self._read(i, modality, band_index)
        off, nb = self.offset[modality][i, band_index], self.nbytes[modality][i, band_index]
        offsets = off - int(off.min())
        self._verify(i, modality, data, band_index, offsets, nb)
        return data, offsets.astype(np.int32), nb.astype(np.int32)

    def tile(self, i: int, modality: str) -> np.ndarray:
        """(C, T, T) tile of record i in its storage dtype (uint16 / float16)."""
        data, offsets, sizes = self.chunks(i, modality)
        dtype = np.dtype(self.modalities[modality].dtype)
        c, t = len(offsets), self.tile_size
        if self.codec == "raw":
            return data[:c * t * t * dtype.itemsize].view(dtype).reshape(c, t, t)
        try:
            return decode_chunks(data, offsets, sizes, (t, t), dtype)
        except ChunkDecodeError as err:
            raise ShardError(f"{self._bin_names[self.shard_of[i]]}: record {i} ({self.keys[i]}) {modality} band "
                             f"{self.modalities[modality].bands[err.chunk]} does not decode ({err}); the shard is "
                             f"corrupt, {self._redo(i)}") from err


def nodata_fill(modality: str, s1_scaling: str) -> np.ndarray:
    """(C,) float32: the value `terrafm prepare` stores in a masked pixel of each band of `modality` (its reference
    mean in the stored scaling, cast to the storage dtype; terrafm.data.sources.storage_tile)."""
    fill = np.asarray(REFERENCE_STATS[modality]["mean"], np.float64)
    if modality == "s1" and s1_scaling == "linear":
        fill = 10.0 ** (fill / 10.0)
    dtype = np.dtype(MODALITIES[modality].dtype)
    return (np.round(fill) if dtype.kind == "u" else fill).astype(dtype).astype(np.float32)


class ChunkDecodeError(ValueError):
    """Chunk `chunk` of a decode_chunks call is not an LZ4 block of the expected size."""

    def __init__(self, chunk: int, message: str):
        super().__init__(message)
        self.chunk = chunk


def decode_chunks(data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, shape: tuple[int, ...],
                  dtype: np.dtype) -> np.ndarray:
    """Host LZ4 decode with fn.decoders.inflate's contract: chunk k = data[offsets[k]:offsets[k] + sizes[k]] is
    one raw LZ4 block that inflates to `shape` of `dtype`; the result is (len(offsets), *shape)."""
    block = _lz4()
    dtype = np.dtype(dtype)
    out = np.empty((len(offsets), *shape), dtype)
    nbytes = out[0].nbytes if len(out) else 0
    for k, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
        try:
            raw = block.decompress(memoryview(data)[o:o + n], uncompressed_size=nbytes)
        except block.LZ4BlockError as err:
            raise ChunkDecodeError(k, str(err)) from err
        if len(raw) != nbytes:
            raise ChunkDecodeError(k, f"inflates to {len(raw)} bytes, not the {nbytes} of {shape} {dtype}")
        out[k] = np.frombuffer(raw, dtype).reshape(shape)
    return out


def _check_index(path: Path, meta: dict) -> None:
    """ShardError naming index.json and the key when a value the reader needs is missing or of another kind."""
    def bad(key: str, expected: str) -> ShardError:
        return ShardError(f"{path}: {key} is missing or not {expected}; re-run `terrafm prepare` into this folder")

    tile = meta.get("tile_size")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise bad("tile_size", "a positive integer")
    if meta.get("codec") not in CODECS:
        raise bad("codec", f"one of {CODECS}")
    if meta.get("s1_scaling", "linear") not in S1_SCALINGS:
        raise bad("s1_scaling", f"one of {S1_SCALINGS}")
    if not isinstance(meta.get("modalities"), dict):
        raise bad("modalities", "an object")
    for m, v in meta["modalities"].items():
        if not isinstance(v, dict):
            raise bad(f"modalities.{m}", "an object")
        bands = v.get("bands")
        if not (isinstance(bands, list) and bands and all(isinstance(b, str) for b in bands)):
            raise bad(f"modalities.{m}.bands", "a list of band names")
        if not isinstance(v.get("dtype"), str) or v["dtype"] not in np.sctypeDict:
            raise bad(f"modalities.{m}.dtype", "a numpy dtype name")
        if m in MODALITIES and v["dtype"] != MODALITIES[m].dtype:
            raise bad(f"modalities.{m}.dtype", f"{MODALITIES[m].dtype!r}, the storage dtype of {m} in this format "
                      f"(it says {v['dtype']!r})")
        for key in ("mean", "std"):
            stat = v.get(key)
            if not (isinstance(stat, list) and len(stat) == len(bands)
                    and all(isinstance(x, int | float) and math.isfinite(x) for x in stat)):
                raise bad(f"modalities.{m}.{key}", f"a list of {len(bands)} numbers (one per band), all finite")
        if min(v["std"]) <= 0:
            raise bad(f"modalities.{m}.std", f"positive (it says {v['std']}: pixels would be divided by zero)")
    s1 = meta["modalities"].get("s1")
    if isinstance(s1, dict):  # the nodata fill, checkpoints, export and eval's unit conversion follow s1_scaling
        scaling = meta.get("s1_scaling", "linear")
        units = str(s1.get("units", ""))
        said = "db" if units.startswith("dB") else "linear" if units.startswith("linear") else None
        if (said is not None and said != scaling) or (scaling == "linear" and min(s1["mean"]) < 0):
            raise ShardError(f"{path}: s1_scaling is {scaling!r} but its s1 statistics say otherwise (units "
                             f"{units!r}, means {s1['mean']}): an edited or mixed index.json; re-run `terrafm "
                             "prepare` into this folder")
    shard_list = meta.get("shards")
    if not (isinstance(shard_list, list) and all(isinstance(e, dict) and plain_name(e.get("name"))
                                                 for e in shard_list)):  # a path in it read another folder's shards
        raise bad("shards", 'a list of {"name": ...} objects, each name a shard of this folder (no path)')


def write_index(shard_dir: Path, meta: dict) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta,
            "classes": {"values": list(WORLDCOVER_VALUES), "names": list(WORLDCOVER_NAMES),
                        **meta.get("classes", {})}}
    atomic_write_bytes(Path(shard_dir) / INDEX_NAME, json.dumps(meta, indent=1).encode())
