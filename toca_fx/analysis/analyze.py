"""Analyse a captured block graph: stream, residual branches, kinds, token-locality, regions.

Everything is derived from the graph: no module, class or attribute names are consulted (the
module paths recorded by export are used only to label sites in ``explain``).
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from .axes import Axes, AxisInfo, NotLocal, propagate
from .graph import packet, shape, to_nx
from .residual import SpineError, find_streams, joint_root, residual_adds
from .sites import BlockAnalysis, Site

aten = torch.ops.aten
_ATTENTION = {aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
              aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention}


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and packet(node) in _ATTENTION


def graph_has_attention(graph: fx.Graph) -> bool:
    """Scaled-dot-product attention, or softmax feeding a matmul (softmax(QK^T)V)."""
    for n in graph.nodes:
        if is_attention(n):
            return True
        if n.op == "call_function" and packet(n) in (aten.softmax, aten._softmax):
            if any(packet(u) in (aten.matmul, aten.bmm) for u in n.users if u.op == "call_function"):
                return True
    return False


def _module_path(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for v in stack.values():
        path = v[0] if isinstance(v, tuple) else str(v)
        # export names the wrapper's child "inner"; strip it so paths are relative to the block
        path = path.split("inner.", 1)[1] if path.startswith("inner.") or ".inner." in path else ("" if path in ("inner", "") else path)
        paths.append(path)
    return [p for p in paths if p]


def _common_module(nodes) -> str:
    common: list[str] | None = None
    for n in nodes:
        p = _module_path(n)
        if not p:
            continue
        deepest = p[-1].split(".")
        if common is None:
            common = deepest
        else:
            i = 0
            while i < min(len(common), len(deepest)) and common[i] == deepest[i]:
                i += 1
            common = common[:i]
    return ".".join(common or [])


def _peel_gate(branch: fx.Node, token_nodes: set) -> tuple[fx.Node, fx.Node | None]:
    """Split ``g * F`` into (F, g) when g does not depend on tokens; else (branch, None)."""
    if branch.op == "call_function" and branch.target == aten.mul.Tensor and len(branch.args) == 2:
        a, b = branch.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if a in token_nodes and b not in token_nodes:
                return a, b
            if b in token_nodes and a not in token_nodes:
                return b, a
    return branch, None


def analyze_block(gm: fx.GraphModule, n_lifted: int) -> BlockAnalysis:
    """Find every residual branch of the block graph and what may be cached or computed partially.

    Example::

        result = analyze_block(capture.gm, len(capture.lifted))
        [(s.name, s.kind, s.local) for s in result.sites]
        # [('self_attn0', 'self_attn', False), ('mlp0', 'mlp', True)]
    """
    res = BlockAnalysis()
    graph = gm.graph
    res.has_attention = graph_has_attention(graph)
    if not res.has_attention:
        res.rejected = "no attention (scaled_dot_product_attention or softmax(QK^T)V) in the captured graph"
        return res
    g = to_nx(graph)
    try:
        pairs = find_streams(gm, n_lifted, g)
    except SpineError as exc:
        res.rejected = f"no residual stream: {exc}"
        return res
    streams, roots = [], set()
    for x0, out in pairs:
        st = residual_adds(graph, g, x0, out)
        if not st.adds:
            root = joint_root(g, x0)
            if root is not None:
                if root in roots:
                    continue       # the other half of a joint sequence already analysed
                roots.add(root)
                st = residual_adds(graph, g, root, out)
                res.notes.append(f"stream {x0.name} is joined with other tokens at {root.name}: "
                                 f"all {shape(root)[1]} tokens are treated alike")
        streams.append(st)
    res.stream_input, res.stream_output = pairs[0]
    res.streams = streams
    res.n_tokens = shape(streams[0].input)[1] if streams else shape(pairs[0][0])[1]
    if not any(st.adds for st in streams):
        res.rejected = "no residual branch found on the stream"
        return res
    for si, st in enumerate(streams):
        spine_nodes = set(st.nodes)
        n_tokens = shape(st.input)[1]
        counts: dict[str, int] = {}
        for ra in st.adds:
            site = _build_site(g, ra, st.input, spine_nodes, n_tokens, res)
            if site is None:
                continue
            idx = counts.get(site.kind, 0)
            counts[site.kind] = idx + 1
            site.name = f"{site.kind}{idx}" if si == 0 else f"s{si}_{site.kind}{idx}"
            site.stream = si
            res.sites.append(site)
    if not res.sites:
        res.rejected = "no residual branch reads the stream"
    return res


def _build_site(g, ra, x0, spine_nodes, n_tokens, res: BlockAnalysis) -> Site | None:
    branch = ra.branch
    anc = nx.ancestors(g, branch) | {branch}
    # nodes computed only for this branch: not needed to reach any stream value it depends on
    own = set(anc)
    for s in spine_nodes:
        if s in anc:
            own -= nx.ancestors(g, s) | {s}
    read_spine = [s for s in spine_nodes if s in anc and any(u in own for u in s.users)]
    if not read_spine:
        res.notes.append(f"{ra.add.name}: added value does not depend on the stream (not a branch)")
        return None
    if len(read_spine) > 1:
        names = ", ".join(sorted(s.name for s in read_spine))
        res.notes.append(f"{ra.add.name}: branch reads several stream values ({names}); left unchanged")
        return None
    x_in = read_spine[0]
    token_nodes = (nx.descendants(g, x_in) & anc) | {x_in}
    value, gate = _peel_gate(branch, token_nodes)
    if value is x_in:
        return None
    token_nodes = (nx.descendants(g, x_in) & (nx.ancestors(g, value) | {value})) | {x_in}
    # -- token axes, in topological order --------------------------------------------------
    order = [n for n in value.graph.nodes if n in token_nodes]
    axes: dict[fx.Node, Axes] = {x_in: Axes(0, 1)}
    infos: dict[fx.Node, AxisInfo] = {}
    failed: dict[fx.Node, str] = {}
    for n in order:
        if n is x_in:
            continue
        bad = [a for a in n.all_input_nodes if a in token_nodes and a not in axes]
        if bad:
            failed[n] = failed.get(bad[0], f"depends on {bad[0].name}")
            continue
        try:
            info = propagate(n, axes, n_tokens)
        except NotLocal as exc:
            failed[n] = str(exc)
            continue
        infos[n] = info
        if info.out is not None:
            axes[n] = info.out
    attention_nodes = [n for n in order if is_attention(n) or packet(n) in (aten.softmax, aten._softmax)]
    mixing = [m for n in order if n in infos for m in infos[n].mixing_inputs]
    # keys/values that depend on the stream make it self-attention even where their axes were lost
    mixing += [a for n in order if is_attention(n) for a in n.args[1:3] if isinstance(a, fx.Node) and a in token_nodes]
    if mixing:
        joint = any(_joins_other_stream(g, m, token_nodes - {x_in}) for m in mixing)
        kind = "joint_attn" if joint else "self_attn"
        # attention and a token-wise path (MLP) side by side into one output: a parallel block
        if not joint and nx.has_path(g.subgraph(token_nodes - set(attention_nodes)), x_in, value):
            kind = "parallel"
    elif attention_nodes:
        kind = "cross_attn"
    elif value in axes and not failed:
        kind = "mlp"
    else:
        kind = "other"
    attn = next((n for n in order if is_attention(n)), None)
    all_nodes = list(value.graph.nodes)
    weighted = [n for n in order if n is not x_in and packet(n) in (aten.linear, aten.matmul, aten.conv1d, aten.addmm)]
    module = _common_module([attn] if attn is not None else (weighted or [n for n in order if n is not x_in]))
    site = Site(name="", kind=kind, module=module, add=ra.add, value=value, gate=gate, stream_in=x_in,
                axes=axes.get(value, Axes(0, 1)), n_tokens=n_tokens, attention=attn)
    if kind == "joint_attn" and attn is not None:
        site.key_segment = _key_segment(g, attn, token_nodes)
    # -- may F be reused? (its value must flow only into the residual add) -----------------
    allowed_users = {gate and _gate_mul(value, gate), ra.add} - {None}
    escapes = [u for u in value.users if u not in allowed_users]
    if escapes:
        site.cacheable = False
        site.reason = f"branch output {value.name} escapes to {escapes[0].name} outside the residual add"
        return site
    if value not in axes:
        site.reason = f"not token-local: {failed.get(value, 'output carries no token axis')}"
        return site
    # -- region computed on k tokens: the query side, never the key/value side --------------
    region: set[fx.Node] = set()
    full: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in region or n is x_in:
            continue
        region.add(n)
        info = infos.get(n)
        for a in n.all_input_nodes:
            if a not in token_nodes or a is x_in:
                continue
            if info is not None and a in info.mixing_inputs:
                full.add(a)
                continue
            stack.append(a)
    full_closure = set(full)
    for f in full:
        full_closure |= nx.ancestors(g, f) & token_nodes
    region -= full_closure
    # an item of a multi-output node computed for all tokens is itself a boundary (lists cannot be gathered)
    region -= {n for n in region if n.target is operator.getitem and n.args[0] not in region}
    boundary, why = _region_inputs(region, value, token_nodes, axes, infos, failed, all_nodes)
    if why:
        site.reason = why
        return site
    site.region = [n for n in all_nodes if n in region]
    site.boundary = boundary
    site.region_axes = {n: axes[n] for n in region}
    site.local = True
    if full:
        _key_value_side(site, g, token_nodes, axes, infos, failed, all_nodes)
    if kind == "parallel":
        _split_parallel(g, site, region, token_nodes, axes, infos, all_nodes)
    return site


def _region_inputs(nodes: set, value: fx.Node, token_nodes: set, axes: dict, infos: dict, failed: dict,
                   all_nodes: list) -> tuple[dict | None, str | None]:
    """Can ``nodes`` run on k tokens? (their boundary: token-carrying inputs to gather, None) or (None, why)."""
    bad = [n for n in nodes if n in failed or n not in axes]
    if bad:
        first = min(bad, key=all_nodes.index)
        return None, f"not token-local: {failed.get(first, first.name + ' carries no token axis')}"
    for n in nodes:
        outside = [u for u in n.users if u not in nodes] if n is not value else []
        if outside:
            return None, f"{n.name} inside the branch is also read by {outside[0].name}"
    boundary: dict = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a in token_nodes and a not in nodes and a not in infos[n].mixing_inputs:
                boundary[a] = axes[a]
        for ext in infos[n].external:
            if ext.node in boundary and boundary[ext.node] != ext:
                return None, f"per-token input {ext.node.name} is read with two different layouts"
            boundary[ext.node] = ext
    return boundary, None


def _key_value_side(site: Site, g, token_nodes: set, axes: dict, infos: dict, failed: dict, all_nodes: list) -> None:
    """For ``self_attention="partial-kv"``: the whole branch on k tokens, keys/values from caches.

    The attention's key/value inputs are cached (their token rows, like any branch output); on a
    partial step the selected tokens recompute query, key and value, their key/value rows are
    scattered into the caches, and the selected queries attend over the whole caches. So the key/value
    side must be token-wise up to the attention, and the key/value inputs feed only the attention.
    """
    both = token_nodes - {site.stream_in}
    boundary, why = _region_inputs(both, site.value, token_nodes, axes, infos, failed, all_nodes)
    if why:
        site.kv_reason = why
        return
    mixing = {m for n in both for m in infos[n].mixing_inputs}
    for m in mixing:
        ax = axes.get(m)
        if m is site.stream_in or ax is None or ax.batch is None or ax.merged is not None:
            site.kv_reason = f"key/value input {m.name} has no separate batch and token axes to cache rows by"
            return
        token_users = [u for u in m.users if u in both and m not in infos[u].mixing_inputs]
        if token_users:
            site.kv_reason = f"key/value input {m.name} is also read token-wise by {token_users[0].name}"
            return
        nested = [n for n in nx.ancestors(g, m) & both if infos[n].mixing_inputs]
        if nested:
            site.kv_reason = f"the key/value side mixes tokens itself at {nested[0].name}"
            return
    site.kv_values = [n for n in all_nodes if n in mixing]
    site.kv_region = [n for n in all_nodes if n in both]
    site.kv_boundary = boundary
    for n in both:
        site.region_axes.setdefault(n, axes[n])


def _split_parallel(g, site: Site, region: set, token_nodes: set, axes: dict, infos: dict, all_nodes: list) -> None:
    """For a parallel block, the part of the region that does not need attention this step.

    ToCa's FLUX port recomputes the MLP half of a parallel block for the selected tokens and
    combines it with cached attention rows. Here: the attention outputs entering the rest of the
    region (``attn_values``) are cached at fresh steps and gathered from the cache on partial
    steps; the query path and the attention itself drop out of the region.
    """
    att = [n for n in region if is_attention(n)]
    # nodes fed by the attention alone (up to where it joins the token-wise path)
    att_side = set(att)
    for n in all_nodes:
        if n in region and n not in att_side:
            tok = [a for a in n.all_input_nodes if a in token_nodes]
            if tok and all(a in att_side for a in tok):
                att_side.add(n)
    values = [n for n in all_nodes if n in att_side
              and any(u in region and u not in att_side for u in n.users)]
    q_side = set(att_side)
    for a in att:
        q_side |= nx.ancestors(g, a) & region
    rest = region - q_side
    if not values or not rest or site.value in q_side:
        return
    boundary = {}
    for n in rest:
        for a in n.all_input_nodes:
            if a in token_nodes and a not in rest:
                boundary[a] = axes[a]
        for ext in infos[n].external:
            boundary[ext.node] = ext
    site.attn_values = values
    site.mlp_region = [n for n in all_nodes if n in rest]
    site.mlp_boundary = boundary


def _key_segment(g, attn: fx.Node, token_nodes: set) -> tuple[int, int] | None:
    """Where this stream's tokens sit on the key axis of a joint attention: (offset, length)."""
    k = attn.args[1]
    for n in [k] + sorted(nx.ancestors(g, k), key=lambda x: -len(nx.ancestors(g, x))):
        if n.op == "call_function" and packet(n) is aten.cat and n in token_nodes:
            parts = [a for a in n.args[0] if isinstance(a, fx.Node)]
            d = n.args[1] if len(n.args) > 1 else 0
            d = d % len(shape(n))
            off = 0
            for a in parts:
                if a in token_nodes:
                    return off, shape(a)[d]
                off += shape(a)[d]
    return None


def _gate_mul(value: fx.Node, gate: fx.Node) -> fx.Node | None:
    for u in value.users:
        if u.target == aten.mul.Tensor and gate in u.args:
            return u
    return None


def _joins_other_stream(g, key_side: fx.Node, token_nodes: set) -> bool:
    """True when the key/value side concatenates stream tokens with tokens from another input."""
    for n in nx.ancestors(g, key_side) | {key_side}:
        if n.op == "call_function" and packet(n) is aten.cat and n in token_nodes:
            others = [a for a in n.args[0] if isinstance(a, fx.Node) and a not in token_nodes]
            if others:
                return True
    return False
