"""What the reported numbers mean on degenerate or unusual labels: class ids, one-class sets, the feature cache."""

import json

import numpy as np
import pytest
from eval_toydata import GEOBENCH_S2, make_splits, write_folder, write_hdf5

from terrafm.cli import main
from terrafm.eval import runner
from terrafm.eval.data import EvalSplit


def _relabelled(tmp_path, relabel, name="m-toy"):
    splits = {k: (x, relabel(y)) for k, (x, y) in make_splits(13, per_class=(3, 1, 2)).items()}
    return write_hdf5(tmp_path / name, splits, GEOBENCH_S2)


def _eval(checkpoint, data, out, *extra, fmt="hdf5"):
    return main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--format", fmt, "--out", str(out),
                 "--linear-epochs", "5", *extra])


def test_sparse_class_ids_are_renumbered_and_named_by_their_ids(tiny_pth, tmp_path):
    """Ids {3, 7} gave the probes 8 outputs (a linear probe could predict class 0, which no sample has) and an
    8 x 8 confusion matrix; an id near 100000 a K x K matrix of many GiB."""
    data = _relabelled(tmp_path, lambda y: np.where(y % 2, 7, 3))
    assert _eval(tiny_pth, data, tmp_path / "out", "--fractions", "1.0") == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["num_classes"] == 2 and res["class_ids"] == [3, 7] and res["class_names"] == ["3", "7"]
    for run in res["runs"]:
        assert np.shape(run["confusion_matrix"]) == (2, 2) and np.sum(run["confusion_matrix"]) == 8


def test_class_ids_renumbering_keeps_ignored_mask_pixels_and_test_only_classes():
    masks = {"train": np.array([[[10, 20], [255, 10]]]), "test": np.array([[[99999, 20], [20, 255]]])}
    splits = {k: EvalSplit(np.zeros((1, 2, 2, 2), np.float32), m, "s1") for k, m in masks.items()}
    assert runner._compact_classes(splits, "seg") == [10, 20, 99999]
    assert splits["train"].labels.tolist() == [[[0, 1], [255, 0]]]
    assert splits["test"].labels.tolist() == [[[2, 1], [1, 255]]]


def test_a_one_class_train_split_is_refused_not_scored_100(tiny_pth, tmp_path, capsys):
    data = _relabelled(tmp_path, np.zeros_like)
    assert _eval(tiny_pth, data, tmp_path / "out", "--fractions", "1.0") == 2
    err = capsys.readouterr().err
    assert "the train split of" in err and "has one class (id 0)" in err and "Traceback" not in err


@pytest.mark.parametrize("split, message", [
    ("train", "split 'train' of seg: every mask pixel is 255"),
    ("test", "split 'test' of seg: every mask pixel is 255"),
])
def test_a_segmentation_split_without_a_labelled_pixel_is_refused(split, message):
    """An all-ignored test split scored mIoU 0 and pixel accuracy 0 (an empty confusion matrix)."""
    masks = {"train": np.array([[[0, 1], [1, 0]]]), "test": np.array([[[1, 0], [0, 1]]])}
    masks[split] = np.full_like(masks[split], 255)
    splits = {k: EvalSplit(np.zeros((1, 2, 2, 2), np.float32), m, "s1") for k, m in masks.items()}
    with pytest.raises(ValueError, match=message):
        runner._compact_classes(splits, "seg")
    masks[split] = np.array([[[0, 0], [255, 0]]])
    if split == "train":  # one class in the train masks: nothing to tell apart
        with pytest.raises(ValueError, match="has one class"):
            runner._compact_classes({k: EvalSplit(s.images, masks[k], "s1") for k, s in splits.items()}, "seg")


def test_a_relabelled_folder_misses_the_feature_cache(tiny_pth, tmp_path):
    """Swapping two test class folders keeps the row count: cached features were scored against the new labels."""
    splits = make_splits(13, seed=1, per_class=(5, 1, 3))
    del splits["valid"]
    root = write_folder(tmp_path / "eurosat", splits)
    args = ("--probe", "knn", "--knn-k", "1", "--fractions", "1.0")
    top1 = lambda out: json.loads((out / "results.json").read_text())["runs"][0]["top1"]  # noqa: E731
    assert _eval(tiny_pth, root, tmp_path / "out", *args, fmt="folder") == 0
    assert top1(tmp_path / "out") == 1.0
    test = root / "test"
    (test / "class_0").rename(test / "swap")
    (test / "class_1").rename(test / "class_0")
    (test / "swap").rename(test / "class_1")
    assert _eval(tiny_pth, root, tmp_path / "out", *args, fmt="folder") == 0
    assert _eval(tiny_pth, root, tmp_path / "fresh", *args, fmt="folder") == 0
    assert top1(tmp_path / "out") == top1(tmp_path / "fresh") == 0.5


def test_effective_k_and_sub_percent_fractions_are_reported_as_run(tiny_pth, hdf5_data, tmp_path, capsys):
    """k is capped at the training subset (results.json said 20 for 4 votes); 0.5% printed as '0%'."""
    assert _eval(tiny_pth, hdf5_data, tmp_path / "out", "--probe", "knn", "--fractions", "1.0", "0.005") == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["train_samples"], r["k"]) for r in res["runs"]] == [(80, 20), (4, 4)]
    assert res["runs"][1]["confusion_png"] == "confusion_knn_0.5pct.png"
    assert "0.5% labels (4 samples)" in capsys.readouterr().out
