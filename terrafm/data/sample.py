"""Deterministic SYNTHETIC sample set in the Major-TOM Core parquet layout (for tests and the default run).

Nothing here is real imagery. Each grid cell gets a WorldCover-like land-cover map drawn from smooth
random fields with a long-tailed class prior; S2 L2A/L1C reflectance and S1 backscatter are drawn
from per-class signatures (typical Sentinel-2 surface reflectance x 10000, S1 sigma0 in linear power
with 4-look speckle), so all modalities are co-registered and correlated with the land cover.

Generator v2 adds what self-supervised learning needs to find and per-band statistics cannot see:
every cell carries a surface texture of one of two grain sizes (`texture_class`: fine, about 2 px, or
coarse, about 10 px), a lognormal field of mean 1 that modulates the 10 m bands and S1 alike. Its
amplitude is the same for both grains, so per-band mean and std of a tile do not reveal the grain;
a model that looks at spatial structure does. Cells also vary in land-cover patch
size. The default set has 64 cells (256 locations), enough distinct places for DINO to learn from.

Layout written (one parquet file per collection, one row per grid cell and product, every band a
GeoTIFF in its own column at its native resolution, as in Major-TOM Core):
    Core-S2L2A/part_00000.parquet   product_id grid_cell timestamp centre_lat centre_lon crs B01..B12 B8A cloud_mask
    Core-S2L1C/part_00000.parquet   the same with B10 (no cloud_mask)
    Core-S1RTC/part_00000.parquet   product_id grid_cell timestamp centre_lat centre_lon crs vv vh
    Core-WorldCover/part_00000.parquet  product_id grid_cell ... map   (our addition: Major-TOM has no
                                    WorldCover collection; real runs join ESA WorldCover 2021 the same way)
"""

import fcntl
import io
import os
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
import torch
import torch.nn.functional as F

from terrafm.data.landcover import NUM_CLASSES, WORLDCOVER_VALUES
from terrafm.fileio import atomic_write
from terrafm.modalities import S2_BANDS, S2_NATIVE_M, S2_WITH_B10

S2_L2A_COLUMNS = S2_BANDS  # the band columns of Major-TOM Core-S2L2A and Core-S2L1C
S2_L1C_COLUMNS = S2_WITH_B10

# Long-tailed global prior over the 11 WorldCover classes (roughly the land-surface shares).
CLASS_PRIOR = np.array([0.30, 0.07, 0.22, 0.16, 0.03, 0.08, 0.015, 0.08, 0.02, 0.002, 0.005])
# Surface reflectance x 1e4 per class for B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12.
S2_SIGNATURE = np.array([
    [250, 300, 500, 300, 800, 2200, 2700, 2900, 3000, 900, 1500, 700],     # tree
    [400, 500, 800, 900, 1300, 2000, 2300, 2500, 2600, 800, 2300, 1500],   # shrub
    [350, 450, 800, 700, 1200, 2400, 2800, 3000, 3100, 900, 2200, 1300],   # grass
    [400, 550, 900, 800, 1400, 2600, 3100, 3300, 3400, 1000, 2500, 1500],  # crop
    [1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700, 1750, 600, 2000, 1800],  # built
    [1200, 1400, 1800, 2200, 2500, 2700, 2800, 2900, 3000, 900, 3500, 3000],  # bare
    [6000, 7000, 7200, 7300, 7200, 7000, 6800, 6700, 6500, 2500, 600, 500],  # snow
    [500, 450, 400, 250, 200, 150, 130, 120, 110, 50, 60, 40],             # water
    [350, 400, 600, 450, 800, 1500, 1800, 1900, 2000, 600, 1000, 500],     # wetland
    [250, 300, 500, 250, 700, 2000, 2500, 2700, 2800, 800, 1200, 550],     # mangrove
    [600, 700, 900, 1000, 1200, 1600, 1800, 1900, 2000, 700, 1800, 1200],  # moss
], dtype=np.float64)
# Top-of-atmosphere (L1C) = surface + path radiance, strongest in the blue/aerosol bands.
L1C_OFFSET = np.array([1100, 800, 550, 350, 300, 250, 220, 200, 190, 120, 70, 50], dtype=np.float64)
# S1 sigma0 in dB per class (VV, VH).
S1_SIGNATURE_DB = np.array([
    [-7, -13], [-9, -16], [-10, -17], [-9, -16], [-2, -9], [-14, -22],
    [-12, -20], [-20, -27], [-8, -15], [-6, -12], [-12, -19],
], dtype=np.float64)

DEFAULT_CELLS = 64
DEFAULT_TILE_SIZE = 60  # px of one location; each sample grid cell is 2 x 2 tiles (Major-TOM: 1068 = 2 x 534)
GENERATOR_VERSION = 2  # part of the cache folder name: a changed generator never reuses old tiles
TEXTURE_GRAIN_PX = (2, 10)  # texture_class 0 (fine) and 1 (coarse): correlation length of the texture
TEXTURE_AMPLITUDE = 0.4  # log-std of the 10 m bands' reflectance modulation (S1: the same, in dB / 10)
S2_10M = np.array([S2_NATIVE_M[b] == 10 for b in S2_L2A_COLUMNS])


def _smooth_fields(gen: torch.Generator, n: int, size: int, coarse: int) -> np.ndarray:
    """(n, size, size) smooth random fields: coarse Gaussian noise upsampled bicubically."""
    noise = torch.randn(1, n, coarse, coarse, generator=gen, dtype=torch.float64)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].numpy()


def _land_cover(gen: torch.Generator, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) WorldCover class indices with patches; each cell has its own biome-like prior and patch size."""
    prior = rng.dirichlet(CLASS_PRIOR * 8.0) + 1e-4
    patch_px = int(rng.integers(12, 40))
    fields = _smooth_fields(gen, NUM_CLASSES, size, max(3, size // patch_px)) * 1.5
    return np.argmax(fields + np.log(prior)[:, None, None], axis=0)


def texture_class(cell: int) -> int:
    """The texture grain of a grid cell: 0 fine, 1 coarse (alternating, independent of land cover)."""
    return cell % 2


def cell_of_key(key: str) -> int:
    """The cell index of a shard record key "<grid_cell>/<row>_<col>" written from this sample."""
    row = int(key.split("U_", 1)[0])
    return (row - 200) // 7


def _texture(gen: torch.Generator, size: int, grain_px: int) -> np.ndarray:
    """(size, size) zero-mean, unit-variance random field with correlation length ~grain_px."""
    field = _smooth_fields(gen, 1, size, max(2, size // grain_px))[0]
    return (field - field.mean()) / field.std()


def _block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    h, w = x.shape
    return x.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _tiff_bytes(array: np.ndarray, pixel_m: float, origin: tuple[float, float]) -> bytes:
    """One band as GeoTIFF bytes (zlib) with ModelPixelScale and ModelTiepoint tags."""
    buf = io.BytesIO()
    tags = [(33550, "d", 3, (pixel_m, pixel_m, 0.0), False),
            (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), False)]
    tifffile.imwrite(buf, array, compression="zlib", extratags=tags)
    return buf.getvalue()


def synthesize_cell(seed: int, cell: int, cell_px: int) -> dict[str, np.ndarray]:
    """All modalities of one grid cell at 10 m: worldcover (H, W) uint8, s2_l2a/s2_l1c (12, H, W) float
    reflectance, s1 (2, H, W) float32 linear power."""
    gen = torch.Generator().manual_seed(seed * 100_003 + cell)
    rng = np.random.default_rng([seed, cell])
    classes = _land_cover(gen, rng, cell_px)
    texture = 1.0 + 0.12 * _smooth_fields(gen, 12, cell_px, max(8, cell_px // 8))
    grain = _texture(gen, cell_px, TEXTURE_GRAIN_PX[texture_class(cell)])
    # lognormal with mean 1, 10 m bands only: block means would blur a fine grain in the 20 m / 60 m bands
    texture[S2_10M] *= np.exp(TEXTURE_AMPLITUDE * grain - TEXTURE_AMPLITUDE ** 2 / 2)
    s2 = S2_SIGNATURE[classes].transpose(2, 0, 1) * texture
    s2 = s2 * rng.normal(1.0, 0.03, size=s2.shape)
    l1c = S2_SIGNATURE[classes].transpose(2, 0, 1) * 0.93 * texture + L1C_OFFSET[:, None, None]
    soil = _smooth_fields(gen, 2, cell_px, max(4, cell_px // 16))
    s1_db = S1_SIGNATURE_DB[classes].transpose(2, 0, 1) + 1.5 * soil + 10.0 * TEXTURE_AMPLITUDE * grain
    speckle = rng.gamma(4.0, 1.0 / 4.0, size=s1_db.shape)
    return {
        "worldcover": np.asarray(WORLDCOVER_VALUES, dtype=np.uint8)[classes],
        "s2_l2a": np.clip(s2, 1, 10000),
        "s2_l1c": np.clip(l1c * rng.normal(1.0, 0.02, size=l1c.shape), 1, 12000),
        "s1": (10.0 ** (s1_db / 10.0) * speckle).astype(np.float32),
    }


def _grid_cell(cell: int) -> str:
    return f"{200 + cell * 7}U_{400 + cell * 13}R"


def write_sample_parquet(out_dir: Path, seed: int = 0, cells: int = DEFAULT_CELLS,
                         tile_size: int = DEFAULT_TILE_SIZE) -> list[Path]:
    """Write the four synthetic Major-TOM-style collections under out_dir; returns the parquet paths."""
    cell_px = 2 * tile_size
    if cell_px % 6:
        raise ValueError(f"sample tile_size must be a multiple of 3 so 60 m bands tile the cell; got {tile_size}")
    rows: dict[str, list[dict]] = {"Core-S2L2A": [], "Core-S2L1C": [], "Core-S1RTC": [], "Core-WorldCover": []}
    for cell in range(cells):
        data = synthesize_cell(seed, cell, cell_px)
        gc = _grid_cell(cell)
        day = f"2021{1 + cell % 12:02d}{10 + cell % 18:02d}"
        meta = {"grid_cell": gc, "centre_lat": 20.0 + cell * 0.1, "centre_lon": 10.0 + cell * 0.1,
                "crs": "EPSG:32633"}
        origin = (500_000.0 + cell * 10_680.0, 4_000_000.0)
        # baseline 03.01 (2021's): its values carry no +1000 DN offset, and neither do the generated ones
        l2a = {"product_id": f"S2A_MSIL2A_{day}T101031_N0301_R022_T33TUL_{day}T120000", **meta,
               "timestamp": f"{day}T101031"}
        l1c = {**l2a, "product_id": l2a["product_id"].replace("MSIL2A", "MSIL1C")}
        for k, band in enumerate(S2_L2A_COLUMNS):
            f = S2_NATIVE_M[band] // 10
            l2a[band] = _tiff_bytes(_block_mean(data["s2_l2a"][k], f).round().astype(np.uint16), 10.0 * f, origin)
            l1c[band] = _tiff_bytes(_block_mean(data["s2_l1c"][k], f).round().astype(np.uint16), 10.0 * f, origin)
        l1c["B10"] = _tiff_bytes(np.full((cell_px // 6, cell_px // 6), 15, np.uint16), 60.0, origin)
        l2a["cloud_mask"] = _tiff_bytes(np.zeros((cell_px, cell_px), np.uint8), 10.0, origin)
        s1 = {"product_id": f"S1A_IW_GRDH_1SDV_{day}T053000_{day}T053025_0{cell:05d}_RTC", **meta,
              "timestamp": f"{day}T053000",
              "vv": _tiff_bytes(data["s1"][0], 10.0, origin), "vh": _tiff_bytes(data["s1"][1], 10.0, origin)}
        wc = {"product_id": f"ESA_WorldCover_10m_2021_v200_{gc}", **meta, "timestamp": "20210101T000000",
              "map": _tiff_bytes(data["worldcover"], 10.0, origin)}
        rows["Core-S2L2A"].append(l2a)
        rows["Core-S2L1C"].append({k: l1c[k] for k in ("product_id", *meta, "timestamp", *S2_L1C_COLUMNS)})
        rows["Core-S1RTC"].append(s1)
        rows["Core-WorldCover"].append(wc)
    paths = []
    for collection, records in rows.items():
        path = Path(out_dir) / collection / "part_00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(atomic_write(path, partial(_write_parquet, pa.Table.from_pylist(records))))
    return paths


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` opened by its bytes (as sources.open_parquet reads): pyarrow encodes a str path as
    UTF-8, so a folder whose name is not UTF-8 (TERRAFM_DATA_DIR with byte 0xff) failed with UnicodeEncodeError."""
    with pa.OSFile(os.fsencode(path), "wb") as sink:
        pq.write_table(table, sink, row_group_size=4)


def default_root() -> Path:
    """$TERRAFM_DATA_DIR/sample, else ~/.cache/terrafm/sample."""
    base = os.environ.get("TERRAFM_DATA_DIR")
    return Path(base) / "sample" if base else Path.home() / ".cache" / "terrafm" / "sample"


def ensure_sample_shards(root: str | Path | None = None, seed: int = 0, cells: int = DEFAULT_CELLS,
                         tile_size: int = DEFAULT_TILE_SIZE) -> Path:
    """Generate the synthetic parquet set and convert it, unless already done; returns the shard directory.

    cells x 4 locations (default 256) of tile_size px with s2_l2a, s2_l1c, s1 and a WorldCover map.
    """
    from terrafm.data.prepare import convert
    from terrafm.data.shards import INDEX_NAME, ShardError
    from terrafm.data.sources import BadInput
    from terrafm.modalities import S1_SCALINGS

    root = Path(root) if root is not None else default_root()
    root = root / f"v{GENERATOR_VERSION}-seed{seed}-cells{cells}-tile{tile_size}"
    shard_dir = root / f"shards-s1{S1_SCALINGS[0]}"  # a new default S1 scaling gets a fresh conversion
    if (shard_dir / INDEX_NAME).exists():
        return shard_dir
    try:
        root.mkdir(parents=True, exist_ok=True)
        # One writer at a time: processes that share the cache (test workers, ranks, two runs) wait for the first.
        with open(root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shard_dir / INDEX_NAME).exists():
                parquet_dir = root / "parquet"
                if not (parquet_dir / "Core-WorldCover" / "part_00000.parquet").exists():
                    write_sample_parquet(parquet_dir, seed=seed, cells=cells, tile_size=tile_size)
                convert([parquet_dir], shard_dir, tile_size=tile_size, workers=0, progress=False)
    except OSError as err:  # a read-only cache, TERRAFM_DATA_DIR a file, a full disk: tracebacks before
        raise ShardError(f"cannot write the bundled sample into {root} ({err.strerror or err}); set "
                         "TERRAFM_DATA_DIR to a writable folder with ~100 MB free") from err
    except BadInput as err:  # a damaged cache (a file cut short by a full disk or a copy)
        raise ShardError(f"the cached sample in {root} is damaged ({err}); delete {root} and run again to "
                         "generate it anew") from err
    return shard_dir
