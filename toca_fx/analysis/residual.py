"""Find the token streams of a block graph and the residual adds on each.

A stream is a floating ``(B, N, C)`` block input that an output of the same shape depends on
(a joint block has two: image and text). A residual add is ``u + b`` with ``u`` a stream value
and ``b`` depending on a stream value: it adds a branch ``b = g * F(...)`` onto the stream. Adds are
found in topological order, so nested residuals (``y = x + g1*attn(x); out = x + g2*mlp(y)``)
and a stream that starts after some non-residual op (a long-skip fusion) are both found.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from .axes import Axes
from .graph import shape, val

aten = torch.ops.aten

_ADDS = (aten.add.Tensor, aten.add_.Tensor)
# Ops a residual skip path may pass through between adds (shape-preserving).
_PASS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
         aten._to_copy.default, aten.view.default, aten.reshape.default, aten.dropout.default}


@dataclass
class ResidualAdd:
    add: fx.Node
    spine_in: fx.Node      # stream value the branch is added to
    branch: fx.Node        # the added value g * F (or F)


@dataclass
class Stream:
    input: fx.Node
    output: fx.Node
    root: fx.Node          # first stream value the residual adds build on (the input, usually)
    adds: list
    nodes: set             # every stream value: input, root, residual adds and their casts/copies
    axes: Axes = Axes(0, 1)   # (batch, token) axes of the stream's values: (B, N, C), or (N, B, C) sequence-first


class SpineError(Exception):
    pass


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS and len(n.args) == 2
            and all(isinstance(a, fx.Node) for a in n.args) and "alpha" not in n.kwargs)


def _skip_path_sources(out: fx.Node) -> set:
    """Nodes reached from ``out`` walking back through adds and pass-through ops only."""
    seen, stack, found = set(), [out], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_add(n):
            stack.extend(n.args)
        elif n.op == "call_function" and n.target in _PASS:
            stack.append(n.args[0])
        else:
            found.add(n)
    return found


def find_streams(gm: fx.GraphModule, n_lifted: int, g: nx.DiGraph) -> list[tuple[fx.Node, fx.Node]]:
    """(input placeholder, output node) per token stream, the one with most tokens first."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][n_lifted:]
    outputs = [a for a in graph.output_node().args[0] if isinstance(a, fx.Node)]
    pairs, used = [], set()
    for out in outputs:
        so = shape(out)
        if so is None or len(so) != 3 or not val(out).dtype.is_floating_point:
            continue
        cands = [ph for ph in placeholders if ph not in used and shape(ph) == so
                 and val(ph).dtype.is_floating_point and nx.has_path(g, ph, out)]
        if not cands:
            continue
        direct = [ph for ph in cands if ph in _skip_path_sources(out)]
        ph = (direct or cands)[0]
        used.add(ph)
        pairs.append((ph, out))
    if not pairs:
        raise SpineError("no (B, N, C) input whose shape an output has and on which it depends")
    pairs.sort(key=lambda p: -shape(p[0])[1])
    return pairs


def residual_adds(graph: fx.Graph, g: nx.DiGraph, x0: fx.Node, out: fx.Node) -> Stream:
    """The residual adds of the stream entering at ``x0``, in topological order."""
    sshape = shape(x0)
    stream = {x0}
    adds: list[ResidualAdd] = []
    root = x0
    reach_out = nx.ancestors(g, out) | {out}
    for n in graph.nodes:
        if (n.op == "call_function" and n.target in _PASS and n.args and n.args[0] in stream
                and shape(n) == sshape):
            stream.add(n)          # a cast or copy of the stream is still the stream
            continue
        if not _is_add(n) or shape(n) != sshape or n not in reach_out:
            continue
        a, b = n.args
        found = None
        for u, br in ((a, b), (b, a)):
            # the branch reads u, or an earlier stream value (parallel residual: x2 = x1 + F(x0))
            if u in stream and br not in stream and stream & (nx.ancestors(g, br) | {br}):
                found = (u, br)
                break
        if found is None and not adds:
            # the stream may start after a non-residual op (e.g. a long-skip fusion): its first add
            for u, br in ((a, b), (b, a)):
                if shape(u) == sshape and x0 in nx.ancestors(g, u) and u in nx.ancestors(g, br):
                    found = (u, br)
                    root = u
                    stream.add(u)
                    break
        if found is not None:
            adds.append(ResidualAdd(n, found[0], found[1]))
            stream.add(n)
    return Stream(input=x0, output=out, root=root, adds=adds, nodes=stream)


def joint_root(g: nx.DiGraph, x0: fx.Node, token_axis: int = 1) -> fx.Node | None:
    """The concatenation of this stream with other tokens, when the block joins them itself.

    Some single-stream blocks take text and image separately, concatenate them on the token axis
    and add every residual branch to the joint sequence (the output is then split again). Their
    residual adds live on the joint sequence: it is the stream to analyse, all tokens alike.
    """
    frontier, seen = [x0], set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in _PASS and shape(u) == shape(n):
                frontier.append(u)
            elif getattr(u.target, "overloadpacket", None) is aten.cat and shape(u) is not None and len(shape(u)) == 3:
                d = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
                if d % 3 == token_axis:
                    return u
    return None
