import numpy as np
import pytest
import torch

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
    pred, lr, _ = probes.linear_probe(x[:150].astype(np.float32), y[:150], x[150:].astype(np.float32),
                                      epochs=30)
    assert (pred == y[150:]).mean() > 0.95 and lr in (1e-3, 1e-2, 1e-1)


def test_confusion_png_is_written(tmp_path):
    cm = np.array([[3, 1], [0, 4]])
    metrics.save_confusion_png(cm, tmp_path / "cm.png", ["a", "b"])
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def _knn_reference(train, labels, test, k, temperature):
    """DINO's vote in float64: the top-k cosine neighbours, each weighted exp(sim / T), summed per class."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    out = []
    for sims in unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T:
        top = np.argsort(-sims)[:k]
        out.append(int(np.bincount(labels[top], weights=np.exp(sims[top] / temperature)).argmax()))
    return out


@pytest.mark.parametrize("temperature", [0.07, 0.02, 0.01, 0.005])
def test_knn_small_temperature_does_not_overflow_into_a_tie(temperature):
    """exp(sim / T) is inf in float32 for T < ~0.0113: neighbours tied at inf gave the vote to class 0."""
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05]], np.float32)
    labels = np.array([0, 1, 1])
    test = np.array([[1.0, 0.01]], np.float32)
    assert probes.knn_predict(train, labels, test, k=3, temperature=temperature).tolist() == \
        _knn_reference(train, labels, test, 3, temperature) == [1]
    multi = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    assert probes.knn_predict(train, multi, test, k=3, temperature=temperature).tolist() == [[0.0, 1.0]]


def test_knn_k_above_the_training_set_and_tied_votes():
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    test = np.array([[1.0, 1.0], [1.0, 0.1]])
    # k = 20 > 2 samples: both vote; [1, 1] is as close to either, the tied vote goes to the lower id
    assert probes.knn_predict(train, np.array([1, 0]), test, k=20).tolist() == [0, 1]
    assert _knn_reference(train, np.array([1, 0]), test, 2, 0.07) == [0, 1]


def test_knn_leaves_out_the_test_samples_own_group():
    feats = np.array([[1.0, 0.0], [1.0, 0.05], [0.9, 0.5], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    groups = np.array([0, 0, 1, 2])
    # without groups each sample is its own nearest neighbour; with them sample 0 (and 1) may vote only with
    # samples 2 and 3, both of class 1
    assert probes.knn_decision(probes.knn_scores(feats, labels, feats, k=1), False).tolist() == [0, 0, 1, 1]
    left_out = probes.knn_scores(feats, labels, feats, k=1, groups=(groups, groups), dtype=torch.float64)
    assert probes.knn_decision(left_out, False).tolist() == [1, 1, 0, 1]
    # k = 20 is capped at the 2 samples outside group 0
    assert np.isfinite(probes.knn_scores(feats, labels, feats, k=20, groups=(groups, groups))).all()
    with pytest.raises(ValueError, match="no training sample outside its own group"):
        probes.knn_scores(feats, labels, feats, groups=(np.zeros(4), np.zeros(4)))
    with pytest.raises(ValueError, match="groups must be"):
        probes.knn_scores(feats, labels, feats, groups=(groups, groups[:3]))


def test_linear_probe_standardises_huge_and_constant_features():
    """float32 squares of features ~1e19 overflowed the std (inf: every feature 0); a feature constant in training
    was divided by 1e-6, so test-time noise of 1e-4 became an input of 100 on a weight training never moved."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    x = (rng.normal(size=(200, 8)) + 4 * np.eye(3, 8)[y]).astype(np.float32)
    huge = x * np.float32(1e19)
    pred, _, _ = probes.linear_probe(huge[:150], y[:150], huge[150:], epochs=10)
    assert (pred == y[150:]).mean() > 0.95
    flat = x.copy()
    flat[:150, 7] = 0.5
    flat[150:, 7] = 0.5 + rng.normal(size=50).astype(np.float32) * 1e-4
    pred, _, _ = probes.linear_probe(flat[:150], y[:150], flat[150:], epochs=10)
    assert (pred == y[150:]).mean() > 0.95
    mean, std = probes.standardisation(flat[:150])
    assert std[7] == 1.0 and mean.dtype == np.float64


def test_segmentation_probe_trains_on_a_single_image():
    """A 1% subset of a small segmentation set is one image: it used to be skipped (BatchNorm wants two samples),
    which left the random-init head to be scored."""
    rng = np.random.default_rng(0)
    mask = np.array([[[0, 1], [2, 0]]]).repeat(4, 1).repeat(4, 2)
    maps = (5 * np.eye(3, 8)[mask[:, ::4, ::4]].transpose(0, 3, 1, 2)
            + rng.normal(scale=0.1, size=(1, 8, 2, 2))).astype(np.float32)
    pred = probes.segmentation_probe(maps, mask, maps, 3, epochs=30)
    assert metrics.segmentation_report(mask, pred, 3)[0]["pixel_acc"] >= 0.75  # the untrained head: ~0.1


def test_probes_never_predict_a_class_absent_from_their_training_labels():
    """A 1% subset can lack a class (GEO-Bench's own 0.01x partitions do): the linear and segmentation heads'
    random weights for it predicted it on test features unlike the training ones (a linear probe fit on one class
    put 83% of these test samples in the three classes it never saw). As sklearn's LogisticRegression: no output."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(2, 16)).astype(np.float32), 3 * rng.normal(size=(200, 16)).astype(np.float32)
    pred, _, scores = probes.linear_probe(train, np.zeros(2, np.int64), test, epochs=20, num_classes=4)
    assert (pred == 0).all() and (scores[:, 1:] == 0).all() and np.allclose(scores[:, 0], 1)
    train = rng.normal(size=(40, 16)).astype(np.float32)
    labels = np.where(train[:, 0] > 0, 2, 0)  # classes 0 and 2 of 4
    pred, _, scores = probes.linear_probe(train, labels, test, epochs=20, num_classes=4)
    assert set(np.unique(pred)) <= {0, 2} and (scores[:, [1, 3]] == 0).all() and np.isfinite(scores).all()
    maps = rng.normal(size=(4, 8, 4, 4)).astype(np.float32)
    masks = np.zeros((4, 16, 16), np.int64)
    masks[:, :, 8:] = 1
    masks[0, :4] = probes.IGNORE_INDEX
    pred = probes.segmentation_probe(maps, masks, 5 * rng.normal(size=(4, 8, 4, 4)).astype(np.float32), 3, epochs=10)
    assert set(np.unique(pred)) <= {0, 1}


def test_a_segmentation_subset_without_a_labelled_pixel_keeps_the_head_finite(monkeypatch):
    """A 1% subset can be images whose masks are all 255: with every class absent, masking them all (-inf) made the
    head's outputs NaN after one step."""
    upsample, finite = probes.F.interpolate, []

    def watched(*args, **kwargs):
        out = upsample(*args, **kwargs)
        finite.append(bool(torch.isfinite(out).all()))
        return out

    monkeypatch.setattr(probes.F, "interpolate", watched)
    maps = np.random.default_rng(0).normal(size=(2, 8, 4, 4)).astype(np.float32)
    pred = probes.segmentation_probe(maps, np.full((2, 16, 16), probes.IGNORE_INDEX), maps, 3, epochs=3)
    assert all(finite) and len(finite) == 4 and pred.shape == (2, 16, 16)


def test_averaging_conventions_for_absent_and_predicted_only_classes():
    """As docs/eval.md states: a class in neither truth nor prediction is not averaged; one predicted but absent from
    the truth scores 0 (sklearn's macro F1 over the labels present, mmsegmentation's mIoU). Multi-label macro F1
    averages every label, one in neither truth nor prediction as 0 (sklearn's and torchmetrics' multi-label macro)."""
    cm = metrics.confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), 4)  # class 2 only predicted
    assert metrics.macro_f1(cm) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics.mean_iou(cm) == pytest.approx((1 / 2 + 1 + 0) / 3)
    target = np.array([[1, 0, 0], [0, 0, 0]])  # label 2 never positive, never predicted; a row with no label
    assert metrics.multilabel_f1(target, np.array([[1, 1, 0], [0, 0, 0]])) == pytest.approx(
        {"f1_micro": 2 / 3, "f1_macro": (1 + 0 + 0) / 3})


def test_classification_scores_class_255_when_there_are_more_classes():
    """255 is segmentation's void label; with 300 classes it is a class and its samples were silently dropped."""
    y = np.arange(300).repeat(2)
    pred = np.where(y == 255, 0, y)
    scores, cm = metrics.classification_report(y, pred, 300)
    assert cm.sum() == 600 and scores["top1"] == pytest.approx(598 / 600)


def test_multilabel_linear_probe_chooses_the_lr_by_f1_not_per_label_accuracy():
    """Sparse labels (BigEarthNet: ~1 of 19 positive) make per-label accuracy favour predicting nothing: it chose an
    lr whose test F1 was half the best."""
    import torch

    rng = np.random.default_rng(0)
    K, D = 19, 64
    W = rng.normal(size=(D, K))

    def make(n):
        x = rng.normal(size=(n, D))
        return x.astype(np.float32), (x @ W / 6 - 3.2 + rng.normal(scale=1.5, size=(n, K)) > 0).astype(np.float32)

    (xtr, ytr), (xva, yva) = make(2000), make(1000)
    mean, std = probes.standardisation(xtr)
    prep = lambda f: torch.from_numpy(((f - mean) / std).astype(np.float32))  # noqa: E731
    f1 = {}
    for lr in (1e-3, 1e-2, 1e-1):
        head = probes._fit_linear(prep(xtr), torch.from_numpy(ytr), K, lr, 100, 0, True)
        f1[lr] = metrics.multilabel_f1(yva, probes._linear_out(head, prep(xva), True))["f1_micro"]
    _, chosen, _ = probes.linear_probe(xtr, ytr, xva[:10], xva, yva, epochs=100)
    assert chosen == max(f1, key=f1.get) and f1[chosen] > 1.5 * min(f1.values()), f1


def test_multilabel_map_is_sklearns_average_precision():
    """AP = sum over thresholds of the recall step times the precision, ties at one threshold, no interpolation;
    macro over all labels (one without a positive scores 0), micro over all pairs (values worked by hand)."""
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.3], [0.3, 0.7, 0.2], [0.1, 0.1, 0.9]])
    # label 0: ranks 0.9 (+), 0.8 (-), 0.3 (+): AP = 0.5 x 1 + 0.5 x 2/3; label 1: 0.7 and 0.7 tied, both +: AP = 1
    ap0, ap1 = 0.5 + 0.5 * 2 / 3, 1.0
    # micro over the 12 pairs, 4 positives, by threshold: 0.9 (1 of 2 positive): R 1/4, P 1/2; 0.8: no recall step;
    # 0.7 (both positive): R 3/4, P 3/5; 0.3 (one of two): R 1, P 4/7
    micro = 0.25 * 0.5 + 0.5 * 0.6 + 0.25 * 4 / 7
    got = metrics.multilabel_map(target, scores)
    assert got["map_macro"] == pytest.approx((ap0 + ap1 + 0) / 3)  # label 2 has no positive: AP 0, as sklearn's
    assert got["map_micro"] == pytest.approx(micro)
    assert metrics.multilabel_map(np.zeros((2, 2)), np.ones((2, 2))) == {"map_macro": 0.0, "map_micro": 0.0}


def test_multilabel_map_macro_scores_a_label_without_a_positive_0_as_sklearn_and_torchmetrics():
    """docs/eval.md gives map_macro as sklearn's average_precision_score(average="macro"). sklearn (1.9) and
    torchmetrics' MultilabelAveragePrecision (1.9) set the recall of a label with no positive in the truth to 1 (with
    a warning), so its AP is 0 and it is averaged in: 0.611 here, computed with both. The mean over the labels with
    a positive only (0.917) read higher than either library on a test split that lacks a label (GEO-Bench's
    m-bigearthnet test split has 1000 samples for 43 labels)."""
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.3], [0.3, 0.7, 0.2], [0.1, 0.1, 0.9]])
    assert metrics.multilabel_map(target, scores)["map_macro"] == pytest.approx(0.6111111111111)
    # every label with a positive: the mean over all of them, unchanged
    assert metrics.multilabel_map(target[:, :2], scores[:, :2])["map_macro"] == pytest.approx(0.9166666666666)
