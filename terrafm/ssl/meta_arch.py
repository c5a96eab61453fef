"""Student / EMA-teacher meta-architecture around a plain TerraFM backbone (DINOv2 layout).

The backbone stays a plain ViT; everything SSL lives here: the DINO heads, the multi-crop forward,
the teacher's EMA update and the loss. Parallelism (FSDP2, activation checkpointing, compile) is
applied from the outside by `terrafm.train.parallelize` to `student` and `teacher` separately.
"""

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from terrafm.data.views import View
from terrafm.models import build_model
from terrafm.models.terrafm import backbone_flops, patch_conv_flops
from terrafm.ssl.head import DINOHead
from terrafm.ssl.loss import DINOLoss, koleo_loss

if TYPE_CHECKING:
    from terrafm.config import Config


def view_key(tensors: View) -> tuple[tuple[str, ...], tuple[int, int]]:
    """(sorted modality names, (h, w)): views with equal keys share one backbone call."""
    if not tensors:
        raise ValueError("a View must hold at least one modality tensor")
    shapes = {tuple(t.shape[-2:]) for t in tensors.values()}
    if len(shapes) != 1:
        raise ValueError(f"the modalities of one view must share a spatial size, got {sorted(shapes)}")
    return tuple(sorted(tensors)), shapes.pop()


class DINOModel(nn.Module):
    """Backbone + DINO head over a list of views: list[{modality: (B, C, h, w)}] -> (V, B, K) logits.

    Multi-crop forward in two stages, so the transformer runs once per crop SIZE:
    1. token embedding (patch embed, Case N fusion, cls token, position embedding) once per group of
       views sharing (modality set, size): `backbone.prepare_tokens`, a dict input for 2+ modalities
       (Case N, needs fusion=True);
    2. the blocks and final norm once per crop size on all views of that size concatenated along the
       batch (2 global + 8 local crops -> 2 passes through the blocks, whatever sensors they drew).
    Stage 2 depends only on the crop sizes, never on the modality draw, so every rank makes the same
    sequence of per-block FSDP all-gathers even when ranks draw different sensors; the embedding lives
    in the root FSDP unit (gathered once per forward), and the parameters of sensors a rank did not draw
    get a zero gradient, so every rank reduce-scatters the same gradients. Features return to view order
    and the head runs once on all V*B rows.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # TerraFM backbones have per-sensor parameters (TerraFM.unused_parameters_zero); other ViTs have none
        self.unused_parameters_zero = getattr(backbone, "unused_parameters_zero", None)

    def forward(self, views: Sequence[View], head_loss: Callable | None = None, return_cls: bool = False):
        """(V, B, K) logits; with head_loss, what head_loss returns (see DINOHead.forward); with return_cls,
        (that, the (V, B, D) cls features the head read)."""
        if not views:
            raise ValueError("DINOModel needs at least one view")
        batch = {t.shape[0] for v in views for t in v.values()}
        if len(batch) != 1:
            raise ValueError(f"all views must have the same batch size, got {sorted(batch)}")
        groups: dict[tuple, list[int]] = {}
        for i, view in enumerate(views):
            groups.setdefault(view_key(view), []).append(i)
        tokens: list[torch.Tensor | None] = [None] * len(views)
        for (modalities, _), idxs in groups.items():
            if len(modalities) == 1:
                x = self.backbone.prepare_tokens(torch.cat([views[i][modalities[0]] for i in idxs]), modalities[0])
            else:
                x = self.backbone.prepare_tokens({m: torch.cat([views[i][m] for i in idxs]) for m in modalities})
            for i, chunk in zip(idxs, x.chunk(len(idxs)), strict=True):
                tokens[i] = chunk
        if self.unused_parameters_zero is not None:  # a zero gradient for each sensor's parameters no view used
            used = {m for modalities, _ in groups for m in modalities}
            zero = self.unused_parameters_zero(used, any(len(m) > 1 for m, _ in groups))
            if zero is not None:
                tokens[0] = tokens[0] + zero.to(tokens[0].dtype)
        features: list[torch.Tensor | None] = [None] * len(views)
        for size in sorted({view_key(v)[1] for v in views}):
            idxs = [i for i, v in enumerate(views) if view_key(v)[1] == size]
            x = torch.cat([tokens[i] for i in idxs])
            for block in self.backbone.blocks:
                x = block(x)
            cls = self.backbone.norm(x)[:, 0]
            for i, chunk in zip(idxs, cls.chunk(len(idxs)), strict=True):
                features[i] = chunk
        # stacked, not a reshaped cat: FSDP2 hooks the outputs for backward and warns on views; the head's
        # (V, B, K) output is fresh too
        cls_features = torch.stack(features)
        out = self.head(cls_features, head_loss=head_loss)
        return (out, cls_features) if return_cls else out


def _teacher_targets(bottleneck: torch.Tensor, prototypes: nn.Module) -> tuple:
    """The teacher's side of the fused head loss: its bottleneck features and a copy of its prototypes.

    A copy, because FSDP2 frees the gathered weight when the teacher head's forward returns."""
    weight_g = None if prototypes.weight_g is None else prototypes.weight_g.detach().clone()
    return bottleneck, prototypes.weight_v.detach().clone(), weight_g


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard a rank owns: FSDP2 parameters are DTensors; plain tensors are their own shard."""
    return t.to_local() if isinstance(t, DTensor) else t


class SSLMetaArch(nn.Module):
    """TerraFM self-distillation: student and EMA teacher (backbone + head each) and the DINO loss.

    `forward(global_views, local_views, majority_class, teacher_temperature)` returns the scalar loss
    of one batch: the teacher sees the global views only; the student sees global then local views.
    fused_head_loss=True computes the prototype layers, teacher softmax and student cross-entropy in
    one `dino_head_loss` op, which never holds the (views x B, K) logits (the Triton kernel; the
    torch reference computes the same from logits); the collapse monitors then have no probabilities.
    `last_teacher_probs` keeps the (T, B, K) teacher targets of the last unfused forward for them.
    koleo_weight > 0 adds DINOv2's KoLeo term on the student's cls features of each global view (the
    loss returned includes it; `last_koleo` keeps the unweighted term of the last forward for the log).
    """

    def __init__(self, student: DINOModel, teacher: DINOModel, loss: DINOLoss, fused_head_loss: bool = False,
                 koleo_weight: float = 0.0):
        super().__init__()
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.student = student
        self.teacher = teacher
        self.loss = loss
        self.fused_head_loss = fused_head_loss
        self.koleo_weight = koleo_weight
        self.last_teacher_probs: torch.Tensor | None = None
        self.last_koleo: torch.Tensor | None = None
        self.teacher.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: "Config", num_classes: int, high_classes: Sequence[int] = (),
                    device: str = "cpu") -> "SSLMetaArch":
        """The SSL model `cfg` describes (model.*, ssl.*, ops), on the CPU; the one place it is assembled.

        num_classes, high_classes: the data's land-cover classes and its high-frequency ones (the loss's
        dual centering). device ("cpu"/"cuda"): where it will run, for the op backends cfg.ops leaves on auto.
        """
        s = cfg.ssl
        loss = DINOLoss(s.num_prototypes, num_classes, high_classes, s.student_temperature, s.center_momentum,
                        s.center_high_momentum, s.center_alpha, cfg.ops, device)
        return cls.build(backbone_factory(cfg, device), head_kwargs(cfg), loss, cfg.model.drop_path_rate,
                         s.fused_head_loss, s.koleo_weight)

    @classmethod
    def build(
        cls,
        backbone_factory: Callable[..., nn.Module],
        head_kwargs: dict,
        loss: DINOLoss,
        drop_path_rate: float,
        fused_head_loss: bool = False,
        koleo_weight: float = 0.0,
    ) -> "SSLMetaArch":
        """Build student (with drop path) and teacher (without), the teacher a copy of the student."""
        student_backbone = backbone_factory(drop_path_rate=drop_path_rate)
        teacher_backbone = backbone_factory(drop_path_rate=0.0)
        teacher_backbone.load_state_dict(student_backbone.state_dict())
        head = DINOHead(student_backbone.embed_dim, **head_kwargs)
        student = DINOModel(student_backbone, head)
        teacher = DINOModel(teacher_backbone, copy.deepcopy(head))
        return cls(student, teacher, loss, fused_head_loss, koleo_weight)

    def forward(
        self,
        global_views: Sequence[View],
        local_views: Sequence[View],
        majority_class: torch.Tensor,
        teacher_temperature: float,
    ) -> torch.Tensor:
        global_views = list(global_views)
        student_views = global_views + list(local_views)
        if self.fused_head_loss:
            with torch.no_grad():
                teacher_bottleneck, teacher_weight_v, teacher_weight_g = self.teacher(global_views, _teacher_targets)
            loss, cls_features = self.student(student_views, partial(
                self.loss.fused, teacher_bottleneck=teacher_bottleneck, teacher_weight_v=teacher_weight_v,
                teacher_weight_g=teacher_weight_g, majority_class=majority_class, temperature=teacher_temperature),
                return_cls=True)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(global_views)
            teacher_probs = self.loss.teacher_probs(teacher_logits, majority_class, teacher_temperature)
            self.last_teacher_probs = teacher_probs
            student_logits, cls_features = self.student(student_views, return_cls=True)
            loss = self.loss(student_logits, teacher_probs)
        if self.koleo_weight == 0:
            return loss
        term = sum(koleo_loss(f) for f in cls_features[:len(global_views)])
        self.last_koleo = term.detach()
        return loss + self.koleo_weight * term

    def flops_per_sample(self, global_views: Sequence[View], local_views: Sequence[View]) -> float:
        """Useful FLOPs of one sample in one step: 3x the student forward on every view (forward and
        backward), less the patch convolutions' input gradient (images need none), 1x the teacher forward on
        the global views. Views give only channels and sizes."""
        backbone, head = self.student.backbone, self.student.head

        def shape(v: View) -> tuple[list[int], int, int]:
            return [t.shape[1] for t in v.values()], *next(iter(v.values())).shape[-2:]

        def forward(views: Sequence[View]) -> float:
            return sum(backbone_flops(backbone.embed_dim, len(backbone.blocks), backbone.patch_size, *shape(v))
                       + head.flops_per_row for v in views)

        student = list(global_views) + list(local_views)
        no_input_grad = sum(patch_conv_flops(backbone.embed_dim, backbone.patch_size, *shape(v)) for v in student)
        return 3 * forward(student) - no_input_grad + forward(global_views)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on each rank's local shards.

        FSDP2 shards student and teacher identically, so the local tensors line up one to one and no
        parameter is all-gathered: two fused foreach kernels over the rank's shard.
        """
        student = [_local(p.detach()) for p in self.student.parameters()]
        teacher = [_local(p.detach()) for p in self.teacher.parameters()]
        if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher, strict=True)):
            raise RuntimeError("student and teacher parameters do not line up; shard both the same way")
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student's prototype-layer parameters (their gradient is dropped in the first epoch)."""
        return list(self.student.head.last_layer.parameters())


def backbone_factory(cfg: "Config", device: str = "cpu") -> Callable[..., nn.Module]:
    """The configured TerraFM backbone constructor; takes drop_path_rate (the student's, or 0 for the teacher)."""
    m = cfg.model
    return partial(build_model, m.name, img_size=m.img_size, patch_size=m.patch_size, fusion=m.fusion,
                   fusion_queries=m.fusion_queries, fusion_heads=m.fusion_heads, fusion_norm=m.fusion_norm,
                   ops=cfg.ops, ops_device=device)


def head_kwargs(cfg: "Config") -> dict:
    """DINOHead's arguments from ssl.*."""
    s = cfg.ssl
    return dict(num_prototypes=s.num_prototypes, hidden_dim=s.head_hidden_dim, bottleneck_dim=s.head_bottleneck_dim,
                num_layers=s.head_layers)
