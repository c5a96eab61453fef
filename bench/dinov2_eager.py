"""DINOv2's loss math written eagerly, step by step as dinov2/loss/*.py computes it (our own code): the
"eager" provider the DINOv2 drop-ins (terrafm_kernels.dino) are timed and measured against.

DINOv2 ViT-L per-GPU shapes (its default config, vitl16_short): 64 images per GPU, 2 global crops (224 px,
patch 16: 196 patches) and 8 local crops, 65536 prototypes for the DINO and iBOT heads, a mask ratio in
[0.1, 0.5] on half of the global crops: ~0.3 x 196 x 64 ~ 3763 masked patch rows per GPU, here
terrafm_kernels.dino_teacher.PRODUCTION_ROWS's 3760 (a multiple of 16), the rows its compile report counts.
"""

import torch
import torch.nn.functional as F

from terrafm_kernels.dino_teacher import PRODUCTION_K, PRODUCTION_ROWS

VIT_L = {"B": 64, "local": 8, "K": PRODUCTION_K, "masked": PRODUCTION_ROWS[-1]}


def centered_softmax(teacher_logits, center, teacher_temp):
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1)


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dino_forward(student_list, teacher_list, student_temp=0.1):
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total = total - torch.sum(t * lsm, dim=-1).mean()
    return total


def dino_step_loss(student_local, student_global, teacher_logits, center, n_local: int, teacher_temp: float = 0.07):
    """One step of DINOv2's class-token loss: centred teacher, local crops against both global teacher
    views, global crops against the swapped teacher views (unscaled sum of the two terms)."""
    with torch.no_grad():
        probs = centered_softmax(teacher_logits, center, teacher_temp).view(2, -1, teacher_logits.shape[-1])
    local = dino_forward(student_local.chunk(n_local), probs)
    return local + dino_forward([student_global], [probs.flatten(0, 1)])


def ibot_step_loss(student_masked, teacher_masked, center, masks_weight, n_images: int, teacher_temp: float = 0.07):
    """One step of DINOv2's iBOT loss on the masked patch rows: centred teacher, then forward_masked."""
    with torch.no_grad():
        probs = centered_softmax(teacher_masked, center, teacher_temp)
    loss = torch.sum(probs * F.log_softmax(student_masked / 0.1, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / n_images


def _last_layer_logits(features, weight_v):
    """DINOv2's DINOHead tail: L2-normalised bottleneck through the weight-normalised last layer (g = 1)."""
    return F.normalize(features, dim=-1) @ (weight_v / weight_v.norm(dim=1, keepdim=True)).t()


def dino_head_step_loss(student_global, student_local, teacher_global, weight_v, teacher_weight_v, center,
                        n_local: int, teacher_temp: float = 0.07):
    """DINOv2 from the bottleneck on: last layer, swapped centred teacher, (local + 2 global) / pairs, i.e.
    dino_local_crops_loss + dino_global_crops_loss of ssl_meta_arch (what DINOLoss.forward_fused fuses)."""
    with torch.no_grad():
        chunks = teacher_global.chunk(2)
        teacher = _last_layer_logits(torch.cat((chunks[1], chunks[0])), teacher_weight_v)
        probs = centered_softmax(teacher, center, teacher_temp).view(2, -1, teacher.shape[-1])
    pairs = 2 + 2 * n_local
    local = dino_forward(_last_layer_logits(student_local, weight_v).chunk(n_local), probs) / pairs
    return local + dino_forward([_last_layer_logits(student_global, weight_v)], [probs.flatten(0, 1)]) * 2 / pairs
