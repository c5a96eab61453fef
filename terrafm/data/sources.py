"""Inputs of `terrafm prepare`: Major-TOM Core parquet shards and Major-TOM-style GeoTIFF folders.

A *product* is one acquisition of one grid cell (one parquet row, or one folder
<root>/<row>/<grid_cell>/<product_id>/<band>.tif). Its modality comes from the product id
(MSIL2A -> s2_l2a, MSIL1C -> s2_l1c, S1* -> s1, *WorldCover* -> worldcover). Bands are read with
tifffile at their native resolution and brought to the 10 m grid by pixel replication.
"""

import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tifffile

from terrafm.data.landcover import class_counts
from terrafm.modalities import MODALITIES

WORLDCOVER = "worldcover"
WORLDCOVER_BAND = "map"
META_COLUMNS = ("product_id", "grid_cell")


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


def discover(inputs: list[Path]) -> tuple[list[Product], list[dict]]:
    """All products under the inputs (parquet files, folders of them, GeoTIFF product folders).

    Returns (products, unknown) where unknown lists records whose product id names no modality.
    """
    products, unknown = [], []
    for root in map(Path, inputs):
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        tif_dirs = defaultdict(dict)
        for path in files:
            if path.suffix == ".parquet":
                _discover_parquet(path, products, unknown)
            elif path.suffix.lower() in (".tif", ".tiff"):
                tif_dirs[path.parent][path.stem] = str(path)
        for folder, bands in sorted(tif_dirs.items()):
            modality = modality_of(folder.name)
            if modality is None:
                unknown.append({"file": str(folder), "record": folder.name, "reason": "unknown product id"})
                continue
            products.append(Product(modality, folder.parent.name, folder.name, str(folder), band_files=bands))
    return products, unknown


def _discover_parquet(path: Path, products: list[Product], unknown: list[dict]) -> None:
    try:
        schema = pq.read_schema(path)
    except Exception as err:
        raise BadInput(f"{path}: not a readable parquet file ({err})") from err
    missing = [c for c in META_COLUMNS if c not in schema.names]
    if missing:
        raise BadInput(f"{path}: missing Major-TOM metadata columns {missing} (has {schema.names[:8]}...)")
    table = pq.read_table(path, columns=list(META_COLUMNS))
    for row, (pid, cell) in enumerate(zip(table["product_id"].to_pylist(), table["grid_cell"].to_pylist(),
                                          strict=True)):
        modality = modality_of(pid or "")
        if modality is None:
            unknown.append({"file": str(path), "record": f"row {row}", "reason": f"unknown product id {pid!r}"})
            continue
        products.append(Product(modality, cell, pid, str(path), row=row))


def expected_bands(modality: str) -> tuple[str, ...]:
    return (WORLDCOVER_BAND,) if modality == WORLDCOVER else MODALITIES[modality].bands


def _column(band: str, modality: str, names: list[str]) -> str | None:
    """Parquet column for a band: Major-TOM writes S2 bands upper case (B04) and S1 lower case (vv)."""
    for name in (band, band.lower(), band.upper()):
        if name in names:
            return name
    return None


def read_parquet_products(path: str, products: list[Product]) -> dict[int, dict[str, object]]:
    """row -> {band: GeoTIFF bytes or a BadInput}, reading only the row groups and columns needed."""
    pf = pq.ParquetFile(path)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    by_group = defaultdict(list)
    for p in products:
        by_group[int(np.searchsorted(starts, p.row, side="right") - 1)].append(p)
    out = {}
    for group, prods in by_group.items():
        wanted = {b: _column(b, p.modality, pf.schema_arrow.names) for p in prods for b in expected_bands(p.modality)}
        table = pf.read_row_group(group, columns=sorted({c for c in wanted.values() if c}))
        for p in prods:
            local = p.row - int(starts[group])
            bands = {}
            for b in expected_bands(p.modality):
                col = wanted[b]
                value = table[col][local].as_py() if col else None
                bands[b] = value if value is not None else BadInput(
                    f"{p.where}: missing band {b} ({'no column' if col is None else 'null value'})")
            out[p.row] = bands
    return out


def decode_band(data: bytes, band: str, product: Product) -> np.ndarray:
    try:
        array = tifffile.imread(io.BytesIO(data))
    except Exception as err:
        raise BadInput(f"{product.where}: band {band}: truncated or corrupt GeoTIFF ({type(err).__name__}: {err})") \
            from err
    if array.ndim != 2:
        raise BadInput(f"{product.where}: band {band}: expected one 2-D band, got shape {array.shape}")
    return array


def to_10m(product: Product, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Validate dtype and size, replicate coarser bands to the 10 m grid; returns ((C, H, W), H)."""
    size = max(a.shape[0] for a in arrays.values())
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
        out.append(a if factor == 1 else np.repeat(np.repeat(a, factor, axis=0), factor, axis=1))
    return np.stack(out), size


def storage_tile(modality: str, cell: np.ndarray, product: Product) -> np.ndarray:
    """Cast a validated 10 m cell (C, H, W) to its shard dtype (S1: float16 linear power, NaN -> 0)."""
    if modality != "s1":
        return cell
    if np.nanmin(cell) < 0:
        raise BadInput(f"{product.where}: S1 has negative values: looks like dB, expected linear power")
    return np.clip(np.nan_to_num(cell, nan=0.0), 0, 65504).astype(np.float16)


def worldcover_counts(cell_map: np.ndarray, product: Product) -> np.ndarray:
    try:
        return class_counts(cell_map)
    except ValueError as err:
        raise BadInput(f"{product.where}: {err}") from err
