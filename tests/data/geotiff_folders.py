"""Major-TOM parquet products written out as GeoTIFF product folders, for the prepare tests."""

from pathlib import Path

import pyarrow.parquet as pq

S2_FILE = ("Core-S2L2A", "part_00000.parquet")


def in_grid_cells(root: Path):
    """Major-TOM's download layout: <root>/<row>/<grid_cell>/<product_id>/<band>.tif."""
    return lambda rec: root / rec["grid_cell"].split("_")[0] / rec["grid_cell"]


def product_folders(sample_parquet: Path, folder, collection: tuple[str, str] = S2_FILE) -> list[Path]:
    """One collection's products as folder(record)/<product_id>/<band>.tif; returns the product folders."""
    products = []
    for rec in pq.read_table(sample_parquet.joinpath(*collection)).to_pylist():
        d = folder(rec) / rec["product_id"]
        d.mkdir(parents=True)
        for name, value in rec.items():
            if isinstance(value, bytes):
                (d / f"{name}.tif").write_bytes(value)
        products.append(d)
    return products
