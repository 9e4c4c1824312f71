"""Token-axis propagation: which axis of each tensor indexes the stream's tokens.

Each rule takes a node and the (batch, token) axes of its token-carrying inputs and returns the
output's axes, or raises ``NotLocal`` with the reason: then output token i may depend on other
input tokens (or the token axis was merged with another axis), and the node cannot be computed
on a subset of the tokens. Rules are registered per ATen op packet (a registry, not an if-chain);
ops tagged ``pointwise`` share the broadcasting rule.

Attention is special: ``scaled_dot_product_attention`` and ``QK^T``-style matmuls are local in
their queries and *mix* over their keys/values; the rule returns the output axes and reports the
key-side inputs in ``Axes.mixing_inputs`` so the rewrite computes those for all tokens.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx

from ..errors import Refusal
from .graph import packet, shape, val

aten = torch.ops.aten


class NotLocal(Exception):
    """Output token i depends on more than input token i; ``refusal`` says why (code and message)."""

    def __init__(self, node: fx.Node, code: str, message: str):
        self.refusal = Refusal(code, f"{node.name}: {message}", stage="analyse", node=node.name)
        super().__init__(self.refusal.message)


@dataclass(frozen=True)
class Axes:
    batch: int | None
    token: int
    merged: int | None = None    # the token axis is (batch x tokens) flattened, batch-major, with this batch size
    token_major: bool = False    # with ``merged``: flattened token-major instead, (tokens x batch)
    batch_merged: int | None = None   # the batch axis is (batch x other axes) flattened, batch-major (heads
                                      # folded into the batch, as nn.MultiheadAttention does), this batch size


@dataclass(frozen=True)
class External:
    """A per-token input that does not come from the stream (a positional table, a RoPE factor,
    a per-query mask): gathered on its token axis like the stream.

    ``axes`` are its own axes (``batch`` None when it has no batch axis, e.g. RoPE's (N, d));
    ``out_ndim`` / ``out_batch`` say how it broadcasts against the op's output, so a batch-less
    table can be expanded to one row per sample before the per-sample gather.
    """

    node: fx.Node
    axes: Axes
    out_ndim: int
    out_batch: int | None


@dataclass
class AxisInfo:
    out: Axes | None                         # axes of the node's output (None: not token-carrying)
    mixing_inputs: list[fx.Node] = field(default_factory=list)   # key/value side of attention
    external: list[External] = field(default_factory=list)       # per-token inputs not from the stream


Rule = Callable[[fx.Node, dict], AxisInfo]
RULES: dict[object, Rule] = {}


def rule(*packets):
    def deco(fn: Rule) -> Rule:
        for p in packets:
            RULES[p] = fn
        return fn
    return deco


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(node: fx.Node, name: str, default=None):
    """The argument ``name`` of an ATen call, read by its schema name (positional or keyword),
    or its schema default; ``default`` when the overload has no such argument."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if not arg.kwarg_only and i < len(node.args):
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return arg.default_value if arg.has_default_value() else default
    return default


def _single_input(node: fx.Node, axes: dict) -> tuple[fx.Node, Axes]:
    a = node.args[0]
    if not isinstance(a, fx.Node) or a not in axes:
        raise NotLocal(node, "not-token-input", "first input is not token-carrying")
    return a, axes[a]


def _out_ndim(node: fx.Node) -> int:
    s = shape(node)
    if s is None:
        raise NotLocal(node, "no-shape", "no recorded shape")
    return len(s)


# -- broadcasting (pointwise) ------------------------------------------------------------------

def _broadcast(node: fx.Node, axes: dict, inputs: list) -> AxisInfo:
    out_nd = _out_ndim(node)
    out_shape = shape(node)
    result: Axes | None = None
    for a in inputs:
        if isinstance(a, fx.Node) and a in axes:
            ax = axes[a]
            off = out_nd - len(shape(a))
            cand = replace(ax, batch=None if ax.batch is None else ax.batch + off, token=ax.token + off)
            if result is None:
                result = cand
            elif cand.token != result.token:
                raise NotLocal(node, "token-axes-differ", "inputs carry tokens on different axes")
            elif result.batch is None:
                result = cand
    if result is None:
        return AxisInfo(None)
    info = AxisInfo(result)
    for a in inputs:
        if isinstance(a, fx.Node) and a not in axes and isinstance(val(a), torch.Tensor):
            s = shape(a)
            off = out_nd - len(s)
            d = result.token - off
            if 0 <= d < len(s) and s[d] != 1:
                if s[d] != out_shape[result.token]:
                    raise NotLocal(node, "token-size-mismatch", f"input {a.name} has size {s[d]} on the token axis")
                if result.batch is None:
                    raise NotLocal(node, "per-token-no-batch", f"per-token input {a.name} without a batch axis on either side")
                db = result.batch - off
                if not (0 <= db < len(s) and s[db] == out_shape[result.batch]):
                    db = None      # broadcast over the batch: expanded before the gather
                info.external.append(External(a, Axes(db, d), out_nd, result.batch))
    return info


def _pointwise(node, axes):
    ins = list(node.args) + list(node.kwargs.values())
    return _broadcast(node, axes, ins)


@rule(aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
      aten.type_as, aten.lift_fresh_copy, aten.native_dropout)
def _identity(node, axes):
    a, ax = _single_input(node, axes)
    v = val(node)
    if isinstance(v, (tuple, list)):
        # several outputs (native_dropout: (output, mask)), each shaped like the input: the node
        # carries the input's axes and getitem passes them on (as for split)
        if not v or not all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape(a) for t in v):
            raise NotLocal(node, "no-shape", "outputs are not all shaped like the input")
        return AxisInfo(ax)
    info = _broadcast(node, axes, [a])
    return info


@rule(aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like)
def _like(node, axes):
    """A tensor shaped like its input (its values do not depend on it): the input's axes. Random
    ``*_like`` factories are left out (a k-token copy would draw different numbers)."""
    a, ax = _single_input(node, axes)
    if shape(node) != shape(a):
        raise NotLocal(node, "no-shape", "output is not shaped like the input")
    return AxisInfo(ax)


@rule(aten.copy)
def _copy(node, axes):
    """The functional ``copy`` (``canonical.py``'s form of ``view.copy_(src)``): src broadcast to self."""
    return _broadcast(node, axes, list(node.args[:2]))


@rule(aten.slice_scatter)
def _slice_scatter(node, axes):
    """``src`` written into a slice of ``self`` (a functional ``view.copy_``): local unless the
    slice runs along the token or batch axis."""
    nd = _out_ndim(node)
    d = _norm(_arg(node, "dim", 0), nd)
    info = _broadcast(node, axes, list(node.args[:2]))
    if info.out is not None and d in (info.out.token, info.out.batch):
        raise NotLocal(node, "slices-token-axis", "scatters into a slice of the token or batch axis")
    return info


@rule(aten.select_scatter)
def _select_scatter(node, axes):
    """``src`` written into ``self.select(dim, index)``: src has no ``dim`` axis."""
    base, src = node.args[0], node.args[1]
    nd = _out_ndim(node)
    d = _norm(_arg(node, "dim"), nd)
    up = lambda x: None if x is None else (x + 1 if x >= d else x)
    cands = []
    if isinstance(base, fx.Node) and base in axes:
        cands.append(axes[base])
    if isinstance(src, fx.Node) and src in axes:
        cands.append(Axes(up(axes[src].batch), up(axes[src].token), axes[src].merged))
    if not cands:
        return AxisInfo(None)
    if any(c.token != cands[0].token for c in cands):
        raise NotLocal(node, "token-axes-differ", "inputs carry tokens on different axes")
    out = next((c for c in cands if c.batch is not None), cands[0])
    if d in (out.token, out.batch):
        raise NotLocal(node, "slices-token-axis", "scatters into the token or batch axis")
    if len(cands) == 1:
        other = src if base in axes else base
        if isinstance(other, fx.Node) and isinstance(val(other), torch.Tensor):
            raise NotLocal(node, "per-token-input", f"{other.name} is written into a token-carrying tensor or "
                           "the other way round, and carries no token axis of its own")
    return AxisInfo(out)


@rule(aten.linear)
def _linear(node, axes):
    a, ax = _single_input(node, axes)
    if ax.token == len(shape(a)) - 1:
        raise NotLocal(node, "contracts-token-axis", "linear contracts the token axis")
    for w in node.args[1:]:
        if isinstance(w, fx.Node) and w in axes:
            raise NotLocal(node, "token-dependent-weight", "linear weight depends on tokens")
    return AxisInfo(ax)


@rule(aten.addmm, aten.mm)
def _addmm(node, axes):
    i = 1 if packet(node) is aten.addmm else 0
    x = node.args[i]
    if x not in axes:
        raise NotLocal(node, "operand-no-tokens", "matrix operand does not carry tokens")
    ax = axes[x]
    if ax.token != 0:
        raise NotLocal(node, "contracts-token-axis", "matrix product contracts the token axis")
    # by position, not by node: mm(x, x) multiplies the token matrix by itself
    others = [a for j, a in enumerate(node.args) if j != i and isinstance(a, fx.Node)]
    if any(a in axes for a in others):
        raise NotLocal(node, "token-token-product", "both operands carry tokens")
    return AxisInfo(ax)


@rule(aten.layer_norm, aten.rms_norm)
def _layer_norm(node, axes):
    a, ax = _single_input(node, axes)
    nd = len(shape(a))
    k = len(node.args[1])
    if ax.token >= nd - k or (ax.batch is not None and ax.batch >= nd - k):
        raise NotLocal(node, "reduces-token-axis", "normalises over the token axis")
    for w in node.args[2:4]:
        if isinstance(w, fx.Node) and w in axes:
            raise NotLocal(node, "token-dependent-weight", "norm weight depends on tokens")
    return AxisInfo(ax)


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum)
def _softmax(node, axes):
    a, ax = _single_input(node, axes)
    d = _norm(node.args[1], len(shape(a)))
    if d == ax.token or d == ax.batch:
        raise NotLocal(node, "reduces-token-axis", "reduces over the token axis")
    return AxisInfo(ax)


@rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm, aten.norm)
def _reduce(node, axes):
    a, ax = _single_input(node, axes)
    nd = len(shape(a))
    # by schema name: var.dim / std.dim are (self, dim, unbiased, keepdim), norm is (self, p, dim,
    # keepdim), var.correction's keepdim is keyword-only
    dims = _arg(node, "dim")
    keep = bool(_arg(node, "keepdim", False))
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or len(dims) == 0:
        # no dim (sum.default, norm.Scalar) or an empty list (sum(x, []), amax's default): every axis
        raise NotLocal(node, "reduces-token-axis", "reduces over all axes")
    dims = sorted({_norm(d, nd) for d in dims})
    if ax.token in dims or (ax.batch is not None and ax.batch in dims):
        raise NotLocal(node, "reduces-token-axis", "reduces over the token or batch axis")
    if keep:
        return AxisInfo(ax)
    shift = lambda x: None if x is None else x - sum(1 for d in dims if d < x)
    return AxisInfo(Axes(shift(ax.batch), shift(ax.token)))


def _map_through_reshape(in_shape, out_shape, d):
    """Output axis that carries exactly input axis d (same size, same prefix product), or None."""
    pre = math.prod(in_shape[:d])
    for j in range(len(out_shape)):
        if out_shape[j] == in_shape[d] and math.prod(out_shape[:j]) == pre:
            return j
    return None


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)
def _reshape(node, axes):
    a, ax = _single_input(node, axes)
    ins, outs = shape(a), shape(node)
    if ax.merged is not None:
        # (B*N, ...) -> (..., B, N, ...) (or (N*B, ...) -> (..., N, B, ...)): split the merged axis back
        pre = math.prod(ins[:ax.token])
        for j in range(len(outs) - 1):
            if outs[j] * outs[j + 1] == ins[ax.token] and math.prod(outs[:j]) == pre:
                if not ax.token_major and outs[j] == ax.merged:
                    return AxisInfo(Axes(j, j + 1))
                if ax.token_major and outs[j + 1] == ax.merged:
                    return AxisInfo(Axes(j + 1, j))
        t = _map_through_reshape(ins, outs, ax.token)
        if t is None:
            raise NotLocal(node, "reshapes-merged-axis", f"reshape of a flattened batch x token axis ({list(ins)} -> {list(outs)})")
        return AxisInfo(replace(ax, token=t))
    if ax.batch_merged is not None:
        # the batch axis holds (B x heads): the tokens map through; the batch axis is split back
        # (its outermost factor B becomes an axis of its own) or kept whole
        t = _map_through_reshape(ins, outs, ax.token)
        if t is None:
            raise NotLocal(node, "reshapes-token-axis", f"reshape merges or splits the token axis ({list(ins)} -> {list(outs)})")
        pre = math.prod(ins[:ax.batch])
        for j in range(len(outs)):
            if j != t and math.prod(outs[:j]) == pre and outs[j] == ax.batch_merged:
                return AxisInfo(Axes(j, t))
        for j in range(len(outs)):
            if j != t and math.prod(outs[:j]) == pre and outs[j] == ins[ax.batch]:
                return AxisInfo(Axes(j, t, batch_merged=ax.batch_merged))
        raise NotLocal(node, "reshapes-batch-axis", f"reshape splits a flattened batch x heads axis ({list(ins)} -> {list(outs)})")
    if ax.batch is not None and ax.batch == ax.token - 1 and (
            _map_through_reshape(ins, outs, ax.token) is None or _map_through_reshape(ins, outs, ax.batch) is None):
        # (B, N, ...) -> (B*N, ...): batch and tokens flattened together (GPT-2's Conv1D). With
        # B == 1 the token axis itself maps through and the batch axis has no image: the same merge.
        pre = math.prod(ins[:ax.batch])
        for j in range(len(outs)):
            if outs[j] == ins[ax.batch] * ins[ax.token] and math.prod(outs[:j]) == pre:
                return AxisInfo(Axes(None, j, ins[ax.batch]))
    t = _map_through_reshape(ins, outs, ax.token)
    if ax.batch is not None and ax.batch == ax.token + 1 and (t is None or _map_through_reshape(ins, outs, ax.batch) is None):
        # (N, B, ...) -> (N*B, ...): tokens and batch flattened token-major (sequence-first layouts,
        # nn.MultiheadAttention's output projection)
        pre = math.prod(ins[:ax.token])
        for j in range(len(outs)):
            if outs[j] == ins[ax.batch] * ins[ax.token] and math.prod(outs[:j]) == pre:
                return AxisInfo(Axes(None, j, ins[ax.batch], token_major=True))
    if t is None:
        raise NotLocal(node, "reshapes-token-axis", f"reshape merges or splits the token axis ({list(ins)} -> {list(outs)})")
    b = None
    if ax.batch is not None:
        b = _map_through_reshape(ins, outs, ax.batch)
        if b is None:
            # (..., B, C, ...) -> (..., B*H, d, ...): the batch flattened with the axes after it,
            # batch-major (heads folded into the batch), the tokens untouched
            pre = math.prod(ins[:ax.batch])
            for j in range(len(outs)):
                if j != t and math.prod(outs[:j]) == pre and outs[j] % ins[ax.batch] == 0 and outs[j] > ins[ax.batch]:
                    return AxisInfo(Axes(j, t, batch_merged=ins[ax.batch]))
            raise NotLocal(node, "reshapes-batch-axis", f"reshape merges the batch axis ({list(ins)} -> {list(outs)})")
    return AxisInfo(Axes(b, t))


@rule(aten.transpose)
def _transpose(node, axes):
    a, ax = _single_input(node, axes)
    nd = len(shape(a))
    d0, d1 = _norm(node.args[1], nd), _norm(node.args[2], nd)
    sw = lambda x: None if x is None else (d1 if x == d0 else d0 if x == d1 else x)
    return AxisInfo(replace(ax, batch=sw(ax.batch), token=sw(ax.token)))


@rule(aten.permute)
def _permute(node, axes):
    a, ax = _single_input(node, axes)
    nd = len(shape(a))
    perm = [_norm(d, nd) for d in node.args[1]]
    inv = lambda x: None if x is None else perm.index(x)
    return AxisInfo(replace(ax, batch=inv(ax.batch), token=inv(ax.token)))


@rule(aten.unsqueeze)
def _unsqueeze(node, axes):
    a, ax = _single_input(node, axes)
    d = _norm(node.args[1], len(shape(a)) + 1)
    sh = lambda x: None if x is None else (x + 1 if x >= d else x)
    return AxisInfo(replace(ax, batch=sh(ax.batch), token=sh(ax.token)))


@rule(aten.squeeze)
def _squeeze(node, axes):
    a, ax = _single_input(node, axes)
    ins, outs = shape(a), shape(node)
    kept = [i for i in range(len(ins))]
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [_norm(d, len(ins)) for d in dims]
        kept = [i for i in range(len(ins)) if not (i in dims and ins[i] == 1)]
    else:
        kept = [i for i in range(len(ins)) if ins[i] != 1]
    if ax.token not in kept or len(kept) != len(outs):
        raise NotLocal(node, "removes-token-axis", "squeeze removes the token axis")
    return AxisInfo(Axes(kept.index(ax.batch) if ax.batch in kept else None, kept.index(ax.token)))


@rule(aten.expand)
def _expand(node, axes):
    a, ax = _single_input(node, axes)
    off = len(shape(node)) - len(shape(a))
    return AxisInfo(Axes(None if ax.batch is None else ax.batch + off, ax.token + off))


@rule(aten.chunk, aten.split, aten.split_with_sizes, aten.unsafe_split, aten.unsafe_chunk)
def _split(node, axes):
    a, ax = _single_input(node, axes)
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    d = _norm(d, len(shape(a)))
    if d in (ax.token, ax.batch):
        raise NotLocal(node, "splits-token-axis", "splits the token or batch axis")
    return AxisInfo(ax)


@rule(aten.unbind)
def _unbind(node, axes):
    a, ax = _single_input(node, axes)
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape(a)))
    if d in (ax.token, ax.batch):
        raise NotLocal(node, "splits-token-axis", "unbinds the token or batch axis")
    sh = lambda x: None if x is None else (x - 1 if x > d else x)
    return AxisInfo(Axes(sh(ax.batch), sh(ax.token)))


@rule(aten.slice, aten.narrow, aten.select)
def _slice(node, axes):
    a, ax = _single_input(node, axes)
    nd = len(shape(a))
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    if d in (ax.token, ax.batch):
        if packet(node) is not aten.select and shape(node)[d] == shape(a)[d]:
            return AxisInfo(ax)   # a full slice (start 0, end >= size) is a no-op
        raise NotLocal(node, "slices-token-axis", "slices the token or batch axis")
    if packet(node) is aten.select:
        sh = lambda x: None if x is None else (x - 1 if x > d else x)
        return AxisInfo(Axes(sh(ax.batch), sh(ax.token)))
    return AxisInfo(ax)


@rule(aten.cat)
def _cat(node, axes):
    tensors = node.args[0]
    nd = _out_ndim(node)
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    info = _broadcast(node, axes, list(tensors))
    if info.out is not None and d in (info.out.token, info.out.batch):
        raise NotLocal(node, "concatenates-token-axis", "concatenates along the token or batch axis")
    return info


@rule(aten.stack)
def _stack(node, axes):
    tensors = node.args[0]
    nd = _out_ndim(node)
    d = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    ins = [a for a in tensors if isinstance(a, fx.Node)]
    if any(a not in axes for a in ins):
        raise NotLocal(node, "stacks-mixed", "stacks token-carrying and other tensors")
    first = axes[ins[0]]
    if any(axes[a] != first for a in ins):
        raise NotLocal(node, "token-axes-differ", "stacked inputs carry tokens on different axes")
    sh = lambda x: None if x is None else (x + 1 if x >= d else x)
    return AxisInfo(Axes(sh(first.batch), sh(first.token)))


@rule(aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa(node, axes):
    q, k, v = node.args[0], node.args[1], node.args[2]
    if q not in axes:
        # queries from non-token inputs attending over tokens: every output depends on all tokens
        raise NotLocal(node, "queries-not-tokens", "queries do not come from the token stream")
    qa = axes[q]
    nd = len(shape(q))
    if qa.token != nd - 2:
        raise NotLocal(node, "queries-not-tokens", "tokens are not the sequence axis of the queries")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    info = AxisInfo(qa)
    mixing = [x for x in (k, v) if isinstance(x, fx.Node) and x in axes]
    if mixing and causal:
        raise NotLocal(node, "causal-attention", "causal self-attention depends on token positions")
    info.mixing_inputs = mixing
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if mask in axes:
            raise NotLocal(node, "token-dependent-mask", "attention mask depends on tokens")
        ms = shape(mask)
        off = nd - len(ms)
        dq = nd - 2 - off
        if 0 <= dq < len(ms) and ms[dq] != 1:
            if qa.merged is not None and qa.token_major:
                raise NotLocal(node, "merged-axis-op", "per-query mask on token-major flattened queries")
            if qa.merged is not None:
                # queries of all samples as one sequence (batch x tokens, batch-major): the mask's rows
                # are flattened the same way (a block-diagonal mask keeps each sample to its own keys)
                if ms[dq] != shape(q)[nd - 2]:
                    raise NotLocal(node, "token-size-mismatch", f"mask {mask.name} has {ms[dq]} query rows")
                info.external.append(External(mask, Axes(None, dq, qa.merged), nd, None))
                return info
            db = -off if 0 <= -off < len(ms) and ms[-off] == shape(q)[0] else None
            info.external.append(External(mask, Axes(db, dq), nd, qa.batch))
    return info


@rule(aten.matmul, aten.bmm)
def _matmul(node, axes):
    a, b = node.args[0], node.args[1]
    if a not in axes:
        raise NotLocal(node, "operand-no-tokens", "left operand of matmul is not token-carrying")
    aa = axes[a]
    nd_a = len(shape(a))
    if aa.token == nd_a - 1:
        raise NotLocal(node, "contracts-token-axis", "matmul contracts the token axis")
    bs = shape(b)
    if bs is not None and len(bs) == 1:
        off = 0     # (..., N, C) @ (C,) -> (..., N): the last axis is dropped, the others stay
    else:
        off = _out_ndim(node) - nd_a    # a's leading axes broadcast against b's batch axes
    info = AxisInfo(Axes(aa.batch + off if aa.batch is not None else None, aa.token + off))
    if isinstance(b, fx.Node) and b in axes:
        info.mixing_inputs = [b]   # attention scores / attention x values: mixes over keys
    return info


@rule(operator.getitem)
def _getitem(node, axes):
    a, ax = _single_input(node, axes)
    return AxisInfo(ax)


_MERGED_OK = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.addmm, aten.mm,
              aten.linear, aten.dropout, aten.clone, aten.contiguous, aten.to, aten._to_copy, aten.alias,
              aten.detach, aten.type_as, aten.native_dropout, aten.empty_like, aten.zeros_like, aten.ones_like,
              aten.full_like,
              # these move the flattened axis whole (their rules keep ``merged``); attention is local in
              # its flattened queries: each query row still attends over the whole key axis
              aten.transpose, aten.permute, aten.unsqueeze, aten.scaled_dot_product_attention,
              aten._scaled_dot_product_flash_attention_for_cpu, operator.getitem}

# ops a batch axis flattened with heads passes through (their rules keep ``batch_merged``; reshapes
# split it back): layout moves only, no arithmetic that would have to know which rows are one sample
_BATCH_MERGED_OK = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.transpose,
                    aten.permute, aten.unsqueeze, aten.clone, aten.contiguous, aten.alias, aten.detach,
                    aten.dropout, aten.native_dropout, aten.to, aten._to_copy, operator.getitem}


def propagate(node: fx.Node, axes: dict) -> AxisInfo:
    """Axes of ``node`` given the axes of its inputs; raises ``NotLocal``."""
    if node.op != "call_function":
        raise NotLocal(node, "not-a-call", f"{node.op} nodes are not analysed")
    p = packet(node)
    tags = getattr(node.target, "tags", ())
    if any(axes[a].batch_merged is not None for a in node.all_input_nodes if a in axes) and p not in _BATCH_MERGED_OK:
        raise NotLocal(node, "batch-merged-op", f"{getattr(p, '__name__', p)} on a flattened batch x heads axis")
    if any(axes[a].merged is not None for a in node.all_input_nodes if a in axes) and p not in _MERGED_OK \
            and torch.Tag.pointwise not in tags:
        raise NotLocal(node, "merged-axis-op", f"{getattr(p, '__name__', p)} on a flattened batch x token axis")
    fn = RULES.get(p)
    if fn is not None:
        return fn(node, axes)
    tags = getattr(node.target, "tags", ())
    if torch.Tag.pointwise in tags:
        return _pointwise(node, axes)
    raise NotLocal(node, "no-axis-rule", f"no token-axis rule for {getattr(p, '__name__', p)}")
