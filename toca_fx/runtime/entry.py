"""One block class captured for one input signature: its analysis and its variant graphs.

Shared by every block of that class (each calls the graphs with its own parameters), so capture
and analysis run once per class and signature.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..analysis import analyze_block, probe_site, run_with_override
from ..capture import Capture
from ..config import ToCaConfig
from ..passes import VariantGraph, build_fresh, build_partial, score_source
from .flops import LinearFlops, TensorSpec, count_flops, spec_of


@dataclass
class Entry:
    key: tuple
    cls_name: str
    capture: Capture | None = None
    analysis: object = None
    failed: str | None = None
    fresh: VariantGraph | None = None
    partials: dict = field(default_factory=dict)
    stream_index: int = 0
    score_role: str | None = None
    score_site: str | None = None
    bonus: float = 0.0
    grid: int = 1
    seconds: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)
    _flops: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    peers: set = field(default_factory=set)          # fine structures of blocks checked to share it
    config: object = None

    @property
    def sites(self):
        return self.analysis.sites if self.analysis is not None else []


def build_entry(key, block, capture: Capture, config: ToCaConfig) -> Entry:
    """Analyse a capture and build its fresh variant (partial variants are built on demand)."""
    e = Entry(key=key, cls_name=type(block).__name__, capture=capture, config=config)
    e.seconds["capture"] = capture.seconds
    t0 = time.perf_counter()
    n_lifted = len(capture.lifted)
    res = analyze_block(capture.gm, n_lifted)
    e.analysis = res
    if res.rejected:
        e.failed = res.rejected
        return e
    user_ph = [n for n in capture.gm.graph.nodes if n.op == "placeholder"][n_lifted:]
    e.stream_index = user_ph.index(res.stream_input)
    if config.probe:
        inputs = capture.lifted_values(block) + list(capture.example_inputs)
        base = run_with_override(capture.gm, inputs, watch=[s.value for s in res.sites])
        for s in res.sites:
            if s.local and s.kind not in ("self_attn", "joint_attn", "parallel"):  # mixing kinds move every row
                why = probe_site(capture.gm, inputs, s, base)
                if why:
                    s.local = False
                    s.reason = why
                    s.probe = "refuted: " + why
                else:
                    s.probe = "confirmed"
    e.seconds["analysis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    e.fresh = build_fresh(capture.gm, res, config.score, kv=config.self_attention == "partial-kv")
    what, site = score_source(res, config.score)
    e.score_role, e.score_site = what, (site.name if site is not None else None)
    if config.score in ("toca", "v-norm", "k-norm") and what is None:
        e.notes.append(f"score {config.score!r} needs an attention this block lacks: staleness only")
    has_cross = any(s.kind == "cross_attn" for s in res.sites)
    e.bonus = config.spatial_bonus if config.spatial_bonus is not None else (0.4 if has_cross else 0.6)
    e.grid = config.spatial_grid if config.spatial_grid is not None else (4 if has_cross else 2)
    side = math.isqrt(res.n_tokens)
    if config.score == "toca" and e.grid > 1 and (side * side != res.n_tokens or side % e.grid):
        e.notes.append(f"s4 spatial bonus off: {res.n_tokens} tokens are not a square grid divisible by {e.grid}")
    e.seconds["rewrite"] = time.perf_counter() - t0
    # the recorded example values are no longer needed; keep only their metadata
    capture.example_inputs = [spec_of(x) for x in capture.example_inputs]
    return e


def cache_dtype(config: ToCaConfig) -> torch.dtype | None:
    return getattr(torch, config.cache_dtype) if config.cache_dtype else None


def partial_variant(e: Entry, actions: dict[str, str], cfg: bool, config: ToCaConfig) -> VariantGraph:
    key = (tuple(sorted(actions.items())), cfg)
    v = e.partials.get(key)
    if v is None:
        t0 = time.perf_counter()
        v = build_partial(e.capture.gm, e.analysis, actions, cfg=cfg, stale_weight=config.staleness_weight,
                          inv_interval=1.0 / config.interval, bonus=e.bonus if config.score == "toca" else 0.0,
                          grid=e.grid if config.score == "toca" else 1, cache_dtype=cache_dtype(config))
        e.partials[key] = v
        e.seconds["rewrite"] = e.seconds.get("rewrite", 0.0) + time.perf_counter() - t0
    return v


def runner(e: Entry, v: VariantGraph, config: ToCaConfig):
    if not config.compile:
        return v.gm
    fn = e.compiled.get(id(v))
    if fn is None:
        fn = torch.compile(v.gm, fullgraph=True)
        e.compiled[id(v)] = fn
    return fn


def extra_inputs_meta(e: Entry, v: VariantGraph, ks: dict[str, int]) -> list:
    """Inputs beyond the user inputs, as TensorSpecs / ints (for FLOP counting)."""
    res = e.analysis
    out = []
    x = e.capture.example_inputs[e.stream_index]
    b = x.shape[0]
    for role, site in v.extra_inputs:
        if role == "cache":
            sv = res.cached_node(site).meta["val"]
            dt = cache_dtype(e.config) or sv.dtype
            out.append(TensorSpec(tuple(sv.shape), tuple(torch.empty(sv.shape).stride()), dt, x.device))
        elif role in ("stale", "score"):
            n = res.site(site).n_tokens if role == "stale" else shape_n(res, int(site))
            out.append(TensorSpec((b, n), (n, 1), torch.float32, x.device))
        elif role == "k":
            out.append(ks[site])
    return out


def shape_n(res, stream: int) -> int:
    return int(res.streams[stream].input.meta["val"].shape[1])


def original_flops(e: Entry, block) -> int:
    if "original" not in e._flops:
        e._flops["original"] = count_flops(e.capture.gm, e.capture.lifted_values(block) + e.capture.example_inputs)
    return e._flops["original"]


def fresh_flops(e: Entry, block) -> int:
    if "fresh" not in e._flops:
        e._flops["fresh"] = count_flops(e.fresh.gm, e.capture.lifted_values(block) + e.capture.example_inputs)
    return e._flops["fresh"]


def variant_flops(e: Entry, v: VariantGraph, block, ks: dict[str, int]) -> int:
    lf = e._flops.get(id(v))
    if lf is None:
        sites = [s for role, s in v.extra_inputs if role == "k"]
        base = e.capture.lifted_values(block) + e.capture.example_inputs
        lf = LinearFlops(v.gm, lambda kk: base + extra_inputs_meta(e, v, kk), sites)
        e._flops[id(v)] = lf
    return lf(ks)
