import numpy as np
import pytest

from terrafm.eval import metrics, probes


def test_confusion_top1_macro_f1_match_hand_computation():
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    cm = metrics.confusion_matrix(target, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.top1(cm) == pytest.approx(4 / 6)
    # per class F1 = 2TP / (2TP + FP + FN): 2/4, 4/5, 2/3
    assert metrics.macro_f1(cm) == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)


def test_miou_ignores_255_and_absent_classes():
    target = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])
    cm = metrics.confusion_matrix(target, pred, 4)
    # class 0: 1 / 2, class 1: 1 / 2, classes 2 and 3 never occur (the 255 pixel is skipped)
    assert metrics.mean_iou(cm) == pytest.approx(0.5)


def test_multilabel_f1_micro_and_macro():
    target = np.array([[1, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    out = metrics.multilabel_f1(target, pred)
    # tp=(1,1,0) fp=(0,1,0) fn=(0,0,1): micro 2*2/(4+1+1); macro over labels 0..2: 1, 2/3, 0
    assert out["f1_micro"] == pytest.approx(4 / 6)
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_knn_weights_votes_by_exp_similarity_over_temperature():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # class 0 once, class 1 twice (same direction)
    labels = np.array([0, 1, 1])
    test = np.array([[1.0, 0.2], [0.2, 1.0]])
    assert probes.knn_predict(train, labels, test, k=3, temperature=0.07).tolist() == [0, 1]
    # with k = 3 and a huge temperature, votes are near-uniform and the majority class 1 wins
    assert probes.knn_predict(train, labels, test, k=3, temperature=1e6).tolist() == [1, 1]


def test_knn_multilabel_majority_of_weight():
    train = np.array([[1.0, 0.0], [0.7, 0.3], [0.0, 1.0]])
    labels = np.array([[1, 0], [1, 1], [0, 1]], dtype=np.float32)
    # label 0 has all the weight; label 1 only that of the two farther neighbours (< half)
    assert probes.knn_predict(train, labels, np.array([[1.0, 0.05]]), k=3).tolist() == [[1.0, 0.0]]
    assert probes.knn_predict(train, labels, np.array([[0.1, 1.0]]), k=3).tolist() == [[0.0, 1.0]]


def test_label_subset_is_stratified_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(5), [300, 200, 100, 10, 1])
    idx = probes.label_subset(labels, 0.01, seed=3)
    counts = np.bincount(labels[idx], minlength=5)
    assert counts.tolist() == [3, 2, 1, 1, 1]
    assert np.array_equal(idx, probes.label_subset(labels, 0.01, seed=3))
    assert not np.array_equal(idx, probes.label_subset(labels, 0.01, seed=4))
    assert len(probes.label_subset(labels, 1.0)) == len(labels)
    with pytest.raises(ValueError, match="label fraction"):
        probes.label_subset(labels, 0.0)


def test_linear_probe_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    x = rng.normal(size=(200, 8)) + 4 * np.eye(3, 8)[y]
    pred, lr = probes.linear_probe(x[:150].astype(np.float32), y[:150], x[150:].astype(np.float32), epochs=30)
    assert (pred == y[150:]).mean() > 0.95 and lr in (1e-3, 1e-2, 1e-1)


def test_confusion_png_is_written(tmp_path):
    cm = np.array([[3, 1], [0, 4]])
    metrics.save_confusion_png(cm, tmp_path / "cm.png", ["a", "b"])
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
