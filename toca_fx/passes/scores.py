"""Token scores (DESIGN.md section 3): the one registry of what each configured score needs.

A score has up to three parts:

* its **source**: which site of the block feeds it (``Score.source(analysis)``);
* its **ingredient**: an ATen side output of the *fresh* variant (attention received, the
  cross-attention map, k/v norms). Attention maps are materialised only here, on fresh steps, from
  the queries and keys the fused attention call already receives; the fused call stays fused;
* its **finisher**: ingredient -> the per-token base score (B, N), run once per fresh step.

The staleness (s3) and spatial (s4) terms and top-k are applied on partial steps by
the selection the partial pass writes into the graph (``passes/select.py``; reference:
``toca_fx/ops.py``). ``ToCaConfig.score`` accepts exactly the names of
``SCORES``.

Example::

    plan = resolve_score("toca", analysis)
    plan.ingredient.name, plan.site.name, plan.bonus, plan.grid    # ('received', 'self_attn0', 0.6, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analysis.graph import shape
from ..analysis.sites import BlockAnalysis, Site
from ..errors import Refusal
from .common import GraphBuilder

aten = torch.ops.aten


# -- graph ingredients ---------------------------------------------------------------------------

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
    if qs is None or ks is None or len(qs) != len(ks) or len(qs) < 3:
        return None   # broadcast layouts: no score side-output
    nq, nk = b.env[q], b.env[k]
    if qs[:-2] != ks[:-2]:
        # grouped-query attention (SDPA's enable_gqa): key head j serves query heads
        # j*g .. j*g+g-1, so the keys are repeated g times on the head axis, as SDPA does
        hq, hk = qs[-3], ks[-3]
        if qs[:-3] != ks[:-3] or hk == 0 or hq % hk:
            return None
        nk = b.call(aten.repeat_interleave.self_int, nk, hq // hk, -3)
        b.bump("gqa_repeats")
    if scale is None:
        scale = 1.0 / math.sqrt(qs[-1])
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


def _stream_rows(b: GraphBuilder, node: fx.Node, site: Site, which: int, rest=()) -> fx.Node:
    """(1, B*N, *rest) -> (B, N, *rest) when the attention's query (which=0) or key (1) token axis is
    the batch and tokens flattened batch-major (queries of all samples as one sequence); else ``node``."""
    ax = site.attention_axes[which]
    if ax is None or ax.merged is None:
        return node
    x = site.attention.args[which]
    return b.call(aten.reshape.default, node, [ax.merged, shape(x)[-2] // ax.merged] + list(rest))


def _received_attention(b: GraphBuilder, site: Site) -> fx.Node | None:
    """s1 ingredient: head-mean attention received by each key token, summed over queries (B, N).
    For a joint attention only this stream's segment of the key axis is kept."""
    got = attention_probs(b, site.attention)
    if got is None:
        return None
    p, heads = got
    n_heads = math.prod(shape(site.attention.args[0])[h] for h in heads) if heads else 1
    col = b.call(aten.sum.dim_IntList, p, heads + [len(heads) + 1], False)
    col = _stream_rows(b, b.call(aten.div.Tensor, col, float(n_heads)), site, 1)
    if site.key_segment is not None:
        off, n = site.key_segment
        col = b.call(aten.slice.Tensor, col, 1, off, off + n)
    return col


def _cross_map(b: GraphBuilder, site: Site) -> fx.Node | None:
    """s2 ingredient: head-mean cross-attention map (B, N, L)."""
    got = attention_probs(b, site.attention)
    if got is None:
        return None
    p, heads = got
    cmap = b.call(aten.mean.dim, p, heads, False) if heads else p
    return _stream_rows(b, cmap, site, 0, [shape(site.attention.args[1])[-2]])


def _norm_of(which: str):
    def add(b: GraphBuilder, site: Site) -> fx.Node:
        """k-norm / v-norm ingredient: L2 norm of each token's keys or values over heads (B, N)."""
        q, k, v, mask, scale = _sdpa_parts(site.attention)
        x = k if which == "k" else v
        xs = shape(x)
        dims = [d for d in range(1, len(xs)) if d != len(xs) - 2]
        nrm = _stream_rows(b, b.call(aten.linalg_vector_norm.default, b.env[x], 2, dims, False), site, 1)
        if site.key_segment is not None:
            off, n = site.key_segment
            nrm = b.call(aten.slice.Tensor, nrm, 1, off, off + n)
        return nrm
    return add


# -- finishers -----------------------------------------------------------------------------------

def received_attention(col: torch.Tensor, paired: bool) -> torch.Tensor:
    """s1: attention received (head-mean, summed over queries), L2-normalised over tokens."""
    return F.normalize(col.float(), dim=1, p=2)


def cross_entropy_score(cmap: torch.Tensor, paired: bool) -> torch.Tensor:
    """s2: norm(1 + H_i), H_i = -sum_j C_ij log(C_ij + 1e-7); the CFG halves' maps averaged first."""
    c = cmap.float()
    if paired:
        half = c.shape[0] // 2
        c = 0.5 * (c[:half] + c[half:])
    h = -(c * torch.log(c + 1e-7)).sum(dim=-1)
    s = F.normalize(1.0 + h, dim=1, p=2)
    return torch.cat([s, s], dim=0) if paired else s


def norm_score(norm: torch.Tensor, paired: bool) -> torch.Tensor:
    """k-norm / v-norm (DuCa's flash-compatible scores): per-token norm, L2-normalised."""
    return F.normalize(norm.float(), dim=1, p=2)


# -- the registries ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ingredient:
    """A fresh-step side output and its finisher."""

    name: str
    add: Callable[[GraphBuilder, Site], fx.Node | None]    # the side output (None: layout unsupported)
    finish: Callable[[torch.Tensor, bool], torch.Tensor]   # (value, CFG halves paired) -> (B, N)
    rows: int = 1                  # the attention input whose token axis indexes the score: 0 queries, 1 keys


INGREDIENTS: dict[str, Ingredient] = {
    i.name: i for i in (
        Ingredient("received", _received_attention, received_attention),
        Ingredient("cross_map", _cross_map, cross_entropy_score, rows=0),
        Ingredient("knorm", _norm_of("k"), norm_score),
        Ingredient("vnorm", _norm_of("v"), norm_score),
    )}


def _attention_sites(analysis: BlockAnalysis, skip=()) -> dict[str, Site]:
    by_kind: dict[str, Site] = {}
    for s in analysis.sites:
        if s.attention is not None and s.stream == 0 and s.name not in skip:
            by_kind.setdefault(s.kind, s)
    return by_kind


def _toca_source(analysis: BlockAnalysis, skip=()):
    """s2 from the first cross-attention; else s1 from self-attention, a parallel block or this
    stream's segment of a joint attention."""
    by_kind = _attention_sites(analysis, skip)
    if "cross_attn" in by_kind:
        return INGREDIENTS["cross_map"], by_kind["cross_attn"]
    for kind in ("self_attn", "parallel"):
        if kind in by_kind:
            return INGREDIENTS["received"], by_kind[kind]
    if "joint_attn" in by_kind and by_kind["joint_attn"].key_segment is not None:
        return INGREDIENTS["received"], by_kind["joint_attn"]
    return None


def _norm_source(which: str):
    def source(analysis: BlockAnalysis, skip=()):
        by_kind = _attention_sites(analysis, skip)
        src = by_kind.get("self_attn") or by_kind.get("parallel") or by_kind.get("joint_attn")
        if src is not None and (src.kind == "self_attn" or src.key_segment is not None):
            return INGREDIENTS[which + "norm"], src
        return None
    return source


@dataclass(frozen=True)
class Score:
    """One value of ``ToCaConfig.score``."""

    name: str
    source: Callable[..., tuple | None] | None = None   # (analysis, skip: site names) -> (Ingredient, Site) or None
    spatial: bool = False          # s4 (ToCa's spatial bonus) is added on partial steps
    random: bool = False           # the base score is drawn per partial call
    in_graph: bool = False         # computed by the technique inside the partial graph


SCORES: dict[str, Score] = {
    s.name: s for s in (
        Score("toca", _toca_source, spatial=True),
        Score("v-norm", _norm_source("v")),
        Score("k-norm", _norm_source("k")),
        Score("random", random=True),
        Score("staleness"),
        # token-wise forecasting: computed in the partial graph from the site's own tables
        Score("forecast-error", in_graph=True),
    )}

# ToCa's s4 defaults: DiT (no cross-attention) beta 0.6 on 2x2 tiles, PixArt beta 0.4 on 4x4 tiles.
SPATIAL_DEFAULTS = {False: (0.6, 2), True: (0.4, 4)}


@dataclass(frozen=True)
class ScorePlan:
    """The score of one block program: resolved once, in the pipeline's "score" stage."""

    score: Score
    ingredient: Ingredient | None
    site: Site | None
    bonus: float                   # s4 beta (0 when the score has no s4)
    grid: int                      # s4 tile side (1: off)
    refusal: Refusal | None = None  # why the configured score fell back to staleness only


def layout_refusal(ingredient: Ingredient, site: Site, analysis: BlockAnalysis) -> Refusal | None:
    """Why the ingredient's rows are not the stream's (B, N) tokens (None: they are). The rows come
    from the attention's queries (``rows=0``) or keys (1): their stream axes when the analysis knows
    them (batch first and tokens on the sequence axis, or batch x tokens flattened batch-major with a
    leading axis of 1), else their shape."""
    x = site.attention.args[ingredient.rows]
    ax = site.attention_axes[ingredient.rows]
    xs = shape(x) if isinstance(x, fx.Node) else None
    b, n = analysis.stream_batch(site.stream), analysis.stream_tokens(site.stream)
    what = "queries" if ingredient.rows == 0 else "keys"
    if xs is None or len(xs) < 3:
        return Refusal("score-layout", f"{ingredient.name} of {site.name}: the {what} have no (batch, heads, tokens, "
                       "dim) layout", stage="score", node=site.attention.name)
    seq = xs[-2]
    if ax is not None:
        if ax.token != len(xs) - 2:
            why = f"the stream's tokens are on axis {ax.token} of the {what} {list(xs)}, not their sequence axis"
        elif ax.merged is not None:
            if ax.token_major:
                why = f"the {what} {list(xs)} flatten tokens and batch token-major"
            elif xs[0] != 1:
                why = f"the {what} {list(xs)} flatten batch and tokens under a leading axis of {xs[0]}"
            elif ax.merged != b:
                why = f"the {what} flatten a batch of {ax.merged}, the stream's is {b}"
            else:
                why, seq = None, seq // ax.merged
        elif ax.batch != 0:
            why = f"the {what} {list(xs)} carry the batch on axis {ax.batch}, not axis 0"
        else:
            why = None
        if why is None and site.key_segment is None and seq != n:
            why = f"the {what} carry {seq} tokens, the stream {n}"
    elif xs[0] != b:
        why = f"the {what} {list(xs)} lead with {xs[0]}, not the stream's batch of {b}"
    elif site.key_segment is None and seq != n:
        why = f"the {what} {list(xs)} carry {seq} tokens on their sequence axis, the stream {n}"
    else:
        why = None
    if why is None:
        return None
    return Refusal("score-layout", f"{ingredient.name} of {site.name} dropped: {why}", stage="score",
                   node=site.attention.name)


def resolve_score(name: str, analysis: BlockAnalysis, spatial_bonus: float | None = None,
                  spatial_grid: int | None = None) -> ScorePlan:
    """The score plan; a source whose attention map does not index the stream's (B, N) tokens
    (``layout_refusal``) is dropped with its reason, and the next candidate source is tried."""
    score = SCORES[name]
    dropped: list[Refusal] = []
    got = None
    if score.source is not None:
        skip: set[str] = set()
        while (got := score.source(analysis, frozenset(skip))):
            why = layout_refusal(got[0], got[1], analysis)
            if why is None:
                break
            dropped.append(why)
            skip.add(got[1].name)
    ingredient, site = got if got else (None, None)
    refusal = None
    if score.source is not None and got is None:
        refusal = Refusal("score-needs-attention", f"score {name!r} needs an attention this block lacks: "
                          "staleness only", stage="score")
    if dropped:
        rest = f"s from {ingredient.name} of {site.name}" if ingredient is not None else " staleness only"
        refusal = Refusal("score-layout", f"score {name!r}: " + "; ".join(r.message for r in dropped)
                          + f"; score{rest}", stage="score", node=dropped[0].node)
    has_cross = any(s.kind == "cross_attn" for s in analysis.sites)
    bonus, grid = SPATIAL_DEFAULTS[has_cross]
    bonus = spatial_bonus if spatial_bonus is not None else bonus
    grid = spatial_grid if spatial_grid is not None else grid
    if not score.spatial:
        bonus, grid = 0.0, 1
    return ScorePlan(score, ingredient, site, float(bonus), int(grid), refusal)
