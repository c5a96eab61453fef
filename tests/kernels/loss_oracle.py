"""Float64 oracles of the loss references and the flash-attn tolerance rule shared by the loss tests.

reference.teacher_softmax / dino_cross_entropy cast inputs with .float(), so called on float64
tensors they would compute in float32; these oracles run the same math entirely in float64.
"""

import torch
import torch.nn.functional as F


def teacher_softmax_f64(t, center, center_high, high_weight, temperature, alpha):
    t, center, center_high, high_weight = (x.double() for x in (t, center, center_high, high_weight))
    centred = t - alpha * center - (1.0 - alpha) * center_high
    probs = torch.softmax(centred / temperature, dim=-1)
    return probs, t.sum(dim=0), (high_weight.unsqueeze(1) * t).sum(dim=0)


def dino_cross_entropy_f64(student_logits, teacher_probs, student_temperature):
    log_p = F.log_softmax(student_logits.double() / student_temperature, dim=-1)
    total, pairs = 0.0, 0
    for t in range(teacher_probs.shape[0]):
        for s in range(student_logits.shape[0]):
            if s != t:
                total = total + (-teacher_probs[t].double() * log_p[s]).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.double() - oracle.double()).abs().max().item()


def assert_flash_tolerance(name: str, kernel: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor,
                           atol: float) -> None:
    """flash-attn rule: error(kernel vs fp64) <= 2 x error(plain PyTorch at the same dtype) + atol."""
    err_kernel, err_plain = max_err(kernel, oracle), max_err(plain, oracle)
    assert err_kernel <= 2 * err_plain + atol, (
        f"{name}: kernel error {err_kernel:.3e} > 2 x plain PyTorch error {err_plain:.3e} + atol {atol:.1e}")
