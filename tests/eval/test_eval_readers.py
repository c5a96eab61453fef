import json

import numpy as np
import pytest
from eval_toydata import GEOBENCH_S2, make_splits, write_folder, write_hdf5

from terrafm.eval.data import S2_WITH_B10, band_stats, geobench_band_name, modality_for_bands, normalize, read_split
from terrafm.modalities import S2_BANDS


def test_geobench_band_names_map_onto_ours():
    assert [geobench_band_name(n) for n in GEOBENCH_S2] == [
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert geobench_band_name("VH") == "VH"


SO2SAT = ["01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary", "05 - VH.LEE Filtered",
          "06 - VV.LEE Filtered", "07 - VH.LEE Filtered.Real", "08 - VV.LEE Filtered.Imaginary",
          *[n for n in GEOBENCH_S2 if not n.startswith(("01", "09", "10"))]]  # GEO-Bench m-so2sat's 18 bands


def test_geobench_radar_bands_are_told_by_polarisation_not_by_number(tmp_path):
    names = [geobench_band_name(n) for n in SO2SAT]
    assert names[:8] == [SO2SAT[0], SO2SAT[1], SO2SAT[2], SO2SAT[3], "VH", "VV", SO2SAT[6], SO2SAT[7]]
    assert names[8:] == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    rng = np.random.default_rng(0)
    images = rng.uniform(0.01, 1.0, size=(4, len(SO2SAT), 32, 32)).astype(np.float32)
    root = write_hdf5(tmp_path / "m-so2sat", {"train": (images, np.arange(4)), "test": (images, np.arange(4))},
                      SO2SAT)
    train = read_split(root, "hdf5", "train")  # S2 lacks B01 / B09 there: the Lee-filtered intensities are S1
    assert train.modality == "s1" and np.array_equal(train.images, images[:, [5, 4]])


def test_hdf5_reader_drops_b10_and_reads_labels(hdf5_data):
    train = read_split(hdf5_data, "hdf5", "train")
    assert train.images.shape == (80, 12, 32, 32) and train.modality == "s2_l1c"
    assert train.task == "classification" and sorted(set(train.labels.tolist())) == [0, 1, 2, 3]
    # class 3 brightens 13-band indices 9..11 = B09, B10, B11 -> after dropping B10: B09 and B11 (idx 9, 10)
    bright = train.images[train.labels == 3].mean(axis=(0, 2, 3))
    assert bright[9] > 3000 and bright[10] > 3000 and bright[11] < 2000
    assert len(read_split(hdf5_data, "hdf5", "val").labels) == 20  # 'val' finds GEO-Bench's 'valid'


def test_folder_reader_reads_channel_last_geotiff_and_npy(folder_data, tmp_path):
    test = read_split(folder_data, "folder", "test")
    assert test.images.shape == (40, 12, 32, 32) and test.class_names == [f"class_{i}" for i in range(4)]
    npy = write_folder(tmp_path / "npy", {"train": make_splits(12)["train"]}, suffix=".npy")
    train = read_split(npy, "folder", "train", modality="s2_l2a")
    assert train.images.shape == (80, 12, 32, 32) and train.modality == "s2_l2a"


def test_normalisation_uses_per_band_statistics():
    x = np.random.default_rng(0).normal([[[[5.0]], [[100.0]]]], [[[[2.0]], [[10.0]]]], size=(50, 2, 4, 4))
    mean, std = band_stats(x)
    z = normalize(x, mean, std)
    assert np.allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_band_count_that_fits_no_modality_lists_what_fits(tmp_path):
    root = write_folder(tmp_path / "five", {"train": make_splits(5)["train"]}, suffix=".npy")
    with pytest.raises(ValueError, match=r"5 bands, which fit no modality.*12 bands.*13 bands.*2 bands"):
        read_split(root, "folder", "train")
    h5 = write_hdf5(tmp_path / "h5", {"train": make_splits(5)["train"]}, GEOBENCH_S2[:5])
    with pytest.raises(ValueError, match=r"fit no modality; what fits: s2_l2a / s2_l1c = 12 bands"):
        read_split(h5, "hdf5", "train")
    with pytest.raises(ValueError, match="--modality s1"):
        modality_for_bands(["B01", "B02"], "s1")
    # m-forestnet: Landsat-8 bands numbered as GEO-Bench numbers S2's; the message names them as stored
    landsat = ["02 - Blue", "03 - Green", "04 - Red", "05 - Near Infrared", "06 - Short-wave Infrared 1"]
    forest = write_hdf5(tmp_path / "forestnet", {"train": make_splits(5)["train"]}, landsat)
    with pytest.raises(ValueError, match=r"5 bands \['02 - Blue', .*\] \(read as \['B02', .*\]\) fit no modality"):
        read_split(forest, "hdf5", "train")


def test_missing_split_names_the_split_and_what_exists(folder_data, hdf5_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found .* has \['test', 'train'\]"):
        read_split(folder_data, "folder", "val")
    part = json.loads((hdf5_data / "default_partition.json").read_text())
    root = tmp_path / "nosplit"
    root.mkdir()
    (root / "default_partition.json").write_text(json.dumps({"train": part["train"]}))
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        read_split(root, "hdf5", "test")
    with pytest.raises(FileNotFoundError, match="default_partition.json not found"):
        read_split(tmp_path, "hdf5", "train")


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "d", {"train": make_splits(12)["train"]}, suffix=".npy")
    (root / "train" / "class_9").mkdir()
    with pytest.raises(ValueError, match=r"class 'class_9' has no images in .*class_9"):
        read_split(root, "folder", "train")


def test_a_test_split_without_a_train_class_folder_is_read_and_upper_case_npy_too(tmp_path):
    """A val/test split lacking one train class was refused ('class ... has no images' for a folder that is not
    there; HDF5 took the same data); x.NPY was listed as an image and then decoded as a TIFF."""
    splits = make_splits(12)
    root = write_folder(tmp_path / "d", {"train": splits["train"], "test": splits["test"]}, suffix=".npy")
    names = read_split(root, "folder", "train").class_names
    for f in (root / "test" / names[-1]).iterdir():
        f.unlink()
    (root / "test" / names[-1]).rmdir()
    first = next((root / "test" / names[0]).iterdir())
    first.rename(first.with_suffix(".NPY"))
    test = read_split(root, "folder", "test", class_names=names)
    assert test.class_names == names and names.index(names[-1]) not in test.labels
    assert len(test.labels) == sum(splits["test"][1] != splits["test"][1].max())
    (root / "test" / names[-1]).mkdir()  # a folder that is there but empty is still named
    with pytest.raises(ValueError, match="has no images in"):
        read_split(root, "folder", "test", class_names=names)


def test_geobench_pickled_attribute_label_is_read_without_geobench(tmp_path, monkeypatch):
    """Real GEO-Bench classification samples keep the label in str(pickle.dumps(attr_dict)) with
    geobench.dataset classes inside: read it without importing geobench."""
    import pickle
    import sys
    import types

    import h5py

    fake = types.ModuleType("geobench.dataset")

    class BandInfo:
        def __init__(self, name):
            self.name = name

    BandInfo.__module__, BandInfo.__qualname__ = "geobench.dataset", "BandInfo"
    fake.BandInfo = BandInfo
    monkeypatch.setitem(sys.modules, "geobench", types.ModuleType("geobench"))
    monkeypatch.setitem(sys.modules, "geobench.dataset", fake)
    splits = make_splits(12, per_class=(2, 1, 1))
    root = tmp_path / "gb"
    root.mkdir()
    partition = {}
    for split, (images, labels) in splits.items():
        partition[split] = [f"{split}{i}" for i in range(len(labels))]
        for sid, img, lab in zip(partition[split], images, labels, strict=True):
            with h5py.File(root / f"{sid}.hdf5", "w") as f:
                for name, band in zip([n for n in GEOBENCH_S2 if not n.startswith("10")], img, strict=True):
                    f.create_dataset(name, data=band)
                attrs = {"label": int(lab), "bands_order": GEOBENCH_S2, GEOBENCH_S2[0]: {"band_info": BandInfo("x")}}
                f.attrs["pickle"] = str(pickle.dumps(attrs))
    (root / "default_partition.json").write_text(json.dumps(partition))
    monkeypatch.delitem(sys.modules, "geobench.dataset")
    train = read_split(root, "hdf5", "train")
    assert train.labels.tolist() == splits["train"][1].tolist() and train.modality == "s2_l2a"

    with h5py.File(root / "train0.hdf5", "a") as f:
        f.attrs["pickle"] = str(pickle.dumps({"label": __import__("os").system}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_split(root, "hdf5", "train")


def test_hdf5_bands_on_a_coarser_grid_are_replicated_to_the_finest(tmp_path):
    images, labels = make_splits(12, per_class=(1, 1, 1))["train"]
    root = write_hdf5(tmp_path / "mixed", {"train": (images, labels)}, [n for n in GEOBENCH_S2 if n[:2] != "10"])
    import h5py

    with h5py.File(root / "train_0000.hdf5", "a") as f:  # store B01 (60 m) at a sixth of the size, B05 (20 m) at half
        coarse = {"01 - Coastal aerosol": f["01 - Coastal aerosol"][::6, ::6].astype(np.float32),
                  "05 - Vegetation Red Edge": f["05 - Vegetation Red Edge"][::2, ::2].astype(np.float32)}
        coarse["01 - Coastal aerosol"][:, :2] = -9999.0  # a fill on the coarse grid, its left two columns
        for name, band in coarse.items():
            del f[name]
            f.create_dataset(name, data=band)
    train = read_split(root, "hdf5", "train")
    size = images.shape[-1]
    assert train.images.shape == (4, 12, size, size)

    def nearest(band):  # output pixel i takes input pixel floor(i * n / size): replication where size / n is whole
        idx = np.arange(size) * band.shape[0] // size
        return band[idx][:, idx]

    b01, b05 = train.images[0, 0], train.images[0, 4]
    np.testing.assert_array_equal(b05, np.repeat(np.repeat(coarse["05 - Vegetation Red Edge"], 2, 0), 2, 1))
    fill = nearest(coarse["01 - Coastal aerosol"]) == -9999.0
    # bilinear resizing blended the fill into its neighbours: values down to -9112 passed as data
    assert fill.any() and np.isnan(b01[fill]).all() and (b01[~fill] > 0).all()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_numpy_labels_dates_and_sets_at_every_protocol(protocol):
    import datetime
    import io
    import pickle

    from terrafm.eval.data import _StubUnpickler

    attrs = {"label": np.array([0, 1, 1], dtype=np.uint8), "date": datetime.date(2020, 1, 1), "ids": {1, 2},
             "resolution": np.float32(10.0)}
    out = _StubUnpickler(io.BytesIO(pickle.dumps(attrs, protocol=protocol))).load()
    assert out["label"].tolist() == [0, 1, 1] and out["date"] == attrs["date"] and out["ids"] == {1, 2}


# 13 S2 bands as EuroSAT-MS files hold them (B8A last). Each band is a constant, distinct so that it names the
# band, near a vegetated scene's top-of-atmosphere reflectance x 1e4; B10 (cirrus) near 0.
EUROSAT_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
VALUE = dict(B01=1300.0, B02=1100.0, B03=1000.0, B04=900.0, B05=1200.0, B06=1800.0, B07=2100.0, B08=2000.0,
             B8A=2300.0, B09=700.0, B10=20.0, B11=1700.0, B12=1050.0)


def _bands(order: list[str], n: int = 4, offset: float = 0.0) -> np.ndarray:
    return np.stack([np.full((n, 32, 32), VALUE[b] + offset) for b in order], axis=1).astype(np.uint16)


def _read_values(split) -> list[float]:
    return [float(v) for v in split.images[0, :, 0, 0]]


WANTED = [VALUE[b] for b in S2_BANDS]  # what the s2_l1c patch embedding must get, in its order


@pytest.mark.parametrize("offset", [0.0, 1000.0])  # 1000: processing baseline 04.00's radiometric offset
@pytest.mark.parametrize("fmt", ["folder", "hdf5"])
def test_eurosat_band_order_is_told_from_the_cirrus_band_and_read_in_our_order(tmp_path, fmt, offset):
    images, labels = _bands(EUROSAT_ORDER, offset=offset), np.arange(4) % 2
    if fmt == "folder":  # EuroSAT-MS files: B8A last
        root = write_folder(tmp_path / "eurosat", {"train": (images, labels), "test": (images, labels)})
    else:  # m-eurosat: the same data under names in ESA's order (geo-bench#28)
        root = write_hdf5(tmp_path / "m-eurosat", {"train": (images, labels), "test": (images, labels)}, GEOBENCH_S2)
    wanted = [v + offset for v in WANTED]
    split = read_split(root, fmt, "train")
    assert (split.modality, split.band_order, _read_values(split)) == ("s2_l1c", "eurosat", wanted)
    assert _read_values(read_split(root, fmt, "train", band_order="eurosat")) == wanted
    forced = read_split(root, fmt, "train", band_order="esa")  # as asked: B8A read from the 9th band (B09)
    assert forced.band_order == "esa" and _read_values(forced)[8] == VALUE["B09"] + offset


@pytest.mark.parametrize("fmt", ["folder", "hdf5"])
def test_esa_band_order_is_read_as_is_and_data_that_cannot_tell_warns(tmp_path, fmt):
    labels = np.arange(4) % 2
    write = (lambda root, images: write_folder(root, {"train": (images, labels)})) if fmt == "folder" else (
        lambda root, images: write_hdf5(root, {"train": (images, labels)}, GEOBENCH_S2))
    split = read_split(write(tmp_path / "esa", _bands(list(S2_WITH_B10))), fmt, "train")
    assert (split.band_order, _read_values(split)) == ("esa", WANTED)
    flat = np.full((4, 13, 32, 32), 500, np.uint16)  # no cirrus band to tell by (e.g. resampled or cloudy)
    with pytest.warns(UserWarning, match="cannot tell the order of its 13 S2 bands.*--band-order eurosat"):
        assert read_split(write(tmp_path / "flat", flat), fmt, "train").band_order == "esa"


def test_m_brick_kiln_true_colour_bands_under_s2_names_are_read_as_named_with_a_warning(tmp_path, recwarn):
    """GEO-Bench's m-brick-kiln names 13 S2 bands, but holds B01-B05, B07, B8A, B08, B11, B12 and an 8-bit
    true-colour RGB (geo-bench#29): read as named, as published results were, and said so."""
    labels = np.arange(4) % 2
    held = ["B01", "B02", "B03", "B04", "B05", "B07", "B8A", "B08", "B11", "B12"]
    images = _bands(held + ["B01"] * 3)
    images[:, 10:] = np.array([90, 80, 60], np.uint16)[None, :, None, None]  # TCI R, G, B
    root = write_hdf5(tmp_path / "m-brick-kiln", {"train": (images, labels)}, GEOBENCH_S2)
    with pytest.warns(UserWarning, match="last three bands hold 8-bit values.*m-brick-kiln.*geo-bench#29"):
        split = read_split(root, "hdf5", "train", band_order="esa")
    assert _read_values(split)[:5] == [VALUE[b] for b in held[:5]] and _read_values(split)[-1] == 60.0
    read_split(write_hdf5(tmp_path / "l1c", {"train": (_bands(list(S2_WITH_B10)), labels)}, GEOBENCH_S2), "hdf5",
               "train")
    assert not [w for w in recwarn if "8-bit" in str(w.message)]  # real L1C: B10 is low, B11 and B12 are not


def test_a_twelve_band_folder_in_eurosat_order_needs_the_flag(tmp_path):
    order = [b for b in EUROSAT_ORDER if b != "B10"]
    root = write_folder(tmp_path / "l2a", {"train": (_bands(order), np.arange(4) % 2)})
    assert read_split(root, "folder", "train").band_order == "esa"  # 12 bands: no cirrus to tell by
    assert _read_values(read_split(root, "folder", "train", band_order="eurosat")) == WANTED
    with pytest.raises(ValueError, match="unknown band order 'b8a-last'"):
        read_split(root, "folder", "train", band_order="b8a-last")


def test_geobench_dated_band_keys_differ_per_sample_and_are_read_by_name(tmp_path):
    """GEO-Bench's writer keys a band with a date as '<name>_<YYYY-MM-DD>' (m-cashew-plant: 12 S2 bands and a cloud
    probability band, each sample of its own date, the mask as dataset 'label')."""
    import h5py

    names = [n for n in GEOBENCH_S2 if n[:2] != "10"]
    images = np.random.default_rng(0).uniform(500, 3000, size=(3, 13, 32, 32)).astype(np.float32)
    masks = np.random.default_rng(1).integers(0, 3, size=(3, 32, 32))
    root = write_hdf5(tmp_path / "m-cashew-plant", {"train": (images, masks)}, [*names, "Cloud Probability"])
    for i in range(3):
        with h5py.File(root / f"train_{i:04d}.hdf5", "a") as f:
            for name in [*names, "Cloud Probability"]:
                f.move(name, f"{name}_2019-11-{5 + 10 * i:02d}")
    train = read_split(root, "hdf5", "train")
    assert (train.modality, train.task) == ("s2_l2a", "segmentation")
    assert np.array_equal(train.images, images[:, :12]) and np.array_equal(train.labels, masks)
    with h5py.File(root / "train_0002.hdf5", "a") as f:  # a second date of a band: a time series
        f.create_dataset("02 - Blue_2020-01-01", data=images[2, 1])
    with pytest.raises(ValueError, match=r"train_0002\.hdf5 holds band '02 - Blue' at several dates .*time series"):
        read_split(root, "hdf5", "train")


def test_geobench_pickle_attribute_stored_as_a_bytes_string_is_read(tmp_path):
    """str(pickle.dumps(...)) kept as a fixed-length bytes attribute (b"b'\\x80...'") is GEO-Bench's dict too."""
    import pickle

    import h5py

    images, labels = make_splits(12, per_class=(1, 1, 1))["train"]
    root = write_hdf5(tmp_path / "m-bytes", {"train": (images, labels)}, [n for n in GEOBENCH_S2 if n[:2] != "10"])
    for i, label in enumerate(labels):
        with h5py.File(root / f"train_{i:04d}.hdf5", "a") as f:
            del f["label"]
            f.attrs["pickle"] = np.bytes_(str(pickle.dumps({"label": int(label)})).encode())
    assert read_split(root, "hdf5", "train").labels.tolist() == labels.tolist()


@pytest.mark.parametrize("stored", ["(1,H,W)", "(H,W,1)", "(1,)"])
def test_hdf5_labels_with_a_singleton_axis_keep_their_task(tmp_path, stored):
    """A mask stored with a band axis is a mask (as folder masks are), a one-element label a class id."""
    import h5py

    images, labels = make_splits(12, per_class=(1, 1, 1))["train"]
    masks = np.random.default_rng(0).integers(0, 3, size=(4, 32, 32))
    want = labels if stored == "(1,)" else masks
    root = write_hdf5(tmp_path / "m-seg", {"train": (images, want)}, [n for n in GEOBENCH_S2 if n[:2] != "10"])
    for i, label in enumerate(want):
        with h5py.File(root / f"train_{i:04d}.hdf5", "a") as f:
            del f["label"]
            f.create_dataset("label", data={"(1,H,W)": label[None], "(H,W,1)": label[..., None],
                                            "(1,)": np.atleast_1d(label)}[stored])
    train = read_split(root, "hdf5", "train")
    assert train.task == ("classification" if stored == "(1,)" else "segmentation")
    assert np.array_equal(train.labels, want)


def test_a_segmentation_mask_is_found_by_its_exact_file_stem(tmp_path):
    """Masks written by GDAL have 'x.tif.aux.xml' sidecars; names may hold dots or brackets: 'x.1.tif' is not the
    mask of 'x.tif', and 'tile[1].tif' is no glob pattern."""
    import tifffile

    images = np.random.default_rng(0).uniform(100, 3000, size=(3, 32, 32, 12)).astype(np.uint16)
    for i, name in enumerate(["tile[1]", "x.1", "x"]):  # sorted file order: class ids 0, 1, 2
        for split in ("images", "masks"):
            (tmp_path / "seg" / "train" / split).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "seg" / "train" / "images" / f"{name}.tif", images[i])
        tifffile.imwrite(tmp_path / "seg" / "train" / "masks" / f"{name}.tif", np.full((32, 32), i, np.uint8))
        (tmp_path / "seg" / "train" / "masks" / f"{name}.tif.aux.xml").write_text("<PAMDataset/>")
    train = read_split(tmp_path / "seg", "folder", "train")
    assert train.task == "segmentation" and [int(m[0, 0]) for m in train.labels] == [0, 1, 2]
    tifffile.imwrite(tmp_path / "seg" / "train" / "masks" / "x.tiff", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"holds two masks named 'x': x\.tif and x\.tiff"):
        read_split(tmp_path / "seg", "folder", "train")


@pytest.mark.parametrize("side", [13, 12, 2, 30])
def test_an_interleaved_geotiff_is_channel_last_whatever_its_size(tmp_path, side):
    """GDAL and EuroSAT-MS interleave a multi-band GeoTIFF's samples (H, W, C): its layout says so, also when the
    tile is 13 px wide and the shape alone cannot tell (read as 13 bands of rows before)."""
    import tifffile

    from terrafm.eval.data import _read_image

    x = (np.arange(13 * side * side).reshape(13, side, side) % 997 + 100).astype(np.uint16)  # (C, H, W)
    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, x.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(_read_image(path), x.astype(np.float32))
    tifffile.imwrite(path, x, photometric="minisblack", planarconfig="separate")  # planes: (C, H, W) as stored
    np.testing.assert_array_equal(_read_image(path), x.astype(np.float32))


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_pixels_outside_a_geotiff_internal_mask_are_nodata(tmp_path, planar):
    """GDAL's internal nodata mask (a NewSubfileType 4 page after the image) was ignored: the masked pixels were
    read as data, and an 8-bit mask beside an 8-bit image was stacked into it as another band."""
    import tifffile

    from terrafm.eval.data import _read_image, _read_mask

    x = (np.arange(13 * 8 * 8).reshape(13, 8, 8) % 97 + 100).astype(np.uint16)
    valid = np.ones((8, 8), bool)
    valid[:2] = False
    path = tmp_path / "tile.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(x.transpose(1, 2, 0) if planar == "contig" else x, photometric="minisblack", planarconfig=planar,
                  metadata=None)
        tif.write(valid.astype(np.uint8) * 255, metadata=None, extratags=[(254, "I", 1, 4, True)])
    image = _read_image(path)
    assert image.shape == (13, 8, 8) and np.isnan(image[:, :2]).all()
    np.testing.assert_array_equal(image[:, 2:], x[:, 2:].astype(np.float32))
    with tifffile.TiffWriter(path) as tif:  # a class map, 8-bit like its mask
        tif.write(np.full((8, 8), 3, np.uint8), metadata=None)
        tif.write(valid.astype(np.uint8) * 255, metadata=None, extratags=[(254, "I", 1, 4, True)])
    mask = _read_mask(path, (8, 8), "train")
    assert (mask[:2] == 255).all() and (mask[2:] == 3).all()


@pytest.mark.parametrize("planar,ext", [("contig", ".msk"), ("separate", ".msk"), ("contig", ".MSK")])
def test_pixels_outside_a_geotiff_msk_sidecar_are_nodata(tmp_path, planar, ext):
    """GDAL before 3.9 writes the nodata mask beside the image (x.tif.msk, 0 at nodata), not in it: the folder reader
    skipped the sidecar and read the masked pixels as data. GDAL also reads x.tif.MSK (upper-cased folders)."""
    import tifffile

    from terrafm.eval.data import _read_image, _read_mask

    x = (np.arange(13 * 8 * 8).reshape(13, 8, 8) % 97 + 100).astype(np.uint16)
    valid = np.full((8, 8), 255, np.uint8)
    valid[:2] = 0
    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, x.transpose(1, 2, 0) if planar == "contig" else x, photometric="minisblack",
                     planarconfig=planar, metadata=None)
    tifffile.imwrite(tmp_path / f"tile.tif{ext}", valid, compression="deflate", metadata=None)
    image = _read_image(path)
    assert image.shape == (13, 8, 8) and np.isnan(image[:, :2]).all()
    np.testing.assert_array_equal(image[:, 2:], x[:, 2:].astype(np.float32))
    tifffile.imwrite(path, np.full((8, 8), 3, np.uint8), metadata=None)  # a class map
    mask = _read_mask(path, (8, 8), "train")
    assert (mask[:2] == 255).all() and (mask[2:] == 3).all()
    tifffile.imwrite(tmp_path / f"tile.tif{ext}", valid[:4], metadata=None)
    with pytest.raises(ValueError, match=r"tile\.tif is 8x8 px but its \.msk sidecar 4x8: not its mask"):
        _read_image(path)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_a_per_band_msk_sidecar_masks_each_band_on_its_own(tmp_path, planar):
    """GDAL's per-band masks (CreateMaskBand without GMF_PER_DATASET) put one sample per band of the image in the
    .msk, interleaved or not: each band is masked by its own (a sidecar of 3 samples was refused as 'not its mask'),
    and one whose band count is not the image's is refused by name. Later pages (the overviews' masks) are ignored."""
    import tifffile

    from terrafm.eval.data import _read_image

    x = (np.arange(3 * 8 * 8).reshape(3, 8, 8) % 97 + 100).astype(np.uint16)
    valid = np.full((3, 8, 8), 255, np.uint8)
    valid[0, :2], valid[2, :, :3] = 0, 0  # band 1: the top rows; band 3: the left columns; band 2: all valid
    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, x.transpose(1, 2, 0) if planar == "contig" else x, photometric="minisblack",
                     planarconfig=planar, metadata=None)
    with tifffile.TiffWriter(tmp_path / "tile.tif.msk") as msk:
        msk.write(valid.transpose(1, 2, 0) if planar == "contig" else valid, photometric="minisblack",
                  planarconfig=planar, metadata=None)
        msk.write(np.zeros((3, 4, 4), np.uint8), photometric="minisblack", planarconfig="separate", metadata=None)
    image = _read_image(path)
    np.testing.assert_array_equal(np.isnan(image), valid == 0)
    np.testing.assert_array_equal(image[1], x[1].astype(np.float32))
    tifffile.imwrite(tmp_path / "tile.tif.msk", valid[:2], photometric="minisblack", planarconfig="separate",
                     metadata=None)
    with pytest.raises(ValueError, match=r"tile\.tif has 3 band\(s\) but its \.msk sidecar 2 per-band masks"):
        _read_image(path)


def _pam(nodata: dict[int, str], stats: bool = True) -> str:
    """A GDAL PAM sidecar (x.tif.aux.xml): dataset metadata, then per band its NoDataValue (nodata[band]) and
    statistics."""
    bands = "".join(
        f'  <PAMRasterBand band="{band}">\n'
        + (f"    <NoDataValue>{nodata[band]}</NoDataValue>\n" if band in nodata else "")
        + ('    <Metadata><MDI key="STATISTICS_MEAN">120</MDI></Metadata>\n' if stats else "")
        + "  </PAMRasterBand>\n" for band in range(1, 14) if band in nodata or stats)
    return f'<PAMDataset>\n  <Metadata><MDI key="AREA_OR_POINT">Area</MDI></Metadata>\n{bands}</PAMDataset>\n'


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_a_nodata_value_declared_in_a_gdal_pam_sidecar_is_nodata_per_band(tmp_path, planar):
    """GDAL records a band's nodata in x.tif.aux.xml when it cannot write it into the file: the folder reader read
    those pixels as data. The sidecar's value wins over the file's GDAL_NODATA tag, band by band, as in GDAL."""
    import tifffile

    from terrafm.data.sources import GDAL_NODATA
    from terrafm.eval.data import _read_image, _read_mask

    x = (np.arange(13 * 8 * 8).reshape(13, 8, 8) % 97 + 100).astype(np.uint16)
    x[:, :2] = 7
    path, sidecar = tmp_path / "tile.tif", tmp_path / "tile.tif.aux.xml"

    def write(tag: str | None = None) -> None:
        tifffile.imwrite(path, x.transpose(1, 2, 0) if planar == "contig" else x, photometric="minisblack",
                         planarconfig=planar, metadata=None,
                         extratags=[(GDAL_NODATA, "s", 0, tag, False)] if tag else None)

    write()
    sidecar.write_text(_pam({}))  # statistics only: nothing is nodata
    np.testing.assert_array_equal(_read_image(path), x.astype(np.float32))
    sidecar.write_text(_pam({b: "7" for b in range(1, 14)}))  # gdal_edit -a_nodata 7 on a read-only file
    image = _read_image(path)
    assert np.isnan(image[:, :2]).all() and not np.isnan(image[:, 2:]).any()
    sidecar.write_text(_pam({3: "7.00000000000000E+00"}))  # band 3 only
    image = _read_image(path)
    assert np.isnan(image[2, :2]).all() and np.isnan(image).sum() == 16
    write(tag="7")
    sidecar.write_text(_pam({1: "nan", 2: "1e+20"}))  # bands 1 and 2 declare another value; the others keep the tag's
    image = _read_image(path)
    assert not np.isnan(image[:2]).any() and np.isnan(image[2:, :2]).all() and np.isnan(image).sum() == 11 * 16
    tifffile.imwrite(path, np.where(np.arange(8)[:, None] < 2, 0, 3).astype(np.uint8).repeat(8, 1), metadata=None)
    sidecar.write_text(_pam({1: "0"}))  # a class map whose 0 is nodata
    mask = _read_mask(path, (8, 8), "train")
    assert (mask[:2] == 255).all() and (mask[2:] == 3).all()


@pytest.mark.parametrize("text, what", [
    ("GDAL was here", r"not XML \(syntax error"),
    ('<!DOCTYPE PAMDataset [<!ENTITY a "a">]><PAMDataset/>', r"it holds a DOCTYPE"),
    ("<VRTDataset/>", r"its root element is <VRTDataset>, not GDAL's <PAMDataset>"),
    (_pam({1: "minus one"}), r"band 1's NoDataValue 'minus one' names no number"),
    ("<PAMDataset>" + " " * (1 << 20) + "</PAMDataset>", r"it is larger than 1 MiB"),
])
def test_a_damaged_gdal_pam_sidecar_is_named(tmp_path, text, what):
    import tifffile

    from terrafm.eval.data import _read_image

    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, np.ones((8, 8, 13), np.uint16), photometric="minisblack", planarconfig="contig",
                     metadata=None)
    (tmp_path / "tile.tif.aux.xml").write_text(text)
    with pytest.raises(ValueError, match=rf"tile\.tif\.aux\.xml: not a readable GDAL sidecar \({what}"):
        _read_image(path)


def test_a_sensor_the_checkpoint_never_trained_on_is_warned_about_and_named():
    """An export of an S1-only run evaluated on S2: its S2 patch embedding is untrained (a random projection)."""
    from terrafm.eval.data import EvalSplit, input_statistics

    rng = np.random.default_rng(0)
    split = EvalSplit(rng.normal(1000, 100, (4, 12, 8, 8)).astype(np.float32), np.arange(4), "s2_l2a")
    inputs = {"mean": {"s1": [-12.0, -19.0]}, "std": {"s1": [3.0, 3.0]}, "bands": {"s1": ["VV", "VH"]}}
    with pytest.warns(UserWarning, match="trained on s1 only: its s2_l2a patch embedding never saw data"):
        mean, _, source = input_statistics(split, inputs)
    assert source == "dataset" and mean.shape == (12,)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no s2_l2a statistics \(its run trained on s1"):
        input_statistics(split, inputs, "checkpoint")


def test_gdal_float64_fill_reads_as_nodata_without_an_overflow_warning(tmp_path):
    """A float64 GeoTIFF with GDAL's usual fill (-1.7976931348623157e+308, tagged as GDAL_NODATA): its cast to float32
    overflowed with a RuntimeWarning printed by `terrafm eval`; the fill is nodata, the rest exact."""
    import warnings

    import tifffile

    from terrafm.eval.data import _read_image

    fill = np.finfo(np.float64).min
    x = np.linspace(0.01, 0.5, 13 * 6 * 6).reshape(13, 6, 6)
    x[:, 0] = fill
    path = tmp_path / "tile.tif"
    tifffile.imwrite(path, x, photometric="minisblack", planarconfig="separate", metadata=None,
                     extratags=[(42113, "s", 0, repr(fill), False)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = _read_image(path)
    assert np.isnan(image[:, 0]).all()
    np.testing.assert_array_equal(image[:, 1:], x[:, 1:].astype(np.float32))
