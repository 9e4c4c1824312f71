"""``forecast`` (TaylorSeer, ``forecast_order`` set): on a non-fresh step the whole branch output is
forecast from its divided-difference tables (``passes/taylor.py``) instead of reused; the tables
are refreshed whenever every token of the site is computed. Order 0 is reuse (FORA)."""

from __future__ import annotations

import torch

from ...analysis.sites import MIXING_KINDS
from ...errors import Refusal
from ..bindings import Buffer
from ..taylor import Taylor, can_forecast, tables
from . import Technique, register

aten = torch.ops.aten


class Forecast(Technique):
    name = "forecast"
    priority = 15
    stats_label = "forecast"

    def possible(self, site):
        return can_forecast(site) or Refusal("no-row-axes", f"site {site.name}: F has no separate batch and token "
                                             "axes to keep per-token offsets on")

    def applies(self, site, k, config) -> bool:
        if config.forecast_order is None or not can_forecast(site):
            return False
        return (site.kind in MIXING_KINDS and config.self_attention == "reuse") or k == 0

    def buffers(self, site, config):
        return tables(site, config) if config.forecast_order is not None and can_forecast(site) else []

    def on_refresh(self, p, site, f) -> None:
        if p.has(site, "t_upd"):
            Taylor(p, site, p.config).refresh_all(f)

    def rewrite(self, p, site) -> None:
        stale = p.state(Buffer(site.name, "stale"))
        p.b.call(aten.add_.Scalar, stale, 1)
        p.replace(site, Taylor(p, site, p.config).forecast())

    def tokens(self, site, k) -> int:
        return 0


register(Forecast())
