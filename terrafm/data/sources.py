"""Inputs of `terrafm prepare`: Major-TOM Core parquet shards and Major-TOM-style GeoTIFF folders.

A *product* is one acquisition of one grid cell (one parquet row, or one folder
<root>/<row>/<grid_cell>/<product_id>/<band>.tif). Its modality comes from the product id
(MSIL2A -> s2_l2a, MSIL1C -> s2_l1c, S1* -> s1, *WorldCover* -> worldcover). Bands are read with
tifffile (compressed GeoTIFFs through imagecodecs) at their native resolution and brought to the 10 m grid
by pixel replication. A parquet file with the metadata columns but no band column (a collection's
metadata.parquet) is metadata, not data, wherever it sits.

Nodata: S2 pixels at 0, S1 pixels that are NaN/inf or at a fill value <= S1_FILL_MAX (-32768, -9999) or
>= HUGE_FILL_MIN (float32's max), and pixels at a GeoTIFF's own nodata value (its GDAL_NODATA tag, or the NoDataValue of
its GDAL PAM sidecar `B04.tif.aux.xml`, which wins as in GDAL) or outside its internal mask or `.msk` sidecar are
masked per band: they carry the modality's reference mean (modalities.REFERENCE_STATS, in the
stored scaling), so they normalise to about 0, and they are left out of the normalisation statistics.
"""

import io
import logging
import math
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile

from terrafm.data.landcover import class_counts
from terrafm.fileio import check_regular, file_format, format_from_magic
from terrafm.modalities import MODALITIES, REFERENCE_STATS, S2_NATIVE_M, s1_to_db

WORLDCOVER = "worldcover"
WORLDCOVER_BAND = "map"
META_COLUMNS = ("product_id", "grid_cell")
NO_MODALITY = "names no modality (expected MSIL2A / MSIL1C / S1* / WorldCover)"
NOT_IN_CELL = ("product folder is not inside a grid cell folder such as 433U_1209R (expected "
               "<row>/<grid_cell>/<product_id>/<band>.tif), so its place is unknown")
PRODUCT_AS_FILE = ("a product stored as one file in its grid cell folder; expected a folder "
                   "<grid_cell>/<product_id>/ of one-band files <band>.tif (split the stack into bands)")
MODEL_PIXEL_SCALE = 33550  # GeoTIFF ModelPixelScaleTag: (x, y, z) size of a pixel in the CRS's units
GDAL_NODATA = 42113  # TIFF tag (ASCII) of GDAL's per-file nodata value
MASK_SUBFILETYPE = 4  # NewSubfileType of a mask page (GDAL's internal nodata mask)
PAM_MAX_BYTES = 1 << 20  # a GDAL .aux.xml sidecar holds metadata and statistics: kilobytes; a larger one is refused
S1_FILL_MAX = -9999.0  # S1 values at or below this are fill (Major-TOM / RTC products use -32768 or -9999)
HUGE_FILL_MIN = 1e20  # float values at or above this are fill (float32's max, netCDF's default 9.97e36): no
#                       reflectance or backscatter comes near it


class BadInput(Exception):
    """An input record that cannot be converted; the message names the file, the record and what is wrong."""


@dataclass
class Product:
    modality: str            # s2_l2a | s2_l1c | s1 | worldcover
    grid_cell: str
    product_id: str
    source: str              # parquet file or product folder
    row: int = -1            # parquet row (-1 for folders)
    band_files: dict[str, str] = field(default_factory=dict)  # folder inputs: band -> .tif path

    @property
    def where(self) -> str:
        rec = f"row {self.row}, " if self.row >= 0 else ""
        return f"{self.source} ({rec}grid_cell {self.grid_cell}, product {self.product_id})"


def modality_of(product_id: str) -> str | None:
    if "MSIL2A" in product_id:
        return "s2_l2a"
    if "MSIL1C" in product_id:
        return "s2_l1c"
    if "WorldCover" in product_id:
        return WORLDCOVER
    if re.match(r"S1[ABCD]?_", product_id):
        return "s1"
    return None


# Sentinel-2 from processing baseline 04.00 (25 January 2022, and Collection-1 reprocessings) stores
# reflectance x 1e4 + 1000 (BOA_ADD_OFFSET / RADIO_ADD_OFFSET -1000 in the product metadata); earlier ones store
# reflectance x 1e4. The baseline is the product id's "_Nxxyy_" field.
S2_OFFSET_BASELINE = 400
S2_OFFSET_DN = 1000
S2_OFFSETS = ("keep", "remove")


def processing_baseline(product_id: str) -> int | None:
    """A Sentinel-2 product id's processing baseline as an int (N0400 -> 400), or None when it names none: no
    `_Nxxyy_` field, or N9999, the placeholder of products made outside ESA's processing chain (Major-TOM's
    Core-S2L2A has N9999 scenes of 2018-2021), which says nothing about the +1000 offset."""
    found = re.search(r"_N(\d{4})_", product_id)
    return int(found.group(1)) if found and found.group(1) != "9999" else None


def remove_s2_offset(cell: np.ndarray) -> np.ndarray:
    """Values of a baseline >= 04.00 product on the earlier scale: DN - 1000, at least 1 (a negative reflectance
    is not nodata), 0 (nodata) kept; same dtype."""
    shifted = np.maximum(cell.astype(np.float64) - S2_OFFSET_DN, 1)
    return np.where(cell > 0, shifted, 0).astype(cell.dtype)


def discover(inputs: list[Path]) -> tuple[list[Product], list[dict], list[str]]:
    """All products under the inputs (parquet files, folders of them, GeoTIFF product folders).

    Returns (products, unknown, metadata): unknown lists records whose product id names no modality or grid
    cell and parquet files that cannot be read, metadata the parquet files that hold product metadata but no
    bands (Major-TOM's metadata.parquet).
    """
    products, unknown, metadata = [], [], []
    seen = set()  # real paths of the parquet files and product folders read: inputs that overlap read each once
    for root in map(Path, inputs):
        if not root.exists():
            raise BadInput(f"input {root} does not exist")
        tif_dirs, twins = defaultdict(dict), defaultdict(list)
        files, folders, unreadable = walk(root)
        unknown += [{"file": str(folder), "record": "whole folder", "reason": f"cannot be listed: {reason}"}
                    for folder, reason in unreadable]
        for folder in folders:  # an empty product folder (or one of hidden files only) is a product without bands
            if _is_product_folder(folder):
                tif_dirs.setdefault(folder, {})
        blocked = set()
        for path in files:
            try:
                dangling = path.suffix.lower() in (".parquet", ".tif", ".tiff") and not path.exists()
                is_file = path.is_file()
            except OSError as err:  # a folder that can be listed but not entered: its files cannot be read
                unknown.append({"file": str(path), "record": "whole file",
                                "reason": f"cannot be read: {err.strerror or err}"})
                blocked.add(path.parent)
                continue
            if dangling:
                unknown.append({"file": str(path), "record": "whole file", "reason": "a symlink to nothing"})
            elif not is_file and path.suffix.lower() in (".parquet", ".tif", ".tiff") and not path.is_dir():
                # a FIFO, device or socket under a data name: left out in silence, its products were lost
                unknown.append({"file": str(path), "record": "whole file", "reason": "not a regular file"})
            elif not is_file:
                continue
            elif path.suffix.lower() in (".tif", ".tiff") and _is_grid_cell(path.parent.name) \
                    and modality_of(path.stem) is not None:  # <grid_cell>/<product_id>.tif: a stack, not a folder
                unknown.append({"file": str(path), "record": path.stem, "reason": PRODUCT_AS_FILE})
            elif path.suffix.lower() == ".parquet":
                if os.path.realpath(path) in seen:
                    continue
                seen.add(os.path.realpath(path))
                try:
                    if not _discover_parquet(path, products, unknown):
                        metadata.append(str(path))
                except BadInput as err:  # a whole file that cannot be read (a partial download): --skip-bad skips it
                    unknown.append({"file": str(path), "record": "whole file", "reason": str(err)})
            elif path.suffix.lower() in (".tif", ".tiff"):
                # B04.tif beside B04.tiff or b04.tif: which one is the band?
                twin = next((f for b, f in tif_dirs[path.parent].items() if b.lower() == path.stem.lower()), None)
                if twin:
                    twins[path.parent].append(f"{Path(twin).name} and {path.name}")
                tif_dirs[path.parent][path.stem] = str(path)
            elif in_product_folder(path):
                tif_dirs.setdefault(path.parent, {})  # a product folder holding only its thumbnail.png: no band
        for folder in blocked:  # reported file by file above, not again as a product missing every band
            if not tif_dirs.get(folder):
                tif_dirs.pop(folder, None)
        nested = _nested_products(root, tif_dirs)
        unknown += [{"file": str(folder), "record": folder.name, "reason": reason}
                    for folder, reason in sorted(nested.items())]
        for folder, bands in sorted(tif_dirs.items()):
            modality, in_cell = modality_of(folder.name), _is_grid_cell(folder.parent.name)
            if folder in nested or (modality is None and not in_cell):
                continue  # not <grid_cell>/<product_id>/: a thumbnail or sidecar in a cell or row folder
            if modality is None:
                unknown.append({"file": str(folder), "record": folder.name, "reason": f"product id {NO_MODALITY}"})
            elif not in_cell:  # its grid cell would be the parent's name: products of many places merged into one
                unknown.append({"file": str(folder), "record": folder.name, "reason": NOT_IN_CELL})
            elif folder in twins:
                unknown.append({"file": str(folder), "record": folder.name,
                                "reason": f"two files for one band ({'; '.join(twins[folder])}): keep one"})
            elif os.path.realpath(folder) not in seen:
                seen.add(os.path.realpath(folder))
                products.append(Product(modality, folder.parent.name, folder.name, str(folder), band_files=bands))
    once = {(os.path.realpath(u["file"]), u["record"]): u for u in reversed(unknown)}  # the first of each kept
    unknown = [u for u in unknown if once[(os.path.realpath(u["file"]), u["record"])] is u]
    return products, unknown, metadata


def _is_grid_cell(name: str) -> bool:
    """A Major-TOM grid cell folder name, such as 433U_1209R."""
    return re.fullmatch(r"\d+[UD]_\d+[LR]", name) is not None


def _is_product_folder(folder: Path) -> bool:
    """Whether a folder is <grid_cell>/<product_id>."""
    return modality_of(folder.name) is not None and _is_grid_cell(folder.parent.name)


def in_product_folder(path: Path) -> bool:
    """Whether a file sits where band files go: <grid_cell>/<product_id>/<file>."""
    return _is_product_folder(path.parent)


def _nested_products(root: Path, tif_dirs: dict[Path, dict]) -> dict[Path, str]:
    """{product folder: reason} for product folders of a grid cell that hold no band file of their own but .tif files
    in a subfolder (<product_id>/IMG_DATA/B04.tif, as SAFE-like exports write): the subfolder is no product, so the
    product was passed over in silence (or, beside a thumbnail.png, read as missing every band)."""
    subfolders = defaultdict(list)
    for folder, bands in tif_dirs.items():
        owner = next((a for a in folder.parents if a.is_relative_to(root) and _is_product_folder(a)), None)
        if not bands or owner is None:
            continue
        own = {b.lower() for b in tif_dirs.get(owner, {})}
        if not own & {b.lower() for b in expected_bands(modality_of(owner.name))}:
            subfolders[owner].append(folder)
    reasons = {}
    for owner, folders in subfolders.items():
        names = sorted(folder.relative_to(owner).as_posix() for folder in folders)
        files = sorted(Path(f).name for folder in folders for f in tif_dirs[folder].values())
        reasons[owner] = (f"band files are in the subfolder{'s' * (len(names) > 1)} {', '.join(names)} "
                          f"({len(files)} .tif files, e.g. {files[0]}); expected <product_id>/<band>.tif: "
                          "move them up into the product folder")
    return reasons


def list_files(root: Path) -> list[Path]:
    """Every file under root (or root itself): walk's files."""
    return walk(root)[0]


def walk(root: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(files, folders, unreadable) under root, following symlinked folders (data linked in from shared storage;
    pathlib's rglob skips them) and visiting each real folder once; hidden files and folders left out. unreadable
    lists the folders that could not be listed, with why (os.walk alone passes them over in silence)."""
    if not root.is_dir():
        return [root], [], []
    files, folders, unreadable, seen = [], [], [], set()

    def refused(err: OSError) -> None:
        unreadable.append((Path(err.filename), err.strerror or str(err)))
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=refused):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        folders.append(Path(folder))
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, .git, ...
        files += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(files), sorted(folders), sorted(unreadable)


def _band_columns() -> set[str]:
    names = {WORLDCOVER_BAND} | {b for m in MODALITIES.values() for b in m.bands}
    return names | {n.lower() for n in names}


def _twin_columns(names: list[str]) -> list[str]:
    """'B04 and b04' for each band that has two columns differing in case only: which one holds the band?"""
    bands, found = {b.lower() for b in _band_columns()}, defaultdict(list)
    for name in names:
        if name.lower() in bands:
            found[name.lower()].append(name)
    return [" and ".join(same) for same in found.values() if len(same) > 1]


def open_parquet(path: str | Path) -> pa.NativeFile:
    """A parquet file opened by its bytes: pyarrow encodes a str path as UTF-8, so a path with bytes that are not
    UTF-8 (allowed on Linux; os.fsdecode keeps them as surrogates) read as "not a readable parquet file". A FIFO or
    a device is an OSError (check_regular), not an open that waits for a writer."""
    check_regular(path)
    return pa.OSFile(os.fsencode(path))


def parquet_rows(path: str | Path) -> int | None:
    """The number of rows a parquet file's footer declares; None when it does not read."""
    try:
        return pq.ParquetFile(open_parquet(path)).metadata.num_rows
    except (OSError, ValueError, pa.ArrowException):
        return None


def _discover_parquet(path: Path, products: list[Product], unknown: list[dict]) -> bool:
    """Add the products of one parquet file; False when it is a metadata file (no band column). BadInput says what
    is wrong with a file that cannot be read (discover names the file); one whose first bytes are another format's
    is named as that (a Git LFS pointer, which `git clone` without git-lfs leaves in place of Major-TOM's files)."""
    try:
        schema = pq.read_schema(open_parquet(path))
    except Exception as err:
        kind = file_format(path, "a Parquet file")
        if kind:
            raise BadInput(f"not a parquet file: it is {kind}") from err
        raise BadInput(f"not a readable parquet file ({err})") from err
    if not _band_columns() & set(schema.names):
        return False
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:  # raw pyarrow writes them (pandas and Spark cannot); which one is the data is a guess
        raise BadInput(f"column name(s) {repeated} appear more than once: keep one of each")
    twins = _twin_columns(schema.names)
    if twins:
        raise BadInput(f"two columns for one band ({'; '.join(twins)}): keep one")
    missing = [c for c in META_COLUMNS if c not in schema.names]
    if missing:
        raise BadInput(f"missing Major-TOM metadata columns {missing} (has {schema.names[:8]}...)")
    for c in META_COLUMNS:
        kind = schema.field(c).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas categoricals; polars writes views
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise BadInput(f"column {c} has type {kind}, expected string (Major-TOM product ids / grid cells)")
    try:
        table = pq.read_table(open_parquet(path), columns=list(META_COLUMNS))
        # to_pylist decodes the strings: a corrupt data page can hold bytes that are not UTF-8 (UnicodeDecodeError)
        ids, cells = table["product_id"].to_pylist(), table["grid_cell"].to_pylist()
    except (OSError, ValueError, pa.ArrowException) as err:  # an intact footer over corrupt data pages
        raise BadInput(f"not a readable parquet file ({err})") from err
    for row, (pid, cell) in enumerate(zip(ids, cells, strict=True)):
        modality = modality_of(pid or "")
        if modality is None or not cell or not _is_grid_cell(cell):
            reason = (f"product id {pid!r} {NO_MODALITY}" if modality is None else "null or empty grid_cell"
                      if not cell else f"grid_cell {cell[:40]!r} is not a Major-TOM grid cell (such as 433U_1209R)")
            unknown.append({"file": str(path), "record": f"row {row}", "reason": reason})
            continue
        products.append(Product(modality, cell, pid, str(path), row=row))
    return True


def expected_bands(modality: str) -> tuple[str, ...]:
    return (WORLDCOVER_BAND,) if modality == WORLDCOVER else MODALITIES[modality].bands


def _column(band: str, modality: str, names: list[str]) -> str | None:
    """Parquet column for a band: Major-TOM writes S2 bands upper case (B04) and S1 lower case (vv)."""
    for name in (band, band.lower(), band.upper()):
        if name in names:
            return name
    return None


LARGE_ROW_GROUP_BYTES = 1 << 30  # band data of one row group that a worker holds in memory at once


def large_row_groups(paths: set[str]) -> list[tuple[str, int, int]]:
    """(file, products, bytes) of the parquet files whose largest row group holds more than one product and over
    LARGE_ROW_GROUP_BYTES of band data (uncompressed, from the footer): ParquetRows holds a whole group per file in
    each worker, so a file rewritten by pandas or polars (one group for all rows) can exhaust memory. Major-TOM
    writes one product per group. A file whose footer does not read here is passed over: reading its products names
    it (a damaged column path that is not UTF-8 stopped the run before any file was read, --skip-bad too)."""
    found, bands = [], _band_columns()
    for path in sorted(paths):
        rows, size = 0, 0
        try:
            meta = pq.ParquetFile(open_parquet(path)).metadata
            for g in map(meta.row_group, range(meta.num_row_groups)):
                group_size = sum(g.column(c).total_uncompressed_size for c in range(g.num_columns)
                                 if g.column(c).path_in_schema in bands)
                if group_size > size:
                    rows, size = g.num_rows, group_size
        except (OSError, ValueError, pa.ArrowException):
            continue
        if rows > 1 and size > LARGE_ROW_GROUP_BYTES:
            found.append((path, rows, size))
    return found


class ParquetRows:
    """Band bytes of parquet products, one row group at a time (the last group per file is cached, so a
    job walking cells in grid order reads each group once and holds one group per file in memory)."""

    def __init__(self):
        self._files: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._cache: dict[str, tuple[tuple[int, str], object]] = {}

    def bands(self, p: Product) -> dict[str, object]:
        """{band: GeoTIFF bytes or a BadInput} of one parquet product."""
        if p.source not in self._files:
            pf = pq.ParquetFile(open_parquet(p.source))
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            self._files[p.source] = (pf, np.cumsum([0] + sizes))
        pf, starts = self._files[p.source]
        group = int(np.searchsorted(starts, p.row, side="right") - 1)
        names = pf.schema_arrow.names
        key = (group, p.modality)
        if self._cache.get(p.source, (None, None))[0] != key:
            cols = [c for c in (_column(b, p.modality, names) for b in expected_bands(p.modality)) if c]
            self._cache[p.source] = (key, pf.read_row_group(group, columns=cols))
        table = self._cache[p.source][1]
        local = p.row - int(starts[group])
        out = {}
        for b in expected_bands(p.modality):
            col = _column(b, p.modality, names)
            value = table[col][local].as_py() if col else None
            out[b] = value if value is not None else BadInput(
                f"{p.where}: missing band {b} ({'no column' if col is None else 'null value'})")
        return out


def decode_band(data: bytes, band: str, product: Product, sidecar: np.ndarray | None = None,
                pam: dict[int, float | None] | None = None) -> np.ndarray:
    """One band's 2-D array; pixels at the GeoTIFF's own nodata value (GDAL_NODATA tag, or band 1's NoDataValue in
    its PAM sidecar, pam: pam_nodata, which wins as in GDAL: effective_nodata), outside its internal mask or outside
    its external one (sidecar: external_mask) are set to the modality's nodata (S2 and WorldCover 0, S1 NaN), so a
    file that declares another fill is masked like Major-TOM's."""
    if not isinstance(data, bytes):
        raise BadInput(f"{product.where}: band {band} holds {type(data).__name__}, expected GeoTIFF bytes (a binary "
                       "column as Major-TOM writes)")
    try:
        array, nodata, pixel_m, mask = read_tiff(io.BytesIO(data))
    except MemoryError as err:  # this machine's limit, not the file's fault: never a skipped "corrupt" product
        raise MemoryError(f"decoding {product.where}: band {band}") from err
    except Exception as err:
        if "imagecodecs" in str(err):
            raise BadInput(f"{product.where}: band {band}: the GeoTIFF is compressed with a codec that needs the "
                           f"imagecodecs package (pip install imagecodecs): {err}") from err
        kind = other_format(data)
        if kind:
            raise BadInput(f"{product.where}: band {band} is {kind}, not a GeoTIFF") from err
        raise BadInput(f"{product.where}: band {band}: truncated or corrupt GeoTIFF ({type(err).__name__}: {err})") \
            from err
    if array.ndim > 2 and sum(n > 1 for n in array.shape) == 2:
        array = array.reshape([n for n in array.shape if n > 1])  # one band written as (1, H, W) or (H, W, 1)
    if array.ndim != 2:
        raise BadInput(f"{product.where}: band {band}: expected one 2-D band, got shape {array.shape}")
    native = S2_NATIVE_M.get(band, 10)
    if pixel_m is not None and pixel_m > 1.5 * native:  # the size check only compares a product's bands
        raise BadInput(f"{product.where}: band {band} has {pixel_m:g} m pixels (its GeoTIFF's ModelPixelScale) where "
                       f"the band's native resolution is {native} m: the product was resampled to a coarser grid "
                       "(e.g. Sen2Cor's R20m / R60m folder); give each band at its native resolution or finer")
    if sidecar is not None:
        if sidecar.ndim == 3:
            raise BadInput(f"{product.where}: band {band}: its .msk sidecar holds {sidecar.shape[0]} per-band masks, "
                           "where a one-band file has one: not this band's mask")
        if sidecar.shape != array.shape:
            raise BadInput(f"{product.where}: band {band} is {array.shape[0]}x{array.shape[1]} px but its .msk sidecar "
                           f"{sidecar.shape[0]}x{sidecar.shape[1]}: not this band's mask")
        mask = sidecar if mask is None else mask | sidecar
    array = _apply_nodata_tag(array, effective_nodata(nodata, pam or {}), product.modality)
    return array if mask is None else _set_nodata(array, mask, product.modality)


def external_mask(path: str | Path) -> np.ndarray | None:
    """True where the `.msk` sidecar of a GeoTIFF (`B04.tif.msk`, which GDAL before 3.9 writes by default in place of
    an internal mask) marks no data: its first page is the full-resolution mask (later pages are the overviews'),
    0 at nodata. (H, W) for GDAL's per-dataset mask (one sample), (bands, H, W) for per-band masks (a sample per band
    of the image, interleaved or not). `B04.TIF.MSK` counts too (GDAL tries the upper-case name where the lower-case
    one is missing). None without a sidecar; a ValueError or OSError when it does not read."""
    sidecar = mask_sidecar(path)
    return None if sidecar is None else _read_tiff(sidecar, _first_page_mask)


def mask_sidecar(path: str | Path) -> Path | None:
    """The `.msk` sidecar of a GeoTIFF, `x.tif.msk` or else `x.tif.MSK`, when there is one."""
    found = (Path(f"{os.fsdecode(path)}{ext}") for ext in (".msk", ".MSK"))
    return next((sidecar for sidecar in found if sidecar.is_file()), None)


def _first_page_mask(tif: tifffile.TiffFile) -> np.ndarray:
    page = tif.pages.first
    _check_declared(page.shape, page.dtype)
    _check_chunks(page)
    mask = page.asarray() == 0
    if page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.CONTIG:
        mask = np.moveaxis(mask, -1, 0)  # (H, W, bands) -> (bands, H, W)
    return mask


def pam_nodata(path: str | Path) -> dict[int, float | None]:
    """{band number: nodata value} that the PAM sidecar of a GeoTIFF (`B04.tif.aux.xml`, where GDAL records a band's
    nodata it cannot write into the file: SetNoDataValue on a read-only file) declares: the <NoDataValue> of each
    <PAMRasterBand band="n"> of its <PAMDataset>, names matched without regard to case, as GDAL's XML reader does.
    A value reads as nodata_number reads the GDAL_NODATA tag's (None for NaN / inf); GDAL's le_hex_equiv attribute
    (the exact double, little-endian hex) wins over the text, as in GDAL (GDALPamRasterBand::XMLInit). Empty without
    a sidecar and for one without a NoDataValue (most hold statistics or metadata only). A ValueError that says what
    is wrong for a sidecar larger than PAM_MAX_BYTES, not XML, holding a DOCTYPE (refused, not expanded: GDAL writes
    none, so a damaged or hostile file), of another root, or with a NoDataValue that names no number; an OSError
    when it does not read."""
    sidecar = Path(f"{os.fsdecode(path)}.aux.xml")
    if not sidecar.is_file():
        return {}
    with open(sidecar, "rb") as f:
        data = f.read(PAM_MAX_BYTES + 1)
    if len(data) > PAM_MAX_BYTES:
        raise ValueError(f"it is larger than {PAM_MAX_BYTES >> 20} MiB, where GDAL's sidecars hold kilobytes of "
                         "metadata")
    root = _parse_xml(data)
    if root.tag.lower() != "pamdataset":
        raise ValueError(f"its root element is <{root.tag}>, not GDAL's <PAMDataset>")
    found = {}
    for element in root:
        if element.tag.lower() != "pamrasterband":
            continue
        try:
            band = int(_attribute(element, "band") or "0")
        except ValueError:
            continue  # GDAL skips a band it cannot number
        value = next((child for child in element if child.tag.lower() == "nodatavalue"), None)
        if value is not None:
            found[band] = _pam_value(value, band)
    return found


def _pam_value(element: ET.Element, band: int) -> float | None:
    """The nodata value of a PAM <NoDataValue> element (pam_nodata)."""
    hex_double = _attribute(element, "le_hex_equiv")
    try:
        raw = bytes.fromhex(hex_double or "")
    except ValueError:
        raw = b""  # GDAL falls back to the text when the hex is not 8 bytes
    if len(raw) == 8:
        value = struct.unpack("<d", raw)[0]
        return value if np.isfinite(value) else None
    try:
        return nodata_number(element.text or "")
    except ValueError:
        raise ValueError(f"band {band}'s NoDataValue {(element.text or '')[:40]!r} names no number") from None


def _attribute(element: ET.Element, name: str) -> str | None:
    return next((value for key, value in element.attrib.items() if key.lower() == name), None)


def _parse_xml(data: bytes) -> ET.Element:
    """The root element of an XML document, parsed by expat with no DTD: a DOCTYPE (and with it any entity
    declaration) is refused before anything in it is read, so no entity is ever expanded. A ValueError when the bytes
    are not XML."""
    def refuse(*_):
        raise ValueError("it holds a DOCTYPE (a DTD, which can declare entities); GDAL writes none: a damaged or "
                         "hostile file")

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise ValueError(f"not XML ({err})") from err
    return builder.close()


def effective_nodata(tag: float | None, pam: dict[int, float | None], band: int = 1) -> float | None:
    """A band's nodata value as GDAL reads it: the NoDataValue of its PAM sidecar (pam_nodata) where that has one for
    the band, even NaN (GDAL's GeoTIFF driver asks PAM first: GTiffRasterBand::GetNoDataValue), else the file's
    GDAL_NODATA tag (tiff_nodata)."""
    return pam[band] if band in pam else tag


def other_format(data: bytes) -> str | None:
    """What a blob that is not a TIFF is, from its leading bytes ('a PNG image', 'empty (0 bytes)'); None when
    unknown."""
    return format_from_magic(data, expected="a TIFF image")


def read_tiff(source) -> tuple[np.ndarray, float | None, float | None, np.ndarray | None]:
    """(array, declared nodata or None, pixel size in metres or None, internal nodata mask or None) of a GeoTIFF path
    or file object."""
    def read(tif: tifffile.TiffFile) -> tuple:
        image, mask = tiff_image(tif)
        return image, tiff_nodata(tif), tiff_pixel_m(tif), mask

    return _read_tiff(source, read)


def tiff_image(tif: tifffile.TiffFile) -> tuple[np.ndarray, np.ndarray | None]:
    """(image, nodata mask or None) of a GeoTIFF. GDAL's internal mask (a page of NewSubfileType 4 the image's size,
    1 or 8 bit, 0 where the image has no data) gives the mask, True at nodata; tifffile would stack an 8-bit one into
    an 8-bit image as a second band, so with a mask the image is the first page, where GDAL writes it. An image that
    decodes to no pixel (tifffile's answer to a damaged BitsPerSample, such as 0) is a ValueError, and so is a header
    that declares an image larger than this machine's memory (a damaged ImageWidth): no number of workers reads it, so
    it is not the MemoryError that prepare reports as the machine's limit."""
    first = tif.pages.first
    size = (first.imagelength, first.imagewidth)
    _check_declared(first.shape, first.dtype)
    _check_chunks(first)
    mask = next((page for page in tif.pages[1:] if int(page.subfiletype) == MASK_SUBFILETYPE
                 and (page.imagelength, page.imagewidth) == size), None)
    if mask is None:  # the whole series is read: a thousand pages of a small image each add up
        _check_declared(tif.series[0].shape, tif.series[0].dtype)
    image = tif.asarray() if mask is None else first.asarray()
    if image.size == 0:
        raise ValueError(f"the image decodes to no pixel (shape {image.shape}, {first.bitspersample} bits per sample): "
                         "a damaged header")
    return image, None if mask is None else mask.asarray() == 0


def _check_declared(shape: tuple[int, ...], dtype) -> None:
    """A ValueError for a TIFF header that declares more pixels than this machine's memory holds (a damaged
    ImageWidth, or a thousand empty pages): no number of workers reads it, so it is not the MemoryError that prepare
    reports as the machine's limit."""
    declared = math.prod(shape) * (dtype.itemsize if dtype is not None else 1)
    if declared > physical_memory():
        raise ValueError(f"its header declares a {' x '.join(map(str, shape))} image ({declared / 2**30:.0f} GiB), "
                         f"more than this machine's {physical_memory() / 2**30:.0f} GiB of memory: a damaged header")


def _check_chunks(page: tifffile.TiffPage) -> None:
    """A ValueError for a TIFF page that lists fewer strips or tiles than its declared size needs: a damaged ImageWidth
    or ImageLength (one changed byte made a 120 px band declare 40000 x 40000, whose decode allocated 3.2 GB before it
    failed, and failed as out of memory under a memory limit, which no rerun cures)."""
    needed, listed = math.prod(page.chunked), len(page.dataoffsets)
    if listed < needed:
        kind = "tiles" if page.is_tiled else "strips"
        raise ValueError(f"its header declares a {page.imagelength} x {page.imagewidth} image in {needed} {kind} but "
                         f"lists {listed}: a damaged header")


def physical_memory() -> int:
    """Bytes of memory this machine has (all of it, not what is free)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_tiff_layout(source) -> tuple[np.ndarray, float | None, bool | None]:
    """(array, declared nodata or None, samples last) of a GeoTIFF path or file object. samples last: True when the
    file interleaves several samples per pixel (PlanarConfiguration contig, as GDAL writes a multi-band GeoTIFF):
    the array is (H, W, C) whatever the sizes; False for separate sample planes, (C, H, W); None for a stack of
    single-sample pages, whose first axis is the pages (bands in a multi-page GeoTIFF, but rows when a (H, W, C)
    array was written naively: the caller decides). Pixels outside GDAL's internal mask (tiff_image) are NaN, in
    float32. tifffile logs a warning per damaged tag as it
    reads; they are silenced here, so that a bad file prints the one message its reader raises. A file whose
    structure tifffile trips over (a header cut short: struct.error; an IFD offset past the end: IndexError) is a
    ValueError, like its other malformed files."""
    def layout(tif: tifffile.TiffFile) -> tuple[np.ndarray, float | None, bool | None]:
        array, mask = tiff_image(tif)
        axes = tif.series[0].axes if mask is None else tif.pages.first.axes
        samples_last = None if array.ndim != 3 or "S" not in axes else axes.endswith("S")
        if mask is not None:
            array = array.astype(np.float32)
            if samples_last is False:
                array[:, mask] = np.nan
            else:
                array[mask] = np.nan  # (H, W) or (H, W, C)
        return array, tiff_nodata(tif), samples_last

    return _read_tiff(source, layout)


def _read_tiff(source, read: Callable[[tifffile.TiffFile], tuple]) -> tuple:
    """read(TiffFile) of a path or file object, tifffile's per-tag warnings silenced and whatever its parser raises
    on malformed bytes a ValueError (read_tiff_layout)."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(source) as tif:
            return read(tif)
    except (OSError, ValueError, MemoryError):
        raise
    except Exception as err:  # untrusted bytes: whatever the parser raises means "not a readable TIFF"
        raise ValueError(f"malformed TIFF ({type(err).__name__}: {err})") from err
    finally:
        logger.setLevel(level)


def tiff_nodata(tif: tifffile.TiffFile) -> float | None:
    """The nodata value a GeoTIFF declares (GDAL_NODATA: ASCII such as "-9999" or "0\\x00"); None without the tag,
    for one that names no number, and for NaN / inf (those pixels are nodata anyway)."""
    tag = tif.pages.first.tags.get(GDAL_NODATA)
    if tag is None:
        return None
    try:
        return nodata_number(str(tag.value))
    except ValueError:
        return None


def nodata_number(text: str) -> float | None:
    """The nodata value a GDAL_NODATA tag or a PAM sidecar's NoDataValue names ("-9999", "0\\x00", "1e+20"); None for
    NaN / inf (those pixels are nodata anyway); a ValueError for text that names no number."""
    value = float(text.strip("\x00 "))
    return value if np.isfinite(value) else None


def tiff_pixel_m(tif: tifffile.TiffFile) -> float | None:
    """The pixel size a GeoTIFF declares (ModelPixelScale, the larger of x and y), when it is in metres: None
    without the tag, for a malformed one and for a geographic CRS (degrees: a pixel under 1)."""
    tag = tif.pages.first.tags.get(MODEL_PIXEL_SCALE)
    try:
        size = max(abs(float(tag.value[0])), abs(float(tag.value[1])))
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return size if np.isfinite(size) and size >= 1 else None


def _apply_nodata_tag(array: np.ndarray, value: float | None, modality: str) -> np.ndarray:
    if value is None:
        return array
    if array.dtype.kind in "ui":
        info = np.iinfo(array.dtype)
        if value != round(value) or not info.min <= value <= info.max:
            return array  # a fill this dtype cannot hold marks no pixel
    return _set_nodata(array, array == value, modality)


def _set_nodata(array: np.ndarray, where: np.ndarray, modality: str) -> np.ndarray:
    """array with the pixels `where` set to the modality's nodata (S1 NaN, S2 and WorldCover 0), which storage_tile
    masks; a band of the wrong dtype is left for the dtype check to name."""
    if modality == "s1":
        return np.where(where, np.nan, array).astype(array.dtype) if array.dtype.kind == "f" else array
    return np.where(where, 0, array).astype(array.dtype) if array.dtype.kind in "ui" else array


def to_10m(product: Product, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Validate dtype and size, replicate coarser bands to the 10 m grid; returns ((C, H, W), H). A band may come
    at its native resolution or finer (resampled products), never coarser: a 10 m band at 20 m would be
    replicated into blocks and trained on as 10 m imagery."""
    size = _ten_m_size(arrays)
    out = []
    for band, a in arrays.items():
        if product.modality in ("s2_l2a", "s2_l1c") and a.dtype != np.uint16:
            raise BadInput(f"{product.where}: band {band} has dtype {a.dtype}, expected uint16 reflectance")
        if product.modality == "s1" and a.dtype.kind != "f":
            raise BadInput(f"{product.where}: band {band} has dtype {a.dtype}, expected float linear power")
        if product.modality == WORLDCOVER and a.dtype != np.uint8:
            raise BadInput(f"{product.where}: WorldCover map has dtype {a.dtype}, expected uint8 class codes")
        factor = size // a.shape[0] if a.shape[0] else 0
        if a.shape[0] != a.shape[1] or factor not in (1, 2, 6) or a.shape[0] * factor != size:
            raise BadInput(f"{product.where}: band {band} has size {a.shape}, expected ({size}, {size}) at 10 m "
                           f"or 1/2 or 1/6 of it (20 m / 60 m)")
        if factor * 10 > S2_NATIVE_M.get(band, 10):
            raise BadInput(f"{product.where}: band {band} is a {S2_NATIVE_M.get(band, 10)} m band but has "
                           f"{a.shape[0]} px where the finest band has {size} ({factor * 10} m): the product was "
                           "resampled or its bands are mislabelled")
        out.append(a if factor == 1 else np.repeat(np.repeat(a, factor, axis=0), factor, axis=1))
    return np.stack(out), size


def _ten_m_size(arrays: dict[str, np.ndarray]) -> int:
    """The 10 m size most bands agree on (as to_10m reads them: at their native resolution or finer; on a tie the
    larger), so that one band of a wrong size is the band named, not a correct one measured against it."""
    def fits(band: str, a: np.ndarray, size: int) -> bool:
        factor = size // a.shape[0] if a.shape[0] else 0
        return factor in (1, 2, 6) and a.shape[0] * factor == size and factor * 10 <= S2_NATIVE_M.get(band, 10)
    candidates = {a.shape[0] * f for a in arrays.values() for f in (1, 2, 6)}
    return max(candidates, key=lambda size: (sum(fits(b, a, size) for b, a in arrays.items()), size))


def nodata_mask(modality: str, cell: np.ndarray) -> np.ndarray:
    """(C, H, W) bool: S2 pixels at 0, S1 pixels NaN/inf or at a fill value (<= S1_FILL_MAX, >= HUGE_FILL_MIN)."""
    if modality == "s1":
        return ~np.isfinite(cell) | (cell <= S1_FILL_MAX) | (cell >= HUGE_FILL_MIN)
    return cell == 0


def storage_tile(modality: str, cell: np.ndarray, product: Product, s1_scaling: str = "db"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(stored cell, nodata mask) of a validated 10 m cell (C, H, W): cast to the shard dtype (S1: float16 in
    s1_scaling), masked pixels set to the band's reference mean."""
    mask = nodata_mask(modality, cell)
    fill = np.asarray(REFERENCE_STATS[modality]["mean"], np.float64)[:, None, None]
    if modality != "s1":
        return np.where(mask, np.round(fill).astype(np.uint16), cell), mask
    for band, values, band_mask in zip(MODALITIES["s1"].bands, cell, mask, strict=True):
        # untagged 0 fill is left out too: over most of a dB scene it would make the median 0, "linear", and put
        # every real pixel on the dB floor
        decisive = values[~band_mask & (values != 0)]
        median = np.median(decisive) if decisive.size else 0.0
        if median < 0:  # dB is mostly negative; linear power has at most a few resampling dips below 0
            raise BadInput(f"{product.where}: S1 {band} is mostly negative (median {median:.3g}, fill <= "
                           f"{S1_FILL_MAX:g}, NaN and exact 0 left out): looks like dB, expected linear power as "
                           "Major-TOM Core-S1RTC")
    valid = np.where(mask, 1.0, np.maximum(cell, 0.0))  # cubic resampling's small negative dips are power 0
    if s1_scaling == "db":
        out = s1_to_db(valid)
    else:
        out, fill = valid, 10.0 ** (fill / 10.0)
    return np.clip(np.where(mask, fill, out), -65504, 65504).astype(np.float16), mask


def worldcover_counts(cell_map: np.ndarray, product: Product) -> np.ndarray:
    try:
        return class_counts(cell_map)
    except ValueError as err:
        raise BadInput(f"{product.where}: {err}") from err
