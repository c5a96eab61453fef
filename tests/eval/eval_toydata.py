"""Toy benchmarks in both formats for the eval tests (GEO-Bench HDF5 and EuroSAT folders).

Classes differ in which band group is bright (a spectral signature), strong enough that a
random-init tiny backbone separates them.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import tifffile

GEOBENCH_S2 = ["01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
               "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge",
               "09 - Water vapour", "10 - SWIR - Cirrus", "11 - SWIR", "12 - SWIR"]
NUM_CLASSES, SIZE = 4, 32


def toy_images(labels: np.ndarray, bands: int, rng: np.random.Generator) -> np.ndarray:
    """(N, bands, 32, 32) uint16: class k brightens bands 3k..3k+2; with 13 bands (ESA's order) the cirrus band
    B10 stays near 0, as in real L1C reflectance."""
    x = rng.normal(1000, 150, size=(len(labels), bands, SIZE, SIZE))
    for i, c in enumerate(labels):
        x[i, 3 * c: 3 * c + 3] += 3000
    return np.clip(with_cirrus(x, rng), 0, 65535).astype(np.uint16)


def with_cirrus(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """13-band images (ESA's order) with a cirrus band B10 near 0, as real L1C reflectance has it."""
    if images.shape[1] == 13:
        images[:, 10] = rng.normal(20, 5, size=images[:, 10].shape)
    return images


def toy_labels(per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))


def write_hdf5(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], band_names: list[str]) -> Path:
    """GEO-Bench layout: default_partition.json + one .hdf5 per sample, one dataset per band + label."""
    root.mkdir(parents=True, exist_ok=True)
    partition = {}
    for split, (images, labels) in splits.items():
        partition[split] = []
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            sid = f"{split}_{i:04d}"
            partition[split].append(sid)
            with h5py.File(root / f"{sid}.hdf5", "w") as f:
                for name, band in zip(band_names, img, strict=True):
                    f.create_dataset(name, data=band)
                f.create_dataset("label", data=lab)
    (root / "default_partition.json").write_text(json.dumps(partition))
    return root


def write_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str = ".tif") -> Path:
    """EuroSAT layout: root/<split>/<class>/<i>.tif (channel-last GeoTIFF like EuroSAT MS) or .npy."""
    for split, (images, labels) in splits.items():
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"class_{lab}"
            folder.mkdir(parents=True, exist_ok=True)
            if suffix == ".tif":
                tifffile.imwrite(folder / f"{i:04d}.tif", img.transpose(1, 2, 0))
            else:
                np.save(folder / f"{i:04d}.npy", img)
    return root


def make_splits(bands: int, seed: int = 0, per_class=(20, 5, 10)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "valid", "test"), per_class, strict=True):
        labels = toy_labels(n, rng)
        out[split] = (toy_images(labels, bands, rng), labels)
    return out
