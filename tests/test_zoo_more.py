"""More diffusers 0.42 transformers (issue 14), each with a layout the pass must read structurally:
grouped-query attention (ACE-Step), sequence-first blocks (ERNIE-Image), in-place writes into an
``empty_like`` (Wan, SkyReels-V2) and ``autocast(enabled=False)`` submodules (Z-Image)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import toca_fx
from conftest import rel_err
from toca_fx.capture.canonical import canonicalize
from toca_fx.passes.bindings import ScoreOutput
from toca_fx.passes.common import GraphBuilder
from toca_fx.passes.scores import attention_probs
from zoo import ZOO_MORE

EXACT = dict(interval=2, fresh_ratio=1.0, ratio_schedule="constant", self_attention="partial")
PARTIAL = dict(interval=3, fresh_ratio=0.25)

# The sites computed on k tokens on partial steps (self-attention with self_attention="partial").
TOKEN_WISE = {
    "ace-step": {"self_attn0", "cross_attn0", "mlp0"},
    "ernie-image": {"self_attn0", "mlp0"},
    "wan": {"self_attn0", "cross_attn0", "mlp0"},
    "skyreels-v2": {"self_attn0", "cross_attn0", "mlp0"},
    # RoPE inside autocast(enabled=False) is a higher-order op with no token-axis rule: reused whole
    "z-image": {"mlp0"},
}


def _out(o):
    o = o.sample if hasattr(o, "sample") else o
    o = o[0] if isinstance(o, tuple) else o
    return torch.stack(list(o)) if isinstance(o, list) else o


@pytest.fixture(scope="module", params=sorted(ZOO_MORE))
def model(request):
    m, inputs = ZOO_MORE[request.param]()
    return request.param, m.eval(), inputs


def _run(model, inputs, steps, **config):
    m = copy.deepcopy(model)
    toca_fx.transform(m, **config)
    errs = []
    with torch.no_grad():
        for step in range(steps):
            errs.append(rel_err(_out(m(**inputs(step))), _out(model(**inputs(step)))))
    return m, errs


@pytest.mark.parametrize("overrides", [dict(interval=1), EXACT, dict(EXACT, self_attention="partial-kv")],
                         ids=["all-fresh", "all-tokens", "all-tokens-kv"])
def test_exact_over_consecutive_calls(model, overrides):
    name, model, inputs = model
    m, errs = _run(model, inputs, 3, **overrides)
    assert max(errs) <= 1e-5, (name, errs)
    rep = toca_fx.explain(m)
    assert rep.programs and all(e.failed is None for e in rep.programs), (name, [e.failed for e in rep.programs])
    st = toca_fx.stats(m)
    assert st.calls == ({"fresh": 3} if overrides.get("interval") == 1 else {"fresh": 2, "partial": 1})
    assert sum(b.get("original", 0) for b in st.blocks.values()) == 0       # no block ran unchanged


def test_partial_calls_compute_the_fixed_sites_on_k_tokens(model):
    name, model, inputs = model
    m, errs = _run(model, inputs, 4, self_attention="partial", **PARTIAL)
    st = toca_fx.stats(m)
    assert st.calls == {"fresh": 2, "partial": 2}
    assert st.flops_ratio > 1.05, (name, st.flops_ratio)        # z-image: its self-attention runs in full
    rep = toca_fx.explain(m)
    for e in rep.programs:
        assert e.failed is None, (name, e.failed)
        assert {s.name for s in e.sites if s.local} == TOKEN_WISE[name], (name, e.cls_name, str(rep))
        (v,) = e.partials.values()
        assert {s for s, a in v.actions.items() if a == "partial"} == TOKEN_WISE[name]
    for s in rep.sites:
        assert s.tokens > 1 and (s.token_wise or s.reason), (name, s.name)


def test_gqa_attention_gives_the_score_its_map():
    """ACE-Step: 4 query heads over 2 key/value heads; the fresh step's score side output exists
    (no fallback to staleness) and the cross-attention map comes from keys repeated per head group."""
    model, inputs = ZOO_MORE["ace-step"]()
    m, _ = _run(model.eval(), inputs, 2, interval=2)
    for e in toca_fx.explain(m).programs:
        assert not any("staleness only" in n for n in e.notes), e.notes
        assert e.fresh.outputs == (ScoreOutput("cross_map"),)
        assert e.fresh.counts.get("attention_maps") == 1 and e.fresh.counts.get("gqa_repeats") == 1


def test_gqa_attention_probs_match_sdpa():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    gm = torch.export.export(Attn(), (q, k, v), strict=False).graph_module
    (sdpa,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    b = GraphBuilder(gm.graph)
    p, heads = attention_probs(b, sdpa)
    b.output(ScoreOutput("probs"), p)
    out, probs = b.finish("probs", {}).gm(q, k, v)
    assert heads == [1] and probs.shape == (2, 4, 6, 5)
    torch.testing.assert_close(probs @ v.repeat_interleave(2, dim=1), out)


def test_sequence_first_stream_is_read_on_axis_0():
    model, inputs = ZOO_MORE["ernie-image"]()
    m, _ = _run(model.eval(), inputs, 3, **PARTIAL)
    rep = toca_fx.explain(m)
    (e,) = rep.programs
    assert e.analysis.n_tokens == 21 and any("sequence-first" in n for n in e.analysis.notes)
    assert all(s.token_axis == 0 and s.tokens == 21 for s in rep.sites)
    assert toca_fx.stats(m).calls == {"fresh": 1, "partial": 2}


def test_sequence_first_random_score_is_drawn_per_sample():
    """The per-call random score is (batch, tokens) of the stream's own axes (batch on axis 1)."""
    model, inputs = ZOO_MORE["ernie-image"]()
    m, _ = _run(model.eval(), inputs, 3, score="random", **PARTIAL)
    (e,) = toca_fx.explain(m).programs
    assert e.score.score.name == "random" and toca_fx.stats(m).calls["partial"] > 0
    _, errs = _run(model.eval(), inputs, 3, **{**EXACT, "score": "random"})
    assert max(errs) <= 1e-5


def test_in_place_writes_into_views_become_functional():
    """``out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b`` (Wan's RoPE): the readers
    of ``out`` read slice_scatter results, so a k-token copy of the region computes the same rows."""
    class Rope(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            out = torch.empty_like(y)
            out[..., 0::2] = y[..., 1::2]
            out[..., 1::2] = -y[..., 0::2]
            return out + 1

    x = torch.randn(2, 5, 4)
    gm = torch.export.export(Rope(), (x,), strict=False).graph_module
    counts = canonicalize(gm)
    assert counts["inplace_views"] == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.copy_.default not in targets
    assert targets.count(torch.ops.aten.slice_scatter.default) == 2
    torch.testing.assert_close(gm(x)[0], Rope()(x))


def test_autocast_submodules_survive_in_variants():
    """Z-Image: the variants call torch.export's ``wrap_with_autocast`` submodules of the capture."""
    model, inputs = ZOO_MORE["z-image"]()
    m, errs = _run(model.eval(), inputs, 2, interval=2)
    for e in toca_fx.explain(m).programs:
        assert e.failed is None
        for v in [e.fresh, *e.partials.values()]:
            subs = [n.target for n in v.gm.graph.nodes if n.op == "get_attr"]
            assert subs and all(isinstance(getattr(v.gm, t), torch.fx.GraphModule) for t in subs)
        (site,) = [s for s in e.sites if s.name == "self_attn0"]
        assert not site.local and "wrap_with_autocast" in site.refusal.message
    assert math.isfinite(toca_fx.stats(m).flops_ratio)
