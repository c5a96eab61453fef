"""Float64 oracles of the loss references and the flash-attn tolerance rule shared by the loss tests.

The oracles are written out here, apart from terrafm_kernels.reference (which keeps float64 too), so a test
compares the kernels with an independent statement of the math, run entirely in float64.
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


def dino_head_loss_f64(student_features, teacher_features, weight_v, center, center_high, high_weight,
                       teacher_temperature, student_temperature, alpha, weight_g=None, teacher_weight_v=None,
                       teacher_weight_g=None):
    """Float64 composition: prototype logits -> dual-centering teacher softmax -> DINO cross-entropy."""
    from terrafm_kernels.reference import prototype_logits

    S, B, D = student_features.shape
    T = teacher_features.shape[0]
    student_logits = prototype_logits(student_features.reshape(S * B, D), weight_v, weight_g)
    with torch.no_grad():
        tw = weight_v if teacher_weight_v is None else teacher_weight_v
        tg = weight_g if teacher_weight_v is None else teacher_weight_g
        teacher_logits = prototype_logits(teacher_features.reshape(T * B, D).double(), tw.detach().double(),
                                          None if tg is None else tg.detach().double())
        probs, logit_sum, high_sum = teacher_softmax_f64(teacher_logits, center, center_high, high_weight,
                                                         teacher_temperature, alpha)
    loss = dino_cross_entropy_f64(student_logits.reshape(S, B, -1), probs.reshape(T, B, -1),
                                  student_temperature)
    return loss, logit_sum, high_sum
