"""Property test: random DiT-like models (hand-written, so every combination exists) stay exact."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import toca_fx

EXACT = dict(interval=2, fresh_ratio=1.0, ratio_schedule="constant", self_attention="partial")


class Attn(nn.Module):
    def __init__(self, d, heads, kv_dim=None):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(kv_dim or d, d)
        self.v = nn.Linear(kv_dim or d, d)
        self.o = nn.Linear(d, d)
        self.h = heads

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.h, -1).transpose(1, 2)
        k = self.k(ctx).view(b, ctx.shape[1], self.h, -1).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], self.h, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d, heads, gated, glu, cross, ctx_dim, cond_dim):
        super().__init__()
        self.gated, self.glu, self.cross = gated, glu, cross
        self.n1 = nn.LayerNorm(d, elementwise_affine=not gated)
        self.attn = Attn(d, heads)
        if gated:
            self.ada = nn.Linear(cond_dim, 6 * d)
        if cross:
            self.n2 = nn.LayerNorm(d)
            self.xattn = Attn(d, heads, ctx_dim)
        self.n3 = nn.LayerNorm(d, elementwise_affine=not gated)
        hidden = 2 * d
        self.fc1 = nn.Linear(d, 2 * hidden if glu else hidden)
        self.fc2 = nn.Linear(hidden, d)

    def mlp(self, h):
        if self.glu:
            a, b = self.fc1(h).chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def forward(self, x, c, ctx=None):
        h = self.n1(x)
        if self.gated:
            s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
            h = h * (1 + sc1[:, None]) + s1[:, None]
        a = self.attn(h)
        x = x + (g1[:, None] * a if self.gated else a)
        if self.cross:
            x = x + self.xattn(self.n2(x), ctx)
        h = self.n3(x)
        if self.gated:
            h = h * (1 + sc2[:, None]) + s2[:, None]
        m = self.mlp(h)
        return x + (g2[:, None] * m if self.gated else m)


class Model(nn.Module):
    def __init__(self, depth, **kw):
        super().__init__()
        self.cond_dim = kw["cond_dim"]
        self.t_embed = nn.Linear(self.cond_dim, self.cond_dim)
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(depth))

    def forward(self, x, timestep, ctx=None):
        half = self.cond_dim // 2
        f = torch.exp(-math.log(1000) * torch.arange(half) / half)
        c = self.t_embed(torch.cat([torch.sin(timestep[:, None] * f), torch.cos(timestep[:, None] * f)], -1))
        for blk in self.blocks:
            x = blk(x, c, ctx)
        return x


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 3),
       gated=st.booleans(), glu=st.booleans(), cross=st.booleans(), tokens=st.sampled_from([4, 9, 16, 12]),
       batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_random_dit_like_models_stay_exact(heads, head_dim, depth, gated, glu, cross, tokens, batch, seed):
    torch.manual_seed(seed)
    d = heads * head_dim
    model = Model(depth, d=d, heads=heads, gated=gated, glu=glu, cross=cross, ctx_dim=6, cond_dim=8).eval()
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, 3, 6, generator=g) if cross else None

    def inputs(step):
        x = torch.randn(batch, tokens, d, generator=torch.Generator().manual_seed(seed + step))
        return dict(x=x, timestep=torch.full((batch,), 900.0 - 100 * step), ctx=ctx)

    for overrides in (dict(interval=1), EXACT):
        m = copy.deepcopy(model)
        toca_fx.transform(m, **overrides)
        with torch.no_grad():
            for step in range(3):
                out, ref = m(**inputs(step)), model(**inputs(step))
                assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
        (e,) = toca_fx.explain(m).programs
        assert [s.kind for s in e.sites] == ["self_attn"] + (["cross_attn"] if cross else []) + ["mlp"]
        assert all(s.local for s in e.sites)
        assert toca_fx.stats(m).calls == ({"fresh": 3} if overrides.get("interval") == 1 else {"fresh": 2, "partial": 1})
