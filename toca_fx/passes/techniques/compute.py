"""``compute``: a site that may not be cached runs as captured (F escapes its residual add)."""

from __future__ import annotations

from . import Technique, register


class Compute(Technique):
    name = "compute"
    priority = 0
    stats_label = "compute"

    def applies(self, site, k, config) -> bool:
        return not site.cacheable

    def rewrite(self, p, site) -> None:
        pass


register(Compute())
