"""The partial-step pass: one variant graph for one set of per-site techniques.

The pass copies the captured graph and hands every cacheable site to its technique
(``passes/techniques/``), which rewrites the site's F: read it from the cache (reuse), recompute k
selected tokens and scatter them into the cache (partial, partial-kv, the MLP half of a parallel
block), or compute it in full. What the techniques share — the selection, gathers, scatters, cache
reads with the cache dtype — is ``PartialPass``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.axes import External
from ..analysis.sites import BlockAnalysis, Site
from ..errors import ToCaError
from .bindings import Buffer, ScoreInput, StateInput, StateSpec, TokenCount
from .common import GraphBuilder, VariantGraph, static_shape
from .select import emit_select
from .techniques import TECHNIQUES

aten = torch.ops.aten


@dataclass(frozen=True)
class SelectSettings:
    """Constants of the token selection (``passes/select.py``) baked into a partial variant."""

    paired: bool                  # the CFG halves of the batch select the same tokens
    stale_weight: float
    inv_interval: float
    bonus: float
    grid: int


class PartialPass:
    """What a technique's ``rewrite`` (and ``on_refresh``) works with: the graph builder, the config,
    and the shared token surgery. The fresh pass uses one too (without selection settings)."""

    def __init__(self, b: GraphBuilder, analysis: BlockAnalysis, specs: dict[str, list[StateSpec]],
                 select: SelectSettings | None, cache_dtype: torch.dtype | None, config):
        self.b = b
        self.analysis = analysis
        self.specs = specs
        self.settings = select
        self.cache_dtype = cache_dtype
        self.config = config
        self._score: dict[int, fx.Node] = {}

    def has(self, site: Site, name: str) -> bool:
        """Whether the site keeps a buffer of this name (declared by some technique's ``buffers``)."""
        return any(s.buffer.name == name for s in self.specs.get(site.name, ()))

    # -- inputs ---------------------------------------------------------------------------------
    def state(self, buffer: Buffer) -> fx.Node:
        return self.b.input(StateInput(buffer), f"cache_{buffer.label}" if buffer.name != "stale" else f"stale_{buffer.site}")

    def value(self, site: Site) -> fx.Node:
        """The site's F in the graph copy."""
        return self.b.env[site.value]

    def read(self, cache: fx.Node, like: fx.Node) -> fx.Node:
        """A cache read in the graph's dtype (a cast when the cache is stored in another)."""
        dtype = like.meta["val"].dtype
        if self.cache_dtype is not None and self.cache_dtype != dtype:
            return self.b.call(aten._to_copy.default, cache, dtype=dtype)
        return cache

    def replace(self, site: Site, new: fx.Node) -> None:
        """Every reader of F reads ``new`` instead."""
        fv = self.value(site)
        for u in list(fv.users):
            u.replace_input_with(fv, new)

    # -- token selection and surgery ------------------------------------------------------------
    def select(self, site: Site, score: fx.Node | None = None) -> tuple[fx.Node, fx.Node]:
        """(idx, k): the token selection (``passes/select.py``) on the stream's base score (or
        ``score``, a (B, N) node the technique computed) and the site's staleness."""
        stream = site.stream
        if score is None:
            if stream not in self._score:
                self._score[stream] = self.b.input(ScoreInput(stream), "score" if stream == 0 else f"score_s{stream}")
            score = self._score[stream]
        stale = self.state(Buffer(site.name, "stale"))
        k = self.b.input(TokenCount(site.name), f"k_{site.name}")
        idx = emit_select(self.b, score, stale, k, self.settings, self.analysis.stream_tokens(stream))
        return idx, k

    def gather(self, boundary: dict, idx: fx.Node, k: fx.Node, batch: int) -> dict:
        """Gather every boundary input of a region on the selected tokens: {copy of node: rows}."""
        b = self.b
        return {b.env[n]: b.gather_external(b.env[n], idx, k, ax, static_shape(n), batch) if isinstance(ax, External)
                else b.gather_tokens(b.env[n], idx, k, ax, static_shape(n))
                for n, ax in boundary.items()}

    def scatter_rows(self, cache: fx.Node, idx, k, site: Site, node: fx.Node):
        """``rows -> whole tensor``: write k recomputed rows of ``node`` into its cache and read the
        whole cache back in the graph's dtype."""
        b, dtype, cache_dtype = self.b, node.meta["val"].dtype, self.cache_dtype
        ax, full_shape = site.region_axes[node], static_shape(node)

        def fill(rows):
            cast = cache_dtype is not None and cache_dtype != dtype
            if cast:
                rows = b.call(aten._to_copy.default, rows, dtype=cache_dtype)
            full = b.scatter_tokens_(cache, idx, k, ax, rows, full_shape)
            return b.call(aten._to_copy.default, full, dtype=dtype) if cast else full
        return fill


def build_partial(gm, analysis: BlockAnalysis, actions: dict[str, str], specs: dict[str, list[StateSpec]],
                  select: SelectSettings, config, cache_dtype: torch.dtype | None = None, key: tuple | None = None,
                  block: str | None = None) -> VariantGraph:
    """Rewrite ``gm`` for one partial step; ``actions[site]`` names the site's technique.

    Example::

        v = build_partial(capture.gm, analysis, {"self_attn0": "reuse", "mlp0": "partial"}, specs,
                          SelectSettings(paired=True, stale_weight=0.25, inv_interval=1/3, bonus=0.6, grid=2), config)
        v.inputs    # (StateInput(Buffer('self_attn0', 'value')), StateInput(Buffer('self_attn0', 'stale')),
                    #  StateInput(Buffer('mlp0', 'value')), ScoreInput(0), StateInput(Buffer('mlp0', 'stale')),
                    #  TokenCount('mlp0'))
    """
    p = PartialPass(GraphBuilder(gm.graph), analysis, specs, select, cache_dtype, config)
    for s in analysis.sites:
        if not s.cacheable:
            continue
        tech = TECHNIQUES[actions.get(s.name, "compute")]
        refusal = tech.possible(s)
        if not refusal:
            raise ToCaError(f"technique {tech.name!r} is not possible for site {s.name}: {refusal}",
                            block=block, node=s.value.name)
        with p.b.graph.inserting_before(p.value(s)):
            tech.rewrite(p, s)
    return p.b.finish("ToCaPartial", actions, key)
