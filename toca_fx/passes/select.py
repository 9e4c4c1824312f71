"""Token selection as plain ATen nodes in the partial variant graph.

``emit_select`` writes what ``toca_fx.ops.select_tokens`` (the reference, in Python) computes:
the base score plus the staleness term (s3), the CFG halves averaged when they are paired, the
spatial bonus (s4), top-k per sample, and the staleness update in place. As ordinary ATen ops in
the graph, inductor fuses them with the gathers and scatters around them (a custom op would be
opaque to it), and ``FlopCounterMode`` sees them like every other op.

Example::

    idx = emit_select(builder, score_node, stale_node, k_node, settings, n_tokens=256)
    # aten.mul / add / [chunk, add, mul] / [view, permute, max, scatter, ...] / topk / [cat] / add_ / scatter_
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def emit_select(b, score: fx.Node, stale: fx.Node, k, settings, n_tokens: int) -> fx.Node:
    """(B, k) int64 indices of the tokens to recompute; ``stale`` is updated in place (+1, 0 for the chosen).

    ``b`` is a ``GraphBuilder``; ``settings`` a ``SelectSettings``; ``k`` a node (the site's
    ``TokenCount`` placeholder) or an int.
    """
    s = score
    val = score.meta.get("val") if isinstance(score, fx.Node) else None
    if val is None or val.dtype != torch.float32:      # base-score buffers are float32 already
        s = b.call(aten._to_copy.default, s, dtype=torch.float32)
    w = float(settings.stale_weight) * float(settings.inv_interval)
    s = b.call(aten.add.Tensor, s, b.call(aten.mul.Tensor, stale, w))
    if settings.paired:
        halves = b.call(aten.chunk.default, s, 2, 0)
        cond, uncond = b.call(operator.getitem, halves, 0), b.call(operator.getitem, halves, 1)
        s = b.call(aten.mul.Tensor, b.call(aten.add.Tensor, cond, uncond), 0.5)
    s = _spatial_bonus(b, s, float(settings.bonus), int(settings.grid), n_tokens)
    top = b.call(aten.topk.default, s, k, 1, True, False)
    idx = b.call(operator.getitem, top, 1)
    if settings.paired:
        idx = b.call(aten.cat.default, [idx, idx], 0)
    b.call(aten.add_.Scalar, stale, 1)
    b.call(aten.scatter_.value, stale, 1, idx, 0)
    b.bump("selections")
    return idx


def _spatial_bonus(b, s: fx.Node, bonus: float, grid: int, n: int) -> fx.Node:
    """s4 (``toca_fx.ops.spatial_bonus``): the top token of every grid x grid tile gets +bonus * its score."""
    side = math.isqrt(n)
    if grid <= 1 or bonus == 0 or side * side != n or side % grid:
        return s
    g = side // grid
    t = b.call(aten.view.default, s, [-1, g, grid, g, grid])
    t = b.call(aten.permute.default, t, [0, 1, 3, 2, 4])
    t = b.call(aten.reshape.default, t, [-1, g * g, grid * grid])
    mx = b.call(aten.max.dim, t, -1, True)
    top, where = b.call(operator.getitem, mx, 0), b.call(operator.getitem, mx, 1)
    one_hot = b.call(aten.scatter.value, b.call(aten.zeros_like.default, t), -1, where, 1.0)
    t = b.call(aten.add.Tensor, t, b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, one_hot, top), bonus))
    t = b.call(aten.view.default, t, [-1, g, g, grid, grid])
    t = b.call(aten.permute.default, t, [0, 1, 3, 2, 4])
    return b.call(aten.reshape.default, t, [-1, n])
