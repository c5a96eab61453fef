"""The end-of-run probe's kNN: leave-one-group-out, so a tile's own grid cell never votes for it."""

import numpy as np
import pytest

from terrafm.eval.learning import band_statistics, knn_accuracy


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
