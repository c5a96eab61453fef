"""ESA WorldCover classes: the land-cover labels behind sampling weights and dual centering.

Class *values* are the WorldCover map codes (10, 20, ... 100); class *indices* 0..10 are what the
index, the sampler and `ViewBatch.majority_class` use.
"""

import numpy as np

WORLDCOVER_VALUES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
WORLDCOVER_NAMES = (
    "tree", "shrub", "grass", "crop", "built", "bare", "snow", "water", "wetland", "mangrove", "moss",
)
NUM_CLASSES = len(WORLDCOVER_VALUES)
WORLDCOVER_NODATA = 0  # "No data" in the WorldCover legend (outside coverage): not counted

_VALUE_TO_INDEX = np.full(256, -1, dtype=np.int16)
_VALUE_TO_INDEX[list(WORLDCOVER_VALUES)] = np.arange(NUM_CLASSES)


def class_counts(worldcover_map: np.ndarray) -> np.ndarray:
    """(NUM_CLASSES,) int64 pixel counts of a uint8 WorldCover map (nodata pixels not counted); raises on
    codes outside the legend."""
    codes = worldcover_map[worldcover_map != WORLDCOVER_NODATA]
    idx = _VALUE_TO_INDEX[codes.astype(np.uint8, copy=False)]
    if (idx < 0).any():
        bad = sorted(set(np.unique(codes[idx < 0]).tolist()))
        raise ValueError(f"WorldCover map holds codes {bad} outside the legend {WORLDCOVER_VALUES} "
                         f"(and {WORLDCOVER_NODATA} = no data)")
    return np.bincount(idx.ravel(), minlength=NUM_CLASSES).astype(np.int64)
