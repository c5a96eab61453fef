"""What eval feeds the backbone: resize before the patch check, the checkpoint's statistics and S1 scaling."""

import json

import numpy as np
import pytest
from eval_toydata import GEOBENCH_S2, SIZE, make_splits, write_hdf5
from safetensors.torch import save_file

from terrafm.eval import features
from terrafm.eval.data import EvalSplit, input_statistics, to_s1_scaling
from terrafm.eval.runner import EvalConfig, evaluate
from terrafm.modalities import MODALITIES, s1_to_db
from terrafm.models import load_checkpoint, published_state_dict
from terrafm.train.export import export_metadata

FAST = dict(probes=("knn",), fractions=(1.0,))


@pytest.fixture
def tiny(tiny_pth):
    return load_checkpoint(tiny_pth).eval()


def test_120_px_images_are_resized_before_the_patch_multiple_check(tiny):
    images = np.random.default_rng(0).normal(size=(3, 12, 120, 120)).astype(np.float32)  # m-bigearthnet size
    feats = features.extract(tiny, images, "s2_l2a", img_size=128, batch_size=2)
    assert feats.shape == (3, tiny.embed_dim) and np.isfinite(feats).all()
    with pytest.raises(ValueError, match=r"120x120 is not a multiple of the patch size 16; pass --img-size .*128"):
        features.extract(tiny, images, "s2_l2a")
    with pytest.raises(ValueError, match=r"100x100 \(--img-size\) is not a multiple"):
        features.extract(tiny, images, "s2_l2a", img_size=100)


def test_eval_of_a_120_px_geobench_set_with_img_size(tiny, tiny_pth, tmp_path):
    splits = {k: (np.pad(x, ((0, 0), (0, 0), (44, 44), (44, 44)), mode="edge"), y)  # 32 -> 120 px
              for k, (x, y) in make_splits(13, per_class=(4, 1, 2)).items()}
    data = write_hdf5(tmp_path / "m-bigearthnet-like", splits, GEOBENCH_S2)
    res = evaluate(EvalConfig(checkpoint=str(tiny_pth), data=str(data), format="hdf5", out=str(tmp_path / "o"),
                              img_size=128, **FAST), tiny)
    assert res["runs"][0]["train_samples"] == len(splits["train"][1])


def _export(backbone, path, **meta):
    save_file({k: v.contiguous() for k, v in published_state_dict(backbone).items()}, str(path),
              metadata={"model": "terrafm_tiny", **meta})
    return path


def test_export_metadata_round_trips_through_load_checkpoint(tiny, tmp_path):
    data = {"bands": {"s1": ["VV", "VH"]}, "mean": {"s1": [-11.0, -17.5]}, "std": {"s1": [4.0, 4.5]},
            "s1_scaling": "db"}
    meta = export_metadata("terrafm_tiny", "teacher", {"model": {"img_size": SIZE, "patch_size": 16}, "data": data})
    assert all(isinstance(v, str) for v in meta.values())  # safetensors takes strings only
    loaded = load_checkpoint(_export(tiny, tmp_path / "t.safetensors", **meta))
    assert loaded.input_metadata == {**data, "img_size": SIZE, "patch_size": 16}
    assert load_checkpoint(_export(tiny, tmp_path / "old.safetensors")).input_metadata == {}
    with pytest.raises(ValueError, match="metadata says img_size 64 / patch_size 16, its weights are 32 / 16"):
        load_checkpoint(_export(tiny, tmp_path / "bad.safetensors", img_size="64", patch_size="16"))


def _split(images, modality="s2_l2a"):
    return EvalSplit(images.astype(np.float32), np.zeros(len(images), np.int64), modality)


def test_eval_normalises_with_the_checkpoints_statistics_and_names_a_band_mismatch():
    train = _split(np.random.default_rng(0).normal(1500, 1000, size=(4, 12, 8, 8)))
    bands = list(MODALITIES["s2_l2a"].bands)
    inputs = {"bands": {"s2_l2a": bands}, "mean": {"s2_l2a": [1000.0] * 12}, "std": {"s2_l2a": [2000.0] * 12}}
    mean, std, source = input_statistics(train, inputs)
    assert source == "checkpoint" and mean[0] == 1000.0 and std[0] == 2000.0
    mean, _, source = input_statistics(train, inputs, "dataset")
    assert source == "dataset" and np.isclose(mean[0], train.images[:, 0].mean(), rtol=1e-4)
    assert input_statistics(train, {})[2] == "dataset"
    with pytest.warns(UserWarning, match=r"band B01 has mean 0.0\d+ / std .*other units or scaling"):
        input_statistics(_split(np.random.default_rng(1).uniform(0, 0.1, (2, 12, 4, 4))), inputs)  # 0-1, not x 1e4
    with pytest.raises(ValueError, match="carries no s2_l2a statistics"):
        input_statistics(train, {}, "checkpoint")
    with pytest.raises(ValueError, match=r"trained on s2_l2a bands \['B02', 'B03', 'B04'\]"):
        input_statistics(train, {**inputs, "bands": {"s2_l2a": ["B02", "B03", "B04"]}})


def test_one_image_file_in_two_splits_is_refused(tiny, tiny_pth, tmp_path):
    """A test folder of symlinks into train (or hard links) scored top-1 1.0 with exit 0; HDF5 refused a sample
    in two splits, the folder format did not."""
    import os

    from eval_toydata import write_folder

    splits = make_splits(12, per_class=(4, 1, 2))
    root = write_folder(tmp_path / "d", {"train": splits["train"], "test": splits["test"]}, suffix=".npy")
    train_file = sorted((root / "train").glob("*/*.npy"))[0]
    twin = root / "test" / train_file.parent.name / "linked.npy"
    os.link(train_file, twin)
    with pytest.raises(ValueError, match=r"1 image file\(s\) are in two splits, e.g. .*linked.npy"):
        evaluate(EvalConfig(checkpoint=str(tiny_pth), data=str(root), format="folder", out=str(tmp_path / "o"),
                            **FAST), tiny)


def test_eval_converts_s1_to_the_checkpoints_scaling(tiny, tiny_pth, tmp_path):
    rng = np.random.default_rng(0)
    linear = rng.gamma(2.0, 0.05, size=(3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(to_s1_scaling(linear, "db"), s1_to_db(linear), rtol=1e-6)
    np.testing.assert_allclose(to_s1_scaling(to_s1_scaling(linear, "db"), "linear"), linear, rtol=1e-4)
    assert to_s1_scaling(linear, "linear") is linear

    splits = {k: (x.astype(np.float32) / 1e4, y)  # linear sigma0
              for k, (x, y) in make_splits(2, per_class=(4, 1, 2)).items()}
    data = write_hdf5(tmp_path / "s1", splits, ["VV", "VH"])
    tiny.input_metadata = {"s1_scaling": "db", "bands": {"s1": ["VV", "VH"]}, "mean": {"s1": [-10.93, -17.329]},
                           "std": {"s1": [4.391, 4.459]}}
    res = evaluate(EvalConfig(checkpoint=str(tiny_pth), data=str(data), format="hdf5", out=str(tmp_path / "o"),
                              **FAST), tiny)
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["modality"] == "s1" and on_disk["statistics"] == "checkpoint"
    assert on_disk["s1_input_units"] == "linear" and on_disk["s1_scaling"] == "db"

    # one resampling dip below 0 in the test split made it 'dB' (per split, from any negative pixel): train was
    # converted to dB and test left linear, scored with exit 0. The units are decided once, by the median.
    dipped = {**splits, "test": (splits["test"][0].copy(), splits["test"][1])}
    dipped["test"][0][0, 0, 0, 0] = -1e-5
    res = evaluate(EvalConfig(checkpoint=str(tiny_pth), data=str(write_hdf5(tmp_path / "dip", dipped, ["VV", "VH"])),
                              format="hdf5", out=str(tmp_path / "o2"), **FAST), tiny)
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["s1_input_units"] == "linear"
    mixed = {**splits, "test": (s1_to_db(splits["test"][0]).astype(np.float32), splits["test"][1])}
    with pytest.raises(ValueError, match="S1 splits are in different units .*train: linear.*test: db"):
        evaluate(EvalConfig(checkpoint=str(tiny_pth), data=str(write_hdf5(tmp_path / "mix", mixed, ["VV", "VH"])),
                            format="hdf5", out=str(tmp_path / "o3"), **FAST), tiny)


def test_a_band_constant_in_train_is_left_out_of_the_features_with_a_warning():
    """Dataset statistics of a band constant in train gave std 1e-6, so a test value 1000 off the constant became 1e9
    after z-scoring and drowned every other band (kNN at chance, no word); it now normalises to 0 everywhere."""
    from terrafm.eval.data import normalize

    s2 = np.random.default_rng(0).uniform(500, 3000, size=(6, 12, 4, 4)).astype(np.float32)
    s2[:, 0] = 7.0
    train = EvalSplit(s2, np.zeros(len(s2), np.int64), "s2_l2a")
    with pytest.warns(UserWarning, match=r"s2_l2a band\(s\) \['B01'\] are constant in the train split"):
        mean, std, source = input_statistics(train, {}, "dataset")
    assert source == "dataset" and np.isinf(std[0]) and np.isfinite(std[1:]).all()
    test = s2.copy()
    test[:, 0] = 1007.0
    out = normalize(test, mean, std)
    assert (out[:, 0] == 0).all() and np.abs(out[:, 1:]).max() < 10
