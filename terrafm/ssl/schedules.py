"""Training schedules as pure functions of the optimiser step (DINOv2 style: no scheduler state).

Every function takes the global step (0-based, counted in optimiser steps) and returns a float, so a
resumed run recomputes exactly the value an uninterrupted run would have used.
"""

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (held at `end` afterwards)."""
    if total_steps <= 0 or step >= total_steps:
        return end
    progress = max(step, 0) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then cosine decay to `min_lr`.

    During warm-up the value at step s is base_lr * (s + 1) / warmup_steps, so step 0 already learns.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, base_lr, min_lr)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = lr_per_256 * global_batch / 256."""
    return lr_per_256 * global_batch / 256.0


def weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine weight decay, 0.04 -> 0.4 by default (increasing)."""
    return cosine(step, total_steps, start, end)


def teacher_momentum(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Cosine EMA momentum of the teacher, 0.996 -> 1."""
    return cosine(step, total_steps, start, end)


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear teacher temperature warm-up (0.04 -> 0.06 over the first 30 epochs), then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def last_layer_frozen(step: int, freeze_steps: int) -> bool:
    """Whether the prototype layer's gradient is dropped at `step` (DINO: during the first epoch)."""
    return step < freeze_steps
