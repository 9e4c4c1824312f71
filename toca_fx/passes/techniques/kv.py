"""``partial_kv`` (``self_attention="partial-kv"``): the selected tokens recompute query, key and
value; their key/value rows are scattered into key/value caches that the selected queries attend
over, so every projection of the branch runs on k tokens."""

from __future__ import annotations

from ...errors import Refusal
from ..bindings import Buffer, StateSpec
from ..common import copy_region_on_k_tokens, static_shape
from . import Technique, needs_local, register


class PartialKV(Technique):
    name = "partial_kv"
    priority = 30
    stats_label = "partial"
    uses_k = True

    def possible(self, site):
        if not site.local:
            return needs_local(site)
        if site.kv is not None:
            return True
        return site.kv_refusal if site.kv_refusal is not None else Refusal("kv-none", "no key/value side")

    def applies(self, site, k, config) -> bool:
        return config.self_attention == "partial-kv" and site.local and site.kv is not None

    def buffers(self, site, config) -> list[StateSpec]:
        if config.self_attention != "partial-kv" or not site.local or site.kv is None:
            return []
        return [StateSpec(Buffer(site.name, f"kv{i}"), m) for i, m in enumerate(site.kv.values)]

    def rewrite(self, p, site) -> None:
        idx, k = p.select(site)
        gathered = p.gather(site.kv.region.boundary, idx, k, static_shape(site.stream_in)[0])
        after = {m: p.scatter_rows(p.state(Buffer(site.name, f"kv{i}")), idx, k, site, m)
                 for i, m in enumerate(site.kv.values)}
        cache = p.state(Buffer(site.name, "value"))
        f_k = copy_region_on_k_tokens(p.b, site, gathered, k, site.kv.region.nodes, after)
        p.replace(site, p.scatter_rows(cache, idx, k, site, site.value)(f_k))
        p.b.bump("partial_sites")


register(PartialKV())
