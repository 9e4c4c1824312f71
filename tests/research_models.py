"""Small hand-written models with the structure of research code bases (no code copied): a timm-style
ViT (blocks in an ``nn.Sequential``), blocks around ``nn.MultiheadAttention``, and a PixArt-alpha
research-code-style DiT whose cross-attention merges the batch into the token axis (one sequence of
B*N queries over B*L keys with a block-diagonal mask, as xformers' ``BlockDiagonalMask``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- timm-style ViT: patch embedding, nn.Sequential of pre-norm blocks ----------------------------

class FusedQKVAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), FusedQKVAttention(dim, heads), nn.Identity()
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), ViTMlp(dim, 2 * dim), nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TinyViT(nn.Module):
    """Patch embed (conv) + position embedding + ``nn.Sequential`` of blocks + norm + linear head."""

    def __init__(self, image=8, patch=2, in_chans=3, dim=32, depth=3, heads=2, blocks=None):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        n = (image // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = blocks if blocks is not None else nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, in_chans * patch * patch)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x))


# -- blocks around nn.MultiheadAttention -------------------------------------------------------

class MHABlock(nn.Module):
    """Pre-norm block whose self-attention is ``nn.MultiheadAttention`` (sequence-first (S, B, C)
    unless ``batch_first``)."""

    def __init__(self, dim, heads, batch_first, need_weights=False):
        super().__init__()
        self.need_weights = need_weights
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ViTMlp(dim, 2 * dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        return x + self.mlp(self.norm2(x))


class MHAModel(nn.Module):
    def __init__(self, dim=32, heads=2, depth=2, batch_first=True, in_dim=6, need_weights=False):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([MHABlock(dim, heads, batch_first, need_weights) for _ in range(depth)])
        self.out = nn.Linear(dim, in_dim)

    def forward(self, x):               # x: (B, N, in_dim)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)       # (N, B, C)
        for blk in self.blocks:
            h = blk(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.out(h)


# -- PixArt-alpha research-code-style DiT ---------------------------------------------------------

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def block_diagonal_mask(q_lens, kv_lens, kv_valid=None, device=None):
    """Dense emulation of xformers' ``BlockDiagonalMask.from_seqlens(q_lens, kv_lens)``: query i of
    segment b may attend key j only if j is in segment b (and ``kv_valid``, a flat bool, allows it)."""
    m = torch.block_diag(*[torch.ones(q, k, dtype=torch.bool, device=device) for q, k in zip(q_lens, kv_lens)])
    return m if kv_valid is None else m & kv_valid[None, :]


class PixArtSelfAttention(FusedQKVAttention):
    pass


class MergedBatchCrossAttention(nn.Module):
    """Queries of all samples as one sequence (1, B*N, H, d) over the keys of all samples (1, B*L, H, d),
    each sample's queries restricted to its own keys by a block-diagonal mask.

    ``layout="per-sample"`` computes the same attention the usual way ((B, H, N, d) queries, a key
    padding mask); ``"token-major"`` flattens the queries tokens-first (N*B rows, the mask's rows
    permuted to match): the same numbers, a layout whose rows cannot be gathered per sample."""

    def __init__(self, dim, heads, layout="merged"):
        super().__init__()
        self.heads, self.head_dim, self.layout = heads, dim // heads, layout
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond, mask=None):
        b, n, c = x.shape
        h, d, m = self.heads, self.head_dim, cond.shape[1]
        valid = None if mask is None else mask.reshape(-1).bool()
        if self.layout == "per-sample":
            q = self.q_linear(x).view(b, n, h, d).transpose(1, 2)
            k, v = self.kv_linear(cond).view(b, m, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            bias = None if valid is None else valid.view(b, 1, 1, m)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.proj(o.transpose(1, 2).reshape(b, n, c))
        kv = self.kv_linear(cond).view(1, -1, 2, h, d)
        k, v = kv.unbind(2)
        bias = block_diagonal_mask([n] * b, [m] * b, valid, device=x.device)
        if self.layout == "token-major":
            q = self.q_linear(x).transpose(0, 1).reshape(1, n * b, h, d)
            bias = bias.view(b, n, -1).transpose(0, 1).reshape(n * b, -1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
            return self.proj(o.transpose(1, 2).reshape(n, b, c).transpose(0, 1))
        q = self.q_linear(x).view(1, -1, h, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return self.proj(o.transpose(1, 2).reshape(b, -1, c))


class PixArtBlock(nn.Module):
    """adaLN-single: a per-block table plus the shared timestep projection gives shift/scale/gate."""

    def __init__(self, dim, heads, layout="merged"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = PixArtSelfAttention(dim, heads)
        self.cross_attn = MergedBatchCrossAttention(dim, heads, layout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = ViTMlp(dim, 2 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, mask=None):
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyPixArtAlpha(nn.Module):
    def __init__(self, image=8, patch=2, in_chans=4, dim=32, depth=2, heads=2, caption=12, layout="merged"):
        super().__init__()
        self.patch, self.in_chans = patch, in_chans
        self.x_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = nn.Sequential(nn.Linear(caption, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([PixArtBlock(dim, heads, layout) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(dim, patch * patch * in_chans)

    def forward(self, x, timestep, y, mask=None):
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        t = self.t_embedder(timestep_embedding(timestep, 64))
        t0 = self.t_block(t)
        y = self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, y, t0, mask)
        return self.final(self.final_norm(h))
