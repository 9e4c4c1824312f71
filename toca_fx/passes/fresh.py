"""The fresh-step pass: the original computation, plus every cacheable site's state written into its
buffers in place and the score ingredient as an extra output; staleness counters are zeroed and
techniques' own tables refreshed (``Technique.on_refresh``: TaylorSeer's differences) in the graph."""

from __future__ import annotations

import torch

from ..analysis.sites import BlockAnalysis
from .bindings import Buffer, ScoreOutput, StateSpec
from .common import GraphBuilder, VariantGraph
from .partial import PartialPass
from .scores import ScorePlan
from .techniques import refresh

aten = torch.ops.aten


def build_fresh(gm, analysis: BlockAnalysis, specs: dict[str, list[StateSpec]], score: ScorePlan, config,
                cache_dtype: torch.dtype | None = None) -> tuple[VariantGraph, bool]:
    """Original graph + in-place writes of each cacheable site's buffers (``specs``: F first, then
    whatever its techniques need, e.g. key/value inputs for ``partial-kv``) + the score ingredient
    as an output.

    Returns (variant, whether the ingredient could be added).

    Example::

        v, ok = build_fresh(capture.gm, analysis, specs, plan, config)
        v.outputs   # (ScoreOutput('received'),)
        v.inputs    # (StateInput(Buffer('self_attn0', 'value')), StateInput(Buffer('self_attn0', 'stale')), ...)
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
                b.write(p.state(spec.buffer), b.env[spec.node])
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
