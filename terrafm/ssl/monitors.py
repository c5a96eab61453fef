"""Collapse monitors: pure functions of the teacher's target probabilities (DINO's two failure modes).

DINO avoids collapse by balancing centring (pushes towards uniform targets) against sharpening (pushes
towards one prototype). Either side can win, and both look the same from one number:
    teacher_entropy        mean over rows of H(p_row): low for ANY sharp teacher, healthy or collapsed
    teacher_batch_entropy  H(mean over rows of p_row): how many prototypes the batch uses as a whole
    teacher_entropy_gap    batch_entropy - entropy: the information the targets carry about WHICH image
                           a row is (mutual information between row and prototype); ~0 = collapse
    teacher_prototypes     distinct argmax prototypes over the rows
    teacher_cosine         mean cosine similarity between the targets of different samples (~1 = collapse)
A healthy run has a sharp teacher (entropy well below log K) AND a wide batch (gap of several nats,
many distinct prototypes, cosine well below 1). Gap ~0 with entropy near log K: uniform targets;
gap ~0 with low entropy: every image is sent to the same few prototypes.
"""

import math

import torch


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def teacher_monitors(teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """(T, B, K) teacher probabilities (T views of B samples) -> the monitors above as 0-d tensors.

    Cosine pairs exclude rows of the same sample (its views should agree); with B = 1 it is NaN.
    Costs (T B)^2 K FLOPs: small next to the head, and it never syncs with the host.
    """
    if teacher_probs.ndim != 3:
        raise ValueError(f"teacher_probs must be (views, batch, prototypes), got shape {tuple(teacher_probs.shape)}")
    T, B, K = teacher_probs.shape
    p = teacher_probs.float().reshape(T * B, K)
    entropy = _entropy(p).mean()
    batch_entropy = _entropy(p.mean(0))
    unit = torch.nn.functional.normalize(p, dim=1)
    sample = torch.arange(B, device=p.device).repeat(T)
    different = sample[:, None] != sample[None, :]
    cosine = ((unit @ unit.T) * different).sum() / different.sum().clamp_min(1)
    if B == 1:
        cosine = torch.full_like(cosine, math.nan)
    prototypes = torch.zeros(K, device=p.device).index_fill_(0, p.argmax(1), 1.0).sum().long()  # a count
    return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
            "teacher_entropy_gap": batch_entropy - entropy, "teacher_prototypes": prototypes,
            "teacher_cosine": cosine}


def collapse_state(values: dict[str, float], num_prototypes: int, min_gap: float) -> str | None:
    """None when healthy, else a one-line diagnosis: "collapse" or "uniform targets" (see module docstring).

    Both show as an entropy gap below `min_gap` nats; the per-row entropy tells them apart.
    """
    gap, entropy = values.get("teacher_entropy_gap"), values.get("teacher_entropy")
    if gap is None or entropy is None or not gap < min_gap:
        return None
    if entropy > 0.5 * math.log(num_prototypes):
        return (f"uniform targets: the teacher's rows are near uniform (entropy {entropy:.2f} of log K = "
                f"{math.log(num_prototypes):.2f} nats) and alike (gap {gap:.3f} < {min_gap} nats); centring wins "
                "over sharpening: lower the teacher temperature or raise the centre momentum")
    return (f"collapse: every image gets the same few prototypes (entropy gap {gap:.3f} < {min_gap} nats, "
            f"row entropy {entropy:.2f} nats); sharpening wins over centring: lower optim.lr, raise the teacher "
            "temperature or lower the centre momentum")
