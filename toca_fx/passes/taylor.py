"""TaylorSeer's arithmetic as graph nodes: divided-difference tables per token, and the forecast.

A site that forecasts keeps m + 1 tables shaped like F: ``D_0`` (the site's ``value`` buffer: F
when it was last computed) and ``d1`` .. ``dm``, plus two per-token counters: ``t_upd``, the step
variable s at which each token's row was last computed, and ``n_upd``, how many times it was.
When a token's F is computed at s (every token on a fresh step, the selected tokens on a
token-wise step), its rows are refreshed:

    D_0 <- F,   D_{i+1} <- (D_i(new) - D_i(old)) / (s - t_upd)     for i < min(m, n_upd)

(the usable order grows by one per update, as in TaylorSeer's code) and the forecast at s is

    F(s) ~ sum_i D_i (s - t_upd)^i / i!       over the orders the token has.

Because the offsets are per token, a token recomputed on a partial step forecasts from its own
last update, and a row just written forecasts exactly its new value (offset 0).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..analysis.axes import Axes
from ..analysis.sites import Site
from .bindings import Buffer, StateSpec, StepInput

aten = torch.ops.aten


def orders(config) -> int:
    return int(config.forecast_order or 0)


def can_forecast(site: Site) -> bool:
    """Per-token offsets broadcast along F's separate batch and token axes."""
    ax = site.axes
    return ax.batch is not None and ax.merged is None


def tables(site: Site, config) -> list[StateSpec]:
    """The buffers of a forecasting site beyond F itself (F is ``D_0``)."""
    m = orders(config)
    return ([StateSpec(Buffer(site.name, f"d{i}"), site.value, filled=False) for i in range(1, m + 1)]
            + [StateSpec(Buffer(site.name, "t_upd"), None, site.n_tokens),
               StateSpec(Buffer(site.name, "n_upd"), None, site.n_tokens)])


def per_token(b, t: fx.Node, ax: Axes, ndim: int) -> fx.Node:
    """A (B, N) tensor with singleton axes inserted to broadcast against a tensor with axes ``ax``."""
    if ax.batch > ax.token:
        t = b.call(aten.t.default, t)
    lo, hi = sorted((ax.batch, ax.token))
    out = t
    for _ in range(lo):
        out = b.call(aten.unsqueeze.default, out, 0)
    for _ in range(hi - lo - 1):
        out = b.call(aten.unsqueeze.default, out, lo + 1)
    for _ in range(ndim - hi - 1):
        out = b.call(aten.unsqueeze.default, out, -1)
    return out


class Taylor:
    """Graph builders for one site's tables, rows or all tokens (``p`` is a pass with ``b``/``state``/``read``)."""

    def __init__(self, p, site: Site, config):
        self.p, self.b, self.site, self.m = p, p.b, site, orders(config)
        self.s = p.b.input(StepInput(), "step_value")

    def _table(self, i: int) -> fx.Node:
        return self.p.state(Buffer(self.site.name, "value" if i == 0 else f"d{i}"))

    def _counters(self):
        return self.p.state(Buffer(self.site.name, "t_upd")), self.p.state(Buffer(self.site.name, "n_upd"))

    def _chain(self, f: fx.Node, old: list, dt: fx.Node, n: fx.Node, ax: Axes, ndim: int, dtype) -> list:
        """New tables from F and the old tables (all in F's dtype), for rows with offsets dt and counts n."""
        b = self.b
        new = [f]
        if self.m == 0:
            return new
        safe_dt = b.call(aten.where.self, b.call(aten.eq.Scalar, dt, 0.0), b.call(aten.ones_like.default, dt), dt)
        inv = per_token(b, b.call(aten.reciprocal.default, safe_dt), ax, ndim)
        for i in range(self.m):
            valid = per_token(b, b.call(aten._to_copy.default, b.call(aten.gt.Scalar, n, float(i)), dtype=dtype), ax, ndim)
            diff = b.call(aten.sub.Tensor, new[i], old[i])
            new.append(b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, diff, b.call(aten._to_copy.default, inv, dtype=dtype)),
                              valid))
        return new

    def refresh_all(self, f: fx.Node) -> None:
        """Every token of F was computed at s: new tables (D_0 is written by the caller's value output)."""
        b, site = self.b, self.site
        like = site.value
        dtype, ndim = like.meta["val"].dtype, len(like.meta["val"].shape)
        t_upd, n_upd = self._counters()
        dt = b.call(aten.sub.Tensor, self.s, t_upd)
        old = [self.p.read(self._table(i), like) for i in range(self.m + 1)]
        new = self._chain(f, old, dt, n_upd, site.axes, ndim, dtype)
        for i in range(1, self.m + 1):
            b.call(aten.copy_.default, self._table(i), new[i])
        b.call(aten.copy_.default, t_upd, b.call(aten.expand_as.default, self.s, t_upd))
        b.call(aten.add_.Scalar, n_upd, 1)
        b.bump("taylor_refreshes")

    def refresh_rows(self, rows: fx.Node, idx: fx.Node, k: fx.Node) -> None:
        """The selected tokens' F (``rows``, k tokens) was computed at s: refresh their table rows."""
        b, site, p = self.b, self.site, self.p
        like = site.value
        dtype = like.meta["val"].dtype
        ndim = len(like.meta["val"].shape)
        ax = site.region_axes[like]
        full_shape = tuple(like.meta["val"].shape)
        t_upd, n_upd = self._counters()
        t_rows = b.call(aten.gather.default, t_upd, 1, idx)
        n_rows = b.call(aten.gather.default, n_upd, 1, idx)
        dt = b.call(aten.sub.Tensor, self.s, t_rows)
        old = [p.read(b.gather_tokens(self._table(i), idx, k, ax, full_shape), like) for i in range(self.m + 1)]
        new = self._chain(rows, old, dt, n_rows, ax, ndim, dtype)
        cast = p.cache_dtype is not None and p.cache_dtype != dtype
        for i in range(self.m + 1):
            r = b.call(aten._to_copy.default, new[i], dtype=p.cache_dtype) if cast else new[i]
            b.scatter_tokens_(self._table(i), idx, k, ax, r, full_shape)
        b.call(aten.scatter_.src, t_upd, 1, idx, b.call(aten.expand_as.default, self.s, t_rows))
        b.call(aten.scatter_.src, n_upd, 1, idx, b.call(aten.add.Scalar, n_rows, 1))
        b.bump("taylor_row_refreshes")

    def forecast(self) -> fx.Node:
        """F at s for every token: sum_i D_i (s - t_upd)^i / i! over each token's orders."""
        b, site = self.b, self.site
        like = site.value
        dtype, ndim = like.meta["val"].dtype, len(like.meta["val"].shape)
        out = self.p.read(self._table(0), like)
        if self.m == 0:
            return out
        t_upd, n_upd = self._counters()
        x = b.call(aten.sub.Tensor, self.s, t_upd)
        power = x
        for i in range(1, self.m + 1):
            valid = b.call(aten._to_copy.default, b.call(aten.gt.Scalar, n_upd, float(i)), dtype=torch.float32)
            coef = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, power, 1.0 / math.factorial(i)), valid)
            coef = per_token(b, b.call(aten._to_copy.default, coef, dtype=dtype), site.axes, ndim)
            out = b.call(aten.add.Tensor, out, b.call(aten.mul.Tensor, self.p.read(self._table(i), like), coef))
            if i < self.m:
                power = b.call(aten.mul.Tensor, power, x)
        b.bump("forecast_sites")
        return out

    def error_score(self) -> fx.Node:
        """Per token, the size of the forecast's last term: |D_m| (s - t_upd)^m / m! (B, N)."""
        b, site = self.b, self.site
        like = site.value
        ax = site.axes
        d = b.call(aten._to_copy.default, self.p.read(self._table(self.m), like), dtype=torch.float32)
        dims = [a for a in range(len(like.meta["val"].shape)) if a not in (ax.batch, ax.token)]
        nrm = b.call(aten.linalg_vector_norm.default, d, 2, dims, False)
        if ax.batch > ax.token:
            nrm = b.call(aten.t.default, nrm)
        t_upd, _ = self._counters()
        x = b.call(aten.abs.default, b.call(aten.sub.Tensor, self.s, t_upd))
        return b.call(aten.mul.Tensor, nrm, b.call(aten.pow.Tensor_Scalar, x, float(self.m)))
