"""An independent re-statement of the published TerraFM inference architecture, for parity tests.

Written from the published layout (DINO ViT + TerraFM PatchEmbed/TokenProjection): manual softmax
attention, conv patchify, proj1 -> norm_input -> proj2 -> proj3, DINO position interpolation.
"""

import math

import torch
import torch.nn as nn


class PubAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class PubMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PubBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PubAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PubMlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PubProjection(nn.Module):
    def __init__(self, attn_dim, dim):
        super().__init__()
        self.proj1 = nn.Linear(attn_dim, attn_dim, bias=False)
        self.norm_input = nn.LayerNorm(attn_dim)
        self.proj2 = nn.Linear(attn_dim, attn_dim)
        self.proj3 = nn.Linear(attn_dim, dim)

    def forward(self, x):
        return self.proj3(self.proj2(self.norm_input(self.proj1(x))))


class PubPatchEmbed(nn.Module):
    def __init__(self, img_size, patch, dim):
        super().__init__()
        attn_dim = 3 * dim
        self.patch_size = patch
        self.num_patches = (img_size // patch) ** 2
        self.conv2d_s2_l2a = nn.Conv2d(12, attn_dim, patch, stride=patch)
        self.conv2d_s2_l1c = nn.Conv2d(12, attn_dim, patch, stride=patch)
        self.conv2d_s1 = nn.Conv2d(2, attn_dim, patch, stride=patch)
        self.projection = PubProjection(attn_dim, dim)
        self.s2_l2a_embed = nn.Parameter(torch.randn(1, attn_dim) * 0.02)
        self.s2_l1c_embed = nn.Parameter(torch.randn(1, attn_dim) * 0.02)
        self.s1_embed = nn.Parameter(torch.randn(1, attn_dim) * 0.02)

    def forward(self, x, is_l2a=False):
        if x.shape[1] == 2:
            t = self.conv2d_s1(x).flatten(2).transpose(1, 2) + self.s1_embed
        elif is_l2a:
            t = self.conv2d_s2_l2a(x).flatten(2).transpose(1, 2) + self.s2_l2a_embed
        else:
            t = self.conv2d_s2_l1c(x).flatten(2).transpose(1, 2) + self.s2_l1c_embed
        return self.projection(t)


class PublishedTerraFM(nn.Module):
    def __init__(self, img_size=224, patch=16, dim=768, depth=12, heads=12):
        super().__init__()
        self.patch_embed = PubPatchEmbed(img_size, patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(PubBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()

    def interpolate_pos_encoding(self, x, w, h):
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        side = math.sqrt(N)
        pos = nn.functional.interpolate(
            self.pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / side, h0 / side), mode="bicubic",
        )
        pos = pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], pos), dim=1)

    def forward(self, x, is_l2a=False):
        _, _, w, h = x.shape
        t = self.patch_embed(x, is_l2a)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        t = t + self.interpolate_pos_encoding(t, w, h)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]
