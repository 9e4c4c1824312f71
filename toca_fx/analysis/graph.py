"""Graph helpers: a networkx view of an FX graph and small queries on nodes."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx


def to_nx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow graph: an edge a -> b when node b reads node a."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    return g


def val(node: Any) -> Any:
    """The example value (FakeTensor, list of them, or scalar) recorded on a node, or None."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return None


def shape(node: Any) -> tuple[int, ...] | None:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def packet(node: fx.Node):
    """The OpOverloadPacket of an ATen call (aten.view for aten.view.default), else the target."""
    t = node.target
    return getattr(t, "overloadpacket", t)
