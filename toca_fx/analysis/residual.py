"""Find the residual stream ("spine") of a block graph and the branches added onto it."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from .graph import shape, val

aten = torch.ops.aten

# Ops that pass the stream through unchanged in shape; allowed on the spine between adds.
_PASS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
         aten._to_copy.default, aten.view.default, aten.reshape.default, aten.dropout.default}


@dataclass
class ResidualAdd:
    add: fx.Node
    spine_in: fx.Node      # stream value before the add
    branch: fx.Node        # the added value g * F (or F)


class SpineError(Exception):
    pass


def find_stream(gm: fx.GraphModule, n_lifted: int) -> tuple[fx.Node, fx.Node]:
    """The (input placeholder, output node) pair of the token stream.

    The stream is a floating (B, N, C) user input whose shape an output of the block has, and on
    which that output depends. The first such pair in output order is returned.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][n_lifted:]
    outputs = [a for a in graph.output_node().args[0] if isinstance(a, fx.Node)]
    g = None
    for out in outputs:
        so = shape(out)
        if so is None or len(so) != 3 or not val(out).dtype.is_floating_point:
            continue
        for ph in placeholders:
            if shape(ph) == so and val(ph).dtype.is_floating_point:
                g = g or _nx(graph)
                if nx.has_path(g, ph, out):
                    return ph, out
    raise SpineError("no (B, N, C) input whose shape an output has and on which it depends")


def _nx(graph):
    from .graph import to_nx
    return to_nx(graph)


def trace_spine(g: nx.DiGraph, stream_in: fx.Node, stream_out: fx.Node) -> list[ResidualAdd]:
    """Walk back from the output to the input through residual adds, in forward order."""
    adds: list[ResidualAdd] = []
    n = stream_out
    seen = 0
    while n is not stream_in:
        seen += 1
        if seen > 10000:
            raise SpineError("spine walk did not terminate")
        if n.op == "call_function" and n.target in _PASS and shape(n) == shape(stream_in):
            n = n.args[0]
            continue
        if n.op == "call_function" and n.target in (aten.add.Tensor, aten.add_.Tensor) and all(
                isinstance(a, fx.Node) for a in n.args[:2]) and len(n.args) < 3 and "alpha" not in n.kwargs:
            a, b = n.args[0], n.args[1]
            anc_b = nx.ancestors(g, b)
            anc_a = nx.ancestors(g, a)
            if a in anc_b or a is stream_in and stream_in in anc_b:
                spine, branch = a, b
            elif b in anc_a or b is stream_in and stream_in in anc_a:
                spine, branch = b, a
            elif stream_in in anc_a or a is stream_in:
                spine, branch = a, b
            elif stream_in in anc_b or b is stream_in:
                spine, branch = b, a
            else:
                raise SpineError(f"add {n.name} does not lie on the stream")
            if shape(spine) != shape(stream_in):
                raise SpineError(f"stream changes shape at {n.name}")
            adds.append(ResidualAdd(n, spine, branch))
            n = spine
            continue
        raise SpineError(f"the stream passes through {n.name} ({getattr(n.target, '__name__', n.target)}), "
                         "which is neither a residual add nor a shape-preserving pass-through")
    adds.reverse()
    return adds
