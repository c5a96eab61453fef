"""Collapse monitors on hand-made teacher targets: each failure mode reads as documented."""

import math

import pytest
import torch

from terrafm.ssl.monitors import collapse_state, teacher_monitors

K = 64


def values(probs: torch.Tensor) -> dict[str, float]:
    return {k: v.item() for k, v in teacher_monitors(probs).items()}


def test_uniform_targets_have_full_entropy_no_gap_and_read_as_uniform():
    m = values(torch.full((2, 8, K), 1.0 / K))
    assert m["teacher_entropy"] == pytest.approx(math.log(K))
    assert m["teacher_batch_entropy"] == pytest.approx(math.log(K))
    assert m["teacher_entropy_gap"] == pytest.approx(0.0, abs=1e-5) and m["teacher_cosine"] == pytest.approx(1.0)
    assert collapse_state(m, K, min_gap=0.1).startswith("uniform targets")


def test_one_prototype_for_every_image_is_collapse_even_though_each_row_is_sharp():
    probs = torch.zeros(2, 8, K)
    probs[..., 5] = 1.0
    m = values(probs)
    assert m["teacher_entropy"] == pytest.approx(0.0, abs=1e-5) and m["teacher_prototypes"] == 1
    assert m["teacher_entropy_gap"] == pytest.approx(0.0, abs=1e-5) and m["teacher_cosine"] == pytest.approx(1.0)
    assert collapse_state(m, K, min_gap=0.1).startswith("collapse")


def test_sharp_distinct_targets_are_healthy_and_same_sample_views_do_not_count_in_the_cosine():
    B = 8
    probs = torch.zeros(2, B, K)
    probs[0, torch.arange(B), torch.arange(B)] = 1.0  # sample b -> prototype b in both views
    probs[1, torch.arange(B), torch.arange(B)] = 1.0
    m = values(probs)
    assert m["teacher_entropy"] == pytest.approx(0.0, abs=1e-5)
    assert m["teacher_batch_entropy"] == pytest.approx(math.log(B)) and m["teacher_entropy_gap"] == pytest.approx(
        math.log(B))
    assert m["teacher_prototypes"] == B and m["teacher_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert collapse_state(m, K, min_gap=0.1) is None


def test_monitors_reject_a_flat_tensor():
    with pytest.raises(ValueError, match="views, batch, prototypes"):
        teacher_monitors(torch.rand(8, K))
