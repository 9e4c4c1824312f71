"""Canonical forms of a captured block graph, so its data flow says what each value depends on.

Two patterns in exported graphs hide dependencies from the analysis, which reads the FX data flow:

* ``type_as(x, other)`` reads ``other`` for its dtype only (recorded on the node), yet draws an
  edge from ``other``: a branch then seems to reach its output around its attention (a false
  parallel block). It becomes ``to.dtype(x, dtype)``, the same op (a no-op when the dtype matches).
* an in-place write into a view of an intermediate tensor (``out = empty_like(x);
  out[..., 0::2] = a`` exports as ``copy_(slice(out), a)``) changes ``out`` without an edge from
  the write to ``out``'s later readers: a region copied on k tokens would read the unwritten
  tensor. Such a write becomes functional: ``out' = slice_scatter(out, copy(slice(out), a))``
  (``select_scatter`` through ``select``), and the readers after the write read ``out'``.

A write that cannot be rewritten (through a view with no scatter form, or with another view of the
tensor read after it) is left as it is; ``remaining_writes`` lists them and the analysis refuses
the branches that read such a tensor.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# view op -> its scatter form: scatter(base, src, *view_args[1:]) writes src into the view of base
_SCATTER = {
    aten.slice.Tensor: aten.slice_scatter.default,
    aten.select.int: aten.select_scatter.default,
}


def canonicalize(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite ``gm`` in place (see the module docstring); returns counts of what was rewritten."""
    counts = {"type_as": _type_as_to_dtype(gm.graph), "inplace_views": _functionalize_view_writes(gm.graph)}
    gm.graph.lint()
    gm.recompile()
    return counts


def _type_as_to_dtype(graph: fx.Graph) -> int:
    n_done = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.type_as.default or len(n.args) != 2:
            continue
        other = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
        if not isinstance(other, torch.Tensor):
            continue
        with graph.inserting_before(n):
            new = graph.call_function(aten.to.dtype, (n.args[0], other.dtype))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        n_done += 1
    return n_done


def _write_schema(node: fx.Node):
    """The schema of an in-place ATen op writing its first argument (``copy_``, ``mul_``), else None."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    args = t._schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]):
        return None    # out= variants and ops writing several arguments
    return t._schema


def _functional(target: torch._ops.OpOverload):
    """``aten.mul_.Tensor`` -> ``aten.mul.Tensor`` (``copy_`` -> ``copy``), or None."""
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    overload = target._overloadname
    fn = getattr(packet, overload, None) if packet is not None else None
    if fn is None or fn._schema.arguments[0].alias_info is not None:
        return None
    return fn


def _is_view(node: fx.Node) -> bool:
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    a = t._schema.arguments
    return bool(a) and a[0].alias_info is not None and not a[0].alias_info.is_write


def _views_of(base: fx.Node) -> set:
    """Every node aliasing ``base`` through view ops (``slice``, ``select``, ``view``, ``permute``...)."""
    seen, stack = set(), [base]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and _is_view(u) and u.args and u.args[0] is n:
                seen.add(u)
                stack.append(u)
    return seen


def _functionalize_view_writes(graph: fx.Graph) -> int:
    n_done = 0
    for node in list(graph.nodes):
        if node.graph is not graph or _write_schema(node) is None:
            continue
        fn = _functional(node.target)
        if fn is None:
            continue
        chain = []          # the view ops from the written tensor back to its base
        v = node.args[0]
        while isinstance(v, fx.Node) and v.op == "call_function" and v.target in _SCATTER:
            chain.append(v)
            v = v.args[0]
        base = v
        if not isinstance(base, fx.Node) or base.op != "call_function" or _is_view(base):
            continue        # a placeholder (export refuses those) or a view with no scatter form
        order = {n: i for i, n in enumerate(graph.nodes)}
        at = order[node]
        later_views = [a for a in _views_of(base) if any(order[u] > at for u in a.users if u is not node)
                       and order[a] < at]
        if later_views:
            continue        # a view taken before the write and read after it would need re-deriving
        # the written view's new value, then scattered back up the chain into a new base
        with graph.inserting_after(node):
            new = graph.call_function(fn, tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        last = new
        for view in chain:
            tgt = view.args[0]
            with graph.inserting_after(last):
                up = graph.call_function(_SCATTER[view.target], (tgt, last) + tuple(view.args[1:]))
            up.meta = dict(tgt.meta)
            last = up
        # readers after the write read the new value: of the base, and of the write's own result
        for user in list(base.users):
            if user is not node and order.get(user, -1) > at and user not in chain:
                user.replace_input_with(base, last)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        n_done += 1
    return n_done


def remaining_writes(graph: fx.Graph) -> list[fx.Node]:
    """In-place writes to intermediate tensors that ``canonicalize`` left in place."""
    out = []
    for n in graph.nodes:
        if _write_schema(n) is None:
            continue
        v = n.args[0]
        while isinstance(v, fx.Node) and _is_view(v):
            v = v.args[0]
        if isinstance(v, fx.Node) and v.op != "placeholder":
            out.append(n)
    return out
