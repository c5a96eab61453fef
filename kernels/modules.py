"""nn.Module drop-ins over the ops: thin wrappers that own parameters and buffers, no kernel code.

Each op file (patch_embed, fusion, teacher_softmax, dino_cross_entropy, dino_head_loss) holds the
Triton kernels, the launcher and the autograd custom op; the modules here only call its public
function. Every module runs the kernel on CUDA tensors (made contiguous first, as the reference takes any strides; the
functional ops refuse non-contiguous ones); on CPU tensors it picks, when it is built (and again
when it is unpickled or deep-copied: the choice is the running process's, never pickled), the
kernel under TRITON_INTERPRET=1 or else the reference behind the kernel's own input checks (less the
kernels' device, contiguity and float64 limits), so a bad input is the same error on the cpu as on a GPU.
The DINOv2 drop-ins (DINOLoss, iBOTPatchLoss) live in dino.py.
"""

import math
from collections.abc import Callable

import torch

from . import _common, reference
from . import dino_cross_entropy as _cross_entropy_op
from . import dino_head_loss as _head_loss_op
from . import fusion as _fusion_op
from . import patch_embed as _patch_embed_op
from . import teacher_softmax as _teacher_softmax_op
from ._common import check_alpha, check_positive, check_size, check_unit_interval
from .dino_cross_entropy import dino_cross_entropy
from .dino_head_loss import MAX_D, dino_head_loss
from .fusion import MAX_QUERIES, cross_attention_fusion
from .patch_embed import patch_embed
from .teacher_softmax import teacher_softmax


def _cpu_impl(kernel: Callable, validate: Callable, reference_fn: Callable) -> Callable:
    """What a module runs on CPU tensors: the kernel under TRITON_INTERPRET=1, else reference_fn after
    validate(*args) (the kernel's checks, for the reference): the reference alone failed deep inside torch on
    a wrong shape, or returned NaN for a temperature of 0."""
    return kernel if _common.INTERPRET else _common.checked_reference(validate, reference_fn)


class _CpuPath:
    """Base of the modules that hold a CPU path: cpu_impl, _cpu_impl(*_CPU_PATH) (kernel, validate, reference_fn),
    chosen when the module is built and again when it is unpickled or deep-copied, and left out of its pickled
    state: a module pickled under TRITON_INTERPRET=1 kept the interpreted kernel, and refused CPU tensors in a
    process without the variable."""

    _CPU_PATH: tuple[Callable, Callable, Callable]

    def _choose_cpu_impl(self) -> None:
        self.cpu_impl = _cpu_impl(*self._CPU_PATH)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("cpu_impl", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._choose_cpu_impl()


def _contiguous(x):
    """x made contiguous (a copy only where it is not): a chunk of a fused K/V projection, a column slice. The modules
    take what the CPU reference takes; the functional ops refuse it, so a drop-in that ran on a laptop failed on a
    GPU. Anything else is passed on for the op's own check to name."""
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def _pair(name: str, value) -> tuple[int, int]:
    """An int or a 2-sequence of ints (timm's to_2tuple), refused by name otherwise."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
        return tuple(value)
    return (value, value)


# timm's output formats (timm.layers.Format) from the kernel's (B, N, E) tokens, N = gh x gw row-major: views, no copy
PATCH_FORMATS = {
    "NLC": lambda t, gh, gw: t,
    "NCL": lambda t, gh, gw: t.transpose(1, 2),
    "NHWC": lambda t, gh, gw: t.unflatten(1, (gh, gw)),
    "NCHW": lambda t, gh, gw: t.unflatten(1, (gh, gw)).permute(0, 3, 1, 2),
}


class PatchEmbed(_CpuPath, torch.nn.Module):
    """Drop-in for timm's PatchEmbed: `proj` is a Conv2d ([D, C, p, p] weights load unchanged).

    Runs the Triton kernel on CUDA tensors, and on CPU tensors the kernel under TRITON_INTERPRET=1
    or else the reference (conv2d), chosen when the module is built, so it works in any environment.
    strict_img_size (timm's default): images must be img_size (None: any size); False takes any multiple of the
    patch size, and dynamic_img_pad any size, zero-padded at the bottom and right to whole patches as timm pads.
    Takes timm's keywords (norm_layer, flatten, output_fmt NLC / NCL / NHWC / NCHW, dynamic_img_pad, device,
    dtype) and its methods (set_input_size, feat_ratio, dynamic_feat_size), so `embed_layer=PatchEmbed` builds
    timm's VisionTransformer, dynamic_img_size=True included.
    """

    _CPU_PATH = (patch_embed, _patch_embed_op.validate, reference.patch_embed)

    def __init__(self, img_size: int | tuple[int, int] | None = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True, strict_img_size: bool = True, *,
                 norm_layer: Callable | None = None, flatten: bool = True, output_fmt: str | None = None,
                 dynamic_img_pad: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(bias, bool):  # timm's 5th positional argument is norm_layer: None or a class slipped in here
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r} (timm's PatchEmbed takes "
                            "norm_layer 5th: pass norm_layer= and the arguments after embed_dim by keyword)")
        # timm's Format enum or its value: str(Format.NHWC) is 'Format.NHWC' on Python 3.11, its value 'NHWC'
        fmt = None if output_fmt is None else str(getattr(output_fmt, "value", output_fmt))
        if fmt is not None and fmt not in PATCH_FORMATS:
            raise ValueError(f"output_fmt={fmt!r} is not one of timm's formats {list(PATCH_FORMATS)}")
        # timm: an output_fmt wins over flatten; without one, flatten=True gives (B, N, E), False (B, E, H/p, W/p)
        self.output_fmt = fmt if fmt is not None else ("NLC" if flatten else "NCHW")
        self.flatten = output_fmt is None and bool(flatten)
        self.strict_img_size = bool(strict_img_size)
        self.dynamic_img_pad = bool(dynamic_img_pad)
        self.patch_size = _pair("patch_size", patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"PatchEmbed supports square patches, got {self.patch_size}")
        for name, value in (("patch_size", self.patch_size[0]), ("in_chans", in_chans), ("embed_dim", embed_dim)):
            check_size(name, value)
        self._set_img_size(img_size)
        factory = {"device": device, "dtype": dtype}
        self.proj = torch.nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias, **factory)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else torch.nn.Identity()
        self._choose_cpu_impl()

    def _set_img_size(self, img_size) -> None:
        """img_size, grid_size and num_patches (None without an img_size, as timm's)."""
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
            return
        size = _pair("img_size", img_size)
        for value in size:
            check_size("img_size", value)
        if self.strict_img_size and not self.dynamic_img_pad and any(s % self.patch_size[0] for s in size):
            raise ValueError(f"img_size {size} is not a multiple of patch_size {self.patch_size[0]}: no image of that "
                             "size can be embedded (pass strict_img_size=False to take any multiple, or "
                             "dynamic_img_pad=True to pad)")
        self.img_size = size
        self.grid_size = self.dynamic_feat_size(size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """timm's: a new img_size (grid_size and num_patches follow). A new patch size would resample the
        projection (timm's resample_patch_embed), which this drop-in does not: it is refused by name."""
        if patch_size is not None and _pair("patch_size", patch_size) != self.patch_size:
            raise ValueError(f"set_input_size(patch_size={patch_size!r}): resampling the projection to another patch "
                             f"size is not supported (the module's is {self.patch_size}); keep timm's PatchEmbed and "
                             "run terrafm_kernels.swap.accelerate_vit on the model instead")
        if img_size is not None:
            self._set_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """timm's: pixels per token along each side (the patch size)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """timm's: the token grid of an image of img_size (rounded up with dynamic_img_pad)."""
        p = self.patch_size[0]
        if self.dynamic_img_pad:
            return -(-img_size[0] // p), -(-img_size[1] // p)
        return img_size[0] // p, img_size[1] // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PatchEmbed takes a (B, C, H, W) tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"PatchEmbed takes a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if self.img_size is not None and self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"PatchEmbed: input is {tuple(x.shape[-2:])} pixels, the module's img_size is "
                             f"{self.img_size}; build it with that img_size, or strict_img_size=False for any "
                             f"multiple of the patch size {self.patch_size[0]}")
        p = self.patch_size[0]
        if self.dynamic_img_pad:  # zeros at the bottom and right up to whole patches, as timm pads
            x = torch.nn.functional.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        fn = patch_embed if x.is_cuda else self.cpu_impl
        tokens = fn(x, self.proj.weight, self.proj.bias)
        return self.norm(PATCH_FORMATS[self.output_fmt](tokens, x.shape[-2] // p, x.shape[-1] // p))


class CrossAttentionFusion(_CpuPath, torch.nn.Module):
    """Drop-in fusion layer owning the Q learned queries and the pooling vector.

    forward(keys, values) with keys/values (T, M, dim) -> (T, dim). Uses the Triton kernel on CUDA
    tensors; on CPU tensors the kernel under TRITON_INTERPRET=1, else the reference (chosen when built).
    """

    _CPU_PATH = (cross_attention_fusion, _fusion_op.validate, reference.cross_attention_fusion)

    def __init__(self, dim: int, num_queries: int = 5, num_heads: int = 16):
        super().__init__()
        check_size("dim", dim)
        check_size("num_queries", num_queries)
        check_size("num_heads", num_heads)
        if num_queries > MAX_QUERIES:
            raise ValueError(f"num_queries must be at most {MAX_QUERIES} (the kernel's limit), got {num_queries}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.queries = torch.nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.pool = torch.nn.Parameter(torch.zeros(dim))
        self._choose_cpu_impl()

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"CrossAttentionFusion: {name} must be a (T, M, dim) tensor, got {type(x).__name__}")
        fn = cross_attention_fusion if keys.is_cuda else self.cpu_impl
        return fn(keys.contiguous(), values.contiguous(), self.queries, self.pool, self.num_heads)


class DualCenteringSoftmax(_CpuPath, torch.nn.Module):
    """Teacher softmax with the plain centre c and the high-frequency centre c_h as buffers.

    forward(teacher_logits, high_weight, temperature) -> (probs, logit_sum, high_logit_sum).
    The caller all-reduces logit_sum, high_logit_sum and the row counts (so this works under any
    distribution scheme), then calls update(logit_sum, high_logit_sum, rows, high_rows):
        c   <- m c   + (1 - m)   logit_sum / rows
        c_h <- m_h c_h + (1 - m_h) high_logit_sum / high_rows   (skipped when high_rows == 0)
    A centre whose update is not finite (NaN or inf in the sums: a diverged step) keeps its value, decided on
    the device (no sync), so one bad batch does not poison the targets of every later step.
    """

    _CPU_PATH = (teacher_softmax, _teacher_softmax_op.validate, reference.teacher_softmax)

    def __init__(self, num_prototypes: int, alpha: float = 0.8, center_momentum: float = 0.9,
                 center_high_momentum: float = 0.9):
        super().__init__()
        check_size("num_prototypes", num_prototypes)
        check_alpha(alpha)
        check_unit_interval("center_momentum", center_momentum)
        check_unit_interval("center_high_momentum", center_high_momentum)
        self.alpha = alpha
        self.center_momentum = center_momentum
        self.center_high_momentum = center_high_momentum
        self.register_buffer("center", torch.zeros(num_prototypes))
        self.register_buffer("center_high", torch.zeros(num_prototypes))
        self._choose_cpu_impl()

    def forward(self, teacher_logits, high_weight, temperature: float):
        fn = teacher_softmax if getattr(teacher_logits, "is_cuda", False) else self.cpu_impl
        return fn(_contiguous(teacher_logits), self.center, self.center_high, _contiguous(high_weight), temperature,
                  self.alpha)

    @torch.no_grad()
    def update(self, logit_sum: torch.Tensor, high_logit_sum: torch.Tensor, rows: float,
               high_rows: float) -> None:
        K = self.center.shape[0]
        for name, x in (("logit_sum", logit_sum), ("high_logit_sum", high_logit_sum)):
            if not isinstance(x, torch.Tensor) or x.numel() != K:
                raise ValueError(f"{name} must be a tensor with K={K} entries (one per prototype), got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
            _common.check_dtype(name, x, _common.FLOAT_DTYPES + (torch.float64,))
            _common.check_device(name, x, self.center.device, "the module's centres are")
        check_positive("rows", rows)
        _common._check_number("high_rows", high_rows)
        if not (math.isfinite(high_rows) and high_rows >= 0):
            raise ValueError(f"high_rows must be a finite count >= 0 (0 skips the c_h update), got {high_rows}")
        reference.update_dual_centers(self.center, self.center_high, logit_sum, high_logit_sum, rows, high_rows,
                                      self.center_momentum, self.center_high_momentum)


class DINOCrossEntropy(_CpuPath, torch.nn.Module):
    """nn.Module wrapper: forward(student_logits (S, B, K), teacher_probs (T, B, K)) -> loss."""

    _CPU_PATH = (dino_cross_entropy, _cross_entropy_op.validate, reference.dino_cross_entropy)

    def __init__(self, student_temperature: float = 0.1):
        super().__init__()
        check_positive("student_temperature", student_temperature)
        self.student_temperature = student_temperature
        self._choose_cpu_impl()

    def forward(self, student_logits, teacher_probs):
        fn = dino_cross_entropy if getattr(student_logits, "is_cuda", False) else self.cpu_impl
        return fn(_contiguous(student_logits), _contiguous(teacher_probs), self.student_temperature)


class DINOHeadLoss(_CpuPath, torch.nn.Module):
    """Owns the student prototype layer (weight_v, optional trainable weight_g) and the dual centres.

    forward(student_features (S, B, D), teacher_features (T, B, D), high_weight (T*B,), teacher_temperature,
    teacher_weight_v=None) -> (loss, logit_sum, high_logit_sum); the caller all-reduces the sums and
    calls update_centers(logit_sum, high_logit_sum, rows, high_rows) (as DualCenteringSoftmax.update).
    """

    _CPU_PATH = (dino_head_loss, _head_loss_op.validate, reference.dino_head_loss)

    def __init__(self, in_dim: int = 256, num_prototypes: int = 65536, student_temperature: float = 0.1,
                 alpha: float = 0.8, center_momentum: float = 0.9, center_high_momentum: float = 0.9,
                 train_weight_g: bool = False):
        super().__init__()
        check_size("in_dim", in_dim)
        if in_dim > MAX_D:
            raise ValueError(f"in_dim must be at most {MAX_D} (the kernels' widest feature), got {in_dim}")
        check_size("num_prototypes", num_prototypes)
        check_positive("student_temperature", student_temperature)
        self.student_temperature = student_temperature
        self.weight_v = torch.nn.Parameter(torch.empty(num_prototypes, in_dim))
        torch.nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = torch.nn.Parameter(torch.ones(num_prototypes, 1)) if train_weight_g else None
        self.centering = DualCenteringSoftmax(num_prototypes, alpha, center_momentum, center_high_momentum)
        self._choose_cpu_impl()

    def forward(self, student_features, teacher_features, high_weight, teacher_temperature: float,
                teacher_weight_v=None, teacher_weight_g=None):
        c = self.centering
        fn = dino_head_loss if getattr(student_features, "is_cuda", False) else self.cpu_impl
        return fn(_contiguous(student_features), _contiguous(teacher_features), self.weight_v, c.center, c.center_high,
                  _contiguous(high_weight), teacher_temperature, self.student_temperature, c.alpha,
                  self.weight_g, _contiguous(teacher_weight_v), _contiguous(teacher_weight_g))

    def update_centers(self, logit_sum, high_logit_sum, rows: float, high_rows: float) -> None:
        self.centering.update(logit_sum, high_logit_sum, rows, high_rows)
