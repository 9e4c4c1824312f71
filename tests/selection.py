"""The token selection as the partial variants run it: ``passes.select.emit_select`` written into a
small graph and executed (the tests call it like ``toca_fx.ops.select_tokens``, the reference)."""

from __future__ import annotations

import torch
import torch.fx as fx

from toca_fx.passes.common import GraphBuilder
from toca_fx.passes.partial import SelectSettings
from toca_fx.passes.select import emit_select


def selection_graph(k: int, stale_weight: float, inv_interval: float, bonus: float, grid: int, paired: bool,
                    n: int) -> fx.GraphModule:
    src = fx.Graph()
    src.placeholder("score")
    src.placeholder("stale")
    src.output(())
    b = GraphBuilder(src)
    score, stale = [nd for nd in b.graph.nodes if nd.op == "placeholder"]
    idx = emit_select(b, score, stale, k, SelectSettings(paired=paired, stale_weight=stale_weight,
                                                          inv_interval=inv_interval, bonus=bonus, grid=grid), n)
    b.outputs = [idx]
    b.n_user_outputs = 1
    return b.finish("Selection", {}).gm


def emitted_select(score, stale, k, stale_weight, inv_interval, bonus, grid, paired):
    gm = selection_graph(k, stale_weight, inv_interval, bonus, grid, paired, score.shape[1])
    return gm(score, stale)[0]
