"""Score side-outputs of the fresh variant (DESIGN.md section 3).

Attention maps are materialised only here, on fresh steps, from the queries and keys that the
fused attention call already receives; the fused call itself is kept for the block's output.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..analysis.graph import shape
from .common import GraphBuilder

aten = torch.ops.aten


def _sdpa_parts(node: fx.Node):
    args = list(node.args) + [None] * 8
    q, k, v = args[0], args[1], args[2]
    mask = node.kwargs.get("attn_mask", args[3])
    scale = node.kwargs.get("scale", args[6])
    return q, k, v, mask, scale


def attention_probs(b: GraphBuilder, attn: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """softmax(QK^T * scale + mask) of an SDPA node, as ATen nodes; and the head axes."""
    q, k, v, mask, scale = _sdpa_parts(attn)
    qs, ks = shape(q), shape(k)
    if qs is None or ks is None or len(qs) != len(ks) or qs[:-2] != ks[:-2]:
        return None   # grouped-query or broadcast layouts: no score side-output
    if scale is None:
        scale = 1.0 / math.sqrt(qs[-1])
    nq, nk = b.env[q], b.env[k]
    s = b.call(aten.matmul.default, nq, b.call(aten.transpose.int, nk, -2, -1))
    s = b.call(aten.mul.Tensor, s, float(scale))
    if isinstance(mask, fx.Node):
        m = b.env[mask]
        if mask.meta["val"].dtype == torch.bool:
            s = b.call(aten.masked_fill.Scalar, s, b.call(aten.logical_not.default, m), float("-inf"))
        else:
            s = b.call(aten.add.Tensor, s, m)
    p = b.call(aten._softmax.default, s, -1, False)
    heads = list(range(1, len(qs) - 2))
    b.bump("attention_maps")
    return p, heads


def add_received_attention(b: GraphBuilder, attn: fx.Node, segment: tuple | None = None) -> bool:
    """s1 ingredient: head-mean attention received by each key token, summed over queries (B, N).

    For a joint attention, ``segment`` = (offset, length) keeps this stream's keys only.
    """
    got = attention_probs(b, attn)
    if got is None:
        return False
    p, heads = got
    n_heads = math.prod(shape(attn.args[0])[h] for h in heads) if heads else 1
    col = b.call(aten.sum.dim_IntList, p, heads + [len(heads) + 1], False)
    col = b.call(aten.div.Tensor, col, float(n_heads))
    if segment is not None:
        col = b.call(aten.slice.Tensor, col, 1, segment[0], segment[0] + segment[1])
    b.add_output("received", None, col)
    return True


def add_cross_map(b: GraphBuilder, attn: fx.Node) -> bool:
    """s2 ingredient: head-mean cross-attention map (B, N, L)."""
    got = attention_probs(b, attn)
    if got is None:
        return False
    p, heads = got
    cmap = b.call(aten.mean.dim, p, heads, False) if heads else p
    b.add_output("cross_map", None, cmap)
    return True


def add_norm(b: GraphBuilder, attn: fx.Node, which: str, segment: tuple | None = None) -> bool:
    """k-norm / v-norm ingredient: L2 norm of each token's keys or values over heads (B, N)."""
    q, k, v, mask, scale = _sdpa_parts(attn)
    x = k if which == "k" else v
    xs = shape(x)
    dims = [d for d in range(1, len(xs)) if d != len(xs) - 2]
    nrm = b.call(aten.linalg_vector_norm.default, b.env[x], 2, dims, False)
    if segment is not None:
        nrm = b.call(aten.slice.Tensor, nrm, 1, segment[0], segment[0] + segment[1])
    b.add_output(f"{which}norm", None, nrm)
    return True
