"""Eval holds a split about once: GEO-Bench m-bigearthnet is ~14 GB per float32 copy, and the reader's list, its
stack, the band selection, the normalised copy and the digest's copy took the peak past 30 GB."""

import tracemalloc
from pathlib import Path

import h5py  # noqa: F401  (eval imports these on first use: not part of the peak)
import numpy as np
import pytest
import tifffile  # noqa: F401
import torch
from eval_toydata import NUM_CLASSES, toy_labels, with_cirrus, write_folder, write_hdf5

from terrafm.eval import data, metrics
from terrafm.eval.runner import EvalConfig, evaluate

SIDE = 16  # S2: one patch, so the images dominate the memory, not the features
S1_SIDE = 48  # S1: 2 bands, images large enough beside their files' Python objects


class BandMeans(torch.nn.Module):
    """A stand-in backbone whose cls feature is each band's mean: fast under tracemalloc, which slows a real one."""

    patch_size = 16

    def forward_features(self, x: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        return {"x_norm_clstoken": x.mean(dim=(2, 3))}


def s2_images(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, 13, 16, 16) uint16 L1C-like images whose class brightens bands 3k..3k+2, and their labels."""
    labels = toy_labels(per_class, rng)
    x = rng.normal(1000, 150, size=(len(labels), 13, SIDE, SIDE))
    x[np.arange(len(labels))[:, None], 3 * labels[:, None] + np.arange(3)] += 3000
    return np.clip(with_cirrus(x, rng), 0, 65535).astype(np.uint16), labels


def s1_images(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, 48, 48) float32 S1 linear power whose class is which of VV and VH is strong, and the labels."""
    labels = toy_labels(per_class, rng)
    strong = np.stack([labels % 2, labels // 2], axis=1)[:, :, None, None]  # 4 directions: cosine kNN tells them
    x = 0.02 * (1 + 2 * strong) * rng.lognormal(0, 0.2, size=(len(labels), 2, S1_SIDE, S1_SIDE))
    return x.astype(np.float32), labels


def peak_copies(tmp_path, monkeypatch, fmt: str, make, bands: list[str] | None, model) -> tuple[dict, float]:
    """Eval on 1000 train + 40 test images; its results and peak traced memory in float32 copies of the splits."""
    rng = np.random.default_rng(0)
    splits = {"train": make(250, rng), "test": make(10, rng)}
    root = (write_folder(tmp_path / "data", splits, suffix=".npy") if fmt == "folder"
            else write_hdf5(tmp_path / "data", splits, bands))
    checkpoint = tmp_path / "stand-in.pth"  # the cache key reads its size and mtime
    checkpoint.write_bytes(b"0")
    cfg = EvalConfig(checkpoint=str(checkpoint), data=str(root), format=fmt, out=str(tmp_path / "out"),
                     probes=("knn",), fractions=(1.0,), batch_size=32)
    monkeypatch.setattr(data, "CHUNK_BYTES", 1 << 15)  # as small beside this split as 8 MB beside a real one
    # matplotlib's fixed MBs: an empty file stands in for the PNG
    monkeypatch.setattr(metrics, "save_confusion_png", lambda cm, path, *a, **k: Path(path).write_bytes(b""))
    tracemalloc.start()  # numpy's allocations are traced
    try:
        res = evaluate(cfg, model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res["splits"] == {"train": 1000, "test": 40} and res["num_classes"] == NUM_CLASSES
    assert res["runs"][0]["top1"] >= 0.95
    return res, peak / (4 * sum(images[:, :12].size for images, _ in splits.values()))  # 13 bands: 12 kept


PEAK_SCRIPT = """
import json, sys, pathlib
sys.path.insert(0, sys.argv[1])
import test_eval_memory as t

class Patch:  # monkeypatch's setattr, in a process that ends after the one call
    def setattr(self, obj, name, value):
        setattr(obj, name, value)

model = t.BandMeans()
if sys.argv[3] == "s1":
    model.input_metadata = {"s1_scaling": "db"}
    args = (t.s1_images, ["VV", "VH"], model)
else:
    from eval_toydata import GEOBENCH_S2
    args = (t.s2_images, GEOBENCH_S2, model)
res, copies = t.peak_copies(pathlib.Path(sys.argv[2]), Patch(), sys.argv[4], *args)
print(json.dumps({"copies": copies, "modality": res["modality"], "s1_input_units": res.get("s1_input_units"),
                  "s1_scaling": res.get("s1_scaling")}))
"""


def peak_in_a_fresh_process(tmp_path, kind: str, fmt: str) -> dict:
    """peak_copies in a process of its own: in a full-suite worker the traced peak read 2.39-2.40 copies for S1
    where alone it reads 2.05, what other tests left behind in the process, not eval."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(Path(__file__).parent), str(tmp_path), kind, fmt],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["folder", "hdf5"])
def test_eval_peak_memory_stays_near_one_float32_copy_of_the_splits(tmp_path, fmt):
    got = peak_in_a_fresh_process(tmp_path, "s2", fmt)
    assert got["modality"] == "s2_l1c"  # 13 bands read, 12 kept
    assert got["copies"] < 1.5, f"peak {got['copies']:.2f} float32 copies of the splits"


def test_s1_eval_converts_units_in_place(tmp_path):
    """S1 linear power converted to the checkpoint's dB: the unit check and the conversion add no copy. The bound is
    wider than S2's: the statistics hold one band in float64, 2 / C of a float32 copy, a whole one for two bands."""
    got = peak_in_a_fresh_process(tmp_path, "s1", "hdf5")
    assert got["modality"] == "s1" and got["s1_input_units"] == "linear" and got["s1_scaling"] == "db"
    assert got["copies"] < 2.25, f"peak {got['copies']:.2f} float32 copies of the splits"


def test_chunked_split_work_gives_the_whole_split_numbers(monkeypatch):
    """Statistics, units, hash and nodata count over chunks give exactly what numpy gives on the whole split, so
    features, results and feature caches stay the same."""
    import hashlib

    from terrafm.eval.features import images_digest

    monkeypatch.setattr(data, "CHUNK_BYTES", 700)  # many chunks, not aligned with anything
    rng = np.random.default_rng(0)
    tiny = np.float32(1.4e-45)  # the smallest subnormal: a middle pair's mean can round to -0.0
    pool = np.array([-3, -0.5, -0.0, 0.0, 0.5, 3, np.nan, np.inf, -np.inf, tiny, -tiny, 2 * tiny, -2 * tiny],
                    np.float32)
    for trial in range(400):
        shape = (int(rng.integers(1, 9)), 2, int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        x = (rng.choice(pool, size=shape) if trial % 2 else rng.normal(rng.normal(), 1, size=shape)).astype(np.float32)
        finite = x[np.isfinite(x)]
        assert data.s1_units(x) == ("db" if finite.size and np.median(finite) < 0 else "linear"), x.ravel()
    x = rng.normal(1000, 300, size=(37, 3, 9, 11)).astype(np.float32)
    x[::5, 1, :4] = np.nan
    mean, std = data.band_stats(x)
    for c in range(3):
        v = x[:, c].astype(np.float64)
        v = v[~np.isnan(v)]
        assert mean[c] == np.float32(v.mean()) and std[c] == np.float32(v.std())
    assert data.nodata_pixels(x) == int(np.isnan(x).sum())
    for images in (x, x[:, ::-1]):  # a strided view hashes as its C-ordered copy
        whole = np.ascontiguousarray(images)
        digest = hashlib.blake2b(f"{whole.shape}{whole.dtype}".encode(), digest_size=16)
        digest.update(memoryview(whole).cast("B"))
        assert images_digest(images) == digest.hexdigest()


RSS_SCRIPT = """
import resource, sys
import numpy as np, torch
from terrafm.eval.features import extract

class PatchMaps(torch.nn.Module):
    patch_size = 16  # 4 maps of 1024 channels per 16 px patch: 64 KB of features per 32 px image

    def multiscale_features(self, x, modality):
        pooled = torch.nn.functional.avg_pool2d(x, 16)[:, :1]
        return [pooled.expand(-1, 1024, -1, -1) * (i + 1) for i in range(4)]

images = np.ones((4096, 2, 32, 32), np.float32)
extract(PatchMaps(), images[:8], "s1", kind="multiscale", batch_size=4)  # warm up: torch's first-call buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
feats = extract(PatchMaps(), images, "s1", kind="multiscale", batch_size=64)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
assert feats.shape == (4096, 4096, 2, 2) and (feats[:, 1024:2048] == 2 * feats[:, :1024]).all()
print(grown / feats.nbytes)
"""


def test_multiscale_features_are_gathered_into_one_array():
    """Segmentation features (L x D maps) can be as large as the images: a list of batches and its concatenation held
    them twice. Measured as the process's peak resident memory: the batches are torch's, which tracemalloc misses."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    copies = float(run.stdout.split()[-1])
    assert copies < 1.5, f"peak grew by {copies:.2f} copies of the features"
