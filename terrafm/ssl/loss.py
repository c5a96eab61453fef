"""DINO local-global loss with dual centering (TerraFM).

The loss owns both centres as buffers (so they are checkpointed with it) and their update:
    c   <- m   c   + (1 - m)   mean over all teacher rows of t
    c_h <- m_h c_h + (1 - m_h) mean over rows whose land-cover majority class is high-frequency
teacher probabilities use t_hat = t - alpha c - (1 - alpha) c_h, softmax(t_hat / tau_t).
Statistics are summed locally over the micro-batches of one optimiser step and all-reduced once per
step as a single flattened tensor (2K + 2 floats), then `update_center` applies them.
The heavy math runs the implementations the op registry chose when the loss was built
(`teacher_softmax`, `dino_cross_entropy`, or with `fused` the `dino_head_loss` op that also does the
prototype layers): the fused kernels on GPU, the torch references on CPU.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from terrafm import ops
from terrafm_kernels.reference import update_dual_centers


def high_frequency_classes(class_frequency: Sequence[float]) -> list[int]:
    """Classes whose share of the land-cover distribution is above the uniform share 1/num_classes."""
    freq = torch.as_tensor(class_frequency, dtype=torch.float64)
    if freq.ndim != 1 or freq.numel() == 0:
        raise ValueError(f"class_frequency must be a non-empty 1-D sequence, got shape {tuple(freq.shape)}")
    share = freq / freq.sum().clamp_min(1e-12)
    return torch.nonzero(share > 1.0 / freq.numel()).flatten().tolist()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser on (B, D) features: -mean_i log(distance of x_i to its nearest neighbour),
    x the L2-normalised rows (the Kozachenko-Leonenko entropy estimator up to constants). Minimising it
    spreads the batch over the sphere, so no two images share a feature. Local to the rank's batch, as in
    DINOv2; computed in fp32."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, D) features, got shape {tuple(features.shape)}")
    x = torch.nn.functional.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = similarity.argmax(dim=1)
    distance = (x - x[nearest] + eps).norm(dim=-1)
    return -torch.log(distance + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between dual-centred teacher probabilities and student log-probabilities.

    Shapes: teacher_logits (T, B, K) for the T global views, student_logits (S, B, K) with the global
    views first, majority_class (B,) land-cover class index per sample (negative = unknown).
    """

    def __init__(
        self,
        num_prototypes: int,
        num_classes: int,
        high_classes: Sequence[int] = (),
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        center_high_momentum: float = 0.9,
        alpha: float = 0.8,
        ops_prefer: Mapping[str, str] | None = None,
        ops_device: str = "cpu",
    ):
        super().__init__()
        for name, value in (("center_momentum", center_momentum), ("center_high_momentum", center_high_momentum),
                            ("alpha", alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DINOLoss {name} must be in [0, 1], got {value}")
        bad = [c for c in high_classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"high_classes {bad} are outside [0, {num_classes}) land-cover classes")
        self.num_prototypes = num_prototypes
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.center_high_momentum = center_high_momentum
        self.alpha = alpha
        self.teacher_softmax_fn = ops.select("teacher_softmax", ops_prefer, ops_device)
        self.cross_entropy_fn = ops.select("dino_cross_entropy", ops_prefer, ops_device)
        self.head_loss_fn = ops.select("dino_head_loss", ops_prefer, ops_device)
        self.register_buffer("center", torch.zeros(num_prototypes))
        self.register_buffer("center_high", torch.zeros(num_prototypes))
        high = torch.zeros(num_classes)
        high[list(high_classes)] = 1.0
        self.register_buffer("high_class_weight", high, persistent=False)
        self._pending: torch.Tensor | None = None  # [logit_sum (K), high_logit_sum (K), rows, high_rows]

    def high_weight(self, majority_class: torch.Tensor) -> torch.Tensor:
        """(B,) 1.0 for samples whose majority class is high-frequency, else 0.0 (unknown classes: 0)."""
        known = (majority_class >= 0) & (majority_class < self.high_class_weight.numel())
        idx = majority_class.clamp(0, self.high_class_weight.numel() - 1)
        return self.high_class_weight[idx] * known

    @torch.no_grad()
    def teacher_probs(
        self, teacher_logits: torch.Tensor, majority_class: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """(T, B, K) teacher logits -> (T, B, K) fp32 probabilities; records the centre statistics."""
        T, B, K = teacher_logits.shape
        if K != self.num_prototypes:
            raise ValueError(f"teacher logits have {K} prototypes, the loss was built for {self.num_prototypes}")
        weight = self._row_high_weight(majority_class, T, B)
        probs, logit_sum, high_logit_sum = self.teacher_softmax_fn(
            teacher_logits.reshape(T * B, K), self.center, self.center_high, weight, temperature, self.alpha
        )
        self._record(logit_sum, high_logit_sum, weight)
        return probs.reshape(T, B, K)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over (teacher view, student view) pairs of different views; scalar fp32."""
        if student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher probs {tuple(teacher_probs.shape)} "
                "must agree in batch and prototypes"
            )
        return self.cross_entropy_fn(student_logits, teacher_probs, self.student_temperature)

    def fused(self, student_bottleneck: torch.Tensor, prototypes: nn.Module, *, teacher_bottleneck: torch.Tensor,
              teacher_weight_v: torch.Tensor, teacher_weight_g: torch.Tensor | None, majority_class: torch.Tensor,
              temperature: float) -> torch.Tensor:
        """teacher_probs + forward in one `dino_head_loss` op, from the heads' bottleneck features (V, B, D)
        and prototype weights (the student's `prototypes` layer, the teacher's weights); records the
        centre statistics. Scalar fp32 loss, differentiable in student_bottleneck and the prototypes."""
        T, B, _ = teacher_bottleneck.shape
        weight = self._row_high_weight(majority_class, T, B)
        loss, logit_sum, high_logit_sum = self.head_loss_fn(
            student_bottleneck, teacher_bottleneck, prototypes.weight_v, self.center, self.center_high, weight,
            temperature, self.student_temperature, self.alpha, prototypes.weight_g, teacher_weight_v, teacher_weight_g)
        self._record(logit_sum.detach(), high_logit_sum.detach(), weight)
        return loss

    def _row_high_weight(self, majority_class: torch.Tensor, T: int, B: int) -> torch.Tensor:
        """(T * B,) high-frequency weight per teacher row, rows ordered (view, sample)."""
        if majority_class.shape != (B,):
            raise ValueError(f"majority_class must have shape ({B},), got {tuple(majority_class.shape)}")
        return self.high_weight(majority_class.to(self.center.device)).repeat(T)

    def _record(self, logit_sum: torch.Tensor, high_logit_sum: torch.Tensor, high_weight: torch.Tensor) -> None:
        """Add one teacher batch's centre statistics to those `update_center` applies."""
        counts = torch.stack([torch.tensor(float(high_weight.numel()), device=high_weight.device),
                              high_weight.sum().float()])
        stats = torch.cat([logit_sum.float(), high_logit_sum.float(), counts])
        self._pending = stats if self._pending is None else self._pending + stats

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the statistics recorded since the last call: one all-reduce of 2K + 2 floats, then the kernels'
        update rule (terrafm_kernels.reference.update_dual_centers: a non-finite update leaves a centre as it was)."""
        if self._pending is None:
            return
        stats, self._pending = self._pending, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        K = self.num_prototypes
        update_dual_centers(self.center, self.center_high, stats[:K], stats[K:2 * K], stats[2 * K], stats[2 * K + 1],
                            self.center_momentum, self.center_high_momentum)
