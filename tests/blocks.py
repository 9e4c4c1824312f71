"""Hand-written blocks for the cases diffusers does not have (negative cases)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then x + fc(norm(x)); ``scale``, a Python number, multiplies the attention
    branch when given (as diffusers' blocks take a LoRA ``scale``)."""

    def __init__(self, d=8):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=None):
        a = self.attn(self.n1(x))
        x = x + (a if scale is None else a * scale)
        return x + self.fc(self.n2(x))


class EscapingBlock(nn.Module):
    """The MLP output is also returned: it escapes the residual add, so it must not be cached."""

    def __init__(self, d):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        h = self.mlp(self.n2(x))
        return x + h, h


class MixerBlock(nn.Module):
    """Attention plus a token-mixing MLP (a linear over the token axis, as in MLP-Mixer)."""

    def __init__(self, d, n):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.token_mix = nn.Linear(n, n)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.token_mix(self.n2(x).transpose(1, 2)).transpose(1, 2)


class MLPOnlyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.n(x))


class Stack(nn.Module):
    def __init__(self, blocks, takes_tuple=False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.takes_tuple = takes_tuple

    def forward(self, x, timestep=None):
        for b in self.blocks:
            x = b(x)
            if isinstance(x, tuple):
                x = x[0]
        return x
