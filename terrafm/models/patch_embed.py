"""TerraFM's modality-specific patch embedding, token projection and adaptive cross-attention fusion.

Published layout (checkpoint keys under `patch_embed.`): conv2d_s2_l2a / conv2d_s2_l1c / conv2d_s1
(Conv2d, C -> attn_dim = 3 * D, kernel = stride = patch), s2_l2a_embed / s2_l1c_embed / s1_embed
(1, attn_dim) learned modality vectors, and projection.{proj1 (no bias), norm_input, proj2, proj3}.

Case 1 (one modality): tokens -> proj1 -> norm_input -> proj2 -> proj3, exactly the published path.
Case N (2+ modalities of the same place, method.md): per patch position the M modality tokens give
keys (fusion.key, new) and values (proj1); Q shared learned queries attend over M per head, the Q
outputs are pooled by softmax(z . pool), then norm_input -> proj2 -> proj3. The fusion's own
parameters live under `patch_embed.fusion.` only when the model is built with fusion=True, so the
published checkpoint still loads with strict=True into a fusion=False model.
"""

import torch
import torch.nn as nn

from terrafm import ops
from terrafm.modalities import MODALITIES, MODALITY_NAMES


class TokenProjection(nn.Module):
    def __init__(self, attn_dim: int, embed_dim: int):
        super().__init__()
        self.proj1 = nn.Linear(attn_dim, attn_dim, bias=False)
        self.norm_input = nn.LayerNorm(attn_dim)
        self.proj2 = nn.Linear(attn_dim, attn_dim)
        self.proj3 = nn.Linear(attn_dim, embed_dim)

    def output(self, values: torch.Tensor) -> torch.Tensor:
        """The part after proj1 (shared by Case 1 and the fused Case N)."""
        return self.proj3(self.proj2(self.norm_input(values)))

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
        ops_prefs: dict[str, str] | None = None,
    ):
        super().__init__()
        attn_dim = 3 * embed_dim
        self.img_size, self.patch_size, self.attn_dim = img_size, patch_size, attn_dim
        self.num_patches = (img_size // patch_size) ** 2
        for name in MODALITY_NAMES:
            channels = MODALITIES[name].channels
            setattr(self, f"conv2d_{name}", nn.Conv2d(channels, attn_dim, patch_size, stride=patch_size))
            setattr(self, f"{name}_embed", nn.Parameter(torch.zeros(1, attn_dim)))
        self.projection = TokenProjection(attn_dim, embed_dim)
        self.fusion = Fusion(attn_dim, fusion_queries, fusion_heads) if fusion else None
        self.ops_prefs = dict(ops_prefs or {})

    def tokens(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, attn_dim): conv patchify + bias + modality vector, via the op registry."""
        conv = getattr(self, f"conv2d_{modality}")
        embed = getattr(self, f"{modality}_embed")
        fn = ops.get("patch_embed", x.device.type, self.ops_prefs.get("patch_embed", "auto"))
        return fn(x, conv.weight, conv.bias, embed.reshape(-1))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """{modality: (B, C, H, W)} -> (B, N, D); one key is Case 1, two or more are fused (Case N)."""
        if len(x) == 1:
            (modality, image), = x.items()
            return self.projection(self.tokens(image, modality))
        if self.fusion is None:
            raise ValueError(
                f"got {len(x)} modalities {sorted(x)} but this model has no fusion parameters; "
                "build it with fusion=True for Case N inputs, or pass one modality"
            )
        tokens = torch.stack([self.tokens(image, m) for m, image in x.items()], dim=2)  # (B, N, M, A)
        B, N, M, A = tokens.shape
        tokens = tokens.reshape(B * N, M, A)
        fn = ops.get("cross_attention_fusion", tokens.device.type, self.ops_prefs.get("cross_attention_fusion", "auto"))
        fused = fn(self.fusion.key(tokens), self.projection.proj1(tokens), self.fusion.queries,
                   self.fusion.pool, self.fusion.num_heads)
        return self.projection.output(fused.reshape(B, N, A))
