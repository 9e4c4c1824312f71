"""Analyse a captured block graph: stream, residual branches, kinds, token-locality, regions.

Everything is derived from the graph: no module, class or attribute names are consulted (the
module paths recorded by export are used only to label sites in ``explain``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from ..errors import Refusal
from .axes import Axes, NotLocal, propagate
from .graph import packet, shape, to_nx
from .residual import SpineError, find_streams, joint_root, residual_adds
from .sites import BlockAnalysis, KeyValueSide, ParallelSplit, Region, Site

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
        res.rejected = Refusal("no-attention", "no attention (scaled_dot_product_attention or softmax(QK^T)V) "
                               "in the captured graph")
        return res
    g = to_nx(graph)
    try:
        pairs = find_streams(gm, n_lifted, g)
    except SpineError as exc:
        res.rejected = Refusal("no-stream", f"no residual stream: {exc}")
        return res
    all_nodes = list(graph.nodes)
    layout = {x0: _stream_axes(all_nodes, x0) for x0, _ in pairs}
    pairs.sort(key=lambda p: -shape(p[0])[layout[p[0]].token])
    for x0, _ in pairs:
        if layout[x0] != Axes(0, 1):
            res.notes.append(f"stream {x0.name} {list(shape(x0))} is sequence-first: tokens on axis "
                             f"{layout[x0].token}, batch on axis {layout[x0].batch}")
    streams, roots = [], set()
    for x0, out in pairs:
        st = residual_adds(graph, g, x0, out)
        if not st.adds:
            root = joint_root(g, x0, layout[x0].token)
            if root is not None:
                if root in roots:
                    continue       # the other half of a joint sequence already analysed
                roots.add(root)
                st = residual_adds(graph, g, root, out)
                res.notes.append(f"stream {x0.name} is joined with other tokens at {root.name}: "
                                 f"all {shape(root)[layout[x0].token]} tokens are treated alike")
        st.axes = layout[x0]
        streams.append(st)
    res.stream_input, res.stream_output = pairs[0]
    res.streams = streams
    res.n_tokens = (shape(streams[0].input)[streams[0].axes.token] if streams
                    else shape(pairs[0][0])[layout[pairs[0][0]].token])
    if not any(st.adds for st in streams):
        res.rejected = Refusal("no-branch", "no residual branch found on the stream")
        return res
    written = _written_in_place(graph)
    for si, st in enumerate(streams):
        spine_nodes = set(st.nodes)
        n_tokens = shape(st.input)[st.axes.token]
        counts: dict[str, int] = {}
        for ra in st.adds:
            site = _build_site(g, ra, spine_nodes, n_tokens, all_nodes, res.notes, written, st.axes)
            if site is None:
                continue
            idx = counts.get(site.kind, 0)
            counts[site.kind] = idx + 1
            site.name = f"{site.kind}{idx}" if si == 0 else f"s{si}_{site.kind}{idx}"
            site.stream = si
            res.sites.append(site)
    if not res.sites:
        res.rejected = Refusal("no-branch", "no residual branch reads the stream")
    return res


@dataclass
class _Branch:
    """What the steps of ``_build_site`` share about one residual branch."""

    g: nx.DiGraph
    all_nodes: list                     # the graph's nodes in topological order
    n_tokens: int
    written: dict = field(default_factory=dict)      # node -> the in-place write into it (not rewritten)
    stream_axes: Axes = Axes(0, 1)                   # the stream's (batch, token) axes
    x_in: fx.Node = None                # the stream value the branch reads
    value: fx.Node = None               # F
    gate: fx.Node | None = None
    token_nodes: set = field(default_factory=set)    # nodes between x_in and F that carry its tokens
    order: list = field(default_factory=list)        # token_nodes in topological order
    axes: dict = field(default_factory=dict)         # node -> Axes
    infos: dict = field(default_factory=dict)        # node -> AxisInfo
    failed: dict = field(default_factory=dict)       # node -> Refusal (no axes)
    mixing: list = field(default_factory=list)       # key/value inputs of token-mixing ops
    full: set = field(default_factory=set)           # key/value inputs the query region reads (all tokens)


def _written_in_place(graph: fx.Graph) -> dict:
    """Tensors (and their views) that an in-place write ``capture.canonical`` could not make
    functional changes after they are computed: their readers' values are not what the data flow says."""
    from ..capture.canonical import remaining_writes
    out: dict = {}
    for w in remaining_writes(graph):
        v = w.args[0]
        while isinstance(v, fx.Node) and v.op == "call_function" and v.args and isinstance(v.args[0], fx.Node) \
                and v not in out and getattr(v.target, "_schema", None) is not None \
                and v.target._schema.arguments[0].alias_info is not None:
            out[v] = w
            v = v.args[0]
        if isinstance(v, fx.Node):
            out[v] = w
    return out


def _stream_axes(all_nodes: list, x0: fx.Node) -> Axes:
    """The (batch, token) axes of a 3-d stream input: (B, N, C) unless reading it as (N, B, C)
    puts its tokens on the sequence axis of more attention queries (a sequence-first block that
    permutes to batch-first around its attention). Axes are propagated through the whole graph
    under each reading; ops with no rule stop the propagation there."""
    default = Axes(0, 1)
    if len(shape(x0) or ()) != 3:
        return default
    best, best_hits = default, None
    for cand in (default, Axes(1, 0)):
        axes, hits = {x0: cand}, 0
        for n in all_nodes:
            if n.op != "call_function" or not any(a in axes for a in n.all_input_nodes):
                continue
            if is_attention(n) and isinstance(n.args[0], fx.Node) and n.args[0] in axes:
                q = n.args[0]
                hits += int(axes[q].token == len(shape(q)) - 2 and axes[q].batch == 0)
            try:
                info = propagate(n, axes)
            except NotLocal:
                continue
            if info.out is not None:
                axes[n] = info.out
        if best_hits is None or hits > best_hits:
            best, best_hits = cand, hits
    return best


def _build_site(g, ra, spine_nodes, n_tokens, all_nodes, notes: list, written: dict | None = None,
                stream_axes: Axes = Axes(0, 1)) -> Site | None:
    """One residual add -> its site, in named steps over one branch context."""
    br = _Branch(g, all_nodes, n_tokens, written=written or {}, stream_axes=stream_axes)
    if not _branch_nodes(br, ra, spine_nodes, notes):
        return None
    _token_axes(br)
    site = _classify(br, ra)
    if not _check_cacheable(br, site, ra):
        return site
    _query_region(br, site)
    if site.local and br.full:
        _key_value_side(br, site)
    if site.local and site.kind == "parallel":
        _split_parallel(br, site)
    return site


def _branch_nodes(br: _Branch, ra, spine_nodes: set, notes: list) -> bool:
    """The stream value the branch reads, F (the gate peeled off) and the token-carrying nodes between."""
    g, branch = br.g, ra.branch
    anc = nx.ancestors(g, branch) | {branch}
    # nodes computed only for this branch: not needed to reach any stream value it depends on
    own = set(anc)
    for s in spine_nodes:
        if s in anc:
            own -= nx.ancestors(g, s) | {s}
    read_spine = [s for s in spine_nodes if s in anc and any(u in own for u in s.users)]
    if not read_spine:
        notes.append(f"{ra.add.name}: added value does not depend on the stream (not a branch)")
        return False
    if len(read_spine) > 1:
        names = ", ".join(sorted(s.name for s in read_spine))
        notes.append(f"{ra.add.name}: branch reads several stream values ({names}); left unchanged")
        return False
    x_in = read_spine[0]
    value, gate = _peel_gate(branch, (nx.descendants(g, x_in) & anc) | {x_in})
    if value is x_in:
        return False
    br.x_in, br.value, br.gate = x_in, value, gate
    br.token_nodes = (nx.descendants(g, x_in) & (nx.ancestors(g, value) | {value})) | {x_in}
    br.order = [n for n in br.all_nodes if n in br.token_nodes]
    return True


def _token_axes(br: _Branch) -> None:
    """Token axes of every token-carrying node, in topological order (``failed``: why none)."""
    br.axes = {br.x_in: br.stream_axes}
    for n in br.order:
        if n is br.x_in:
            continue
        bad = [a for a in n.all_input_nodes if a in br.token_nodes and a not in br.axes]
        if bad:
            br.failed[n] = br.failed.get(bad[0], Refusal("depends-on-non-local", f"depends on {bad[0].name}",
                                                         node=n.name))
            continue
        if n in br.written:
            br.failed[n] = Refusal("in-place-write", f"{n.name} is written in place by {br.written[n].name} "
                                   "(not rewritten as a functional op)", node=n.name)
            continue
        try:
            info = propagate(n, br.axes)
        except NotLocal as exc:
            br.failed[n] = exc.refusal
            continue
        br.infos[n] = info
        if info.out is not None:
            br.axes[n] = info.out
    br.mixing = [m for n in br.order if n in br.infos for m in br.infos[n].mixing_inputs]
    # keys/values that depend on the stream make it self-attention even where their axes were lost
    br.mixing += [a for n in br.order if is_attention(n) for a in n.args[1:3]
                  if isinstance(a, fx.Node) and a in br.token_nodes]


def _classify(br: _Branch, ra) -> Site:
    """The branch's kind (where its attention's keys and values come from) and its module label."""
    g, order = br.g, br.order
    attention_nodes = [n for n in order if is_attention(n) or packet(n) in (aten.softmax, aten._softmax)]
    if br.mixing:
        joint = any(_joins_other_stream(g, m, br.token_nodes - {br.x_in}) for m in br.mixing)
        kind = "joint_attn" if joint else "self_attn"
        # attention and a token-wise path (MLP) side by side into one output: a parallel block
        if not joint and nx.has_path(g.subgraph(br.token_nodes - set(attention_nodes)), br.x_in, br.value):
            kind = "parallel"
    elif attention_nodes:
        kind = "cross_attn"
    elif br.value in br.axes and not br.failed:
        kind = "mlp"
    else:
        kind = "other"
    attn = next((n for n in order if is_attention(n)), None)
    weighted = [n for n in order if n is not br.x_in and packet(n) in (aten.linear, aten.matmul, aten.conv1d, aten.addmm)]
    module = _common_module([attn] if attn is not None else (weighted or [n for n in order if n is not br.x_in]))
    site = Site(name="", kind=kind, module=module, add=ra.add, value=br.value, gate=br.gate, stream_in=br.x_in,
                axes=br.axes.get(br.value, br.stream_axes), n_tokens=br.n_tokens, attention=attn,
                stream_axes=br.stream_axes)
    if kind == "joint_attn" and attn is not None:
        site.key_segment = _key_segment(g, attn, br.token_nodes)
    if attn is not None:
        site.attention_axes = tuple(br.axes.get(a) if isinstance(a, fx.Node) else None for a in attn.args[:2])
    return site


def _check_cacheable(br: _Branch, site: Site, ra) -> bool:
    """F may be cached only when it flows into nothing but its gate and residual add."""
    allowed_users = {br.gate and _gate_mul(br.value, br.gate), ra.add} - {None}
    escapes = [u for u in br.value.users if u not in allowed_users]
    if escapes:
        site.cacheable = False
        site.refusal = Refusal("escapes", f"branch output {br.value.name} escapes to {escapes[0].name} "
                               "outside the residual add", node=br.value.name)
        return False
    if br.value not in br.axes:
        inner = br.failed.get(br.value)
        if inner is None:
            inner = Refusal("no-token-axis", "output carries no token axis", node=br.value.name)
        site.refusal = inner.wrap("not token-local: ")
        return False
    return True


def _query_region(br: _Branch, site: Site) -> None:
    """The region computed on k tokens: the query side, never the key/value side (``br.full``)."""
    region: set[fx.Node] = set()
    full: set[fx.Node] = set()
    stack = [br.value]
    while stack:
        n = stack.pop()
        if n in region or n is br.x_in:
            continue
        region.add(n)
        info = br.infos.get(n)
        for a in n.all_input_nodes:
            if a not in br.token_nodes or a is br.x_in:
                continue
            if info is not None and a in info.mixing_inputs:
                full.add(a)
                continue
            stack.append(a)
    full_closure = set(full)
    for f in full:
        full_closure |= nx.ancestors(br.g, f) & br.token_nodes
    region -= full_closure
    # an item of a multi-output node computed for all tokens is itself a boundary (lists cannot be gathered)
    region -= {n for n in region if n.target is operator.getitem and n.args[0] not in region}
    br.full = full
    got = _region(br, region)
    if not got:
        site.refusal = got
        return
    site.region = got
    site.region_axes = {n: br.axes[n] for n in region}
    site.local = True


def _region(br: _Branch, nodes: set) -> Region | Refusal:
    """Can ``nodes`` run on k tokens? Their region (with the inputs to gather), or why not."""
    bad = [n for n in nodes if n in br.failed or n not in br.axes]
    if bad:
        first = min(bad, key=br.all_nodes.index)
        inner = br.failed.get(first)
        if inner is None:
            inner = Refusal("no-token-axis", f"{first.name} carries no token axis", node=first.name)
        return inner.wrap("not token-local: ")
    for n in nodes:
        outside = [u for u in n.users if u not in nodes] if n is not br.value else []
        if outside:
            return Refusal("read-outside", f"{n.name} inside the branch is also read by {outside[0].name}", node=n.name)
    boundary: dict = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a in br.token_nodes and a not in nodes and a not in br.infos[n].mixing_inputs:
                boundary[a] = br.axes[a]
        for ext in br.infos[n].external:
            if ext.node in boundary and boundary[ext.node] != ext:
                return Refusal("two-layouts", f"per-token input {ext.node.name} is read with two different layouts",
                               node=ext.node.name)
            boundary[ext.node] = ext
    return Region([n for n in br.all_nodes if n in nodes], boundary)


def _key_value_side(br: _Branch, site: Site) -> None:
    """For ``self_attention="partial-kv"``: the whole branch on k tokens, keys/values from caches.

    The attention's key/value inputs are cached (their token rows, like any branch output); on a
    partial step the selected tokens recompute query, key and value, their key/value rows are
    scattered into the caches, and the selected queries attend over the whole caches. So the key/value
    side must be token-wise up to the attention, and the key/value inputs feed only the attention.
    """
    both = br.token_nodes - {site.stream_in}
    region = _region(br, both)
    if not region:
        site.kv_refusal = region
        return
    mixing = {m for n in both for m in br.infos[n].mixing_inputs}
    for m in mixing:
        ax = br.axes.get(m)
        if m is site.stream_in or ax is None or ax.batch is None or ax.merged is not None:
            site.kv_refusal = Refusal("kv-no-row-axes", f"key/value input {m.name} has no separate batch and token "
                                      "axes to cache rows by", node=m.name)
            return
        token_users = [u for u in m.users if u in both and m not in br.infos[u].mixing_inputs]
        if token_users:
            site.kv_refusal = Refusal("kv-read-token-wise", f"key/value input {m.name} is also read token-wise by "
                                      f"{token_users[0].name}", node=m.name)
            return
        nested = [n for n in nx.ancestors(br.g, m) & both if br.infos[n].mixing_inputs]
        if nested:
            site.kv_refusal = Refusal("kv-nested-mixing", f"the key/value side mixes tokens itself at {nested[0].name}",
                                      node=nested[0].name)
            return
    site.kv = KeyValueSide(values=[n for n in br.all_nodes if n in mixing], region=region)
    for n in both:
        site.region_axes.setdefault(n, br.axes[n])


def _split_parallel(br: _Branch, site: Site) -> None:
    """For a parallel block, the part of the region that does not need attention this step.

    ToCa's FLUX port recomputes the MLP half of a parallel block for the selected tokens and
    combines it with cached attention rows. Here: the attention outputs entering the rest of the
    region (``attn_values``) are cached at fresh steps and gathered from the cache on partial
    steps; the query path and the attention itself drop out of the region.
    """
    region = set(site.region.nodes)
    att = [n for n in region if is_attention(n)]
    # nodes fed by the attention alone (up to where it joins the token-wise path)
    att_side = set(att)
    for n in br.all_nodes:
        if n in region and n not in att_side:
            tok = [a for a in n.all_input_nodes if a in br.token_nodes]
            if tok and all(a in att_side for a in tok):
                att_side.add(n)
    values = [n for n in br.all_nodes if n in att_side
              and any(u in region and u not in att_side for u in n.users)]
    q_side = set(att_side)
    for a in att:
        q_side |= nx.ancestors(br.g, a) & region
    rest = region - q_side
    if not values or not rest or site.value in q_side:
        return
    boundary = {}
    for n in rest:
        for a in n.all_input_nodes:
            if a in br.token_nodes and a not in rest:
                boundary[a] = br.axes[a]
        for ext in br.infos[n].external:
            boundary[ext.node] = ext
    site.parallel = ParallelSplit(attn_values=values, region=Region([n for n in br.all_nodes if n in rest], boundary))


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
