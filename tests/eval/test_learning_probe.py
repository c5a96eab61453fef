"""The end-of-run probe's kNN: leave-one-group-out, so a tile's own grid cell never votes for it."""

import numpy as np
import pytest

from terrafm.eval.learning import band_statistics, knn_accuracy, paired_se


def test_features_that_carry_the_label_score_100_and_noise_scores_near_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    groups = np.arange(80) // 4
    informative = np.eye(2)[labels] + 0.05 * rng.normal(size=(80, 2))
    assert knn_accuracy(informative, labels, groups, k=5) == 100.0
    assert abs(knn_accuracy(rng.normal(size=(80, 8)), labels, groups, k=5) - 50.0) < 20.0


def test_own_group_never_votes():
    """Features identical within a group, labels constant within a group but unrelated to the features
    across groups: only same-group neighbours could predict them, and they are left out."""
    groups = np.arange(40) // 4
    labels = (groups % 2).astype(np.int64)
    features = np.eye(10)[groups]  # orthogonal across groups: no other group is closer than any other
    assert knn_accuracy(features, labels, groups, k=4) <= 60.0


def test_band_statistics_are_per_band_mean_and_std_z_scored():
    images = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32)
    stats = band_statistics(images)
    assert stats.shape == (6, 6)
    np.testing.assert_allclose(stats.mean(0), 0.0, atol=1e-5)
    assert stats.std(0) == pytest.approx(np.ones(6), rel=1e-3)


def test_paired_se_is_zero_for_identical_predictions_and_the_binomial_se_for_independent_samples():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=4000) < 0.7
    b = rng.uniform(size=4000) < 0.6
    groups = np.arange(4000)
    assert paired_se(a, a, groups) == 0.0
    diff = a.astype(float) - b.astype(float)
    expected = 100.0 * diff.std() / np.sqrt(len(diff))
    assert paired_se(a, b, groups) == pytest.approx(expected, rel=0.1)


def test_paired_se_resamples_a_group_together():
    """The same per-sample differences, four copies of each in one group (a place's four tiles agree), are
    as informative as a quarter of the samples: about twice the s.e. of independent samples."""
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=1000) < 0.7, rng.uniform(size=1000) < 0.6
    independent = paired_se(np.repeat(a, 4), np.repeat(b, 4), np.arange(4000))
    grouped = paired_se(np.repeat(a, 4), np.repeat(b, 4), np.repeat(np.arange(1000), 4))
    assert grouped == pytest.approx(2.0 * independent, rel=0.15)


def test_probe_features_are_computed_on_the_backbones_device():
    """A GPU run's probe built its models with the ops chosen for cuda (compiled Triton kernels) and fed them cpu
    tensors: every CUDA run on the bundled sample failed after its last checkpoint. The tiles now go to the device
    of the backbone's parameters (a meta-device stand-in here: no GPU) and the features come back to the cpu."""
    import torch

    from terrafm.eval.learning import cls_features

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen = []

        def forward_features(self, x, modality):
            self.seen.append(x.device.type)
            return {"x_norm_clstoken": torch.zeros(len(x), 4)}

    backbone = Recorder()
    features = cls_features(backbone, np.zeros((5, 2, 8, 8), np.float32), "s1", 8, batch_size=2)
    assert backbone.seen == ["meta"] * 3 and features.device.type == "cpu" and features.shape == (5, 4)
