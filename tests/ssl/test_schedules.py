import math

import pytest

from terrafm.ssl import schedules


def test_cosine_endpoints_and_midpoint():
    assert schedules.cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert schedules.cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)  # (start + end) / 2
    assert schedules.cosine(100, 100, 0.04, 0.4) == 0.4
    assert schedules.cosine(500, 100, 0.04, 0.4) == 0.4


def test_learning_rate_warmup_then_cosine():
    base, warm, total, floor = 1e-3, 10, 110, 1e-6
    assert schedules.learning_rate(0, total, base, warm, floor) == pytest.approx(1e-4)
    assert schedules.learning_rate(9, total, base, warm, floor) == pytest.approx(1e-3)
    # 25 steps into a 100-step cosine: floor + (base - floor) * (1 + cos(pi / 4)) / 2
    expected = floor + (base - floor) * (1 + math.cos(math.pi / 4)) / 2
    assert schedules.learning_rate(35, total, base, warm, floor) == pytest.approx(expected)
    assert schedules.learning_rate(110, total, base, warm, floor) == pytest.approx(floor)


def test_scaled_lr_is_the_linear_rule():
    assert schedules.scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_teacher_momentum_cosine_to_one():
    assert schedules.teacher_momentum(0, 1000, 0.996) == pytest.approx(0.996)
    assert schedules.teacher_momentum(500, 1000, 0.996) == pytest.approx(0.998)
    assert schedules.teacher_momentum(1000, 1000, 0.996) == 1.0


def test_teacher_temperature_linear_warmup_then_constant():
    assert schedules.teacher_temperature(0, 30, 0.04, 0.06) == pytest.approx(0.04)
    assert schedules.teacher_temperature(15, 30, 0.04, 0.06) == pytest.approx(0.05)
    assert schedules.teacher_temperature(30, 30, 0.04, 0.06) == 0.06
    assert schedules.teacher_temperature(3, 0, 0.04, 0.06) == 0.06


def test_last_layer_frozen_first_epoch_only():
    assert schedules.last_layer_frozen(0, 100) and schedules.last_layer_frozen(99, 100)
    assert not schedules.last_layer_frozen(100, 100)
