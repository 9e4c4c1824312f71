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


def _received_attention(b: GraphBuilder, site: Site) -> fx.Node | None:
    """s1 ingredient: head-mean attention received by each key token, summed over queries (B, N).
    For a joint attention only this stream's segment of the key axis is kept."""
    got = attention_probs(b, site.attention)
    if got is None:
        return None
    p, heads = got
    n_heads = math.prod(shape(site.attention.args[0])[h] for h in heads) if heads else 1
    col = b.call(aten.sum.dim_IntList, p, heads + [len(heads) + 1], False)
    col = b.call(aten.div.Tensor, col, float(n_heads))
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
    return b.call(aten.mean.dim, p, heads, False) if heads else p


def _norm_of(which: str):
    def add(b: GraphBuilder, site: Site) -> fx.Node:
        """k-norm / v-norm ingredient: L2 norm of each token's keys or values over heads (B, N)."""
        q, k, v, mask, scale = _sdpa_parts(site.attention)
        x = k if which == "k" else v
        xs = shape(x)
        dims = [d for d in range(1, len(xs)) if d != len(xs) - 2]
        nrm = b.call(aten.linalg_vector_norm.default, b.env[x], 2, dims, False)
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


INGREDIENTS: dict[str, Ingredient] = {
    i.name: i for i in (
        Ingredient("received", _received_attention, received_attention),
        Ingredient("cross_map", _cross_map, cross_entropy_score),
        Ingredient("knorm", _norm_of("k"), norm_score),
        Ingredient("vnorm", _norm_of("v"), norm_score),
    )}


def _attention_sites(analysis: BlockAnalysis) -> dict[str, Site]:
    by_kind: dict[str, Site] = {}
    for s in analysis.sites:
        if s.attention is not None and s.stream == 0:
            by_kind.setdefault(s.kind, s)
    return by_kind


def _toca_source(analysis: BlockAnalysis):
    """s2 from the first cross-attention; else s1 from self-attention, a parallel block or this
    stream's segment of a joint attention."""
    by_kind = _attention_sites(analysis)
    if "cross_attn" in by_kind:
        return INGREDIENTS["cross_map"], by_kind["cross_attn"]
    for kind in ("self_attn", "parallel"):
        if kind in by_kind:
            return INGREDIENTS["received"], by_kind[kind]
    if "joint_attn" in by_kind and by_kind["joint_attn"].key_segment is not None:
        return INGREDIENTS["received"], by_kind["joint_attn"]
    return None


def _norm_source(which: str):
    def source(analysis: BlockAnalysis):
        by_kind = _attention_sites(analysis)
        src = by_kind.get("self_attn") or by_kind.get("parallel") or by_kind.get("joint_attn")
        if src is not None and (src.kind == "self_attn" or src.key_segment is not None):
            return INGREDIENTS[which + "norm"], src
        return None
    return source


@dataclass(frozen=True)
class Score:
    """One value of ``ToCaConfig.score``."""

    name: str
    source: Callable[[BlockAnalysis], tuple | None] | None = None   # (Ingredient, Site) or None
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


def resolve_score(name: str, analysis: BlockAnalysis, spatial_bonus: float | None = None,
                  spatial_grid: int | None = None) -> ScorePlan:
    score = SCORES[name]
    got = score.source(analysis) if score.source is not None else None
    ingredient, site = got if got else (None, None)
    refusal = None
    if score.source is not None and got is None:
        refusal = Refusal("score-needs-attention", f"score {name!r} needs an attention this block lacks: "
                          "staleness only", stage="score")
    has_cross = any(s.kind == "cross_attn" for s in analysis.sites)
    bonus, grid = SPATIAL_DEFAULTS[has_cross]
    bonus = spatial_bonus if spatial_bonus is not None else bonus
    grid = spatial_grid if spatial_grid is not None else grid
    if not score.spatial:
        bonus, grid = 0.0, 1
    return ScorePlan(score, ingredient, site, float(bonus), int(grid), refusal)
