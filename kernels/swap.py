"""accelerate_vit: put terrafm's kernels into someone else's ViT with one explicit call.

Supported hosts, detected by class name and duck typing (timm, torchvision and transformers are never
imported here): timm `VisionTransformer` (and subclasses), torchvision `VisionTransformer`, Hugging Face
`ViTModel` / `ViTForImageClassification`.

What changes:
  patch embedding  the host's patchifying Conv2d (timm `patch_embed.proj`, torchvision `conv_proj`,
                   HF `embeddings.patch_embeddings.projection`) becomes a `PatchProjection`: a Conv2d
                   subclass holding the same `weight` / `bias` Parameters (same names and shapes, so
                   state_dicts load unchanged) whose forward runs the fused patchify + GEMM + bias of
                   `patch_embed` (kernels/patch_embed.py) and returns the Conv2d's (B, E, H/p, W/p)
                   layout as a view, so the host's own flatten/transpose code runs untouched.
  attention        switched to torch SDPA (flash / memory-efficient on GPU) where the host computes
                   softmax(q k^T) v by hand and has an equivalent SDPA path of its own: timm
                   `Attention.fused_attn`, Hugging Face `config._attn_implementation`.
Everything else is left as it is, and the returned SwapReport says what was left and why.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import _common
from .patch_embed import patch_embed as fused_patch_embed


class PatchProjection(torch.nn.Conv2d):
    """Drop-in for a patchifying Conv2d (kernel == stride == p, no padding): (B, C, H, W) -> (B, E, H/p, W/p).

    Runs the fused patchify + GEMM + bias (2 B N E C p^2 FLOPs; reads the image and weight once and
    writes (B, N, E) once, without the im2col buffer of a conv) and returns a view in the Conv2d layout.
    Falls back to F.conv2d where the kernel cannot run (CPU without the Triton interpreter, H or W not a
    multiple of p, a dtype it does not take: float64 after model.double(), bf16 in the interpreter, an input
    whose dtype differs from the weight's, which Conv2d refuses), which computes the same function.
    """

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> "PatchProjection":
        """A PatchProjection holding conv's own Parameters (nothing is copied, optimizers keep working)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.backend = "triton (terrafm_kernels.patch_embed) on CUDA or under TRITON_INTERPRET=1, else conv2d"
        new.kernel_on_cpu = _common.INTERPRET  # CPU tensors run the kernel only in the Triton interpreter
        return new

    def __setstate__(self, state):  # the unpickling process's choice: one pickled under the interpreter kept it
        super().__setstate__(state)
        self.kernel_on_cpu = _common.INTERPRET

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) image, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            return F.conv2d(x, self.weight, self.bias, stride=self.stride)  # Conv2d's own error
        p = self.kernel_size[0]
        B, _, H, W = x.shape
        kernel_dtypes = _common.FLOAT_DTYPES if x.is_cuda else (torch.float32, torch.float16)  # interpreter: no bf16
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        run_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype  # cpu autocast's default: bf16
        if (H % p or W % p or not (x.is_cuda or self.kernel_on_cpu) or x.dtype != self.weight.dtype
                or run_dtype not in kernel_dtypes):
            return F.conv2d(x, self.weight, self.bias, stride=self.stride)
        tokens = fused_patch_embed(x, self.weight, self.bias)  # (B, N, E)
        return tokens.transpose(1, 2).unflatten(2, (H // p, W // p))


@dataclass
class SwapEntry:
    path: str  # dotted module path inside the host
    what: str  # "patch_embed" | "attention"
    detail: str  # for a swap: old -> new; for a module left alone: why


@dataclass
class SwapReport:
    host: str
    swapped: list[SwapEntry] = field(default_factory=list)
    left: list[SwapEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"accelerate_vit on {self.host}: {len(self.swapped)} swapped, {len(self.left)} left"]
        lines += [f"  swapped {e.what:11s} {e.path}: {e.detail}" for e in self.swapped]
        lines += [f"  left    {e.what:11s} {e.path}: {e.detail}" for e in self.left]
        return "\n".join(lines)


def _class_names(module: torch.nn.Module) -> list[str]:
    return [f"{c.__module__}.{c.__name__}" for c in type(module).__mro__]


def _host_kind(model: torch.nn.Module) -> str | None:
    names = _class_names(model)
    if any(n.startswith("timm.") and n.endswith(".VisionTransformer") for n in names):
        return "timm"
    if any(n.startswith("torchvision.") and n.endswith(".VisionTransformer") for n in names):
        return "torchvision"
    if any(n.startswith("transformers.") and n.rsplit(".", 1)[1] in ("ViTModel", "ViTForImageClassification",
                                                                       "ViTPreTrainedModel") for n in names):
        return "huggingface"
    return None


def _patch_conv_path(kind: str) -> str:
    return {"timm": "patch_embed.proj", "torchvision": "conv_proj",
            "huggingface": "embeddings.patch_embeddings.projection"}[kind]


def _swap_patch_conv(model: torch.nn.Module, kind: str, report: SwapReport) -> None:
    path = _patch_conv_path(kind)
    if kind == "huggingface" and not hasattr(model, "embeddings"):
        path = "vit." + path
    try:
        conv = model.get_submodule(path)
    except AttributeError:
        report.left.append(SwapEntry(path, "patch_embed", "no such submodule in this host"))
        return
    if isinstance(conv, PatchProjection):
        report.left.append(SwapEntry(path, "patch_embed", "already a PatchProjection"))
        return
    why = _why_not_patchify(conv)
    if why:
        report.left.append(SwapEntry(path, "patch_embed", why))
        return
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    new = PatchProjection.from_conv(conv)
    setattr(parent, name, new)
    report.swapped.append(SwapEntry(path, "patch_embed", f"Conv2d(k=stride={conv.kernel_size[0]}) -> "
                                                         f"PatchProjection [{new.backend}]"))


def _why_not_patchify(conv: torch.nn.Module) -> str | None:
    if not isinstance(conv, torch.nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    kind = type(conv)
    if kind.forward is not torch.nn.Conv2d.forward or kind._conv_forward is not torch.nn.Conv2d._conv_forward:
        return (f"{kind.__name__} computes its own forward (e.g. timm's StdConv2d standardises its weight): not a "
                "plain convolution")
    if torch.nn.utils.parametrize.is_parametrized(conv) or not isinstance(conv.weight, torch.nn.Parameter):
        return ("its weight is computed (a parametrization such as weight_norm, or pruning's weight_orig * mask): "
                "the kernel would take a stale copy")
    if type(conv.weight).__name__ == "DTensor":
        return "its weight is a sharded DTensor (FSDP2): call accelerate_vit before fully_shard"
    hooks = [name for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(conv, name, None)]
    if hooks:
        return f"it has hooks ({', '.join(h.strip('_') for h in hooks)}) that a new module would silently drop"
    if conv.weight.dtype not in _common.FLOAT_DTYPES:
        return f"{conv.weight.dtype} weights: the kernel takes {', '.join(str(d) for d in _common.FLOAT_DTYPES)}"
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k[0] != k[1]:
        return f"non-square patch {k}"
    if s != k:
        return f"stride {s} != kernel {k}: overlapping patches are not a patchify"
    if conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) or conv.groups != 1:
        return f"padding {conv.padding}, dilation {conv.dilation}, groups {conv.groups}: not a plain patchify"
    return None


def _swap_attention(model: torch.nn.Module, kind: str, report: SwapReport) -> None:
    if kind == "timm":
        for path, m in model.named_modules():
            if not hasattr(m, "fused_attn") or not hasattr(m, "qkv"):
                continue
            if m.fused_attn:
                report.left.append(SwapEntry(path, "attention", "already uses F.scaled_dot_product_attention"))
            else:
                m.fused_attn = True
                report.swapped.append(SwapEntry(path, "attention", "manual softmax(q k^T) v -> timm's SDPA path"))
        return
    if kind == "torchvision":
        for path, m in model.named_modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                report.left.append(SwapEntry(path, "attention", "nn.MultiheadAttention called with "
                                             "need_weights=False already runs F.scaled_dot_product_attention"))
        return
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == "eager" and getattr(config, "output_attentions", False):
        report.left.append(SwapEntry("config._attn_implementation", "attention", "eager: config.output_attentions is "
                                     "set, and sdpa returns no attention weights"))
    elif impl == "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")
        else:
            config._attn_implementation = "sdpa"
        report.swapped.append(SwapEntry("config._attn_implementation", "attention",
                                        "eager softmax(q k^T) v -> sdpa: a call with output_attentions=True now "
                                        "returns no attention maps (set config.output_attentions before the swap to "
                                        "keep eager), and the config object is changed in place, so models built "
                                        "on the same config object switch too"))
    else:
        report.left.append(SwapEntry("config._attn_implementation", "attention", f"already {impl!r}"))


def accelerate_vit(model: torch.nn.Module, *, patch_embed: bool = True, attention: bool = True) -> SwapReport:
    """Swap terrafm's kernels into a timm / torchvision / Hugging Face ViT in place; returns what changed.

    The model keeps its weight names and shapes (load_state_dict works before and after), its
    attributes and its forward signature; outputs match the untouched model to float rounding.
    Raises TypeError for a model that is not one of the supported ViTs.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accelerate_vit expects a torch.nn.Module, got {type(model).__name__}")
    kind = _host_kind(model)
    if kind is None and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        raise TypeError("accelerate_vit takes the model before torch.compile: call it on the module you compiled "
                        "(compiled._orig_mod), then compile again")
    if kind is None:
        raise TypeError(f"accelerate_vit supports timm VisionTransformer, torchvision VisionTransformer and "
                        f"Hugging Face ViTModel/ViTForImageClassification; got {type(model).__module__}."
                        f"{type(model).__name__}")
    report = SwapReport(host=f"{kind}:{type(model).__name__}")
    if patch_embed:
        _swap_patch_conv(model, kind, report)
    if attention:
        _swap_attention(model, kind, report)
    return report


__all__ = ["accelerate_vit", "SwapReport", "SwapEntry", "PatchProjection"]
