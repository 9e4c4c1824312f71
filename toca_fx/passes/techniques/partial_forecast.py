"""``partial_forecast`` (token-wise forecasting: ``forecast_order`` set and k > 0): the k selected
tokens compute the site's query-side region exactly and refresh their rows of the difference
tables (each token keeps its own last-update step); every other token is forecast from its rows.
With ``score="forecast-error"`` the tokens whose forecast leans most on extrapolation are picked."""

from __future__ import annotations

from ...errors import Refusal
from ..common import copy_region_on_k_tokens, static_shape
from ..taylor import Taylor, can_forecast
from . import Technique, needs_local, register


class PartialForecast(Technique):
    name = "partial_forecast"
    priority = 45
    stats_label = "partial"
    uses_k = True

    def possible(self, site):
        if not site.local:
            return needs_local(site)
        return can_forecast(site) or Refusal("no-row-axes", f"site {site.name}: no separate batch and token axes")

    def applies(self, site, k, config) -> bool:
        return config.forecast_order is not None and site.local and can_forecast(site)

    def rewrite(self, p, site) -> None:
        taylor = Taylor(p, site, p.config)
        score = taylor.error_score() if p.config.score == "forecast-error" else None
        idx, k = p.select(site, score)
        gathered = p.gather(site.region.boundary, idx, k, static_shape(site.stream_in)[0])
        f_k = copy_region_on_k_tokens(p.b, site, gathered, k, site.region.nodes)
        taylor.refresh_rows(f_k, idx, k)
        p.replace(site, taylor.forecast())
        p.b.bump("partial_sites")


register(PartialForecast())
