"""``partial_mlp``: ToCa's scheme for parallel blocks (FLUX single blocks). The attention half is
reused: its output rows are gathered from an attention cache filled at fresh steps; the MLP half
and the shared output projection are recomputed for the selected tokens."""

from __future__ import annotations

from ...errors import Refusal
from ..bindings import Buffer, StateSpec
from ..common import copy_region_on_k_tokens, static_shape
from . import Technique, register


class PartialMLP(Technique):
    name = "partial_mlp"
    priority = 10
    stats_label = "partial"
    uses_k = True

    def possible(self, site):
        return site.parallel is not None or Refusal("no-mlp-half", f"site {site.name} has no MLP half")

    def applies(self, site, k, config) -> bool:
        return (site.kind == "parallel" and site.parallel is not None and config.self_attention == "reuse" and k > 0
                and config.forecast_order is None)

    def buffers(self, site, config) -> list[StateSpec]:
        if site.parallel is None or config.self_attention != "reuse" or config.forecast_order is not None:
            return []
        return [StateSpec(Buffer(site.name, f"attn{i}"), a) for i, a in enumerate(site.parallel.attn_values)]

    def rewrite(self, p, site) -> None:
        b = p.b
        idx, k = p.select(site)
        gathered = p.gather(site.parallel.region.boundary, idx, k, static_shape(site.stream_in)[0])
        for i, a in enumerate(site.parallel.attn_values):
            sub = p.state(Buffer(site.name, f"attn{i}"))
            rows = b.gather_tokens(sub, idx, k, site.region_axes[a], static_shape(a))
            gathered[b.env[a]] = p.read(rows, a)
        cache = p.state(Buffer(site.name, "value"))
        f_k = copy_region_on_k_tokens(b, site, gathered, k, site.parallel.region.nodes)
        p.replace(site, p.scatter_rows(cache, idx, k, site, site.value)(f_k))
        p.b.bump("partial_sites")


register(PartialMLP())
