"""Our own re-implementation of the DINOv2 loss semantics (dino_clstoken_loss.py, ibot_patch_loss.py),
written step by step as DINOv2 computes, at any dtype: float64 for the oracle, float32 for "plain
PyTorch" in the flash-attn tolerance rule. Multiple ranks are simulated by a list of row shards.
"""

import math

import torch
import torch.nn.functional as F


def centered_softmax(t, center, temp, dtype=torch.float64):
    return F.softmax((t.to(dtype) - center.to(dtype).reshape(-1)) / temp, dim=-1)


def sinkhorn_literal(shards, temp, n_iterations=3, n_samples=None, dtype=torch.float64):
    """DINOv2's sinkhorn_knopp_teacher, exp without a max, over rank shards [(R_i, K)]; returns the shards."""
    Qs = [torch.exp(s.to(dtype) / temp).t() for s in shards]
    B = sum(q.shape[1] for q in Qs) if n_samples is None else n_samples
    K = Qs[0].shape[0]
    total = sum(q.sum() for q in Qs)
    Qs = [q / total for q in Qs]
    for _ in range(n_iterations):
        rows = sum(q.sum(dim=1, keepdim=True) for q in Qs)
        Qs = [q / rows / K for q in Qs]
        Qs = [q / q.sum(dim=0, keepdim=True) / B for q in Qs]
    return [(q * B).t() for q in Qs]


def sinkhorn_log_f64(t, temp, n_iterations=3, n_samples=None):
    """The same steps on log Q in float64 (logsumexp for every sum): finite where exp(t / tau) overflows."""
    logq = (t.double() / temp).t()
    B = logq.shape[1] if n_samples is None else n_samples
    K = logq.shape[0]
    logq = logq - torch.logsumexp(logq.flatten(), dim=0)
    for _ in range(n_iterations):
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True) - math.log(K)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - math.log(B)
    return torch.exp(logq + math.log(B)).t()


def dino_forward(student_list, teacher_list, student_temp, dtype=torch.float64):
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s.to(dtype) / student_temp, dim=-1)
        for t in teacher_list:
            total = total - torch.sum(t.to(dtype) * lsm, dim=-1).mean()
    return total


def ibot_forward(s, t, masks, student_temp, dtype=torch.float64):
    loss = torch.sum(t.to(dtype) * F.log_softmax(s.to(dtype) / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * masks.to(dtype), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def ibot_forward_masked(s, t, masks, student_temp, n_masked_patches=None, masks_weight=None,
                        dtype=torch.float64):
    loss = torch.sum(t.to(dtype) * F.log_softmax(s.to(dtype) / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    return -(loss * masks_weight.to(dtype)).sum() / masks.shape[0]


def center_after_update(center, teacher_rows_sum, rows, momentum):
    """DINOv2's apply_center_update: c m + (sum / rows) (1 - m)."""
    return center * momentum + teacher_rows_sum / rows * (1 - momentum)
