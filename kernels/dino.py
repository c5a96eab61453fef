"""Drop-in replacements for DINOv2's DINOLoss and iBOTPatchLoss, backed by the Triton kernels.

In a DINOv2 codebase (dinov2/train/ssl_meta_arch.py) change the import and nothing else:
    from terrafm_kernels.dino import DINOLoss, iBOTPatchLoss
Constructors, methods, argument names, the `center` buffer ((1, K) and (1, 1, K), so checkpoints load
both ways), the asynchronous all-reduce of the centre and the all-reduced Sinkhorn-Knopp sums follow
dinov2/loss/dino_clstoken_loss.py and ibot_patch_loss.py. What the kernels change:
  - no (R, K) fp32 log-softmax, product or gradient temporaries (kernels/dino_student_ce.py);
  - Sinkhorn-Knopp in log domain: DINOv2's numbers where its exp(t / tau) stays finite, finite rows
    summing to 1 where it overflows to NaN (small teacher_temp, large logits) (kernels/dino_teacher.py);
  - the centre statistics are summed in fp32 and the centre is updated in place.
The implementation is chosen once, in __init__ (and again when the loss is unpickled or deep-copied: it is not
pickled, the choice is the running process's): backend="auto" takes the Triton kernels when CUDA is
available or TRITON_INTERPRET=1 is set, else the pure-PyTorch reference (kernels/reference.py); both
compute the same numbers.
"""

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from . import _common, reference
from ._common import check_device, check_positive, check_size, check_unit_interval

BACKENDS = ("auto", "triton", "torch")


def _backend_ops(backend: str) -> tuple[str, SimpleNamespace]:
    """(resolved backend name, its centered_softmax / sinkhorn_knopp / weighted_soft_cross_entropy)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() or _common.INTERPRET else "torch"
    if backend == "torch":  # the references behind the kernels' own checks: the same errors on any device
        from . import dino_head_loss as head_loss_op
        from . import dino_student_ce, dino_teacher

        checked = _common.checked_reference
        return backend, SimpleNamespace(
            centered_softmax=checked(dino_teacher.validate_centered_softmax, reference.centered_softmax),
            sinkhorn_knopp=checked(dino_teacher.validate_sinkhorn_knopp, reference.sinkhorn_knopp),
            weighted_soft_cross_entropy=checked(dino_student_ce.validate, reference.weighted_soft_cross_entropy),
            dino_head_loss=checked(head_loss_op.validate, reference.dino_head_loss))
    from .dino_head_loss import dino_head_loss
    from .dino_student_ce import weighted_soft_cross_entropy
    from .dino_teacher import centered_softmax, sinkhorn_knopp

    return backend, SimpleNamespace(centered_softmax=centered_softmax, sinkhorn_knopp=sinkhorn_knopp,
                                    weighted_soft_cross_entropy=weighted_soft_cross_entropy,
                                    dino_head_loss=dino_head_loss)


def _all_reduce(tensor: torch.Tensor, op: str) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


def _world() -> tuple[int, object]:
    """(world size, all_reduce or None): torch.distributed's state at call time, as DINOv2 reads it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), _all_reduce
    return 1, None


def _check_dims(name: str, x, ndim: int, shape: tuple | None = None) -> None:
    """Refuse what the losses would otherwise misread in a reshape: a non-tensor, a non-float tensor, another
    number of dimensions or (when given; -1 matches any size) another shape, named by DINOv2's argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if shape is not None and any(want not in (-1, got) for want, got in zip(shape, x.shape, strict=True)):
        wanted = "(" + ", ".join("any" if w == -1 else str(w) for w in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {wanted}")


def _teacher_views(teacher_list, rows: int, K: int) -> torch.Tensor:
    """DINOv2's teacher list (a (T, R, K) tensor or a list of (R, K) tensors) as one contiguous (T, R, K)."""
    if isinstance(teacher_list, torch.Tensor):
        views = teacher_list.unsqueeze(0) if teacher_list.dim() == 2 else teacher_list
    elif len(teacher_list) == 1:
        views = teacher_list[0].unsqueeze(0)
    else:
        views = torch.stack(list(teacher_list))
    if views.dim() != 3 or views.shape[1:] != (rows, K):
        raise ValueError(f"teacher views {tuple(views.shape)} must be (T, R, K) = (T, {rows}, {K}) to pair with "
                         f"student outputs of shape ({rows}, {K})")
    return views.contiguous()


class _CenteredLoss(nn.Module):
    """The centre buffer and its asynchronously all-reduced update, shared by both losses."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float, backend: str):
        super().__init__()
        check_size("out_dim" if len(center_shape) == 2 else "patch_out_dim", center_shape[-1])
        check_positive("student_temp", student_temp)
        check_unit_interval("center_momentum", center_momentum)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None
        self._requested_backend = backend
        self.backend, self._ops = _backend_ops(backend)

    def __getstate__(self):  # the ops are left out and chosen again by the unpickling process (backend="auto")
        state = super().__getstate__()
        state.pop("_ops", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.backend, self._ops = _backend_ops(self.__dict__.get("_requested_backend", self.backend))

    def _start_center_update(self, batch_center_sum: torch.Tensor, rows: int) -> None:
        self.updated = False
        self._center_rows = rows
        self.async_batch_center = batch_center_sum
        if dist.is_available() and dist.is_initialized():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self):
        """Finish the pending update: wait for the all-reduce, then c <- m c + (1 - m) batch mean."""
        if self.updated is False:
            world_size, _ = _world()
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            if self._center_rows > 0:  # a rank without rows (iBOT, nothing masked) keeps its centre, not 0 / 0
                batch_center = self.async_batch_center / (self._center_rows * world_size)
                m = self.center_momentum
                self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1 - m)
            self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        """softmax((teacher_output - center) / teacher_temp), fp32, after applying a pending centre update."""
        self.apply_center_update()
        return self._ops.centered_softmax(teacher_output, self.center.to(teacher_output.device), teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    def _soft_cross_entropy(self, student, targets, row_weight):
        if student.shape[0] == 0:  # nothing masked: DINOv2's empty sum, still connected to the graph
            return student.float().sum() * 0.0
        return self._ops.weighted_soft_cross_entropy(student.contiguous(), targets, row_weight, self.student_temp)


class DINOLoss(_CenteredLoss):
    """DINOv2's class-token DINO loss (dinov2/loss/dino_clstoken_loss.py) on the fused kernels.

    out_dim K prototypes; center buffer (1, K). backend: "auto" | "triton" | "torch" (see module doc).
    forward_fused additionally fuses the DINO head's last layer into the loss (see there).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, *, backend: str = "auto"):
        super().__init__((1, out_dim), student_temp, center_momentum, backend)
        self.len_teacher_output = None

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        """Sinkhorn-Knopp targets (R, K) fp32 over the global batch (the prototype sums are all-reduced)."""
        return self._ops.sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, _world()[1])

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """Sum over student views s and teacher views t of -mean_b sum_k t log_softmax(s / student_temp).

        Each student output (R, K) is paired with every teacher view (R, K) (a list or a (T, R, K) tensor).
        """
        total_loss = 0
        targets = None
        if isinstance(teacher_out_softmaxed_centered_list, (list, tuple)) and not teacher_out_softmaxed_centered_list:
            raise ValueError("the teacher list is empty: DINOLoss pairs each student output with at least one "
                             "teacher view")
        for s in student_output_list:
            _check_dims("each student output", s, 2)
            if s.shape[0] == 0:
                raise ValueError(f"each student output must have at least one row (R, K), got shape {tuple(s.shape)}")
            if targets is None:
                targets = _teacher_views(teacher_out_softmaxed_centered_list, s.shape[0], s.shape[-1])
            row_weight = torch.full((s.shape[0],), 1.0 / s.shape[0], device=s.device)
            total_loss = total_loss + self._soft_cross_entropy(s, targets, row_weight)
        return total_loss

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        """Start the centre update: sum the teacher logits over rows (fp32) and all-reduce asynchronously."""
        _check_dims("teacher_output", teacher_output, 2, (-1, self.center.shape[-1]))
        check_device("teacher_output", teacher_output, self.center.device, "the loss's center is")
        self.len_teacher_output = len(teacher_output)
        self._start_center_update(torch.sum(teacher_output, dim=0, keepdim=True, dtype=torch.float32),
                                  self.len_teacher_output)

    def forward_fused(self, student_global, student_local, teacher_global, last_layer, teacher_last_layer,
                      teacher_temp):
        """The DINO head's last layer fused with centring and both DINO terms: no (rows, K) logits exist.

        Equals, from the bottleneck on, DINOv2's (dino_local_crops_loss + dino_global_crops_loss) of
        ssl_meta_arch.forward_backward with centering="centering" (before dino_loss_weight): every (teacher
        crop, student crop) pair of different crops, mean over images, divided by the number of pairs;
        then update_center with the teacher logits. student_global (2B, D), student_local (n B, D),
        teacher_global (2B, D): bottleneck outputs (before the L2 normalisation) in crop order, the
        teacher's *without* DINOv2's swap of its two crops (the pairing is by crop here). last_layer and
        teacher_last_layer: the heads' weight-normalised nn.Linear(D, K, bias=False) (old or
        parametrize weight_norm, or a plain Linear). Gradients reach the student features and weights.
        """
        _check_dims("student_global", student_global, 2)
        D = student_global.shape[-1]
        if student_global.shape[0] % 2 or student_global.shape[0] == 0:
            raise ValueError(f"student_global has {student_global.shape[0]} rows: it must hold 2 crops of B images")
        B = student_global.shape[0] // 2
        _check_dims("student_local", student_local, 2, (-1, D))
        check_device("student_local", student_local, student_global.device, "student_global is")
        if student_local.shape[0] % B:
            raise ValueError(f"student_local has {student_local.shape[0]} rows: not a whole number of crops of "
                             f"B = {B} images")
        _check_dims("teacher_global", teacher_global, 2, (2 * B, D))
        check_device("teacher_global", teacher_global, student_global.device, "student_global is")
        self.apply_center_update()
        student = torch.cat([student_global.reshape(2, B, D), student_local.reshape(-1, B, D)]).contiguous()
        teacher = teacher_global.detach().reshape(2, B, D).contiguous()
        K = self.center.shape[-1]
        weight_v, weight_g = _weight_norm_parts(last_layer, "last_layer", K, D)
        with torch.no_grad():
            teacher_v, teacher_g = _weight_norm_parts(teacher_last_layer, "teacher_last_layer", K, D)
        center = self.center.reshape(K).float().contiguous()
        loss, logit_sum, _ = self._ops.dino_head_loss(
            student, teacher, weight_v.contiguous(), center, center, torch.zeros(2 * B, device=center.device),
            teacher_temp, self.student_temp, 1.0, weight_g=weight_g,
            teacher_weight_v=teacher_v.detach().contiguous(),
            teacher_weight_g=None if teacher_g is None else teacher_g.detach())
        self.len_teacher_output = 2 * B
        with torch.no_grad():
            self._start_center_update(logit_sum.detach().float().reshape(1, K).clone(), 2 * B)
        return loss


def _weight_norm_parts(layer: nn.Module, name: str, K: int, D: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight_v (K, D), weight_g (K, 1)) of a weight-normalised Linear: torch.nn.utils.weight_norm's
    weight_v / weight_g, parametrize.weight_norm's original1 / original0, or a plain Linear's weight and
    its row norms (so that v / |v| g is the weight, with gradients through both). A layer that is no Linear
    of D inputs and K outputs without bias (DINO's last layer has none; the fused loss has no place for one)
    is refused by `name`."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be the head's nn.Linear(D, K, bias=False), got {type(layer).__name__}")
    parametrizations = getattr(layer, "parametrizations", None)
    if hasattr(layer, "weight_v") and hasattr(layer, "weight_g"):
        v, g = layer.weight_v, layer.weight_g
    elif parametrizations is not None and "weight" in parametrizations:  # (reading layer.weight would form W)
        v, g = parametrizations.weight.original1, parametrizations.weight.original0
    elif isinstance(getattr(layer, "weight", None), torch.Tensor):
        v, g = layer.weight, None
    else:
        raise TypeError(f"{name} must be the head's nn.Linear(D, K, bias=False), got {type(layer).__name__}")
    if tuple(v.shape) != (K, D):
        raise ValueError(f"{name} has weight {tuple(v.shape)}, expected (K, D) = ({K}, {D}) for this loss's K "
                         "prototypes and the features' width")
    if getattr(layer, "bias", None) is not None:
        raise ValueError(f"{name} has a bias: the fused loss computes logits without one (DINO's last layer is "
                         "nn.Linear(D, K, bias=False)); use forward() with the layer's own output instead")
    return (v, v.norm(dim=1, keepdim=True)) if g is None else (v, g)


class iBOTPatchLoss(_CenteredLoss):  # noqa: N801 (DINOv2's class name, so that one import line changes)
    """DINOv2's masked patch-token iBOT loss (dinov2/loss/ibot_patch_loss.py) on the fused kernels.

    patch_out_dim K prototypes; center buffer (1, 1, K). backend: "auto" | "triton" | "torch".
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, *, backend: str = "auto"):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, backend)
        self.len_teacher_patch_tokens = None

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        """Sinkhorn-Knopp targets (M, K) fp32 for this rank's M masked patch rows. n_masked_patches_tensor
        is all-reduced in place over ranks as DINOv2 does; the result does not depend on its value (DINOv2's
        divisions by it are undone by its next normalisation and its final * B)."""
        _, all_reduce = _world()
        if all_reduce is not None:
            dist.all_reduce(n_masked_patches_tensor)
        return self._ops.sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, all_reduce)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """-mean over images of the mask-weighted mean over patches of sum_k t log_softmax(s / student_temp).

        student_patch_tokens, teacher_patch_tokens (B, N, K); student_masks_flat (B, N).
        """
        _check_dims("student_patch_tokens", student_patch_tokens, 3)
        B, N, K = student_patch_tokens.shape
        _check_dims("teacher_patch_tokens", teacher_patch_tokens, 3, (B, N, K))
        if not isinstance(student_masks_flat, torch.Tensor) or tuple(student_masks_flat.shape) != (B, N):
            got = tuple(student_masks_flat.shape) if isinstance(student_masks_flat, torch.Tensor) else type(
                student_masks_flat).__name__
            raise ValueError(f"student_masks_flat must have shape (B, N) = ({B}, {N}), got {got}")
        for name, x in (("teacher_patch_tokens", teacher_patch_tokens), ("student_masks_flat", student_masks_flat)):
            check_device(name, x, student_patch_tokens.device, "student_patch_tokens is")
        masks = student_masks_flat.float()
        row_weight = (masks / masks.sum(dim=-1, keepdim=True).clamp(min=1.0) / B).reshape(B * N)
        targets = _teacher_views(teacher_patch_tokens.reshape(B * N, K), B * N, K)
        return self._soft_cross_entropy(student_patch_tokens.reshape(B * N, K), targets, row_weight)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """-sum_r masks_weight[r] sum_k t[r] log_softmax(s[r] / student_temp) / number of images.

        Rows (M, K) of the masked patches (the first n_masked_patches when given); masks_weight (M,)
        defaults to 1 / (masked patches of the row's image), as DINOv2 computes it.
        """
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        _check_dims("student_patch_tokens_masked", s, 2)
        if not isinstance(student_masks_flat, torch.Tensor) or student_masks_flat.dim() != 2:
            raise ValueError("student_masks_flat must be a (B, N) tensor of the masked patches")
        if student_masks_flat.dtype != torch.bool:
            raise TypeError(f"student_masks_flat must be a bool mask (B, N), got {student_masks_flat.dtype}")
        if n_masked_patches is not None:
            n = int(n_masked_patches.item() if isinstance(n_masked_patches, torch.Tensor) else n_masked_patches)
            if not 0 <= n <= s.shape[0]:
                raise ValueError(f"n_masked_patches must be in 0..{s.shape[0]} (the masked rows given), got {n}")
            s, t = s[:n], t[:n]
        if masks_weight is not None and not isinstance(masks_weight, torch.Tensor):
            raise TypeError(f"masks_weight must be a tensor of one weight per masked row, got "
                            f"{type(masks_weight).__name__}")
        if masks_weight is None:
            check_device("student_masks_flat", student_masks_flat, s.device, "student_patch_tokens_masked is")
            masks_weight = ((1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                            .expand_as(student_masks_flat)[student_masks_flat])
        rows = s.shape[0]
        if masks_weight.numel() not in (1, rows):
            raise ValueError(f"masks_weight has {masks_weight.numel()} entries but there are {rows} masked patch "
                             "rows (one weight per row, after n_masked_patches)")
        check_device("masks_weight", masks_weight, s.device, "student_patch_tokens_masked is")
        row_weight = masks_weight.float().reshape(-1).expand(rows) / student_masks_flat.shape[0]
        return self._soft_cross_entropy(s, _teacher_views(t, rows, s.shape[-1]), row_weight.contiguous())

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        """Start the centre update: sum over dim 0 of the mean over dim 1 (fp32), all-reduced asynchronously.
        teacher_patch_tokens (B, N, K); (M, K) rows are one image's masked patches (DINOv2 passes (1, M, K))."""
        if isinstance(teacher_patch_tokens, torch.Tensor) and teacher_patch_tokens.dim() == 2:
            teacher_patch_tokens = teacher_patch_tokens.unsqueeze(0)  # mean(dim=1) of (M, K) mixed prototypes
        _check_dims("teacher_patch_tokens", teacher_patch_tokens, 3, (-1, -1, self.center.shape[-1]))
        check_device("teacher_patch_tokens", teacher_patch_tokens, self.center.device, "the loss's center is")
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        batch_sum = torch.sum(torch.mean(teacher_patch_tokens, dim=1, dtype=torch.float32), dim=0, keepdim=True)
        rows = self.len_teacher_patch_tokens
        if teacher_patch_tokens.numel() == 0:  # the mean of nothing is NaN, which the all-reduce would spread
            batch_sum, rows = torch.zeros_like(batch_sum), 0
        self._start_center_update(batch_sum, rows)
