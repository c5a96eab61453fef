"""Multi-crop modality views: the trainer contract (View, ViewBatch) and the per-batch crop plan.

All randomness of a batch (modality subset per view, crop boxes, flips) is drawn here, in one place,
from (seed, epoch, step, rank); the read paths (numpy reference, C++ twin, DALI) only execute the
plan, which is why they produce the same tensors.

Modality choice is per (view, batch): every sample of a view uses the same modality subset, so a
view is one tensor per modality. With probability p_fused a view draws a subset of 2+ of the
configured modalities (Case N, fused by the model); otherwise one modality (Case 1), uniformly.
Crops follow random-resized-crop: area share in scale, aspect ratio log-uniform in ratio, integer box
inside the tile; the same box and flips for every modality of a view (tiles are co-registered).
A view's pixels: crop -> bilinear resize (align_corners=False, no antialias) -> flips -> the storage
dtype (uint16 rounded half up, float16), in which the host hands views over (half the bytes of float32) ->
on the device (x - mean) / std per band, cast to the compute dtype.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from terrafm.data.config import DataConfig

View = dict[str, torch.Tensor]  # one crop of one batch: modality -> (B, C, h, w); 2+ keys = Case N (fused).
# What the loader yields is normalised float32 on its device; between its host renderers and its device stage,
# the storage dtype.


@dataclass
class ViewBatch:
    global_views: list[View]      # n_global crops at global_size
    local_views: list[View]       # n_local crops at local_size
    majority_class: torch.Tensor  # (B,) long WorldCover class index 0..10 of each sample (-1: no map)
    index: torch.Tensor           # (B,) long location ids


@dataclass
class ViewPlan:
    size: int                     # output px (square)
    modalities: tuple[str, ...]   # 1 = Case 1, 2+ = Case N
    boxes: np.ndarray             # (B, 4) int32: top, left, height, width in tile px
    flips: np.ndarray             # (B, 2) uint8: horizontal, vertical


@dataclass
class BatchPlan:
    indices: np.ndarray           # (B,) int64 location ids
    global_views: list[ViewPlan]
    local_views: list[ViewPlan]

    @property
    def views(self) -> list[ViewPlan]:
        return self.global_views + self.local_views


def plan_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step, rank, 0xC209])


def _crop_box(rng: np.random.Generator, tile: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """Random-resized-crop box (top, left, h, w) in a square tile of `tile` px; after 10 misses torchvision's fallback,
    the largest central crop whose aspect ratio is in `ratio` (the full tile when 1 is)."""
    area = tile * tile
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= tile and 0 < h <= tile:
            return int(rng.integers(0, tile - h + 1)), int(rng.integers(0, tile - w + 1)), h, w
    h = max(1, int(round(tile / ratio[0]))) if ratio[0] > 1 else tile
    w = max(1, int(round(tile * ratio[1]))) if ratio[1] < 1 else tile
    return (tile - h) // 2, (tile - w) // 2, h, w


def modality_mix(modalities: tuple[str, ...], p_fused: float) -> list[tuple[float, tuple[str, ...]]]:
    """(probability, modality subset) of every subset a view can draw (choose_modalities): one modality uniformly
    with 1 - p_fused, else a subset size k uniform in 2..M and a subset of that size uniformly. The bench's cost
    models average over it (views of 2-3 fused sensors cost more patch embedding than one sensor's)."""
    m = len(modalities)
    if m < 2:
        return [(1.0, tuple(modalities))]
    mix = [((1.0 - p_fused) / m, (name,)) for name in modalities]
    for k in range(2, m + 1):
        subsets = list(itertools.combinations(modalities, k))
        mix += [(p_fused / (m - 1) / len(subsets), subset) for subset in subsets]
    return mix


def choose_modalities(rng: np.random.Generator, modalities: tuple[str, ...], p_fused: float) -> tuple[str, ...]:
    """The modality subset of one view (the distribution modality_mix lists)."""
    if len(modalities) >= 2 and rng.uniform() < p_fused:
        k = int(rng.integers(2, len(modalities) + 1))
        picked = set(rng.choice(len(modalities), size=k, replace=False).tolist())
        return tuple(m for i, m in enumerate(modalities) if i in picked)
    return (modalities[int(rng.integers(len(modalities)))],)


def make_plan(cfg: DataConfig, indices: np.ndarray, tile_size: int, epoch: int, step: int, rank: int = 0,
              seed: int | None = None) -> BatchPlan:
    """The crop/modality/flip plan of one batch, a pure function of (seed, epoch, step, rank, indices); seed defaults
    to cfg.seed (the Loader passes its combined data.seed and train.seed)."""
    rng = plan_rng(cfg.seed if seed is None else seed, epoch, step, rank)
    b = len(indices)

    def view(size: int, scale: tuple[float, float]) -> ViewPlan:
        mods = choose_modalities(rng, cfg.modalities, cfg.p_fused)
        boxes = np.array([_crop_box(rng, tile_size, scale, cfg.ratio) for _ in range(b)], np.int32).reshape(b, 4)
        flips = np.stack([rng.uniform(size=b) < cfg.hflip, rng.uniform(size=b) < cfg.vflip], 1).astype(np.uint8)
        return ViewPlan(size, mods, boxes, flips)

    globals_ = [view(cfg.global_size, cfg.global_scale) for _ in range(cfg.n_global)]
    locals_ = [view(cfg.local_size, cfg.local_scale) for _ in range(cfg.n_local)]
    return BatchPlan(np.asarray(indices, np.int64), globals_, locals_)


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Resized float pixels -> the modality's storage dtype, the compact form views cross PCIe in: uint16 rounds
    half up (floor(x + 0.5), as DALI's cast does for x >= 0) and saturates; float16 rounds to nearest."""
    if dtype == torch.uint16:
        return torch.floor(x + 0.5).clamp_(0, 65535).to(dtype)
    return x.to(dtype)


def normalise(x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Storage-dtype views (B, C, h, w) -> (x - mean) * inv_std in `dtype`; mean / inv_std (C, 1, 1) float32.

    Runs where x is (on the GPU after the transfer); the same code on CPU tensors in tests."""
    return ((x.to(torch.float32) - mean) * inv_std).to(dtype)


def render_view_numpy(tiles: list[np.ndarray], band_index: np.ndarray, view: ViewPlan, out: torch.Tensor) -> None:
    """Reference executor: fill out (B, C, s, s) in the storage dtype from per-sample (C_all, T, T) storage tiles
    (crop -> bilinear resize -> flips -> to_storage; normalise() follows on the device)."""
    s = view.size
    for i, tile in enumerate(tiles):
        top, left, h, w = (int(v) for v in view.boxes[i])
        crop = torch.from_numpy(np.ascontiguousarray(tile[band_index, top:top + h, left:left + w]).astype(np.float32))
        x = F.interpolate(crop[None], size=(s, s), mode="bilinear", align_corners=False, antialias=False)[0]
        dims = [d for d, f in ((2, view.flips[i, 0]), (1, view.flips[i, 1])) if f]
        out[i] = to_storage(torch.flip(x, dims) if dims else x, out.dtype)
