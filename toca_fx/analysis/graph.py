"""Graph helpers: a networkx view of an FX graph and small queries on nodes."""

from __future__ import annotations

from typing import Any, Iterable

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


def is_tensor(node: Any) -> bool:
    return isinstance(val(node), torch.Tensor)


def tensor_args(node: fx.Node) -> Iterable[tuple[int | str, fx.Node]]:
    """(position or keyword, node) for every node-valued argument, lists flattened with their index."""
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            yield i, a
        elif isinstance(a, (list, tuple)):
            for a2 in a:
                if isinstance(a2, fx.Node):
                    yield i, a2
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            yield k, a


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        return getattr(t, "__name__", str(t))
    return f"{node.op}:{t}"


def packet(node: fx.Node):
    """The OpOverloadPacket of an ATen call (aten.view for aten.view.default), else the target."""
    t = node.target
    return getattr(t, "overloadpacket", t)
