"""The per-site technique registry (``toca_fx.passes.techniques``): what is registered, in which
order the planner asks, which technique ``choose`` picks, which buffers each site gets, and where a
technique refuses. Sites are real ones, from tiny diffusers models after one call."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import toca_fx
from blocks import EscapingBlock, MixerBlock, Stack
from toca_fx import Refusal, ToCaConfig
from toca_fx.analysis.axes import Axes
from toca_fx.analysis.sites import MIXING_KINDS
from toca_fx.passes import TECHNIQUES, choose, site_state
from toca_fx.passes import techniques as T
from toca_fx.passes.bindings import Buffer
from toca_fx.passes.taylor import can_forecast
from zoo import ZOO

# name -> (priority, stats label, takes k, module): the whole registry, one module per technique
REGISTRY = {
    "compute": (0, "compute", False, "compute"),
    "partial_mlp": (10, "partial", True, "mlp_half"),
    "forecast": (15, "forecast", False, "forecast"),
    "reuse": (20, "reuse", False, "reuse"),
    "partial_kv": (30, "partial", True, "kv"),
    "full": (40, "full", False, "full"),
    "partial_forecast": (45, "partial", True, "partial_forecast"),
    "partial": (50, "partial", True, "tokens"),
}


def _sites(model, call):
    toca_fx.transform(model)
    with torch.no_grad():
        call(model)
    return {(p.cls_name, s.name): s for p in toca_fx.explain(model).programs for s in p.sites}


@pytest.fixture(scope="module")
def sites():
    """Real sites: DiT (self-attention, MLP), FLUX (joint attention: not token-local; MLP; a
    parallel single block with an MLP half), a branch escaping its add (not cacheable) and a
    token-mixing MLP (cacheable, not token-local); plus two edited copies of real sites."""
    dit, dit_in = ZOO["dit"]()
    flux, flux_in = ZOO["flux"]()
    out = {}
    got = _sites(dit.eval(), lambda m: m(**dit_in(0)))
    out["dit.self_attn"] = got[("BasicTransformerBlock", "self_attn0")]
    out["dit.mlp"] = got[("BasicTransformerBlock", "mlp0")]
    got = _sites(flux.eval(), lambda m: m(**flux_in(0)))
    out["flux.joint_attn"] = got[("FluxTransformerBlock", "joint_attn0")]
    out["flux.mlp"] = got[("FluxTransformerBlock", "mlp0")]
    out["flux.parallel"] = got[("FluxSingleTransformerBlock", "parallel0")]
    got = _sites(Stack([EscapingBlock(8) for _ in range(2)]).eval(), lambda m: m(torch.randn(2, 6, 8), timestep=1))
    out["escaping.mlp"] = got[("EscapingBlock", "mlp0")]
    got = _sites(Stack([MixerBlock(8, 6) for _ in range(2)]).eval(), lambda m: m(torch.randn(2, 6, 8), timestep=1))
    out["mixer.token_mix"] = got[("MixerBlock", "other0")]
    # F without a separate batch axis (as a flattened batch x token axis would be): nothing to forecast on
    out["no-row-axes.mlp"] = dataclasses.replace(out["dit.mlp"], axes=Axes(batch=None, token=1))
    # a parallel site whose MLP half was not split off
    out["unsplit.parallel"] = dataclasses.replace(out["flux.parallel"], parallel=None)
    return out


def test_the_sites_are_what_the_cases_need(sites):
    facts = {n: (s.kind, s.cacheable, s.local, s.kv is not None, s.parallel is not None, can_forecast(s))
             for n, s in sites.items()}
    assert facts == {
        "dit.self_attn": ("self_attn", True, True, True, False, True),
        "dit.mlp": ("mlp", True, True, False, False, True),
        "flux.joint_attn": ("joint_attn", True, False, False, False, True),
        "flux.mlp": ("mlp", True, True, False, False, True),
        "flux.parallel": ("parallel", True, True, True, True, True),
        "escaping.mlp": ("mlp", False, False, False, False, True),
        "mixer.token_mix": ("other", True, False, False, False, True),
        "no-row-axes.mlp": ("mlp", True, True, False, False, False),
        "unsplit.parallel": ("parallel", True, True, True, False, True),
    }


# -- the registry ----------------------------------------------------------------------------------

def test_every_technique_registered_once_with_its_priority_label_and_module():
    assert {n: (t.priority, t.stats_label, t.uses_k, t.__class__.__module__.rsplit(".", 1)[1])
            for n, t in TECHNIQUES.items()} == REGISTRY
    assert all(t.name == n for n, t in TECHNIQUES.items())
    assert len({type(t) for t in TECHNIQUES.values()}) == len(REGISTRY)       # one class per technique
    assert len({t.priority for t in TECHNIQUES.values()}) == len(REGISTRY)    # no ties in the planner's order


def test_planner_asks_in_priority_order():
    assert [t.name for t in T._ORDER] == list(REGISTRY)
    assert [t.priority for t in T._ORDER] == sorted(p for p, *_ in REGISTRY.values())
    assert T._ORDER == [TECHNIQUES[n] for n in REGISTRY]


def test_register_refuses_a_duplicate_name_and_leaves_the_registry_alone():
    before, order = dict(TECHNIQUES), list(T._ORDER)
    dup = type("Reuse2", (T.Technique,), {"name": "reuse", "priority": 1, "stats_label": "reuse"})()
    with pytest.raises(ValueError, match="'reuse' is registered twice"):
        T.register(dup)
    assert TECHNIQUES == before and T._ORDER == order


def test_register_inserts_by_priority_and_choose_sees_it(monkeypatch, sites):
    monkeypatch.setattr(T, "TECHNIQUES", dict(TECHNIQUES))
    monkeypatch.setattr(T, "_ORDER", list(T._ORDER))
    new = type("Always", (T.Technique,), {"name": "always", "priority": 12, "stats_label": "partial",
                                          "applies": lambda self, site, k, config: True})()
    assert T.register(new) is new
    assert [t.name for t in T._ORDER][:4] == ["compute", "partial_mlp", "always", "forecast"]
    cfg = ToCaConfig()
    assert choose(sites["dit.mlp"], 3, cfg) is new                       # before reuse / partial
    assert choose(sites["escaping.mlp"], 3, cfg).name == "compute"       # compute still asked first
    assert choose(sites["flux.parallel"], 3, cfg).name == "partial_mlp"  # and partial_mlp (priority 10)


def test_choose_raises_when_nothing_applies(monkeypatch, sites):
    monkeypatch.setattr(T, "_ORDER", [TECHNIQUES["compute"]])
    with pytest.raises(LookupError, match="no technique applies to site mlp0"):
        choose(sites["dit.mlp"], 3, ToCaConfig())


# -- choose: the planner ----------------------------------------------------------------------------

def _if_chain(site, k, cfg) -> str:
    """The planner before techniques were units (runtime/block.py ``_actions``), with the forecast
    rules added: the reference ``choose`` must agree with."""
    fc = cfg.forecast_order is not None and can_forecast(site)
    if not site.cacheable:
        return "compute"
    mlp_half = site.kind == "parallel" and site.parallel is not None and cfg.self_attention == "reuse"
    if mlp_half and k > 0 and cfg.forecast_order is None:
        return "partial_mlp"
    if (site.kind in MIXING_KINDS and cfg.self_attention == "reuse") or k == 0:
        return "forecast" if fc else "reuse"
    if cfg.self_attention == "partial-kv" and site.kv is not None and site.local:
        return "partial_kv"
    if not site.local:
        return "full"
    if fc:
        return "partial_forecast"
    return "partial"


CONFIGS = [dict(self_attention=a, forecast_order=f) for a, f in itertools.product(("reuse", "partial", "partial-kv"),
                                                                                 (None, 0, 2))
           if not (a == "partial-kv" and f is not None)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['self_attention']}-fo{c['forecast_order']}")
def test_choose_matches_the_old_if_chain(sites, cfg):
    config = ToCaConfig(**cfg)
    seen = set()
    for (name, site), k in itertools.product(sites.items(), (0, 1, 3)):
        t = choose(site, k, config)
        assert t.name == _if_chain(site, k, config), (name, k)
        assert t.possible(site), (name, k, t.name)          # the planner never picks an impossible one
        seen.add(t.name)
    assert "compute" in seen


@pytest.mark.parametrize("site,k,cfg,expect", [
    ("escaping.mlp", 3, {}, "compute"),
    ("escaping.mlp", 0, dict(forecast_order=1), "compute"),
    ("flux.parallel", 3, {}, "partial_mlp"),
    ("flux.parallel", 0, {}, "reuse"),
    ("flux.parallel", 3, dict(forecast_order=1), "forecast"),
    ("flux.parallel", 3, dict(self_attention="partial"), "partial"),
    ("flux.parallel", 3, dict(self_attention="partial-kv"), "partial_kv"),
    ("unsplit.parallel", 3, {}, "reuse"),
    ("dit.self_attn", 3, {}, "reuse"),
    ("dit.self_attn", 3, dict(forecast_order=0), "forecast"),
    ("dit.self_attn", 3, dict(self_attention="partial"), "partial"),
    ("dit.self_attn", 3, dict(self_attention="partial-kv"), "partial_kv"),
    ("dit.self_attn", 0, dict(self_attention="partial-kv"), "reuse"),
    ("dit.mlp", 0, {}, "reuse"),
    ("dit.mlp", 0, dict(forecast_order=2), "forecast"),
    ("dit.mlp", 3, {}, "partial"),
    ("dit.mlp", 3, dict(self_attention="partial-kv"), "partial"),    # no key/value side
    ("dit.mlp", 3, dict(forecast_order=2), "partial_forecast"),
    ("no-row-axes.mlp", 3, dict(forecast_order=2), "partial"),
    ("no-row-axes.mlp", 0, dict(forecast_order=2), "reuse"),
    ("flux.joint_attn", 3, {}, "reuse"),
    ("flux.joint_attn", 3, dict(self_attention="partial"), "full"),
    ("flux.joint_attn", 3, dict(self_attention="partial", forecast_order=1), "full"),
    ("mixer.token_mix", 3, {}, "full"),
    ("mixer.token_mix", 0, {}, "reuse"),
    ("mixer.token_mix", 3, dict(forecast_order=1), "full"),
])
def test_choose_cases(sites, site, k, cfg, expect):
    assert choose(sites[site], k, ToCaConfig(**cfg)).name == expect


def test_runtime_plans_with_choose():
    """A transformed DiT's partial call runs the variant of exactly what choose picks."""
    model, inputs = ZOO["dit"]()
    toca_fx.transform(model.eval(), interval=3, fresh_ratio=0.25)
    with torch.no_grad():
        model(**inputs(0))
        model(**inputs(1))
    (p,) = toca_fx.explain(model).programs
    recs = [r for r in toca_fx.stats(model).records if r.variant is not None]
    assert sorted(r.block for r in recs) == ["transformer_blocks.0", "transformer_blocks.1"]
    (variant,) = {r.variant for r in recs}                            # both blocks share one variant
    assert {r.ks for r in recs} == {(("mlp0", 4),)}                   # floor(0.25 * 16)
    assert p.partials[variant].actions == {"self_attn0": "reuse", "mlp0": "partial"}
    assert {s.name: choose(s, 4, p.config).name for s in p.sites} == p.partials[variant].actions


# -- site_state: the buffers of a site ------------------------------------------------------------

def _layout(specs):
    return [(s.buffer.name, "node" if s.node is not None else s.tokens, s.filled) for s in specs]


@pytest.mark.parametrize("site,cfg,expect", [
    ("dit.self_attn", {}, ["value", "stale"]),
    ("dit.self_attn", dict(self_attention="partial"), ["value", "stale"]),
    ("dit.self_attn", dict(self_attention="partial-kv"), ["value", "stale", "kv0", "kv1"]),
    ("dit.mlp", dict(self_attention="partial-kv"), ["value", "stale"]),
    ("dit.mlp", dict(forecast_order=2), ["value", "stale", "d1", "d2", "t_upd", "n_upd"]),
    ("dit.mlp", dict(forecast_order=0), ["value", "stale", "t_upd", "n_upd"]),
    ("no-row-axes.mlp", dict(forecast_order=2), ["value", "stale"]),
    ("flux.parallel", {}, ["value", "stale", "attn0"]),
    ("flux.parallel", dict(self_attention="partial"), ["value", "stale"]),
    ("flux.parallel", dict(self_attention="partial-kv"), ["value", "stale", "kv0", "kv1"]),
    ("flux.parallel", dict(forecast_order=1), ["value", "stale", "d1", "t_upd", "n_upd"]),
    ("unsplit.parallel", {}, ["value", "stale"]),
    ("flux.joint_attn", dict(self_attention="partial-kv"), ["value", "stale"]),
    ("flux.joint_attn", dict(forecast_order=3), ["value", "stale", "d1", "d2", "d3", "t_upd", "n_upd"]),
])
def test_site_state_buffers_per_config(sites, site, cfg, expect):
    s = sites[site]
    specs = site_state(s, ToCaConfig(**cfg))
    assert [sp.buffer for sp in specs] == [Buffer(s.name, n) for n in expect]
    n = s.n_tokens
    want = {"value": ("node", True), "stale": (n, True), "t_upd": (n, True), "n_upd": (n, True),
            "kv0": ("node", True), "kv1": ("node", True), "attn0": ("node", True)}
    want.update({f"d{i}": ("node", False) for i in range(1, 9)})
    assert _layout(specs) == [(b, *want[b]) for b in expect]
    by = {sp.buffer.name: sp for sp in specs}
    assert by["value"].node is s.value and by["value"].is_filled and not by["stale"].is_filled
    if "kv0" in by:
        assert [by["kv0"].node, by["kv1"].node] == s.kv.values
    if "attn0" in by:
        assert [by["attn0"].node] == s.parallel.attn_values
    for i in range(1, 4):
        if f"d{i}" in by:                       # shaped like F, maintained by the technique (not copied)
            assert by[f"d{i}"].node is s.value and not by[f"d{i}"].is_filled


def test_program_state_is_site_state_of_its_config():
    """The pipeline's "state" stage allocates exactly site_state's buffers (partial-kv DiT)."""
    model, inputs = ZOO["dit"]()
    toca_fx.transform(model.eval(), self_attention="partial-kv")
    with torch.no_grad():
        model(**inputs(0))
    (p,) = toca_fx.explain(model).programs
    assert {n: [sp.buffer.name for sp in v] for n, v in p.state.items()} == {
        "self_attn0": ["value", "stale", "kv0", "kv1"], "mlp0": ["value", "stale"]}
    assert p.state == {s.name: site_state(s, p.config) for s in p.sites}
    assert p.stages["state"].counts == {"buffers": 6}


# -- possible(): where a technique cannot apply ----------------------------------------------------

def _code(r):
    return True if r is True else (r.code, bool(r), type(r) is Refusal)


@pytest.mark.parametrize("tech,site,expect", [
    ("partial_mlp", "dit.mlp", "no-mlp-half"),
    ("partial_mlp", "unsplit.parallel", "no-mlp-half"),
    ("partial_mlp", "flux.parallel", True),
    ("partial_kv", "dit.mlp", "kv-none"),
    ("partial_kv", "flux.joint_attn", "not-local"),
    ("partial_kv", "mixer.token_mix", "not-local"),
    ("partial_kv", "dit.self_attn", True),
    ("partial_kv", "flux.parallel", True),
    ("partial", "flux.joint_attn", "not-local"),
    ("partial", "escaping.mlp", "not-local"),
    ("partial", "dit.mlp", True),
    ("partial_forecast", "mixer.token_mix", "not-local"),
    ("partial_forecast", "no-row-axes.mlp", "no-row-axes"),
    ("partial_forecast", "dit.mlp", True),
    ("forecast", "no-row-axes.mlp", "no-row-axes"),
    ("forecast", "flux.joint_attn", True),          # a whole branch can be forecast even if not token-local
    ("compute", "dit.mlp", True),
    ("reuse", "flux.joint_attn", True),
    ("full", "mixer.token_mix", True),
])
def test_possible_refuses_with_a_code(sites, tech, site, expect):
    r = TECHNIQUES[tech].possible(sites[site])
    if expect is True:
        assert r is True
    else:
        assert _code(r) == (expect, False, True)
        assert str(r) == r.message and r.stage == "analyse"
        if expect != "kv-none":
            assert sites[site].name in r.message


def test_possible_not_local_carries_the_sites_reason(sites):
    s = sites["mixer.token_mix"]
    r = TECHNIQUES["partial"].possible(s)
    assert s.reason and str(r) == f"site {s.name} is not token-local ({s.reason})"
    assert s.refusal.code == "contracts-token-axis"


def test_partial_kv_possible_returns_the_analysis_refusal(sites):
    why = Refusal("kv-read-token-wise", "key/value input layer_norm is also read token-wise by mul", node="layer_norm")
    s = dataclasses.replace(sites["dit.self_attn"], kv=None, kv_refusal=why)
    assert TECHNIQUES["partial_kv"].possible(s) is why


def test_stats_tokens_per_technique(sites):
    s = sites["dit.mlp"]
    assert {n: t.tokens(s, 5) for n, t in TECHNIQUES.items()} == {
        "compute": 16, "partial_mlp": 5, "forecast": 0, "reuse": 0, "partial_kv": 5, "full": 16,
        "partial_forecast": 5, "partial": 5}


def test_full_site_with_forecast_order_builds_and_runs():
    model = Stack([MixerBlock(8, 6) for _ in range(2)]).eval()
    toca_fx.transform(model, interval=3, fresh_ratio=0.5, forecast_order=1)
    with torch.no_grad():
        for t in (3, 2, 1):
            model(torch.randn(2, 6, 8), timestep=t)
    assert toca_fx.stats(model).calls == {"fresh": 1, "partial": 2}
    (p,) = toca_fx.explain(model).programs
    assert [v.actions for v in p.partials.values()] == [{"self_attn0": "forecast", "other0": "full"}]
