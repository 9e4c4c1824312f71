"""``partial``: ToCa's token-wise step. The k selected tokens recompute the site's query-side
region (the keys/values of an attention are computed for all tokens); their rows are scattered
into F's cache, and every reader of F reads the whole cache.

k == N goes through the same gather/compute/scatter path: exactness at r = 1 then proves the
partial machinery, not a shortcut around it.
"""

from __future__ import annotations

from ..bindings import Buffer
from ..common import copy_region_on_k_tokens, static_shape
from . import Technique, needs_local, register


class Partial(Technique):
    name = "partial"
    priority = 50
    stats_label = "partial"
    uses_k = True

    def possible(self, site):
        return needs_local(site)

    def applies(self, site, k, config) -> bool:
        return site.local

    def rewrite(self, p, site) -> None:
        idx, k = p.select(site)
        gathered = p.gather(site.region.boundary, idx, k, static_shape(site.stream_in)[0])
        cache = p.state(Buffer(site.name, "value"))
        f_k = copy_region_on_k_tokens(p.b, site, gathered, k, site.region.nodes)
        p.replace(site, p.scatter_rows(cache, idx, k, site, site.value)(f_k))
        p.b.bump("partial_sites")


register(Partial())
