"""Fresh variant: the original computation, plus each site's value and the score ingredients."""

from __future__ import annotations

from ..analysis.sites import BlockAnalysis
from .common import GraphBuilder, VariantGraph
from .scores import add_cross_map, add_norm, add_received_attention


def score_source(analysis: BlockAnalysis, score: str):
    """(ingredient, site) the configured score needs from a fresh step, or (None, None)."""
    by_kind = {}
    for s in analysis.sites:
        if s.attention is not None and s.stream == 0:
            by_kind.setdefault(s.kind, s)
    if score == "toca":
        if "cross_attn" in by_kind:
            return "cross_map", by_kind["cross_attn"]
        for kind in ("self_attn", "parallel"):
            if kind in by_kind:
                return "received", by_kind[kind]
        if "joint_attn" in by_kind and by_kind["joint_attn"].key_segment is not None:
            return "received", by_kind["joint_attn"]
    elif score in ("v-norm", "k-norm"):
        src = by_kind.get("self_attn") or by_kind.get("parallel") or by_kind.get("joint_attn")
        if src is not None and (src.kind == "self_attn" or src.key_segment is not None):
            return score[0] + "norm", src
    return None, None


def build_fresh(gm, analysis: BlockAnalysis, score: str, kv: bool = False) -> VariantGraph:
    """Original graph + outputs: every cacheable site's F (and, with ``kv``, the key/value inputs of
    its attention, for ``self_attention="partial-kv"``), then the score ingredient (if any).

    Example::

        v = build_fresh(capture.gm, analysis, "toca")
        v.extra_outputs   # [('value', 'self_attn0'), ('value', 'mlp0'), ('received', None)]
    """
    b = GraphBuilder(gm.graph)
    actions = {}
    for s in analysis.sites:
        if s.cacheable:
            b.add_output("value", s.name, b.env[s.value])
            for i, a in enumerate(s.attn_values):
                b.add_output("value", f"{s.name}__attn{i}", b.env[a])
            if kv and s.local:
                for i, m in enumerate(s.kv_values):
                    b.add_output("value", f"{s.name}__kv{i}", b.env[m])
            actions[s.name] = "fresh"
        else:
            actions[s.name] = "compute"
    what, site = score_source(analysis, score)
    if what == "received":
        add_received_attention(b, site.attention, site.key_segment)
    elif what == "cross_map":
        add_cross_map(b, site.attention)
    elif what in ("knorm", "vnorm"):
        add_norm(b, site.attention, what[0], site.key_segment)
    return b.finish("ToCaFresh", actions)
