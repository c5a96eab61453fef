"""Pure-PyTorch references: the specification every fused kernel in this package must match.

Each function here is the CPU path of the engine and the oracle of the kernel tests (computed in
float64 there). Shapes use: B batch, C bands, H/W pixels, p patch, N = (H/p)(W/p) patches,
E embedding width, T tokens (patch positions), M modalities per position, A token width,
Q fusion queries, R rows (views x batch), K prototypes.
"""

import math

import torch
import torch.nn.functional as F

from ._common import check_alpha, check_head_loss_shapes, check_patch_grid, check_positive


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    modality_embed: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    tf32: bool = False,
) -> torch.Tensor:
    """Patchify + linear projection: (B, C, H, W) -> (B, N, E), patches in row-major order.

    H and W must be multiples of p (an error otherwise, as in the Triton kernel; no silent crop).
    weight (E, C, p, p) is a Conv2d weight (so published checkpoints load unchanged), bias (E,),
    modality_embed (E,) is added to every token, pos_embed (N, E) to the matching token. Parameters of another
    dtype than x are used in x's dtype, as the kernel does (fp32 weights with fp16 images give fp16 tokens).
    tf32=True computes the GEMMs as nn.Conv2d does on a tensor-core GPU by default, and as the kernel does
    with fp32 inputs: every operand, the output's gradient included, rounded by round_tf32, products exact.
    """
    p = weight.shape[-1]
    check_patch_grid(x.shape[-2], x.shape[-1], p)  # a strided conv would silently drop the partial patches
    # A GEMM on the patches: the conv's math (stride = kernel), without F.conv2d, whose oneDNN 3.12 bf16
    # path on CPU returned wrong values for 12 input channels on a Xeon (error 5.5 on outputs of size 5)
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    w = weight.reshape(weight.shape[0], -1).to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if tf32:
        out = _Tf32Linear.apply(patches, w)
        out = out if bias is None else out + bias
    else:
        out = F.linear(patches, w, bias)
    # out's dtype, not x's: under autocast the GEMM gives the autocast dtype, as the kernel does, and fp32
    # embeddings added in x's fp32 turned the tokens back into fp32
    if modality_embed is not None:
        out = out + modality_embed.to(out.dtype).reshape(1, 1, -1)
    if pos_embed is not None:
        out = out + pos_embed.to(out.dtype).reshape(1, out.shape[1], out.shape[2])
    return out


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 t rounded to tf32 (10 mantissa bits; to nearest, ties away from zero), as cuDNN rounds the operands
    of its tf32 convolutions; NaN and inf pass, a finite value past tf32's range becomes inf."""
    if t.dtype != torch.float32:
        raise TypeError(f"round_tf32 takes float32, got {t.dtype}")
    rounded = ((t.contiguous().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(t.isnan(), t, rounded)


class _Tf32Linear(torch.autograd.Function):
    """patches (..., KD) @ w (E, KD)^T with every GEMM operand rounded to tf32, forward and backward."""

    @staticmethod
    def forward(ctx, patches, w):
        ctx.save_for_backward(patches, w)
        return round_tf32(patches) @ round_tf32(w).T

    @staticmethod
    def backward(ctx, grad):
        patches, w = ctx.saved_tensors
        g = round_tf32(grad)
        return g @ round_tf32(w), g.reshape(-1, g.shape[-1]).T @ round_tf32(patches).reshape(-1, patches.shape[-1])


def cross_attention_fusion(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    pool: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Adaptive cross-attention fusion of M modality tokens at each of T patch positions.

    keys, values (T, M, A); queries (Q, A) shared learned queries; pool (A,) the pooling vector p_r.
    Per head h (width d = A / num_heads), per query q:
        a[t, q, :] = softmax_m(<queries[q, h], keys[t, m, h]> / sqrt(d))
        z[t, q, h] = sum_m a[t, q, m] * values[t, m, h]
    then the Q query outputs are pooled: w[t] = softmax_q(<z[t, q], pool>), out[t] = sum_q w z[t, q].
    With M == 1 every query returns values[:, 0], so out == values[:, 0] (the published Case 1 path).
    Returns (T, A) in keys' dtype: values, queries and pool of another dtype are used in it, as the kernel's output.
    """
    T, M, A = keys.shape
    Q = queries.shape[0]
    d = A // num_heads
    values, queries, pool = (t.to(keys.dtype) for t in (values, queries, pool))
    k = keys.reshape(T, M, num_heads, d)
    v = values.reshape(T, M, num_heads, d)
    q = queries.reshape(Q, num_heads, d) / math.sqrt(d)  # scaled first: in fp16 the raw dot overflowed to NaN
    scores = torch.einsum("qhd,tmhd->thqm", q, k)
    attn = scores.softmax(dim=-1)
    z = torch.einsum("thqm,tmhd->tqhd", attn, v).reshape(T, Q, A)
    w = (z @ pool).softmax(dim=-1)
    return (w.unsqueeze(-1) * z).sum(dim=1)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 for the loss references' arithmetic, float64 kept as float64 (gradcheck, float64 oracles: the
    kernels' float64 refusal points here)."""
    return x if x.dtype == torch.float64 else x.float()


def teacher_softmax(
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    center_high: torch.Tensor,
    high_weight: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dual-centering teacher softmax and the batch statistics of both centre updates.

    teacher_logits (R, K); center, center_high (K,); high_weight (R,) is 1 for rows whose sample's
    land-cover majority class is a high-frequency class, else 0 (any non-negative weight works).
    probs = softmax((t - alpha * center - (1 - alpha) * center_high) / temperature) in fp32 (float64 stays so).
    Also returns logit_sum = sum_r t[r] and high_logit_sum = sum_r high_weight[r] * t[r] (K,), fp32,
    so the caller all-reduces both once and divides by R and sum(high_weight). No gradient flows (the teacher is
    not trained by backprop), as in the kernel.
    """
    t = _wide(teacher_logits.detach())
    centred = t - alpha * _wide(center.detach()) - (1.0 - alpha) * _wide(center_high.detach())
    probs = torch.softmax(centred / temperature, dim=-1)
    logit_sum = t.sum(dim=0)
    high_logit_sum = (_wide(high_weight.detach()).unsqueeze(1) * t).sum(dim=0)
    return probs, logit_sum, high_logit_sum


@torch.no_grad()
def update_dual_centers(center: torch.Tensor, center_high: torch.Tensor, logit_sum: torch.Tensor,
                        high_logit_sum: torch.Tensor, rows, high_rows, momentum: float, high_momentum: float) -> None:
    """The dual centres' EMA update from teacher_softmax's statistics (all-reduced by the caller), in place:
        c   <- m   c   + (1 - m)   logit_sum / rows
        c_h <- m_h c_h + (1 - m_h) high_logit_sum / high_rows
    rows, high_rows: numbers or 0-d tensors (the row count and sum(high_weight)). A centre keeps its value when
    its count is 0 (no high-frequency row in the step) or its new value has a NaN or inf (a diverged step would
    otherwise poison the targets of every later step). Decided with torch.where on the centre's device: no host sync.
    """
    for centre, total, count, m in ((center, logit_sum, rows, momentum),
                                    (center_high, high_logit_sum, high_rows, high_momentum)):
        count = torch.as_tensor(count, dtype=torch.float32, device=centre.device)
        new = centre.mul(m).add_(total.to(centre.dtype).reshape(centre.shape) / count, alpha=1.0 - m)
        centre.copy_(torch.where((count > 0) & torch.isfinite(new).all(), new, centre))


def dino_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temperature: float
) -> torch.Tensor:
    """DINO local-global cross-entropy, averaged over (teacher view, student view) pairs.

    student_logits (S, B, K) for S student views; teacher_probs (T, B, K) for the T global views,
    which are also the first T student views. Pairs with the same view are skipped:
        loss = mean over pairs (t, s), s != t, of mean_b -sum_k P[t, b, k] log_softmax(S[s, b] / tau)[k]
    The teacher's targets carry no gradient, as in the kernel.
    """
    teacher_probs = teacher_probs.detach()
    S, T = student_logits.shape[0], teacher_probs.shape[0]
    if S < 2 and T <= S:
        raise ValueError(f"dino_cross_entropy needs at least one pair of different views; got S={S}, T={T}")
    log_p = F.log_softmax(_wide(student_logits) / student_temperature, dim=-1)
    total = log_p.new_zeros(())
    pairs = 0
    for t in range(T):
        for s in range(S):
            if s == t:
                continue
            total = total + (-_wide(teacher_probs[t]) * log_p[s]).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


def prototype_logits(features: torch.Tensor, weight_v: torch.Tensor, weight_g: torch.Tensor | None = None):
    """DINO head's last layer: L2-normalise features (R, D), weight-normalised linear to K prototypes.

    weight_v (K, D); weight_g (K, 1) or None for the frozen unit norm DINO uses by default.
    Returns (R, K) logits = normalize(features) @ (g * v / ||v||)^T, the product in the features' dtype (fp32
    prototypes with bf16 features, as the kernels take them, and as torch.autocast casts them).
    """
    w = weight_v / weight_v.norm(dim=1, keepdim=True)
    if weight_g is not None:
        w = w * weight_g
    return F.normalize(features, dim=-1) @ w.t().to(features.dtype)


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """DINOv2's centred teacher: softmax((teacher_logits - center) / temperature) over the last dim, fp32.

    teacher_logits (..., K); center with K elements ((1, K) or (1, 1, K) buffers in DINOv2).
    """
    K = teacher_logits.shape[-1]
    centred = _wide(teacher_logits) - _wide(center).reshape(K)
    return torch.softmax(centred / temperature, dim=-1)


def sinkhorn_first_shift(col_max: torch.Tensor, col_sum: torch.Tensor, all_reduce=None) -> torch.Tensor:
    """-logsumexp over all ranks' rows of each prototype column, from this rank's column max and
    sum(exp(x - max)) (K,): the first column potential of Sinkhorn-Knopp (shared with the Triton path)."""
    if all_reduce is not None:
        global_max = col_max.clone()
        all_reduce(global_max, "max")
        col_sum = col_sum * torch.exp(col_max - global_max)
        all_reduce(col_sum, "sum")
        col_max = global_max
    return -(col_max + torch.log(col_sum))


def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3,
                   all_reduce=None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets in log domain: the same numbers, finite at any temperature.

    DINOv2 takes Q = exp(t / tau) (R, K), then n_iterations times divides each prototype column by its
    sum over all B samples on all ranks and by K, and each sample row by its sum and by B; finally * B.
    Each row normalisation makes the row a softmax, so only the prototype potentials a (K,) are carried
    (the divisions by K and B scale every entry alike and drop out of the softmax):
        a = -logsumexp_rows(t / tau)
        a <- a - log(sum_rows softmax(t / tau + a))    (n_iterations - 1 times)
        out = softmax(t / tau + a)                       (R, K) fp32
    teacher_logits (R, K) holds this rank's rows; all_reduce(tensor, op), op "max" or "sum", reduces in
    place over ranks (None: one process).
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1 (DINOv2 uses 3), got {n_iterations}")
    x = _wide(teacher_logits) / temperature
    if x.shape[0] == 0:  # a rank without rows joins the all-reduces with the empty max and sum
        col_max, col_sum = x.new_full(x.shape[1:], -math.inf), x.new_zeros(x.shape[1:])
    else:
        col_max = x.max(dim=0).values
        col_sum = torch.exp(x - col_max).sum(dim=0)
    shift = sinkhorn_first_shift(col_max, col_sum, all_reduce)
    for _ in range(n_iterations - 1):
        mass = torch.softmax(x + shift, dim=-1).sum(dim=0)
        if all_reduce is not None:
            all_reduce(mass, "sum")
        shift = shift - torch.log(mass)
    return torch.softmax(x + shift, dim=-1)


def weighted_soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
                                student_temperature: float) -> torch.Tensor:
    """Soft-target cross-entropy of student rows against T teacher views, weighted per row:
        loss = -sum_r row_weight[r] sum_t sum_k targets[t, r, k] log_softmax(student_logits[r] / tau)[k]
    student_logits (R, K), targets (T, R, K), row_weight (R,). DINOv2's DINOLoss.forward per student view
    is row_weight = 1 / R; its iBOT forward_masked is T = 1, row_weight = masks_weight / images. The targets carry
    no gradient, as in the kernel (the student logits and the row weights do).
    """
    log_p = F.log_softmax(_wide(student_logits) / student_temperature, dim=-1)
    per_row = -(_wide(targets.detach()).sum(dim=0) * log_p).sum(dim=-1)
    return (_wide(row_weight) * per_row).sum()


def dino_head_loss(student_features, teacher_features, weight_v, center, center_high, high_weight,
                   teacher_temperature, student_temperature, alpha, weight_g=None,
                   teacher_weight_v=None, teacher_weight_g=None):
    """DINO head last layer + dual-centering teacher softmax + student cross-entropy, composed from the
    references above (materialises the (rows, K) logits): the specification of the fused dino_head_loss.

    Returns (loss, logit_sum (K,), high_logit_sum (K,)); the teacher side carries no gradient.
    """
    check_head_loss_shapes(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
                           teacher_weight_v, teacher_weight_g)
    check_positive("teacher_temperature", teacher_temperature)
    check_positive("student_temperature", student_temperature)
    check_alpha(alpha)
    S, B, D = student_features.shape
    T = teacher_features.shape[0]
    student_logits = prototype_logits(student_features.reshape(S * B, D), weight_v, weight_g)
    with torch.no_grad():
        if teacher_weight_v is None:
            teacher_weight_v, teacher_weight_g = weight_v, weight_g
        teacher_logits = prototype_logits(teacher_features.reshape(T * B, D), teacher_weight_v, teacher_weight_g)
        probs, logit_sum, high_logit_sum = teacher_softmax(
            teacher_logits, center, center_high, high_weight, teacher_temperature, alpha)
    loss = dino_cross_entropy(student_logits.reshape(S, B, -1), probs.reshape(T, B, -1), student_temperature)
    return loss, logit_sum, high_logit_sum
