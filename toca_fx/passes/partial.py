"""Partial variant: per site, reuse the cache, recompute k selected tokens, or compute in full.

For a ``partial`` site: ``idx = toca_fx.select_tokens(score, stale, k)``; gather the boundary
inputs of the site's token-local region on ``idx``; run the region on k tokens; scatter the rows
into the site's cache; every reader of F reads the whole cache. Key/value projections of
self-attention stay outside the region and run on all tokens (queries attend over every key),
except for ``partial_kv``: the selected tokens recompute their keys/values too, which are
scattered into key/value caches that the selected queries attend over.
"""

from __future__ import annotations

import torch

from ..analysis.axes import External
from ..analysis.sites import BlockAnalysis
from ..runtime import ops  # noqa: F401  (registers toca_fx::select_tokens)
from .common import GraphBuilder, VariantGraph, copy_region_on_k_tokens, static_shape

aten = torch.ops.aten


def build_partial(gm, analysis: BlockAnalysis, actions: dict[str, str], *, cfg: bool,
                  stale_weight: float, inv_interval: float, bonus: float, grid: int,
                  cache_dtype: torch.dtype | None = None) -> VariantGraph:
    """Rewrite ``gm`` for one partial step; ``actions[site]`` is reuse | partial | full | compute.

    Example::

        v = build_partial(capture.gm, analysis, {"self_attn0": "reuse", "mlp0": "partial"},
                          cfg=True, stale_weight=0.25, inv_interval=1/3, bonus=0.6, grid=2)
        v.extra_inputs   # [('cache', 'self_attn0'), ('cache', 'mlp0'), ('score', '0'), ('stale', 'mlp0'), ('k', 'mlp0')]
    """
    b = GraphBuilder(gm.graph)
    score_ph: dict[int, object] = {}     # stream -> its base score input (B, N_stream)
    for s in analysis.sites:
        act = actions.get(s.name, "compute")
        if act in ("compute",) or not s.cacheable:
            continue
        fv = b.env[s.value]
        if act == "full":
            b.add_output("value", s.name, fv)
            for i, a in enumerate(s.attn_values):
                b.add_output("value", f"{s.name}__attn{i}", b.env[a])
            continue
        cache = b.add_input("cache", s.name, f"cache_{s.name}")
        f_dtype = s.value.meta["val"].dtype
        cast = cache_dtype is not None and cache_dtype != f_dtype
        if act == "reuse":
            if cast:
                with b.graph.inserting_before(fv):
                    read = b.call(aten._to_copy.default, cache, dtype=f_dtype)
            else:
                read = cache
            fv.replace_all_uses_with(read)
            b.bump("reused_sites")
            continue
        if act not in ("partial", "partial_mlp", "partial_kv") or not s.local \
                or (act == "partial_mlp" and not s.mlp_region) or (act == "partial_kv" and not s.kv_values):
            raise ValueError(f"site {s.name}: action {act!r} is not possible ({s.reason})")
        if s.stream not in score_ph:
            score_ph[s.stream] = b.add_input("score", str(s.stream), "score" if s.stream == 0 else f"score_s{s.stream}")
        stale = b.add_input("stale", s.name, f"stale_{s.name}")
        k = b.add_input("k", s.name, f"k_{s.name}")
        with b.graph.inserting_before(fv):
            idx = b.call(torch.ops.toca_fx.select_tokens.default, score_ph[s.stream], stale, k,
                         float(stale_weight), float(inv_interval), float(bonus), int(grid), bool(cfg))
            batch = static_shape(s.stream_in)[0]
            boundary, region = {"partial_mlp": (s.mlp_boundary, s.mlp_region),
                                "partial_kv": (s.kv_boundary, s.kv_region)}.get(act, (s.boundary, s.region))
            gathered = {b.env[n]: b.gather_external(b.env[n], idx, k, ax, static_shape(n), batch) if isinstance(ax, External)
                        else b.gather_tokens(b.env[n], idx, k, ax, static_shape(n))
                        for n, ax in boundary.items()}
            if act == "partial_mlp":
                # attention rows come from the attention cache, gathered like any boundary input
                for i, a in enumerate(s.attn_values):
                    sub = b.add_input("cache", f"{s.name}__attn{i}", f"cache_{s.name}__attn{i}")
                    with b.graph.inserting_before(fv):
                        rows = b.gather_tokens(sub, idx, k, s.region_axes[a], static_shape(a))
                        if cache_dtype is not None and cache_dtype != a.meta["val"].dtype:
                            rows = b.call(aten._to_copy.default, rows, dtype=a.meta["val"].dtype)
                        gathered[b.env[a]] = rows
            after = {}
            if act == "partial_kv":
                for i, m in enumerate(s.kv_values):
                    sub = b.add_input("cache", f"{s.name}__kv{i}", f"cache_{s.name}__kv{i}")
                    after[m] = _scatter_rows(b, sub, idx, k, s.region_axes[m], static_shape(m),
                                             m.meta["val"].dtype, cache_dtype)
            f_k = copy_region_on_k_tokens(b, s, gathered, k, region, after)
            full = _scatter_rows(b, cache, idx, k, s.region_axes[s.value], static_shape(s.value), f_dtype,
                                 cache_dtype)(f_k)
        users = [u for u in fv.users]
        for u in users:
            u.replace_input_with(fv, full)
        b.bump("partial_sites")
    return b.finish("ToCaPartial", actions)


def _scatter_rows(b: GraphBuilder, cache, idx, k, ax, full_shape, dtype, cache_dtype):
    """``rows -> whole tensor``: write k recomputed rows into a cache (F's, or a key/value input's)
    and read the whole cache back in the graph's dtype (casting when the cache is stored in another)."""
    def fill(rows):
        cast = cache_dtype is not None and cache_dtype != dtype
        if cast:
            rows = b.call(aten._to_copy.default, rows, dtype=cache_dtype)
        full = b.scatter_tokens_(cache, idx, k, ax, rows, full_shape)
        return b.call(aten._to_copy.default, full, dtype=dtype) if cast else full
    return fill
