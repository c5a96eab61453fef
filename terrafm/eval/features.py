"""Frozen-feature extraction with a TerraFM backbone, cached on disk once per (checkpoint, data, split).

Classification uses the cls token after the final norm, (N, D); segmentation the normed patch tokens
of the model's out_indices blocks concatenated, (N, L*D, H/p, W/p). Caches are .npz files named by
a hash of the checkpoint (path, size, mtime; for a run folder those of the checkpoint it resolves to
now), dataset path, split, modality, image size, kind, input preparation (statistics, S1 scaling, band order)
and a hash of the split's images as read (images_digest).
"""

import hashlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from terrafm.data.sources import physical_memory
from terrafm.eval.data import normalize, row_chunks
from terrafm.fileio import NPZ_READ_ERRORS, atomic_write, check_regular


def checkpoint_identity(checkpoint: str | Path) -> dict:
    """What cached features are keyed on: the checkpoint file, or the .metadata of the step folder a run or
    checkpoint folder resolves to now (so new steps miss the cache), by path, size and modification time. Taken once,
    where the model is loaded: taken again per split, a run that checkpointed meanwhile filed one step's features
    under the next step's name."""
    ckpt = Path(checkpoint).resolve()
    if ckpt.is_dir():
        from terrafm.checkpoint_io import resolve

        ckpt = resolve(ckpt) / ".metadata"
    stat = ckpt.stat()
    return {"checkpoint": str(ckpt), "size": stat.st_size, "mtime": stat.st_mtime_ns}


def cache_key(checkpoint: str | Path | dict, data: str | Path, split: str, modality: str, img_size: int | None,
              kind: str, inputs: str = "", images: str = "") -> str:
    """checkpoint: a path, or its checkpoint_identity taken where it was loaded; inputs: how the images were
    prepared (normalisation statistics, S1 scaling); images: images_digest of the split as read. Other features if
    either differs."""
    ident = {**(checkpoint if isinstance(checkpoint, dict) else checkpoint_identity(checkpoint)),
             "data": str(Path(data).resolve()), "split": split, "modality": modality,
             "img_size": img_size, "kind": kind, "inputs": inputs, "images": images}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def images_digest(images: np.ndarray) -> str:
    """A hash of a split's images (values, order, shape, dtype), part of the cache key: the dataset path alone
    misses a relabelled sample (a file moved to another class folder reorders the split at the same row count)
    or images rewritten in place, and cached features would then be scored against other samples' labels."""
    digest = hashlib.blake2b(f"{images.shape}{images.dtype}".encode(), digest_size=16)
    for chunk in row_chunks(images):  # the bytes of the C-ordered split, without a copy of all of it
        digest.update(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    return digest.hexdigest()


def resize(images: torch.Tensor, img_size: int | None) -> torch.Tensor:
    if img_size is None or images.shape[-2:] == (img_size, img_size):
        return images
    return F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)


@torch.no_grad()
def extract(model, images: np.ndarray, modality: str, kind: str = "cls", batch_size: int = 64,
            img_size: int | None = None, device: str = "cpu", desc: str = "features",
            stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Run the frozen backbone over images (N, C, H, W); returns float32 features. stats: (mean, std) to normalise
    each batch with (normalize), so the split is not copied whole; without them the images are taken as normalised."""
    if kind not in ("cls", "multiscale"):
        raise ValueError(f"feature kind must be 'cls' or 'multiscale', got {kind!r}")
    h, w = (img_size, img_size) if img_size else images.shape[-2:]  # images are resized first, then checked
    if h % model.patch_size or w % model.patch_size:
        size = max(h, w)
        raise ValueError(
            f"image size {h}x{w}{' (--img-size)' if img_size else ''} is not a multiple of the patch size "
            f"{model.patch_size}; pass --img-size (e.g. {max(1, round(size / model.patch_size)) * model.patch_size})"
        )
    model.eval().to(device)
    out = None  # (N, ...) allocated at the first batch: multi-scale maps can be as large as the images
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = images[start:start + batch_size]
        x = resize(torch.from_numpy(normalize(batch, *stats) if stats else batch).to(device), img_size)
        if kind == "cls":
            feats = model.forward_features(x, modality)["x_norm_clstoken"]
        else:
            feats = torch.cat(model.multiscale_features(x, modality), dim=1)
        feats = feats.float().cpu().numpy()
        if out is None:
            out = np.empty((len(images), *feats.shape[1:]), np.float32)
        out[start:start + len(feats)] = feats
    return out


def _cache_fits(path: Path, rows: int | None) -> bool:
    """Whether a cache file's features array is what compute() writes, from its .npy header alone: float32, one row
    per sample (rows, when given), at least one feature axis, and no larger than this machine's memory (compute()
    held it). Strings or a 1-D array failed in the probe, and a header declaring more than memory (a zip that
    inflates without end) exhausted it."""
    check_regular(path)
    with zipfile.ZipFile(path) as z, z.open("features.npy") as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
    return (dtype == np.float32 and len(shape) >= 2 and (rows is None or shape[0] == rows)
            and math.prod(shape) * 4 <= physical_memory())


def cached_features(cache_dir: str | Path | None, key: str, compute, rows: int | None = None) -> np.ndarray:
    """Load features for `key` from cache_dir, or compute() and store them there. A cache file that cannot be
    read (a foreign or damaged file) or has another row count than the split's `rows` (samples added to the
    dataset since) is recomputed and replaced: the cache is derived data, never a reason to fail or to mislead."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"features_{key}.npz"
    if path.exists():
        try:
            if _cache_fits(path, rows):
                with np.load(path) as f:
                    cached = f["features"]
                if np.isfinite(cached).all():  # NaN features were blamed on the dataset and the checkpoint
                    return cached
        except (*NPZ_READ_ERRORS, KeyError):
            pass  # recomputed below
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp file's name
            np.savez(f, features=feats)

    atomic_write(path, write)
    return feats
