"""The fresh-step pass: the original computation, plus every cacheable site's state and the score
ingredient as extra outputs; staleness counters are zeroed and techniques' own tables refreshed
(``Technique.on_refresh``: TaylorSeer's differences) in the graph."""

from __future__ import annotations

import torch

from ..analysis.sites import BlockAnalysis
from .bindings import Buffer, ScoreOutput, StateOutput, StateSpec
from .common import GraphBuilder, VariantGraph
from .partial import PartialPass
from .scores import ScorePlan
from .techniques import refresh

aten = torch.ops.aten


def build_fresh(gm, analysis: BlockAnalysis, specs: dict[str, list[StateSpec]], score: ScorePlan, config,
                cache_dtype: torch.dtype | None = None) -> tuple[VariantGraph, bool]:
    """Original graph + outputs: each cacheable site's buffers (``specs``: F first, then whatever its
    techniques need, e.g. key/value inputs for ``partial-kv``), then the score ingredient.

    Returns (variant, whether the ingredient could be added).

    Example::

        v, ok = build_fresh(capture.gm, analysis, specs, plan, config)
        v.outputs   # (StateOutput(Buffer('self_attn0', 'value')), StateOutput(Buffer('mlp0', 'value')),
                    #  ScoreOutput('received'))
    """
    b = GraphBuilder(gm.graph)
    p = PartialPass(b, analysis, specs, None, cache_dtype, config)
    actions = {}
    for s in analysis.sites:
        if not s.cacheable:
            actions[s.name] = "compute"
            continue
        for spec in specs[s.name]:
            if spec.is_filled:
                b.output(StateOutput(spec.buffer), b.env[spec.node])
        b.call(aten.zero_.default, p.state(Buffer(s.name, "stale")))
        refresh(p, s, b.env[s.value])
        actions[s.name] = "fresh"
    added = False
    if score.ingredient is not None:
        node = score.ingredient.add(b, score.site)
        if node is not None:
            b.output(ScoreOutput(score.ingredient.name), node)
            added = True
    return b.finish("ToCaFresh", actions), added
