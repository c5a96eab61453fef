"""TerraFM's modality-specific patch embedding, token projection and adaptive cross-attention fusion.

Published layout (checkpoint keys under `patch_embed.`): conv2d_s2_l2a / conv2d_s2_l1c / conv2d_s1
(Conv2d, C -> attn_dim = 3 * D, kernel = stride = patch), s2_l2a_embed / s2_l1c_embed / s1_embed
(1, attn_dim) learned modality vectors, and projection.{proj1 (no bias), norm_input, proj2, proj3}.

Case 1 (one modality): tokens -> proj1 -> norm_input -> proj2 -> proj3, exactly the published path.
Case N (2+ modalities of the same place, method.md): per patch position the M modality tokens give
keys (fusion.key, new) and values (proj1, then norm_input: "LayerNorm after proj1"); Q shared learned queries
attend over M per head, the Q outputs are pooled by softmax(z . pool), then proj2 -> proj3. Where the norm sits
is unpublished: fusion_norm="values" (the default, above) or "pooled" (after the pooling, before proj2: the
placement of checkpoints written before it was configurable). The fusion's own
parameters live under `patch_embed.fusion.` only when the model is built with fusion=True, so the
published checkpoint still loads with strict=True into a fusion=False model.

The patch_embed and cross_attention_fusion implementations are chosen by the op registry when the
module is built and held as attributes. The work is split into three modality-agnostic stages,
`embed_one` (Case 1), `patchify` (one modality's tokens) and `fuse` (Case N), so that compiling them
(terrafm.train.parallelize) gives graphs that serve every sensor: the modality only picks which
parameters are passed in, outside the compiled code.
"""

from collections.abc import Mapping

import torch
import torch.nn as nn

from terrafm import ops
from terrafm.modalities import MODALITIES, MODALITY_NAMES

FUSION_NORMS = ("values", "pooled")  # where Case N applies norm_input: each sensor's values, or the pooled value


class TokenProjection(nn.Module):
    def __init__(self, attn_dim: int, embed_dim: int):
        super().__init__()
        self.proj1 = nn.Linear(attn_dim, attn_dim, bias=False)
        self.norm_input = nn.LayerNorm(attn_dim)
        self.proj2 = nn.Linear(attn_dim, attn_dim)
        self.proj3 = nn.Linear(attn_dim, embed_dim)

    def output(self, values: torch.Tensor) -> torch.Tensor:
        """The part after proj1: norm_input -> proj2 -> proj3."""
        return self.after_norm(self.norm_input(values))

    def after_norm(self, values: torch.Tensor) -> torch.Tensor:
        """proj2 -> proj3 (Case N with fusion_norm="values": the values were normalised before the fusion)."""
        return self.proj3(self.proj2(values))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.proj1(tokens))


class Fusion(nn.Module):
    """Parameters of the adaptive cross-attention fusion: key projection, Q queries, pooling vector."""

    def __init__(self, attn_dim: int, num_queries: int = 5, num_heads: int = 16):
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"fusion: attn_dim {attn_dim} must be divisible by fusion heads {num_heads}")
        self.num_heads = num_heads
        self.key = nn.Linear(attn_dim, attn_dim, bias=False)
        self.queries = nn.Parameter(torch.zeros(num_queries, attn_dim))
        self.pool = nn.Parameter(torch.zeros(attn_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)


class TerraFMPatchEmbed(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        fusion: bool = False,
        fusion_queries: int = 5,
        fusion_heads: int = 16,
        fusion_norm: str = "values",
        ops_prefs: Mapping[str, str] | None = None,
        ops_device: str = "cpu",
    ):
        super().__init__()
        if fusion_norm not in FUSION_NORMS:
            raise ValueError(f"fusion_norm must be one of {FUSION_NORMS}, got {fusion_norm!r}")
        self.fusion_norm = fusion_norm
        attn_dim = 3 * embed_dim
        self.img_size, self.patch_size, self.attn_dim = img_size, patch_size, attn_dim
        self.num_patches = (img_size // patch_size) ** 2
        for name in MODALITY_NAMES:
            channels = MODALITIES[name].channels
            setattr(self, f"conv2d_{name}", nn.Conv2d(channels, attn_dim, patch_size, stride=patch_size))
            setattr(self, f"{name}_embed", nn.Parameter(torch.zeros(1, attn_dim)))
        self.projection = TokenProjection(attn_dim, embed_dim)
        self.fusion = Fusion(attn_dim, fusion_queries, fusion_heads) if fusion else None
        self.patch_embed_fn = ops.select("patch_embed", ops_prefs, ops_device)
        self.fusion_fn = ops.select("cross_attention_fusion", ops_prefs, ops_device)

    def modality_params(self, modality: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv weight, conv bias, modality vector (attn_dim,)) of one sensor."""
        conv = getattr(self, f"conv2d_{modality}")
        return conv.weight, conv.bias, getattr(self, f"{modality}_embed").reshape(-1)

    def unused_parameters_zero(self, used: set[str], fused: bool) -> torch.Tensor | None:
        """A zero that depends on every embedding parameter a forward left unused (None if none was).

        Added to the tokens in training, it gives each such parameter a zero gradient, so every rank's
        backward has the same parameters with gradients whichever sensors it drew, and FSDP2's reduce-scatter
        lines up on every torch version (torch 2.11, the GPU image, has no FSDP2 set_reduce_scatter_unused_params)."""
        params = [p for name in MODALITY_NAMES if name not in used for p in self.modality_params(name)]
        if self.fusion is not None and not fused:
            params += list(self.fusion.parameters())
        if not params:
            return None
        return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0

    def patchify(self, image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 modality_embed: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, attn_dim): conv patchify + bias + modality vector."""
        return self.patch_embed_fn(image, weight, bias, modality_embed)

    def embed_one(self, image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  modality_embed: torch.Tensor) -> torch.Tensor:
        """Case 1: (B, C, H, W) -> (B, N, D), patchify then the token projection."""
        return self.projection(self.patch_embed_fn(image, weight, bias, modality_embed))

    def fuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """Case N: (B, N, M, attn_dim) tokens of M sensors -> (B, N, D)."""
        B, N, M, A = tokens.shape
        tokens = tokens.reshape(B * N, M, A)
        values = self.projection.proj1(tokens)
        if self.fusion_norm == "values":
            values = self.projection.norm_input(values)
        fused = self.fusion_fn(self.fusion.key(tokens), values, self.fusion.queries, self.fusion.pool,
                               self.fusion.num_heads).reshape(B, N, A)
        if self.fusion_norm == "values":
            return self.projection.after_norm(fused)
        return self.projection.output(fused)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """{modality: (B, C, H, W)} -> (B, N, D); one key is Case 1, two or more are fused (Case N).

        Images are cast to the weights' dtype (float16 tiles into a float32 model, float32 into a bfloat16 one);
        under autocast the conv then runs in the autocast dtype as before."""
        if len(x) == 1:
            (modality, image), = x.items()
            weight, bias, embed = self.modality_params(modality)
            return self.embed_one(image.to(weight.dtype), weight, bias, embed)
        if self.fusion is None:
            raise ValueError(
                f"got {len(x)} modalities {sorted(x)} but this model has no fusion parameters; "
                "build it with fusion=True for Case N inputs, or pass one modality"
            )
        tokens = []
        for m, image in x.items():
            weight, bias, embed = self.modality_params(m)
            tokens.append(self.patchify(image.to(weight.dtype), weight, bias, embed))
        return self.fuse(torch.stack(tokens, dim=2))
