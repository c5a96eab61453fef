"""Bad input to `terrafm eval` is one message naming the file or flag (exit 2), never a traceback or a silent score."""

import contextlib
import json
import os
import pickle
import re

import h5py
import numpy as np
import pytest
from eval_toydata import GEOBENCH_S2, make_splits, write_folder, write_hdf5

from terrafm.cli import main
from terrafm.eval.data import band_stats, geobench_label_subset, nodata_pixels, normalize, read_split
from terrafm.eval.runner import EvalConfig, _load_splits


def _geobench(tmp_path, name="m-toy", per_class=(3, 1, 2), mutate=None):
    splits = make_splits(13, per_class=per_class)
    if mutate:
        mutate(splits)
    return write_hdf5(tmp_path / name, splits, GEOBENCH_S2)


def _eval(data, out, *extra, fmt="hdf5", checkpoint="unused.pth"):
    return main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--format", fmt, "--out", str(out),
                 "--fractions", "1.0", "--probe", "knn", *extra])


@pytest.mark.parametrize("flag, value, message", [
    ("--img-size", "0", "--img-size must be >= 1"), ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--knn-k", "0", "--knn-k must be >= 1"), ("--knn-temperature", "0", "--knn-temperature must be a positive"),
    ("--linear-epochs", "-1", "--linear-epochs must be >= 1"), ("--device", "tpu", "'tpu' is not a device"),
    ("--fractions", "0", "--fractions must be in (0, 1], got 0.0"), ("--fractions", "nan", "--fractions must be in"),
])
def test_bad_numbers_and_devices_exit_2_before_reading_anything(tmp_path, capsys, flag, value, message):
    assert _eval(tmp_path / "nowhere", tmp_path / "out", flag, value) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_cpu_machine_and_an_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _eval(tmp_path, tmp_path / "out", "--device", "cuda") == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # was a traceback when the model moved there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _eval(tmp_path, tmp_path / "out", "--device", "cuda:2") == 2
    assert "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in capsys.readouterr().err
    (tmp_path / "file").write_text("keep me")
    for extra in ((), ("--cache-dir", str(tmp_path / "file"))):
        out = tmp_path / ("file" if not extra else "out")
        assert _eval(tmp_path, out, *extra) == 2
        assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n"


def _corrupt_partition(root, text):
    (root / "default_partition.json").write_text(text)


@pytest.mark.parametrize("damage, message", [
    (lambda r: _corrupt_partition(r, "{not json"), "not a readable JSON partition"),
    (lambda r: _corrupt_partition(r, "[1, 2]"), "expected an object of splits"),
    (lambda r: _corrupt_partition(r, json.dumps({"train": "train_0000", "test": []})), "must be a list of sample ids"),
    (lambda r: _corrupt_partition(r, json.dumps({"train": ["../x"], "test": []})), "must be a list of sample ids"),
    (lambda r: _corrupt_partition(r, json.dumps({"train": ["train_0000", "train_0001"], "test": ["train_0001"]})),
     r"lists 1 sample in both 'train' and 'test' \(e.g. 'train_0001'\): a probe would be scored on images it was fit"),
    (lambda r: _corrupt_partition(r, json.dumps({"train": ["train_0000", "train_0001", "train_0000"], "test": []})),
     r"lists 1 sample more than once in 'train' \(e.g. 'train_0000'\): it would count twice"),
    (lambda r: (r / "train_0001.hdf5").write_bytes(b"garbage" * 10), "train_0001.hdf5: not a readable HDF5 file"),
    (lambda r: (r / "train_0001.hdf5").write_bytes((r / "train_0001.hdf5").read_bytes()[:3000]),
     "train_0001.hdf5: not a readable HDF5 file"),
    (lambda r: (r / "train_0001.hdf5").write_text(LFS_POINTER),  # what `git clone` without git-lfs leaves
     r"train_0001\.hdf5: not an HDF5 file: it is a Git LFS pointer, not the data \(run `git lfs pull` where"),
])
def test_a_broken_geobench_folder_names_the_file(tmp_path, damage, message):
    root = _geobench(tmp_path)
    damage(root)
    with pytest.raises(ValueError, match=message):
        read_split(root, "hdf5", "train")


def test_nodata_pixels_are_masked_and_an_all_nodata_image_is_refused(tmp_path):
    def nan(splits):
        images = splits["train"][0].astype(np.float32)
        images[2, 3, :2, :2] = np.nan
        images[1, 0, 5, 5] = -9999.0  # S1 RTC fill
        images[0, 5, 0, 0] = np.inf
        splits["train"] = (images, splits["train"][1])

    split = read_split(_geobench(tmp_path, mutate=nan), "hdf5", "train")
    bad = np.isnan(split.images)  # 13 bands: S2 L1C, B10 (index 10) dropped, the bands before it keep their index
    assert nodata_pixels(split.images) == 6 and bad[2, 3, :2, :2].all() and bad[1, 0, 5, 5] and bad[0, 5, 0, 0]
    mean, std = band_stats(split.images)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and mean[0] > 500  # the fill is not in the mean
    x = normalize(split.images, mean, std)
    assert np.isfinite(x).all() and (x[bad] == 0).all()
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=".npy")
    np.save(root / "train" / "class_0" / "inf.npy", np.full((13, 32, 32), np.inf, np.float32))
    with pytest.raises(ValueError, match=r"inf\.npy: every pixel is nodata"):
        read_split(root, "folder", "train")


def test_an_s2_pixel_at_0_in_every_band_is_nodata_and_a_0_in_one_band_is_kept(tmp_path):
    def edge(splits):
        images = splits["train"][0].astype(np.float32)
        images[0, :, :3, :] = 0  # outside the swath: ESA's NO_DATA in every band
        images[1, 12, 4, 4] = 0  # a dark pixel clipped at 0 in B12 only
        splits["train"] = (images, splits["train"][1])

    split = read_split(_geobench(tmp_path, mutate=edge), "hdf5", "train")
    assert np.isnan(split.images[0, :, :3]).all() and not np.isnan(split.images[0, :, 3:]).any()
    assert split.images[1, 11, 4, 4] == 0 and not np.isnan(split.images[1:]).any()  # B12 is band 11 without B10
    assert nodata_pixels(split.images) == 12 * 3 * split.images.shape[-1]
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=".npy")
    np.save(root / "train" / "class_0" / "empty.npy", np.zeros((13, 32, 32), np.uint16))
    with pytest.raises(ValueError, match=r"empty\.npy: every pixel is nodata \(0 in every S2 band"):
        read_split(root, "folder", "train")


def test_a_geotiff_declared_nodata_value_is_masked_in_images_and_ignored_in_masks(tmp_path):
    import tifffile

    from terrafm.data.sources import GDAL_NODATA

    def tif(path, array, nodata):
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, array, extratags=[(GDAL_NODATA, "s", 0, nodata, False)])

    image = np.full((32, 32, 12), 1200, np.uint16)
    image[:4, :, :] = 65535  # the file declares 65535 as its fill
    tif(tmp_path / "seg" / "train" / "images" / "a.tif", image, "65535")
    mask = np.ones((32, 32), np.uint8)
    mask[:, :3] = 0
    tif(tmp_path / "seg" / "train" / "masks" / "a.tif", mask, "0")
    split = read_split(tmp_path / "seg", "folder", "train")
    assert np.isnan(split.images[0, :, :4]).all() and not np.isnan(split.images[0, :, 4:]).any()
    assert (split.labels[0, :, :3] == 255).all() and (split.labels[0, :, 3:] == 1).all()
    assert band_stats(split.images)[0][0] == 1200
    tif(tmp_path / "seg" / "train" / "images" / "a.tif", image, "nan")  # a NaN or textual tag declares nothing more
    assert not np.isnan(read_split(tmp_path / "seg", "folder", "train").images).any()


def test_a_band_without_valid_pixels_in_the_train_split_is_refused(tmp_path):
    images = np.ones((2, 12, 8, 8), np.float32)
    images[:, 4] = np.nan
    with pytest.raises(ValueError, match="band 'B05' has no valid pixel in the train split"):
        band_stats(images, ("B01", "B02", "B03", "B04", "B05"))


def test_bad_bands_and_attrs_pickle_name_the_sample(tmp_path):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["02 - Blue"]
        f.create_dataset("02 - Blue", data=np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match=r"train_0001\.hdf5: band '02 - Blue' has shape \(2, 32, 32\)"):
        read_split(root, "hdf5", "train")
    with h5py.File(root / "train_0001.hdf5", "a") as f:  # a coarser grid of the same area is resized ...
        del f["02 - Blue"]
        f.create_dataset("02 - Blue", data=np.ones((16, 16)))
    assert read_split(root, "hdf5", "train").images.shape[-2:] == (32, 32)
    with h5py.File(root / "train_0001.hdf5", "a") as f:  # ... another area is not
        del f["02 - Blue"]
        f.create_dataset("02 - Blue", data=np.ones((7, 9)))
    with pytest.raises(ValueError, match=r"train_0001\.hdf5: band '02 - Blue' is 7x9 px and the finest band 32x32"):
        read_split(root, "hdf5", "train")
    root = _geobench(tmp_path, "m-pickle")
    for raw, message in (("not a bytes literal", "attrs\\['pickle'\\] is not GEO-Bench's"),
                         (str(pickle.dumps({"label": 1})[:-3]), "test_0000.hdf5: .*truncated"),
                         (str(pickle.dumps(print)), "test_0000.hdf5: refusing to load builtins.print")):
        with h5py.File(root / "test_0000.hdf5", "a") as f:
            del f["label"]  # GEO-Bench keeps classification labels in attrs['pickle']
            f.attrs["pickle"] = raw
        with pytest.raises((ValueError, pickle.UnpicklingError), match=message):
            read_split(root, "hdf5", "test")
        with h5py.File(root / "test_0000.hdf5", "a") as f:
            f.create_dataset("label", data=0)


@pytest.mark.parametrize("split, label, message", [
    ("test", 99, r"split 'test' .* has class id\(s\) \[99\] that the train split lacks"),
    ("train", -1, "split 'train' .*: label -1 is negative"),
    ("valid", -3, "split 'val' .*: label -3 is negative"),
])
def test_labels_out_of_range_are_one_message(tmp_path, split, label, message):
    def set_label(splits):
        images, labels = splits[split]
        labels = labels.copy()
        labels[0] = label
        splits[split] = (images, labels)

    root = _geobench(tmp_path, mutate=set_label)
    with pytest.raises(ValueError, match=message):
        _load_splits(EvalConfig(checkpoint="", data=str(root), format="hdf5", out=str(tmp_path / "out")))


def test_multi_hot_labels_of_another_length_in_a_split_are_named(tmp_path, capsys, tiny_pth):
    """A test split whose multi-hot vectors list 5 labels beside a train split of 4 was a numpy broadcast error after
    feature extraction."""
    def multi_hot(splits):
        for split, (images, labels) in splits.items():
            hot = np.zeros((len(labels), 5 if split == "test" else 4), np.uint8)
            hot[np.arange(len(labels)), labels] = 1
            splits[split] = (images, hot)

    root = _geobench(tmp_path, mutate=multi_hot)
    assert _eval(root, tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert "split 'test'" in err and "multi-hot labels of 5 entries, train of 4" in err, err


def test_folder_sidecars_and_hidden_entries_are_skipped_and_bad_images_named(tmp_path):
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits)
    (root / "train" / "class_0" / "0000.tif.aux.xml").write_text("<PAMDataset/>")
    (root / "train" / "class_1" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "class_2" / "._0001.tif").write_bytes(b"\0\0")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    train = read_split(root, "folder", "train")
    assert train.class_names == [f"class_{k}" for k in range(4)] and len(train.labels) == 8
    (root / "train" / "class_0" / "bad.tif").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"class_0/bad\.tif: not a readable image"):
        read_split(root, "folder", "train")
    (root / "train" / "class_0" / "bad.tif").unlink()
    np.save(root / "train" / "class_0" / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: not a readable image"):
        read_split(root, "folder", "train")


def test_a_sample_of_another_size_is_named(tmp_path):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0002.hdf5", "a") as f:
        for name in GEOBENCH_S2:
            del f[name]
            f.create_dataset(name, data=np.ones((33, 33), np.uint16))
    with pytest.raises(ValueError, match=r"train_0002\.hdf5 is 33x33 px, the first sample of split 'train' 32x32"):
        read_split(root, "hdf5", "train")


def test_a_damaged_or_stale_feature_cache_is_recomputed(tmp_path):
    from terrafm.eval.features import cached_features

    calls = []

    def compute(rows=4):
        calls.append(rows)
        return np.full((rows, 3), float(len(calls)), np.float32)

    (tmp_path / "features_k.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert cached_features(tmp_path, "k", compute, rows=4).shape == (4, 3) and calls == [4]
    assert cached_features(tmp_path, "k", compute, rows=4)[0, 0] == 1.0 and calls == [4]  # now a good cache
    assert cached_features(tmp_path, "k", lambda: compute(6), rows=6).shape == (6, 3)  # samples added since


def _full_disk_after_half(monkeypatch) -> None:
    """Path.write_text / write_bytes write half their data, then fail as a full disk does."""
    import errno
    from pathlib import Path

    def half_then_enospc(self, data, *args, **kwargs):
        with open(self, "wb") as f:
            f.write((data.encode() if isinstance(data, str) else data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_enospc)
    monkeypatch.setattr(Path, "write_bytes", half_then_enospc)


def test_a_full_disk_keeps_the_last_results_json(tmp_path, monkeypatch, capsys, tiny_pth):
    """results.json was rewritten in place: a full disk (or a kill) mid-write tore the last run's results."""
    data, out = _geobench(tmp_path), tmp_path / "out"
    assert _eval(data, out, checkpoint=tiny_pth) == 0
    before = (out / "results.json").read_bytes()
    _full_disk_after_half(monkeypatch)
    assert _eval(data, out, checkpoint=tiny_pth) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert not [p.name for p in out.rglob("*.tmp*")]


def test_a_feature_cache_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    """The cache's own temp file (features_<key>.tmp.npz) was left behind by a failed write."""
    import errno

    from terrafm.eval import features

    def savez_half_then_enospc(file, **arrays):
        with open(file, "ab") if isinstance(file, str | os.PathLike) else contextlib.nullcontext(file) as f:
            f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.np, "savez", savez_half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        features.cached_features(tmp_path, "k", lambda: np.zeros((2, 3), np.float32), rows=2)
    assert list(tmp_path.iterdir()) == []


def test_a_test_class_the_train_split_lacks_is_named_not_dropped(tmp_path):
    """Dropping its images would score the probe on a filtered test set; the other direction was already an error."""
    import shutil

    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits)
    train = read_split(root, "folder", "train")
    shutil.copytree(root / "test" / "class_0", root / "test" / "class_zz")
    with pytest.raises(ValueError, match=r"class folders the train split lacks: \['class_zz'\]"):
        read_split(root, "folder", "test", class_names=train.class_names)


def _segmentation(tmp_path, masks):
    """A segmentation folder train/images + train/masks with one 32x32 12-band image per mask (numpy arrays)."""
    import tifffile

    root = tmp_path / "seg"
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    for i, mask in enumerate(masks):
        tifffile.imwrite(root / "train" / "images" / f"{i}.tif", np.full((32, 32, 12), 1000 + i, np.uint16))
        tifffile.imwrite(root / "train" / "masks" / f"{i}.tif", mask)
    return root


def test_segmentation_masks_of_another_shape_or_non_integer_values_are_named(tmp_path):
    m = np.tile(np.arange(32, dtype=np.uint8) % 3, (32, 1))
    split = read_split(_segmentation(tmp_path / "ok", [m[None], m[..., None]]), "folder", "train")
    assert split.labels.shape == (2, 32, 32) and (split.labels == m).all()  # a singleton channel is squeezed
    for masks, message in (
        ([m, np.stack([m] * 3, -1)], r"masks/1\.tif: a mask is one band of class ids .*, got shape \(32, 32, 3\)"),
        ([m, m[:16]], r"masks/1\.tif is 16x32 px, its image 32x32"),
        ([m, m.astype(np.float32) + 0.5], r"masks/1\.tif: label 0\.5 is not an integer class id"),
    ):
        with pytest.raises(ValueError, match=message):
            read_split(_segmentation(tmp_path / str(len(list(tmp_path.iterdir()))), masks), "folder", "train")


def _corrupt_zlib_tif(path, array):
    import tifffile

    tifffile.imwrite(path, array, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[start + 2:start + count] = bytes(b ^ 0x5A for b in raw[start + 2:start + count])
    path.write_bytes(bytes(raw))


def test_a_corrupt_compressed_geotiff_or_a_complex_npy_is_named(tmp_path):
    m = np.ones((32, 32), np.uint8)
    root = _segmentation(tmp_path / "image", [m])
    _corrupt_zlib_tif(root / "train" / "images" / "0.tif", np.full((32, 32, 12), 1000, np.uint16))
    with pytest.raises(ValueError, match=r"images/0\.tif: not a readable image"):
        read_split(root, "folder", "train")
    root = _segmentation(tmp_path / "mask", [m])
    _corrupt_zlib_tif(root / "train" / "masks" / "0.tif", np.tile(np.arange(32, dtype=np.uint8), (32, 1)))
    with pytest.raises(ValueError, match=r"masks/0\.tif: not a readable image"):
        read_split(root, "folder", "train")
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=".npy")
    np.save(root / "train" / "class_0" / "c.npy", np.full((13, 32, 32), 1000 + 1j, np.complex64))
    with pytest.raises(ValueError, match=r"c\.npy: complex values"):
        read_split(root, "folder", "train")


def _huge_tif(path):
    """ImageWidth and ImageLength 2**20 in the first page: terabytes declared, more than any machine's memory."""
    import io

    import tifffile

    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        for code in (256, 257):
            at = tif.pages.first.tags[code].valueoffset
            data[at:at + 4] = (1 << 20).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _npy_header(path, old, new):
    raw = path.read_bytes()
    at = raw.index(old)
    path.write_bytes(raw[:at] + new + raw[at + len(new):])  # over the header's padding: its length is kept


@pytest.mark.parametrize("suffix, damage, message", [
    (".tif", _huge_tif, r"its header declares a 1048576 x 1048576\S* image \(\d+ GiB\), more than this machine's"),
    (".npy", lambda p: _npy_header(p, b"(13, 32, 32), }", b"(13, 32, 999999999)}"),  # was a MemoryError (832 GB)
     "mmap length is greater than file size"),
    (".npy", lambda p: _npy_header(p, b"'shape': (", b"'shape': \xd7"),  # was tokenize's TokenError
     r"malformed \.npy header \(TokenError"),
])
def test_an_image_with_a_damaged_header_is_named_not_a_traceback(tmp_path, capsys, tiny_pth, suffix, damage, message):
    """One byte changed in an image's header (a download gone wrong): a header that declares a huge image made
    tifffile or numpy allocate it (MemoryError) and a .npy header that no longer parses raised TokenError, both
    tracebacks; now one message names the file."""
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=suffix)
    victim = sorted((root / "train" / "class_1").iterdir())[0]
    damage(victim)
    assert _eval(root, tmp_path / "out", fmt="folder", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(re.escape(f"{victim}: not a readable image (") + ".*" + message, err), err


def test_a_damaged_hdf5_label_dataset_is_named(tmp_path):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.create_dataset("label", data=np.arange(32 * 32).reshape(32, 32), chunks=(8, 8), compression="gzip")
        start = f["label"].id.get_chunk_info(0).byte_offset
    raw = bytearray((root / "train_0001.hdf5").read_bytes())
    raw[start:start + 40] = b"\xff" * 40
    (root / "train_0001.hdf5").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_0001\.hdf5: its label is not readable"):
        read_split(root, "hdf5", "train")


@pytest.mark.parametrize("signature, error", [
    (b"TREE", "RuntimeError"),  # the root group's B-tree: listing the bands raised RuntimeError (a traceback)
    (b"GCOL", "OSError"),  # the global heap holding attrs['pickle']: an OSError, reported as "cannot write" --out
])
def test_a_geobench_sample_with_damaged_metadata_is_named(tmp_path, capsys, tiny_pth, signature, error):
    """A sample that opens (its superblock is intact) but whose inner metadata is damaged, as one byte changed in a
    download leaves it: h5py raises from whichever read meets the damage; one message names the file."""
    root = _geobench(tmp_path)
    for sample in root.glob("*.hdf5"):  # GEO-Bench keeps classification labels in attrs['pickle'] (a vlen string)
        with h5py.File(sample, "a") as f:
            f.attrs["pickle"] = str(pickle.dumps({"label": int(np.asarray(f["label"])), "bands_order": GEOBENCH_S2}))
            del f["label"]
    raw = (root / "train_0001.hdf5").read_bytes()
    assert raw.count(signature) == 1
    (root / "train_0001.hdf5").write_bytes(raw.replace(signature, b"X" + signature[1:]))
    assert _eval(root, tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "cannot write" not in err, err
    assert f"train_0001.hdf5: damaged HDF5 file, not readable ({error}: " in err


@pytest.mark.parametrize("label, message", [
    (10**12, r"label 1e\+12 is not a class id: class ids are below 100000"),
    (2.7, r"label 2\.7 is not an integer class id"),
    (float("nan"), r"label nan is not a finite number"),
])
def test_a_huge_fractional_or_nan_label_is_named_before_any_allocation(tmp_path, label, message):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.attrs["label"] = label
    with pytest.raises(ValueError, match=r"split 'train' sample .*train_0001\.hdf5: " + message):
        read_split(root, "hdf5", "train")
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        f.attrs["label"] = 1.0  # an integral float is a class id
    assert read_split(root, "hdf5", "train").labels.dtype == np.int64


@pytest.mark.parametrize("label, message", [
    (None, r"label is missing \(None\)"),
    ("3", r"label is text \['3'\], not a number"),
    (b"3", r"label is text \[b'3'\], not a number"),
    (["1", 2], r"label is text \['1', '2'\], not a number"),
])
def test_a_missing_or_text_label_is_named_not_read_as_nan_or_a_class(tmp_path, label, message):
    """A pickled label None was 'label nan is not a finite number'; "3" or b"3" was read as class 3."""
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.attrs["pickle"] = str(pickle.dumps({"label": label}))
    with pytest.raises(ValueError, match=r"split 'train' sample .*train_0001\.hdf5: " + message):
        read_split(root, "hdf5", "train")
    if isinstance(label, str | bytes):  # stored as an attribute, as h5py writes strings
        with h5py.File(root / "train_0001.hdf5", "a") as f:
            f.attrs["label"] = label
        with pytest.raises(ValueError, match=r"split 'train' sample .*train_0001\.hdf5: label is text"):
            read_split(root, "hdf5", "train")


def test_a_band_missing_from_the_first_sample_only_names_that_sample(tmp_path):
    """The first sample's bands decide the modality: when only it lacks B8A, the message named no file."""
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0000.hdf5", "a") as f:
        del f["08A - Vegetation Red Edge"]
    with pytest.raises(ValueError, match=r"train_0000\.hdf5 \(the first sample, whose bands decide\): the dataset's 12 "
                                         r"bands \[.*\] \(read as .*\) fit no modality"):
        read_split(root, "hdf5", "train")


def test_a_benchmark_folder_names_the_datasets_inside(tmp_path, capsys, tiny_pth):
    """GEO-Bench's classification_v1.0/ (the folder of datasets) read 'default_partition.json not found'."""
    _geobench(tmp_path / "classification_v1.0", name="m-eurosat")
    assert _eval(tmp_path / "classification_v1.0", tmp_path / "out", checkpoint=tiny_pth) == 2
    assert "holds the datasets ['m-eurosat']: pass one, e.g." in capsys.readouterr().err


def test_a_later_sample_with_an_extra_band_loads_and_one_lacking_a_band_is_named(tmp_path):
    """A band the read does not use (a cloud mask in some samples) refused the whole split."""
    root = _geobench(tmp_path)
    before = read_split(root, "hdf5", "train")
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        f.create_dataset("Cloud Probability", data=np.zeros((32, 32), np.uint8))
    after = read_split(root, "hdf5", "train")
    assert after.modality == before.modality and np.array_equal(after.images, before.images, equal_nan=True)
    with h5py.File(root / "train_0002.hdf5", "a") as f:
        del f["04 - Red"]
    with pytest.raises(ValueError, match=r"train_0002\.hdf5 lacks band\(s\) \['04 - Red'\], which the first sample "
                                         "has"):
        read_split(root, "hdf5", "train")


def test_an_hdf5_mask_of_another_size_than_its_image_is_named(tmp_path):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.create_dataset("label", data=np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"train_0001\.hdf5: its label mask is 16x16 px, its image 32x32"):
        read_split(root, "hdf5", "train")


def test_an_hdf5_label_of_three_dimensions_is_named_not_a_traceback(tmp_path, capsys, tiny_pth):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.create_dataset("label", data=np.zeros((32, 32, 2), np.uint8))
    assert _eval(root, tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert "train_0001.hdf5: its label has shape (32, 32, 2)" in err and "Traceback" not in err


def test_an_empty_validation_split_is_no_validation_split(tmp_path):
    root = _geobench(tmp_path)
    partition = json.loads((root / "default_partition.json").read_text())
    (root / "default_partition.json").write_text(json.dumps({**partition, "valid": []}))
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    folder = write_folder(tmp_path / "eurosat", splits)
    (folder / "val").mkdir()
    for data, fmt in ((root, "hdf5"), (folder, "folder")):
        loaded = _load_splits(EvalConfig(checkpoint="", data=str(data), format=fmt, out=str(tmp_path / "out")))
        assert sorted(loaded) == ["test", "train"]
    (root / "default_partition.json").write_text(json.dumps({**partition, "test": []}))
    with pytest.raises(FileNotFoundError, match="split 'test' in .*default_partition.json is empty"):
        _load_splits(EvalConfig(checkpoint="", data=str(root), format="hdf5", out=str(tmp_path / "out")))


def test_a_geobench_folder_moved_away_from_its_absolute_links_names_them(tmp_path, capsys, tiny_pth):
    """GEO-Bench's Partition.save(as_default=True) writes default_partition.json as a symlink to
    f"{directory}/original_partition.json": once the folder is moved it dangles, and eval said "not found"; a
    dangling label-fraction partition fell back to a stratified subset in silence."""
    built = _geobench(tmp_path / "built")
    (built / "default_partition.json").rename(built / "original_partition.json")
    os.symlink(f"{built}/original_partition.json", built / "default_partition.json")
    (tmp_path / "built").rename(tmp_path / "moved")
    root = tmp_path / "moved" / built.name
    assert _eval(root, tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert (f"{root}/default_partition.json is a broken symlink: it points to {built}/original_partition.json, which "
            f"does not exist; the folder was moved? link it again where it is: ln -sf original_partition.json "
            f"{root}/default_partition.json") in err, err
    (root / "default_partition.json").unlink()
    (root / "default_partition.json").symlink_to("original_partition.json")
    (root / "train_0001.hdf5").rename(tmp_path / "elsewhere.hdf5")
    (root / "train_0001.hdf5").symlink_to(tmp_path / "gone" / "train_0001.hdf5")
    with pytest.raises(FileNotFoundError, match=r"train_0001\.hdf5 is a broken symlink: it points to .*gone/"
                                                r"train_0001\.hdf5, which does not exist$"):
        read_split(root, "hdf5", "train")
    (root / "train_0001.hdf5").unlink()
    (tmp_path / "elsewhere.hdf5").rename(root / "train_0001.hdf5")
    train = read_split(root, "hdf5", "train")
    (root / "0.01x_train_partition.json").symlink_to(tmp_path / "gone" / "0.01x_train_partition.json")
    with pytest.raises(FileNotFoundError, match=r"0\.01x_train_partition\.json is a broken symlink"):
        geobench_label_subset(root, 0.01, train.files)


@pytest.mark.parametrize("partition, message", [
    ("{not json", "0.01x_train_partition.json: not a readable JSON partition"),
    (json.dumps({"train": ["test_0000"]}), "0.01x_train_partition.json lists 1 sample(s) that are not in default_"),
])
def test_a_broken_label_fraction_partition_is_refused_before_any_probe_runs(tmp_path, capsys, tiny_pth, partition,
                                                                            message):
    """The 1% partition was read in the loop over fractions, after the features and the 1.0 probes (minutes on real
    data)."""
    root = _geobench(tmp_path)
    (root / "0.01x_train_partition.json").write_text(partition)
    assert _eval(root, tmp_path / "out", "--fractions", "1.0", "0.01", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not list((tmp_path / "out").iterdir())  # no features cached, no confusion PNG of the 1.0 probe


def test_paths_that_are_not_utf8_are_read_and_printed_escaped(tmp_path, capsys, tiny_pth):
    """A class folder or --out whose name holds a byte that is not UTF-8 (Linux allows any): the confusion PNG's
    tick labels and the last line printed raised after the features were extracted, and results.json was lost."""
    splits = make_splits(13, per_class=(2, 1, 1))
    root = write_folder(tmp_path / "eurosat", splits)
    for split in ("train", "valid", "test"):
        (root / split / "class_1").rename(root / split / os.fsdecode(b"class_\xff"))
    out = tmp_path / os.fsdecode(b"out\xff")
    assert _eval(root, out, fmt="folder", checkpoint=tiny_pth) == 0
    assert f"results: {tmp_path}/out\\xff/results.json" in capsys.readouterr().out
    assert os.fsdecode(b"class_\xff") in json.loads((out / "results.json").read_text())["class_names"]
    assert (out / "confusion_knn_100pct.png").is_file()


@pytest.mark.parametrize("member", ["04 - Red", "label"])
@pytest.mark.parametrize("link", ["dangling", "external"])
def test_a_broken_or_external_hdf5_link_is_named(tmp_path, member, link):
    root = _geobench(tmp_path)
    outside = tmp_path / "outside.hdf5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("x", data=np.ones((32, 32), np.float32))
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f[member]
        f[member] = h5py.SoftLink("/nonexistent") if link == "dangling" else h5py.ExternalLink(str(outside), "/x")
    what = "band" if member != "label" else "label"
    message = "is a link to '/nonexistent', which is not in the file" if link == "dangling" else \
        "is a link to '.*outside.hdf5'; a sample's data must be in its own file"
    with pytest.raises(ValueError, match=rf"train_0001\.hdf5: {what} '{member}' " + message):
        read_split(root, "hdf5", "train")


def _folder_with_first_image(tmp_path, content: bytes):
    """(root, path) of an EuroSAT-style folder whose first train image holds `content` instead."""
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits)
    first = sorted((root / "train" / "class_0").glob("*.tif"))[0]
    first.write_bytes(content)
    return root, first


@pytest.mark.parametrize("content, kind", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "a Git LFS pointer"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "a PNG image"),
    (b"", "empty (0 bytes)"),
])
def test_a_file_of_another_format_in_an_image_folder_is_named_as_that(tmp_path, content, kind):
    """A clone without git-lfs, a PNG saved as .tif, an empty download: the folder reader said 'not a readable image
    (not a TIFF file: header=...)', where prepare and the HDF5 reader say what the file is."""
    root, first = _folder_with_first_image(tmp_path, content)
    with pytest.raises(ValueError, match=rf"{first.name}: not a GeoTIFF: it is {re.escape(kind)}"):
        read_split(root, "folder", "train")


@pytest.mark.parametrize("content", [b"II*\x00", b"II*\x00" + (10**6).to_bytes(4, "little") + b"\x00" * 20,
                                     b"II*\x00junkjunk", b"II+\x00\x08\x00\x00\x00" + b"\xff" * 30])
def test_a_tiff_whose_structure_is_broken_is_named(tmp_path, content):
    root, first = _folder_with_first_image(tmp_path, content)
    with pytest.raises(ValueError, match=rf"{first.name}: not a readable image"):
        read_split(root, "folder", "train")


def test_a_plain_pickle_checkpoint_is_one_message_without_torch_warnings(tmp_path):
    """In a process of its own: pytest records warnings instead of printing them."""
    import subprocess
    import sys

    checkpoint = tmp_path / "plain.pth"
    checkpoint.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # not torch.save: torch warns of the protocol
    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "eval", "--checkpoint", str(checkpoint), "--data",
                           str(_geobench(tmp_path)), "--format", "hdf5", "--out", str(tmp_path / "out"), "--probe",
                           "knn"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "plain.pth is a pickle PyTorch's weights-only loader refuses" in proc.stderr
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr


def test_images_in_a_subfolder_of_a_class_folder_are_named_not_left_out(tmp_path):
    """train/<class>/sub/x.npy was not read, and nothing said so: the class lost those images."""
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=".npy")
    (root / "train" / "class_0" / "more").mkdir()
    np.save(root / "train" / "class_0" / "more" / "x.npy", np.full((13, 32, 32), 1000, np.uint16))
    with pytest.raises(ValueError, match=r"class_0/more holds images inside the folder of class 'class_0'"):
        read_split(root, "folder", "train")
    (root / "train" / "class_0" / "more" / "x.npy").unlink()  # an empty sub-folder (or one of sidecars) is fine
    (root / "train" / "class_0" / "more" / "notes.txt").write_text("x")
    assert len(read_split(root, "folder", "train").labels) == 8


def test_a_test_split_of_loose_images_without_class_folders_is_named(tmp_path):
    """test/x.npy beside no class folder: the split held no image to read (was numpy's 'need at least one array')."""
    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits, suffix=".npy")
    train = read_split(root, "folder", "train")
    for folder in (root / "test").iterdir():
        for f in folder.iterdir():
            f.rename(root / "test" / f"{folder.name}_{f.name}")
        folder.rmdir()
    with pytest.raises(ValueError, match=r"test holds none of the train split's class folders \['class_0'"):
        read_split(root, "folder", "test", class_names=train.class_names)


def test_a_label_of_another_shape_than_the_first_samples_names_its_file(tmp_path):
    def longer_vector(splits):
        images, labels = splits["train"]
        hot = np.eye(4, dtype=np.uint8)[labels]
        splits["train"] = (images, [*hot[:2], np.ones(5, np.uint8), *hot[3:]])

    data = _geobench(tmp_path, mutate=longer_vector)
    with pytest.raises(ValueError, match=r"train_0002.hdf5: its label has shape \(5,\), the first sample's \(4,\)"):
        read_split(data, "hdf5", "train")


@pytest.mark.parametrize("hot, message", [
    (lambda n: np.zeros((n, 0), np.uint8), r"train_0000\.hdf5: its label is empty \(shape \(0,\)\)"),
    (lambda n: np.zeros((n, 4), np.uint8), r"the train split of .* has no positive label: every multi-hot vector is 0"),
])
def test_empty_or_all_zero_multi_hot_labels_are_refused_not_scored_zero(tmp_path, hot, message):
    """An empty label vector was multi-label with K = 0, and a train split of all-zero vectors fitted nothing: both
    ran to exit 0 with every F1 and mAP 0."""
    def multi_hot(splits):
        for split, (images, labels) in splits.items():
            splits[split] = (images, hot(len(labels)))

    root = _geobench(tmp_path, mutate=multi_hot)
    with pytest.raises(ValueError, match=message):
        _load_splits(EvalConfig(checkpoint="", data=str(root), format="hdf5", out=str(tmp_path / "out")))


# attrs['pickle'] bytes that a flipped byte leaves (found by fuzzing GEO-Bench pickles): numpy's own dtype.__setstate__
# on this state killed the process (SIGSEGV); the others escaped as LookupError / OverflowError tracebacks (exit 1)
DAMAGED_PICKLES = {
    "dtype state": b"\x80\x03cnumpy\ndtype\nX\x02\x00\x00\x00i8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<"
                   b"J\x0d\x0d\x4e\x4eJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    "encoding name": b"\x80\x02}q\x00X\x05\x00\x00\x00labelq\x01c_codecs\nencode\nq\x02X\x01\x00\x00\x00\x01q\x03"
                     b"X\x06\x00\x00\x00lat_n1q\x04\x86q\x05Rq\x06s.",
    "huge bytearray": b"\x80\x05\x96" + b"\xff" * 8 + b".",
}


@pytest.mark.parametrize("name", sorted(DAMAGED_PICKLES))
def test_a_damaged_geobench_pickle_is_named_never_a_crash(tmp_path, capsys, tiny_pth, name):
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f["label"]
        f.attrs["pickle"] = str(DAMAGED_PICKLES[name])
    assert _eval(root, tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "train_0001.hdf5" in err and "attrs['pickle']" in err, err


def test_pickled_numpy_labels_rebuild_from_checked_bytes_and_other_values_never_fail_the_label():
    """Arrays and scalars are rebuilt from their raw bytes (numpy's __setstate__ is never called): byte order, bool,
    object and text labels come back equal; a value of a dtype no label has (datetime64) elsewhere in the dict leaves
    the label readable, and as the label it is refused by name."""
    import io

    from terrafm.eval.data import _StubUnpickler, _Unreadable

    labels = [np.array([0, 1, 1], dtype=">i4"), np.array([True, False]), np.array([1, None], dtype=object),
              np.array(["a", "bc"]), np.int64(7), np.float32(2.0), np.asfortranarray(np.arange(6).reshape(2, 3))]
    for protocol in (2, 4, 5):
        for label in labels:
            attrs = {"label": label, "when": np.array(["2020-01-01"], dtype="datetime64[D]")}
            out = _StubUnpickler(io.BytesIO(pickle.dumps(attrs, protocol=protocol))).load()
            assert type(out["label"]) is type(label) and out["label"].dtype == label.dtype, (protocol, label)
            np.testing.assert_array_equal(out["label"], label)
            assert isinstance(out["when"], _Unreadable)


def test_a_pickled_label_of_a_dtype_no_label_has_is_named(tmp_path):
    root = _geobench(tmp_path)
    with h5py.File(root / "test_0000.hdf5", "a") as f:
        del f["label"]
        f.attrs["pickle"] = str(pickle.dumps({"label": np.array(["2020-01-01"], dtype="datetime64[D]")}))
    with pytest.raises(pickle.UnpicklingError, match=r"test_0000\.hdf5: attrs\['pickle'\] holds a label that is a "
                                                     "pickled numpy dtype 'M8' that a label never has"):
        read_split(root, "hdf5", "test")


@pytest.mark.parametrize("kind", ["external storage", "a virtual dataset"])
def test_a_band_whose_data_is_in_another_file_is_refused(tmp_path, kind):
    """A band stored as raw data in an outside file, or a virtual dataset over another file, was read without a word
    (a virtual dataset whose source is gone read as zeros)."""
    root = _geobench(tmp_path)
    sample = root / "train_0001.hdf5"
    with h5py.File(sample, "a") as f:
        band = np.asarray(f[GEOBENCH_S2[0]])
        del f[GEOBENCH_S2[0]]
        if kind == "external storage":
            (tmp_path / "raw.bin").write_bytes(band.astype("<f4").tobytes())
            f.create_dataset(GEOBENCH_S2[0], shape=band.shape, dtype="<f4", external=[(str(tmp_path / "raw.bin"), 0,
                                                                                          band.size * 4)])
        else:
            with h5py.File(tmp_path / "source.h5", "w") as src:
                src["x"] = band
            layout = h5py.VirtualLayout(shape=band.shape, dtype=band.dtype)
            layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "x", shape=band.shape)
            f.create_virtual_dataset(GEOBENCH_S2[0], layout)
    with pytest.raises(ValueError, match=rf"train_0001\.hdf5: band '{re.escape(GEOBENCH_S2[0])}' keeps its data in "
                                         rf"other files \({kind}\); a sample's data must be in its own file"):
        read_split(root, "hdf5", "train")


def test_format_folder_on_a_geobench_dataset_says_to_use_hdf5(tmp_path):
    from terrafm.eval.data import MissingSplitError

    root = _geobench(tmp_path)
    with pytest.raises(MissingSplitError, match=r"split 'train' not found in .*m-toy; it has \[\] \(its \.hdf5 "
                                                r"files are GEO-Bench samples: --format hdf5\)"):
        read_split(root, "folder", "train")


def test_a_split_reads_in_sample_id_order_whatever_the_partition_lists(tmp_path):
    """Seeded 1% subsets and the linear probe's hold-out pick rows by position: a partition file listing the same
    samples in another order picked other samples (linear top-1 0.55 vs 0.45 on one dataset)."""
    root = _geobench(tmp_path)
    partition = json.loads((root / "default_partition.json").read_text())
    before = read_split(root, "hdf5", "train")
    partition["train"] = partition["train"][::-1]
    (root / "default_partition.json").write_text(json.dumps(partition))
    after = read_split(root, "hdf5", "train")
    assert [p.name for p in after.files] == [p.name for p in before.files] == sorted(p.name for p in before.files)
    np.testing.assert_array_equal(after.labels, before.labels)
    np.testing.assert_array_equal(after.images, before.images)


def test_a_partition_key_no_split_reads_is_ignored(tmp_path):
    """An extra list such as "all" (train + test) was taken for a split: 'a probe would be scored on images it was fit
    on'."""
    root = _geobench(tmp_path)
    partition = json.loads((root / "default_partition.json").read_text())
    before = read_split(root, "hdf5", "train")
    partition["all"] = partition["train"] + partition["test"]
    (root / "default_partition.json").write_text(json.dumps(partition))
    assert [p.name for p in read_split(root, "hdf5", "train").files] == [p.name for p in before.files]
    partition["valid"] = partition["test"][:1]  # a real split that shares a sample is still refused
    (root / "default_partition.json").write_text(json.dumps(partition))
    with pytest.raises(ValueError, match=r"in both 'test' and 'valid'|in both 'valid' and 'test'"):
        read_split(root, "hdf5", "test")


def test_a_sample_listed_twice_in_a_label_fraction_file_is_refused(tmp_path):
    from terrafm.eval.data import geobench_label_subset

    root = _geobench(tmp_path)
    train = read_split(root, "hdf5", "train")
    first = train.files[0].stem
    (root / "0.10x_train_partition.json").write_text(json.dumps({"train": [first, first]}))
    with pytest.raises(ValueError, match=rf"0\.10x_train_partition\.json lists 1 sample more than once in 'train' "
                                         rf"\(e\.g\. '{first}'\)"):
        geobench_label_subset(root, 0.1, train.files)


def test_a_soft_link_through_an_external_link_is_refused(tmp_path):
    """Only the member's own link was checked: a soft link to a path under an external link (here hidden under a
    'label*' name, which is not read as a band) read another file's data as the sample's band."""
    root = _geobench(tmp_path)
    outside = tmp_path / "outside.hdf5"
    with h5py.File(outside, "w") as f:
        f.create_dataset("data", data=np.full((32, 32), -7.0, np.float32))
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        f["labelz"] = h5py.ExternalLink(str(outside), "/")
        del f["04 - Red"]
        f["04 - Red"] = h5py.SoftLink("/labelz/data")
    with pytest.raises(ValueError, match=r"train_0001\.hdf5: band '04 - Red' leads into '.*outside\.hdf5' through a "
                                         "link; a sample's data must be in its own file"):
        read_split(root, "hdf5", "train")


@pytest.mark.parametrize("member", ["04 - Red", "label"])
def test_an_hdf5_dataset_declaring_more_than_memory_is_refused_before_reading(tmp_path, member):
    """A chunked dataset declares any shape in a few bytes: reading it allocated it first (13 GiB, then a
    MemoryError traceback, or the out-of-memory killer)."""
    from terrafm.data.sources import physical_memory

    side = int((physical_memory() / 4) ** 0.5) + 1  # float32 past all of memory
    root = _geobench(tmp_path)
    with h5py.File(root / "train_0001.hdf5", "a") as f:
        del f[member]
        f.create_dataset(member, shape=(side, side), dtype="f4", chunks=(64, 64), fillvalue=1.0)
    with pytest.raises(ValueError, match=rf"train_0001\.hdf5: \w+ '{member}' declares shape \({side}, {side}\), more "
                                         "than this machine's"):
        read_split(root, "hdf5", "train")


def _pages_tif(path, pages: int, side: int):
    """A tiled float32 TIFF of `pages` pages of side x side whose tiles are all absent (offset and count 0): a
    few hundred bytes a page that declare pages x side^2 x 4 bytes."""
    import struct

    tiles = ((side + 255) // 256) ** 2
    out = bytearray(b"II*\x00") + struct.pack("<I", 8)
    for i in range(pages):
        ifd_at = len(out)
        arrays_at = ifd_at + 2 + 10 * 12 + 4
        tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 32), (259, 3, 1, 1), (277, 3, 1, 1),
                (322, 3, 1, 256), (323, 3, 1, 256), (324, 4, tiles, arrays_at if tiles > 1 else 0),
                (325, 4, tiles, arrays_at + 4 * tiles if tiles > 1 else 0), (339, 3, 1, 3)]
        out += struct.pack("<H", len(tags))
        for code, kind, count, value in tags:
            out += struct.pack("<HHII", code, kind, count, value)
        next_at = arrays_at + 8 * tiles if tiles > 1 else arrays_at
        out += struct.pack("<I", next_at if i + 1 < pages else 0)
        if tiles > 1:
            out += b"\x00" * (8 * tiles)
    path.write_bytes(bytes(out))


def test_a_tiff_of_many_pages_or_a_huge_msk_sidecar_is_refused_before_reading(tmp_path):
    """Only the first page was checked against memory, where the whole series is read (a thousand pages), and the
    .msk sidecar not at all: each was a MemoryError traceback."""
    from terrafm.data.sources import physical_memory

    splits = make_splits(13, per_class=(2, 1, 1))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits)
    victim = sorted((root / "train" / "class_1").glob("*.tif"))[0]
    side = 4096
    pages = physical_memory() // (side * side * 4) + 1
    _pages_tif(victim, pages, side)
    with pytest.raises(ValueError, match=rf"{re.escape(str(victim))}: not a readable image \(its header declares a "
                                         rf"{pages} x {side} x {side} image"):
        read_split(root, "folder", "train")
    victim.unlink()
    huge_side = int((physical_memory()) ** 0.5) + 1
    image = sorted((root / "train" / "class_1").glob("*.tif"))[0]
    _pages_tif(tmp_path / "mask.tif", 1, huge_side)
    (tmp_path / "mask.tif").rename(f"{image}.msk")
    with pytest.raises(ValueError, match=rf"{re.escape(str(image))}\.msk: not a readable mask \(its header declares"):
        read_split(root, "folder", "train")


@pytest.mark.parametrize("target", ["partition", "sample"])
def test_a_fifo_or_a_device_in_a_dataset_is_named_not_waited_on(tmp_path, target):
    """A FIFO in place of a sample or partition blocked eval forever (it opens for a writer that never comes), and
    a link to /dev/zero read until memory ran out."""
    root = _geobench(tmp_path)
    path = root / ("default_partition.json" if target == "partition" else "train_0001.hdf5")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable .*is a FIFO \(named pipe\), not a "
                                         "regular file"):
        read_split(root, "hdf5", "train")
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable .*is a device, not a regular file"):
        read_split(root, "hdf5", "train")


def test_a_deeply_nested_partition_is_named(tmp_path):
    """json raises RecursionError for nesting past the stack, which was a traceback."""
    root = _geobench(tmp_path)
    (root / "default_partition.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="default_partition.json: not a readable JSON partition .*nests its JSON too "
                                         "deeply"):
        read_split(root, "hdf5", "train")


@pytest.mark.parametrize("bad", [np.array(["a", "b", "c", "d"]), np.ones(4, np.float32),
                                 np.full((4, 3), np.nan, np.float32), np.ones((4, 3), np.float64)])
def test_a_feature_cache_of_another_kind_is_recomputed(tmp_path, bad):
    """Only the row count was checked: strings or a 1-D array were tracebacks in the probe, and NaN features were
    blamed on the dataset and the checkpoint."""
    from terrafm.eval.features import cached_features

    np.savez(tmp_path / "features_k.npz", features=bad)
    got = cached_features(tmp_path, "k", lambda: np.full((4, 3), 2.0, np.float32), rows=4)
    assert got.dtype == np.float32 and got.shape == (4, 3) and (got == 2.0).all()


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "--seed must be in 0 .. 2**63 - 1, got -1"),
    ("--seed", str(2**64), f"--seed must be in 0 .. 2**63 - 1, got {2**64}"),
])
def test_a_seed_out_of_range_is_refused_before_anything_is_read(tmp_path, capsys, flag, value, message):
    """-1 failed only on a dataset without its own fraction file ('expected non-negative integer'), 2**64 after every
    feature was computed ('Overflow when unpacking long long')."""
    assert _eval(tmp_path / "nowhere", tmp_path / "out", flag, value) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_made_is_refused_before_anything_is_read(tmp_path, capsys):
    """An --out that could not be written was found only when the cache or the first PNG was written, after every split
    had been read and its features computed."""
    (tmp_path / "file").write_text("keep me")
    assert _eval(tmp_path / "nowhere", tmp_path / "file" / "out") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a folder" in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_failed_run_leaves_the_last_runs_results_and_pngs_together(tmp_path, monkeypatch, capsys, tiny_pth):
    """Each confusion PNG was published as its probe finished and results.json at the end: a run that failed at its
    second probe left the last run's results.json beside its own first PNG."""
    from terrafm.eval import probes

    data, out = _geobench(tmp_path), tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tiny_pth), "--data", str(data), "--format", "hdf5", "--out", str(out),
                 "--fractions", "1.0"]) == 0
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir() if p.is_file()}  # rewritten: new inode
    assert {"results.json", "confusion_knn_100pct.png", "confusion_linear_100pct.png"} <= set(before)

    def failing_probe(*args, **kwargs):
        raise ValueError("the linear probe failed")

    monkeypatch.setattr(probes, "linear_probe", failing_probe)
    assert main(["eval", "--checkpoint", str(tiny_pth), "--data", str(data), "--format", "hdf5", "--out", str(out),
                 "--fractions", "1.0", "--knn-k", "1"]) == 2
    assert "the linear probe failed" in capsys.readouterr().err
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir() if p.is_file()} == before


def test_a_downloaded_folder_of_weight_files_is_named_by_the_command(tmp_path, capsys, tiny_pth):
    """`terrafm eval --checkpoint FOLDER` resolved any folder as a trainer checkpoint first, so a Hugging Face style
    folder holding TerraFM-B.pth was 'not a checkpoint' without naming the file to pass."""
    import shutil

    (tmp_path / "hf").mkdir()
    shutil.copy(tiny_pth, tmp_path / "hf" / "TerraFM-B.pth")
    assert _eval(tmp_path / "nowhere", tmp_path / "out", checkpoint=tmp_path / "hf") == 2
    assert "it holds TerraFM-B.pth: pass the file" in capsys.readouterr().err


def test_running_out_of_memory_is_one_message(tmp_path, monkeypatch, capsys, tiny_pth):
    from terrafm.eval import cli

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 1099511627776 bytes")

    monkeypatch.setattr(cli, "evaluate", no_memory)
    assert _eval(_geobench(tmp_path), tmp_path / "out", checkpoint=tiny_pth) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "lower --batch-size or --img-size" in err and "Traceback" not in err, err


def test_a_tiny_knn_temperature_votes_for_the_nearest_neighbour(tmp_path):
    """1e-50 became 0 in float32: the nearest neighbour's weight was 0 / 0, a NaN vote, and every score chance."""
    from terrafm.eval import probes

    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    shares = probes.knn_scores(train, np.array([0, 1, 1]), np.array([[1.0, 0.1]]), k=3, temperature=1e-50)
    assert np.isfinite(shares).all() and probes.knn_decision(shares, False).tolist() == [0]
