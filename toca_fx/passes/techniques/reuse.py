"""``reuse``: F read from the cache, nothing computed (FORA; ToCa's self-attention on partial steps).

The site's staleness counters grow by one (in the graph), so a later token-wise step ranks the
tokens of a reused branch as one call staler.
"""

from __future__ import annotations

import torch

from ...analysis.sites import MIXING_KINDS
from ..bindings import Buffer
from . import Technique, register

aten = torch.ops.aten


class Reuse(Technique):
    name = "reuse"
    priority = 20
    stats_label = "reuse"

    def applies(self, site, k, config) -> bool:
        # token-mixing branches are reused whole (ToCa: partial-token attention propagates error)
        return (site.kind in MIXING_KINDS and config.self_attention == "reuse") or k == 0

    def rewrite(self, p, site) -> None:
        cache = p.state(Buffer(site.name, "value"))
        stale = p.state(Buffer(site.name, "stale"))
        p.b.call(aten.add_.Scalar, stale, 1)
        p.replace(site, p.read(cache, site.value))
        p.b.bump("reused_sites")

    def tokens(self, site, k) -> int:
        return 0


register(Reuse())
