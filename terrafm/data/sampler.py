"""Land-cover-aware sampling, sharded across ranks, deterministic for (seed, epoch), resumable.

weight_i = sum_k h_ik / f_k^beta (method.md): h_i the tile's WorldCover class fractions, f_k the global
class frequency; beta = 0 is uniform, beta = 1 fully balanced. Tiles without a land-cover map get the
mean weight. Two factors follow method.md's data curation ("98% of ocean cells dropped; sampling balanced
by land cover, climate zone and region"):
- region: weight_i x n_s^-region_beta, n_s the number of locations in location i's stratum: a latitude
  band (a climate-zone proxy: tropical, subtropical, temperate, boreal, polar, per hemisphere) x a 30 degree
  longitude sector, read from the key's Major-TOM grid cell name ("433U_1203R"); region_beta = 1 gives
  every stratum the same share. Keys that are not grid cell names get the mean factor.
- open water: weight_i x ocean_keep for locations whose mapped pixels are at least OPEN_WATER_FRACTION water
  (ocean, and the inside of large lakes, which WorldCover does not tell apart); ocean_keep = 0.02 draws them
  as often as keeping 2% of them would.
Each epoch draws len(dataset) indices with replacement from the normalised weights
(one generator seeded by (seed, epoch)), pads to a multiple of world_size by wrapping, and gives rank r
the positions r, r + world_size, ...: the ranks partition the epoch's draws, none is duplicated.
"""

import math
import re

import numpy as np

from terrafm.data.landcover import WORLDCOVER_NAMES

GRID_KM = 10.0  # Major-TOM Core's grid spacing: its cell names count rows and columns of it from (0, 0)
EARTH_RADIUS_KM = 6378.137  # Major-TOM's grid.py
CLIMATE_BANDS = (23.44, 35.0, 55.0, 66.56)  # |latitude| edges: tropical, subtropical, temperate, boreal, polar
SECTOR_DEG = 30.0  # longitude sectors of a region
OPEN_WATER_FRACTION = 0.99
WATER = WORLDCOVER_NAMES.index("water")
_GRID_CELL = re.compile(r"(\d+)([UD])_(\d+)([RL])")


def grid_cell_latlon(name: str) -> tuple[float, float] | None:
    """(lat, lon) of the bottom-left corner of a Major-TOM grid cell ("433U_1203R": row 433 north of the equator,
    column 1203 east of Greenwich), as Major-TOM's grid lays them out; None for another name."""
    match = _GRID_CELL.fullmatch(name)
    if match is None:
        return None
    row, ns, col, ew = match.groups()
    lat_step = 180.0 / math.ceil(math.pi * EARTH_RADIUS_KM / GRID_KM)
    lat = int(row) * lat_step * (1 if ns == "U" else -1)
    if abs(lat) >= 90.0:
        return None
    columns = math.ceil(2 * math.pi * EARTH_RADIUS_KM * math.cos(math.radians(lat)) / GRID_KM)
    lon = int(col) * 360.0 / columns * (1 if ew == "R" else -1)
    return (lat, lon) if -180.0 <= lon <= 180.0 else None


def region_strata(keys) -> np.ndarray:
    """(N,) int stratum of each shard key "<grid cell>/<row>_<col>": latitude band (CLIMATE_BANDS, per hemisphere)
    x 30 degree longitude sector; -1 where the key is not a Major-TOM grid cell's."""
    keys = np.asarray(keys, dtype=str)
    cells, inverse = np.unique(np.char.partition(keys, "/")[..., 0].reshape(-1), return_inverse=True)
    sectors = round(360.0 / SECTOR_DEG)
    strata = np.full(len(cells), -1, np.int64)
    for i, cell in enumerate(cells):
        latlon = grid_cell_latlon(str(cell))
        if latlon is not None:
            lat, lon = latlon
            band = int(np.searchsorted(CLIMATE_BANDS, abs(lat), side="right")) + (len(CLIMATE_BANDS) + 1) * (lat < 0)
            strata[i] = band * sectors + min(int((lon + 180.0) // SECTOR_DEG), sectors - 1)
    return strata[inverse.reshape(-1)]


def open_water(class_counts: np.ndarray) -> np.ndarray:
    """(N,) bool: locations whose mapped pixels are at least OPEN_WATER_FRACTION water (no map: False)."""
    counts = np.asarray(class_counts, np.float64)
    total = counts.sum(axis=1)
    return (total > 0) & (counts[:, WATER] >= OPEN_WATER_FRACTION * total)


def land_cover_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """(N,) float64 sampling probabilities from (N, K) per-tile class pixel counts."""
    counts = np.asarray(class_counts, np.float64)
    total = counts.sum(axis=1, keepdims=True)
    hist = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    freq = counts.sum(axis=0) / max(counts.sum(), 1.0)
    inv = np.where(freq > 0, np.power(np.maximum(freq, 1e-12), -beta), 0.0)
    w = hist @ inv
    known = total[:, 0] > 0
    if not known.any():
        return np.full(len(counts), 1.0 / max(len(counts), 1))
    w[~known] = w[known].mean()
    return w / w.sum()


def sampling_weights(class_counts: np.ndarray, beta: float, strata: np.ndarray | None = None,
                     region_beta: float = 0.0, ocean_keep: float = 1.0) -> np.ndarray:
    """(N,) float64 sampling probabilities: land_cover_weights x the region factor (strata: region_strata of the
    locations' keys) x ocean_keep for open water (the module docstring)."""
    w = land_cover_weights(class_counts, beta)
    if region_beta > 0 and strata is not None and len(w):
        strata = np.asarray(strata)
        known = strata >= 0
        if known.any():
            _, inverse, counts = np.unique(strata[known], return_inverse=True, return_counts=True)
            factor = np.empty(len(w))
            factor[known] = counts[inverse].astype(np.float64) ** -region_beta
            factor[~known] = factor[known].mean()
            w = w * factor
    if ocean_keep < 1.0:
        w = w * np.where(open_water(class_counts), ocean_keep, 1.0)
    total = w.sum()
    if not total > 0:
        raise ValueError("every location is open water and data.ocean_keep is 0: nothing to sample; raise "
                         "data.ocean_keep or convert land")
    return w / total


class LandCoverSampler:
    """Indices for one rank: iterate, or `epoch_indices(epoch)`; `state_dict` resumes mid-epoch."""

    def __init__(self, class_counts: np.ndarray, beta: float = 0.5, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_samples: int | None = None, strata: np.ndarray | None = None,
                 region_beta: float = 0.0, ocean_keep: float = 1.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(class_counts) == 0:
            raise ValueError("LandCoverSampler: the dataset has no records")
        self.weights = sampling_weights(class_counts, beta, strata, region_beta, ocean_keep)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        total = num_samples or len(self.weights)
        self.per_rank = -(-total // world_size)
        self.epoch, self.position = 0, 0
        self._drawn: tuple[int, np.ndarray] | None = None  # (epoch, epoch_indices(epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's draws of `epoch`, read-only. The last epoch's are kept: the loader asks for them once per batch,
        and drawing an epoch of millions of locations takes a second."""
        drawn = self._drawn
        if drawn is None or drawn[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5A3])
            draws = rng.choice(len(self.weights), size=self.per_rank * self.world_size, replace=True, p=self.weights)
            drawn = (epoch, np.ascontiguousarray(draws[self.rank::self.world_size]))
            drawn[1].flags.writeable = False
            self._drawn = drawn
        return drawn[1]

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            i = indices[self.position]
            self.position += 1
            yield int(i)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(f"sampler state is for seed {state['seed']} / world_size {state['world_size']}, "
                             f"this sampler has {self.seed} / {self.world_size}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
