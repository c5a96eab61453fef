import pytest
import torch

from terrafm.ssl.head import DINOHead
from terrafm.ssl.loss import DINOLoss, high_frequency_classes


def test_high_frequency_classes_are_above_the_uniform_share():
    # 4 classes: uniform share 0.25; only classes 0 (0.4) and 2 (0.3) exceed it
    assert high_frequency_classes([40, 10, 30, 20]) == [0, 2]
    with pytest.raises(ValueError, match="non-empty"):
        high_frequency_classes([])


def test_dual_centering_update_matches_hand_computation():
    K = 3
    loss = DINOLoss(K, num_classes=4, high_classes=[1], center_momentum=0.9, center_high_momentum=0.5, alpha=0.8)
    loss.center.copy_(torch.tensor([1.0, 0.0, 0.0]))
    loss.center_high.copy_(torch.tensor([0.0, 2.0, 0.0]))
    t = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]],  # view 0: samples 0, 1
                      [[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]]])  # view 1
    cls = torch.tensor([1, 3])  # sample 0 is high-frequency (class 1), sample 1 is not
    probs = loss.teacher_probs(t, cls, temperature=0.5)
    centred = t - 0.8 * torch.tensor([1.0, 0.0, 0.0]) - 0.2 * torch.tensor([0.0, 2.0, 0.0])
    torch.testing.assert_close(probs, torch.softmax(centred / 0.5, dim=-1))
    loss.update_center()
    mean_all = torch.tensor([5.0, 4.0, 8.0]) / 4
    mean_high = torch.tensor([1.0, 4.0, 4.0]) / 2  # rows of sample 0 in both views
    torch.testing.assert_close(loss.center, 0.9 * torch.tensor([1.0, 0.0, 0.0]) + 0.1 * mean_all)
    torch.testing.assert_close(loss.center_high, 0.5 * torch.tensor([0.0, 2.0, 0.0]) + 0.5 * mean_high)


def test_center_high_unchanged_without_high_frequency_samples_and_stats_accumulate():
    loss = DINOLoss(2, num_classes=3, high_classes=[0])
    a, b = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[3.0, 5.0]]])
    loss.teacher_probs(a, torch.tensor([2]), 0.1)
    loss.teacher_probs(b, torch.tensor([-1]), 0.1)  # unknown class: counts for c only
    loss.update_center()  # two micro-batches, one update: mean of both
    torch.testing.assert_close(loss.center, 0.1 * torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(loss.center_high, torch.zeros(2))


def test_a_non_finite_teacher_batch_leaves_both_centres_as_they_were():
    # a diverged step's inf logits must not poison the centres (and with them every later step's targets)
    loss = DINOLoss(2, num_classes=2, high_classes=[0])
    loss.center.copy_(torch.tensor([0.5, -0.5]))
    loss.center_high.copy_(torch.tensor([1.0, 2.0]))
    loss.teacher_probs(torch.tensor([[[float("inf"), 1.0]]]), torch.tensor([0]), 0.1)
    loss.update_center()
    torch.testing.assert_close(loss.center, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(loss.center_high, torch.tensor([1.0, 2.0]))
    loss.teacher_probs(torch.tensor([[[1.0, 3.0]]]), torch.tensor([0]), 0.1)  # the next good step updates both
    loss.update_center()
    torch.testing.assert_close(loss.center, torch.tensor([0.55, -0.15]))
    torch.testing.assert_close(loss.center_high, torch.tensor([1.0, 2.1]))


def test_loss_is_cross_entropy_over_pairs_of_different_views():
    loss = DINOLoss(4, num_classes=2)
    s = torch.randn(3, 2, 4)
    p = torch.softmax(torch.randn(2, 2, 4), dim=-1)
    log_p = torch.log_softmax(s / 0.1, dim=-1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum((-p[t] * log_p[v]).sum(-1).mean() for t, v in pairs) / 4
    torch.testing.assert_close(loss(s, p), expected)


def test_loss_validates_inputs():
    with pytest.raises(ValueError, match="high_classes"):
        DINOLoss(4, num_classes=2, high_classes=[5])
    loss = DINOLoss(4, num_classes=2)
    with pytest.raises(ValueError, match="prototypes"):
        loss.teacher_probs(torch.zeros(2, 3, 5), torch.zeros(3, dtype=torch.long), 0.04)


def test_head_prototypes_are_unit_norm_and_logits_are_cosines():
    head = DINOHead(16, num_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)  # the norm of v must not matter
    x = torch.randn(5, 16)
    logits = head(x)
    assert logits.shape == (5, 32) and logits.abs().max() <= 1.0 + 1e-6
    # each logit is the cosine of the bottleneck feature and its prototype (a bound alone passed for all-zero logits)
    z = head.mlp(x).detach()
    cosines = torch.nn.functional.cosine_similarity(z[:, None, :], head.last_layer.weight_v.detach()[None], dim=-1)
    torch.testing.assert_close(logits.detach(), cosines, rtol=1e-5, atol=1e-6)
    names = {n for n, _ in head.named_parameters()}
    assert "last_layer.weight_v" in names and "last_layer.weight_g" not in names
