"""Numeric confirmation of token-locality: perturb one token of x_in, watch which rows of F move."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import Refusal
from .sites import Site


class _Override(fx.Interpreter):
    def __init__(self, gm, node, fn, watch):
        super().__init__(gm)
        self.node, self.fn, self.watch, self.seen = node, fn, watch, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.node and self.fn is not None:
            out = self.fn(out)
        if n in self.watch:
            self.seen[n] = out
        return out


def run_with_override(gm: fx.GraphModule, inputs: list, node: fx.Node | None = None, fn=None, watch=()):
    interp = _Override(gm, node, fn, set(watch))
    with torch.no_grad():
        interp.run(*inputs)
    return interp.seen


def probe_site(gm: fx.GraphModule, inputs: list, site: Site, baseline: dict) -> Refusal | None:
    """None when the probe agrees that F is token-local; otherwise the reason it does not.

    Token ``j`` of batch row 0 of x_in is perturbed; every other (row, token) of F must stay
    unchanged, and token ``j`` must be the only one allowed to move.
    """
    base = baseline.get(site.value)
    if not isinstance(base, torch.Tensor):
        return Refusal("probe-unobserved", "probe could not observe the branch output", stage="probe")
    n = site.n_tokens
    j = n // 2

    def perturb(x):
        x = x.clone()
        scale = x.abs().mean().clamp_min(1e-3)
        idx = [slice(None)] * x.dim()
        idx[site.stream_axes.batch], idx[site.stream_axes.token] = 0, j
        x[tuple(idx)] += scale * torch.randn_like(x[tuple(idx)])
        return x

    seen = run_with_override(gm, inputs, site.stream_in, perturb, [site.value])
    pert = seen[site.value]
    ax = site.axes
    diff = (pert.float() - base.float()).abs()
    diff = diff.movedim((ax.batch, ax.token), (0, 1)).reshape(diff.shape[ax.batch], diff.shape[ax.token], -1).amax(-1)
    tol = 1e-5 * float(base.float().abs().max().clamp_min(1e-6))
    moved = (diff > tol).nonzero().tolist()
    others = [(b, t) for b, t in moved if (b, t) != (0, j)]
    if others:
        b, t = others[0]
        return Refusal("probe-refuted", f"numeric probe: perturbing token {j} of sample 0 changed token {t} of "
                       f"sample {b}", stage="probe", node=site.value.name)
    return None
