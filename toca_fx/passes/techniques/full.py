"""``full``: F computed for every token, as captured, and written into the caches (a branch that is
cacheable but not token-local, e.g. a token-mixing MLP, on a partial step)."""

from __future__ import annotations

import torch

from ..bindings import Buffer
from . import Technique, refresh, register

aten = torch.ops.aten


class Full(Technique):
    name = "full"
    priority = 40
    stats_label = "full"

    def applies(self, site, k, config) -> bool:
        return not site.local

    def rewrite(self, p, site) -> None:
        # the caches stay current, as on a fresh step: every filled buffer refilled, staleness
        # zeroed, techniques' own tables refreshed
        for spec in p.specs[site.name]:
            if spec.is_filled:
                p.b.write(p.state(spec.buffer), p.b.env[spec.node])
        p.b.call(aten.zero_.default, p.state(Buffer(site.name, "stale")))
        # the refreshes read F: insert them after it, before its first reader
        fv = p.value(site)
        order = {n: i for i, n in enumerate(p.b.graph.nodes)}
        with p.b.graph.inserting_before(min(fv.users, key=order.__getitem__)):
            refresh(p, site, fv)


register(Full())
