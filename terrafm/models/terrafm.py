"""The TerraFM backbone: modality-specific patch embedding (+ fusion) followed by a plain ViT.

state_dict keys and shapes match the published TerraFM-B / TerraFM-L checkpoints (cls_token,
pos_embed, patch_embed.*, blocks.i.*, norm.*) when built with fusion=False; fusion=True adds only
`patch_embed.fusion.*`. Inputs are validated before any compute.
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from terrafm import ops as op_registry
from terrafm.modalities import MODALITIES, MODALITY_NAMES
from terrafm.models.patch_embed import TerraFMPatchEmbed
from terrafm.models.vit import Block

Images = torch.Tensor | dict[str, torch.Tensor]


class TerraFM(nn.Module):
    def __init__(
        self,
        name: str = "terrafm_base",
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        fusion: bool = False,
        fusion_queries: int = 5,
        fusion_heads: int = 16,
        fusion_norm: str = "values",
        out_indices: Sequence[int] = (3, 5, 7, 11),
        ops: Mapping[str, str] | None = None,
        ops_device: str = "cpu",
    ):
        """`ops` ({op: backend | "auto"}) and `ops_device` choose, through the op registry, the
        attention, patch_embed and cross_attention_fusion implementations, once, here."""
        super().__init__()
        for key, value in (("img_size", img_size), ("patch_size", patch_size)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{key} must be a positive whole number of pixels, got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.name, self.embed_dim, self.patch_size, self.img_size = name, embed_dim, patch_size, img_size
        self.out_indices = tuple(out_indices)
        self.input_metadata: dict = {}  # what the inputs must be (bands, mean, std, ...); set by load_checkpoint
        self.patch_embed = TerraFMPatchEmbed(
            img_size, patch_size, embed_dim, fusion, fusion_queries, fusion_heads, fusion_norm, ops_prefs=ops,
            ops_device=ops_device,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        attention = op_registry.select("attention", ops, ops_device)
        rates = [drop_path_rate * i / max(depth - 1, 1) if drop_path_rate > 0 else None for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r, attention) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- input handling -------------------------------------------------------------------------
    def _as_dict(self, x: Images, modality: str | None) -> dict[str, torch.Tensor]:
        """Validate the input and return {modality: (B, C, H, W)}; raises before any compute."""
        if isinstance(x, dict):
            if modality is not None:
                raise ValueError("pass either a tensor with `modality`, or a dict {modality: tensor}, not both")
            images = x
        else:
            if modality is None:
                raise ValueError(f"a tensor input needs `modality`, one of {list(MODALITY_NAMES)}")
            images = {modality: x}
        if not images:
            raise ValueError("empty modality dict: pass at least one {modality: tensor}")
        ref_shape = None
        for m, img in images.items():
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}; expected one of {list(MODALITY_NAMES)}")
            if not isinstance(img, torch.Tensor) or img.dim() != 4:
                shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"{m}: expected a (B, C, H, W) tensor, got {shape}")
            want = MODALITIES[m].channels
            if img.shape[1] != want:
                raise ValueError(
                    f"{m}: expected {want} bands {list(MODALITIES[m].bands)}, got {img.shape[1]} channels"
                )
            if not img.is_floating_point():
                raise TypeError(
                    f"{m}: expected a normalised floating-point tensor (float32/bfloat16/float16), got {img.dtype}"
                )
            H, W = img.shape[-2:]
            if H % self.patch_size or W % self.patch_size:
                raise ValueError(f"{m}: image size {H}x{W} is not divisible by the patch size {self.patch_size}")
            if ref_shape is not None and (img.shape[0], H, W) != ref_shape:
                raise ValueError(
                    f"fused modalities must share batch and size; {m} is {tuple(img.shape)} vs (B, H, W) {ref_shape}"
                )
            ref_shape = (img.shape[0], H, W)
        return images

    def interpolate_pos_encoding(self, num_tokens: int, height: int, width: int) -> torch.Tensor:
        """Position embedding for an H x W input: bicubic resize of the 2D grid (DINO's +0.1 rule)."""
        n = self.pos_embed.shape[1] - 1
        if num_tokens - 1 == n and height == width:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(n))
        h0, w0 = height // self.patch_size + 0.1, width // self.patch_size + 0.1
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), scale_factor=(h0 / side, w0 / side), mode="bicubic").to(patch_pos.dtype)
        return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)), dim=1)

    def unused_parameters_zero(self, used: set[str], fused: bool) -> torch.Tensor | None:
        """See TerraFMPatchEmbed.unused_parameters_zero: the sensor parameters are all in the patch embedding."""
        return self.patch_embed.unused_parameters_zero(used, fused)

    def prepare_tokens(self, x: Images, modality: str | None = None) -> torch.Tensor:
        images = self._as_dict(x, modality)
        H, W = next(iter(images.values())).shape[-2:]
        tokens = self.patch_embed(images)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1], H, W).to(tokens.dtype)

    # -- outputs --------------------------------------------------------------------------------
    def forward_features(self, x: Images, modality: str | None = None) -> dict[str, torch.Tensor]:
        tokens = self.prepare_tokens(x, modality)
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:], "x_prenorm": tokens}

    def forward(self, x: Images, modality: str | None = None) -> torch.Tensor:
        """(B, D) cls token after the final norm: the published inference output."""
        return self.head(self.forward_features(x, modality)["x_norm_clstoken"])

    def _block_outputs(self, x: Images, modality: str | None, indices: Sequence[int]) -> list[torch.Tensor]:
        depth = len(self.blocks)
        if not indices:
            raise ValueError("no block indices given")
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {depth}-block model")
        wanted = {i % depth for i in indices}
        tokens = self.prepare_tokens(x, modality)
        outputs = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens)
            if i in wanted:
                outputs[i] = tokens
        return [outputs[i % depth] for i in indices]

    def get_intermediate_layers(
        self,
        x: Images,
        modality: str | None = None,
        n: int | Sequence[int] = 1,
        norm: bool = True,
        return_class_token: bool = False,
    ) -> tuple:
        """Patch tokens (B, N, D) of the last `n` blocks (int) or of the given block indices."""
        depth = len(self.blocks)
        if isinstance(n, int) and not 1 <= n <= depth:
            raise ValueError(f"n={n} last blocks asked of a {depth}-block model; n must be 1..{depth}")
        indices = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        outs = [self.norm(o) if norm else o for o in self._block_outputs(x, modality, indices)]
        if return_class_token:
            return tuple((o[:, 1:], o[:, 0]) for o in outs)
        return tuple(o[:, 1:] for o in outs)

    def multiscale_features(
        self, x: Images, modality: str | None = None, out_indices: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Normed patch tokens of `out_indices` blocks (default: the model's) as contiguous (B, D, H/p, W/p) maps for
        segmentation heads, as DINOv2's and timm's are (a head may `.view` them)."""
        images = self._as_dict(x, modality)
        H, W = next(iter(images.values())).shape[-2:]
        indices = list(self.out_indices if out_indices is None else out_indices)
        outs = self.get_intermediate_layers(images, None, indices)
        h, w = H // self.patch_size, W // self.patch_size
        return [o.transpose(1, 2).reshape(o.shape[0], self.embed_dim, h, w).contiguous() for o in outs]


def patch_conv_flops(embed_dim: int, patch_size: int, in_channels: Sequence[int], h: int, w: int) -> float:
    """Forward FLOPs of the patch convolutions of one image (C*p*p -> A=3D per modality), the part of
    backbone_flops whose backward has no input gradient (images need none): 2x its forward, not 3x."""
    n = (h // patch_size) * (w // patch_size)
    return float(sum(2 * n * c * patch_size * patch_size * 3 * embed_dim for c in in_channels))


def backbone_flops(embed_dim: int, depth: int, patch_size: int, in_channels: Sequence[int], h: int, w: int,
                   mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one image through TerraFM (multiply-add = 2 FLOPs).

    Patch embedding per modality: conv C*p*p -> A=3D, then proj1 (A->A), proj2 (A->A), proj3 (A->D);
    each block: qkv + proj 8*N*D^2, MLP 4*mlp_ratio*N*D^2, attention scores and values 4*N^2*D.
    With 2+ modalities (Case N) the conv, proj1 and the fusion's key projection (A->A) run once per modality; the
    fusion's attention over the modality tokens (~4 Q M A per position) is left out (well under 1%).
    """
    n = (h // patch_size) * (w // patch_size)
    tokens = n + 1
    a = 3 * embed_dim
    embed = sum(2 * n * c * patch_size * patch_size * a + 2 * n * a * a for c in in_channels)
    if len(in_channels) > 1:
        embed += len(in_channels) * 2 * n * a * a
    embed += 2 * n * (a * a + a * embed_dim)
    blocks = depth * (2 * tokens * embed_dim * embed_dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * embed_dim)
    return float(embed + blocks)
