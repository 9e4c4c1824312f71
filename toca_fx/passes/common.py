"""Graph surgery shared by the passes: copying, new inputs/outputs, token gather/scatter."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.axes import Axes
from ..analysis.graph import shape

aten = torch.ops.aten


@dataclass
class VariantGraph:
    """A rewritten block graph and the meaning of what it takes and returns beyond the original.

    ``inputs`` / ``outputs`` are the binding slots (``passes.bindings``) of the placeholders appended
    after the block's own inputs and of the outputs appended after its own outputs, in order.
    """

    name: str
    gm: fx.GraphModule
    actions: dict[str, str]           # site name -> technique name ("fresh" on the fresh variant)
    inputs: tuple                     # slots of the extra placeholders
    outputs: tuple                    # slots of the extra outputs
    n_user_outputs: int
    counts: dict[str, int] = field(default_factory=dict)
    key: tuple | None = None          # the program's key for it (None: the fresh variant)
    mutated: tuple = ()               # positions in ``inputs`` the graph writes in place (caches, counters)


class GraphBuilder:
    """A copy of a captured graph with helpers to add inputs, outputs and token gathers."""

    def __init__(self, src: fx.Graph):
        # submodules and attributes the graph reads with get_attr (higher-order ops' bodies, e.g.
        # torch.export's ``wrap_with_autocast`` regions) stay reachable from the variant's module
        self.root = src.owning_module if src.owning_module is not None else torch.nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.outputs: list = []
        for n in src.nodes:
            if n.op == "output":
                self.outputs = list(n.args[0])
            else:
                self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
        self.outputs = [self.env[a] if isinstance(a, fx.Node) else a for a in self.outputs]
        self.n_user_outputs = len(self.outputs)
        self.inputs: list = []
        self.outputs_slots: list = []
        self._inputs_by_slot: dict = {}
        self._last_placeholder = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        self.counts: dict[str, int] = {}
        self._writes: list[tuple[fx.Node, fx.Node]] = []

    def bump(self, key: str, by: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + by

    def input(self, slot, name: str) -> fx.Node:
        """The placeholder bound to ``slot`` (added after the last one the first time)."""
        ph = self._inputs_by_slot.get(slot)
        if ph is None:
            with self.graph.inserting_after(self._last_placeholder):
                ph = self.graph.placeholder(name)
            self._last_placeholder = ph
            self.inputs.append(slot)
            self._inputs_by_slot[slot] = ph
        return ph

    def output(self, slot, node: fx.Node) -> None:
        self.outputs.append(node)
        self.outputs_slots.append(slot)

    def write(self, cache: fx.Node, value: fx.Node) -> None:
        """``cache.copy_(value)`` as the graph's last op (after every read of the old value: a
        technique's refresh reads it), into the state buffer in place: no graph output becomes a cache."""
        self._writes.append((cache, value))

    def call(self, target, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def token_index(self, idx: fx.Node, k: fx.Node, like_shape: tuple[int, ...], ax: Axes) -> fx.Node:
        """Expand (B, k) indices to gather/scatter along ``ax.token`` of a tensor shaped like_shape."""
        nd = len(like_shape)
        view_shape = [1] * nd
        src = idx
        if ax.batch is None:
            raise ValueError("token gather needs a batch axis")
        if ax.batch > ax.token:
            src = self.call(aten.t.default, idx)
        view_shape[ax.batch] = like_shape[ax.batch]
        view_shape[ax.token] = k
        v = self.call(aten.reshape.default, src, view_shape)
        sizes = list(like_shape)
        sizes[ax.token] = k
        return self.call(aten.expand.default, v, sizes)

    def gather_tokens(self, x: fx.Node, idx: fx.Node, k: fx.Node, ax: Axes, x_shape) -> fx.Node:
        index = self.token_index(idx, k, x_shape, ax)
        self.bump("gathers")
        return self.call(aten.gather.default, x, ax.token, index)

    def gather_external(self, x: fx.Node, idx: fx.Node, k: fx.Node, ext, x_shape, batch: int) -> fx.Node:
        """Gather a per-token input that is not from the stream, in the layout of the op reading it.

        A batch-less table (RoPE's (N, d)) is viewed with the op's rank and expanded to one row per
        sample first, so the per-sample gather gives a (B, ..., k, ...) tensor that broadcasts.
        A table whose token axis is batch x tokens flattened batch-major (the rows of a block-diagonal
        mask over all samples' queries) is split into (B, N), gathered per sample and flattened back.
        """
        if ext.axes.merged is not None:
            t, nb, s = ext.axes.token, ext.axes.merged, list(x_shape)
            split = s[:t] + [nb, s[t] // nb] + s[t + 1:]
            g = self.gather_tokens(self.call(aten.reshape.default, x, split), idx, k, Axes(t, t + 1), tuple(split))
            return self.call(aten.reshape.default, g, s[:t] + [self.call(operator.mul, k, nb)] + s[t + 1:])
        if ext.axes.batch is not None:
            return self.gather_tokens(x, idx, k, ext.axes, x_shape)
        off = ext.out_ndim - len(x_shape)
        full = [1] * off + list(x_shape)
        if ext.out_batch is None or full[ext.out_batch] != 1:
            raise ValueError("cannot align a batch-less per-token input")
        v = self.call(aten.reshape.default, x, full)
        full[ext.out_batch] = batch
        v = self.call(aten.expand.default, v, list(full))
        return self.gather_tokens(v, idx, k, Axes(ext.out_batch, ext.axes.token + off), tuple(full))

    def scatter_tokens_(self, cache: fx.Node, idx: fx.Node, k: fx.Node, ax: Axes, src: fx.Node, full_shape) -> fx.Node:
        index = self.token_index(idx, k, full_shape, ax)
        self.bump("scatters")
        return self.call(aten.scatter_.src, cache, ax.token, index, src)

    def finish(self, name: str, actions: dict[str, str], key: tuple | None = None) -> VariantGraph:
        for cache, value in self._writes:
            self.call(aten.copy_.default, cache, value)
        if self._writes:
            self.bump("cache_writes", len(self._writes))
        self.graph.output(tuple(self.outputs))
        before = len(self.graph.nodes)
        eliminate_dead_code(self.graph)
        self.bump("nodes_removed", before - len(self.graph.nodes))
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=name)
        phs = [self._inputs_by_slot[s] for s in self.inputs]
        mutated = tuple(i for i, ph in enumerate(phs) if any(_writes_to(u, ph) for u in ph.users))
        return VariantGraph(name=name, gm=gm, actions=dict(actions), inputs=tuple(self.inputs),
                            outputs=tuple(self.outputs_slots), n_user_outputs=self.n_user_outputs,
                            counts=dict(self.counts), key=key, mutated=mutated)


def _writes_to(node: fx.Node, ph: fx.Node) -> bool:
    """Does ``node`` write into ``ph`` in place (an argument its schema marks as written)?"""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return False
    for arg, a in zip(schema.arguments, node.args):
        if a is ph and arg.alias_info is not None and arg.alias_info.is_write:
            return True
    return any(v is ph and arg.alias_info is not None and arg.alias_info.is_write
               for arg in schema.arguments for k, v in node.kwargs.items() if k == arg.name)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Erase calls whose results nobody reads, unless they mutate an input.

    ``Graph.eliminate_dead_code`` keeps every random op (``aten.dropout`` included, even with
    p=0), which would keep the full-token computation of every rewritten branch alive.
    """
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            continue
        if schema is None and node.target is not operator.getitem:
            continue
        graph.erase_node(node)


_SIZED_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def copy_region_on_k_tokens(b: GraphBuilder, site, gathered: dict, k: fx.Node, region: list,
                            after: dict | None = None) -> fx.Node:
    """Copy ``region`` (nodes of the site, computed on k tokens); returns the copy of F.

    ``after[node](copy)`` may return what the region's later nodes read instead of ``node``'s
    k-token copy (the key/value caches of ``partial-kv``, filled with the copy's rows)."""
    after = after or {}
    rmap: dict[fx.Node, fx.Node] = {}

    def m(a):
        if a in rmap:
            return rmap[a]
        if a in gathered:
            return gathered[a]
        return a

    for n in region:
        src = b.env[n]
        c = b.graph.node_copy(src, m)
        c.meta.pop("val", None)
        c.meta.pop("tensor_meta", None)
        if src.target in _SIZED_VIEWS:
            ax = site.region_axes[n]
            sizes = list(c.args[1])
            if sizes[ax.token] != -1:
                if ax.merged is not None:
                    with b.graph.inserting_before(c):
                        sizes[ax.token] = b.call(operator.mul, k, ax.merged)
                else:
                    sizes[ax.token] = k
                c.args = (c.args[0], sizes) + tuple(c.args[2:])
        rmap[src] = after[n](c) if n in after else c
    b.bump("region_nodes", len(region))
    return rmap[b.env[site.value]]


def static_shape(node: fx.Node) -> tuple[int, ...]:
    s = shape(node)
    if s is None:
        raise ValueError(f"node {node.name} has no recorded shape")
    return s
