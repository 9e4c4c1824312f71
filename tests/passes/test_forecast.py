"""TaylorSeer forecasting and token-wise forecasting (passes/taylor.py, techniques forecast / partial_forecast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import toca_fx
from blocks import Attention
from conftest import make_dit, make_pixart, rel_err, sample_dit, sample_pixart
from toca_fx.runtime import schedule


class _Poly(nn.Module):
    """Attention, then an MLP branch F(t) = fc(norm(x) * p(t)) = p(t) W norm(x) + b: for a fixed input x,
    F is a polynomial in t of p's degree (p: coefficients ``coef``), so forecasts can be checked exactly."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = Attention(d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x, p):
        x = x + self.attn(self.n1(x))
        return x + self.fc(self.n2(x) * p.reshape(-1, 1, 1))


class _PolyStack(nn.Module):
    def __init__(self, coef, n=1):     # one block: its input, hence n2(x), is the same every call
        super().__init__()
        self.blocks = nn.ModuleList([_Poly() for _ in range(n)])
        self.coef = coef

    def forward(self, x, t):
        p = sum(c * t ** i for i, c in enumerate(self.coef))
        for b in self.blocks:
            x = b(x, p)
        return x


def _poly_run(coef, order, steps=9, h=0.5):
    torch.manual_seed(0)
    net = _PolyStack(coef).eval()
    ref = copy.deepcopy(net)
    toca_fx.transform(net, interval=4, fresh_ratio=0.0, forecast_order=order, warmup=order + 1,
                      forecast_variable="timestep", timestep_arg="t")
    x = torch.randn(2, 4, 8)
    out = []
    with torch.no_grad():
        for step in range(steps):
            t = torch.full((2,), 3.0 - h * step)
            out.append((net(x, t=t), ref(x, t=t)))
    assert toca_fx.stats(net).calls["partial"] >= 4
    return out


def _fresh_set(cfg, n=50):
    out, last = [], None
    for s in range(n):
        if schedule.is_fresh(cfg, s, last, s / n, n):
            out.append(s)
            last = s
    return out


def test_taylorseer_preset_reproduces_the_official_fresh_steps():
    # TaylorSeer-DiT (N=5, first_enhance=2, step counter 49 -> 0): full steps 49, 48, 43, ..., 3, i.e. call
    # indices 0, 1, 6, ..., 46: 11 of 50
    assert _fresh_set(toca_fx.ToCaConfig.preset("taylorseer")) == [0, 1] + list(range(6, 50, 5))
    assert _fresh_set(toca_fx.ToCaConfig.preset("forecast-n4")) == [0, 1] + list(range(4, 49, 4)) + [49]
    assert _fresh_set(toca_fx.ToCaConfig(interval=3, fresh_steps=(0, 7, 9))) == [0, 7, 9]


@pytest.mark.parametrize("order,coef", [(0, (1.5,)), (1, (1.0, 0.5)), (2, (1.0, 0.5))], ids=["0", "1", "2"])
def test_forecast_is_exact_on_polynomials_of_degree_at_most_one(order, coef):
    """Orders 0 and 1 are exact on polynomials of their degree; order 2 is exact on a linear one too
    (its second difference is 0)."""
    for got, want in _poly_run(coef, order):
        assert rel_err(got, want) < 1e-5


def test_order_two_on_a_quadratic_has_the_chained_difference_bias():
    """TaylorSeer's chained differences D_{i+1} = (D_i(k) - D_i(k-1)) / (s_k - s_{k-1}) (the official code,
    kept as it is) are backward differences: on F = a + b s + c s^2 with fresh steps h apart, D_1 = F'(s_k) -
    c h_k; with the gaps h_1 = 0.5 (warm-up) then h = 2.0 in t, D_2 = 2c - c (h - h_1) / h, and the order-2
    forecast at offset x misses by E(x) = c h x + c x^2 (h - h_1) / (2 h), not 0. Checked through the block's
    (linear) output, where the error is E(x) times a fixed tensor: the ratios E(x2)/E(x1) must match."""
    c = 0.25
    runs = _poly_run((1.0, 0.5, c), 2, steps=12)
    errs = [float((g - w).abs().max()) for g, w in runs]
    fresh = [0, 1, 2, 6, 10]                    # warm-up 3, then every 4 calls
    assert max(errs[i] for i in fresh) < 1e-5
    # calls 7, 8, 9 forecast from 6 at x = 0.5, 1.0, 1.5 in t
    h, h1 = 2.0, 0.5

    def bias(x):
        return c * h * x + c * x * x * (h - h1) / (2 * h)
    e7, e8, e9 = errs[7], errs[8], errs[9]
    assert e7 > 1e-4
    assert abs(e8 / e7 - bias(1.0) / bias(0.5)) < 1e-3 and abs(e9 / e7 - bias(1.5) / bias(0.5)) < 1e-3


def test_order_zero_forecast_is_bit_identical_to_reuse():
    a, b = make_dit(), make_dit()
    toca_fx.transform(a, interval=3, fresh_ratio=0.0)
    toca_fx.transform(b, interval=3, fresh_ratio=0.0, forecast_order=0)
    assert torch.equal(sample_dit(a, steps=8), sample_dit(b, steps=8))
    assert toca_fx.stats(b).sites["transformer_blocks.0.mlp0"].get("forecast", 0) > 0


@pytest.mark.parametrize("make,sample", [(make_dit, sample_dit), (make_pixart, sample_pixart)], ids=["dit", "pixart"])
@pytest.mark.parametrize("overrides", [
    dict(interval=1, forecast_order=2),
    dict(interval=3, fresh_ratio=1.0, forecast_order=2, self_attention="partial"),
    dict(interval=3, fresh_ratio=1.0, forecast_order=1, self_attention="partial", score="forecast-error"),
], ids=["all-fresh", "all-tokens", "all-tokens-error-score"])
def test_forecasting_is_exact_in_its_degenerate_cases(make, sample, overrides):
    model = make()
    ref = sample(copy.deepcopy(model), steps=8)
    toca_fx.transform(model, **overrides)
    assert rel_err(sample(model, steps=8), ref) <= 1e-5
    st = toca_fx.stats(model)
    if overrides["interval"] == 3:
        assert st.calls["partial"] > 0


def test_forecast_differs_from_reuse_and_keeps_m_plus_one_tables():
    a, b = make_dit(), make_dit()
    toca_fx.transform(a, interval=3, fresh_ratio=0.0)
    toca_fx.transform(b, interval=3, fresh_ratio=0.0, forecast_order=2)
    assert not torch.equal(sample_dit(a, steps=8), sample_dit(b, steps=8))
    from conftest import branch_state
    names = {n for n, _ in branch_state(b, "transformer_blocks.0").named_buffers()}
    assert {"value_mlp0", "d1_mlp0", "d2_mlp0", "t_upd_mlp0", "n_upd_mlp0"} <= names and "d3_mlp0" not in names


@pytest.mark.parametrize("order", [0, 1, 3])
def test_stats_reports_bytes_per_site_and_order_m_costs_m_plus_one_tensors(order):
    from conftest import branch_state
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.0, forecast_order=order)
    sample_dit(model, steps=4)
    st = toca_fx.stats(model)
    bufs = dict(branch_state(model, "transformer_blocks.0").named_buffers())
    value = bufs["value_mlp0"]
    # value-sized tensors of the site: F itself (D0) and D1..Dm; the per-token counters are (batch, tokens)
    big = [n for n, t in bufs.items() if n.endswith("_mlp0") and t.shape == value.shape]
    assert len(big) == order + 1, big
    # stats sums the block's branch states (one per CFG branch)
    block_state = model.get_submodule("_toca_fx_state.transformer_blocks__0")
    expect = sum(t.numel() * t.element_size() for br in block_state.children()
                 for n, t in br.named_buffers() if n.endswith("_mlp0"))
    assert expect >= value.numel() * value.element_size() * (order + 1)
    assert st.site_bytes["transformer_blocks.0.mlp0"] == expect
    assert sum(st.site_bytes.values()) <= st.cache_bytes
    assert "KiB" in str(st)


def test_token_wise_forecast_refreshes_the_rows_it_recomputes():
    """Token-wise forecasting on a branch linear in t: recomputed rows and forecast rows are all exact, so
    rows refreshed on partial steps keep correct per-token offsets and slopes."""
    torch.manual_seed(0)
    net = _PolyStack((1.0, 0.5)).eval()
    ref = copy.deepcopy(net)
    toca_fx.transform(net, interval=4, fresh_ratio=0.5, forecast_order=1, warmup=2, timestep_arg="t",
                      forecast_variable="timestep", score="forecast-error", staleness_weight=0.0)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        for step in range(10):
            t = torch.full((2,), 3.0 - 0.25 * step)
            assert rel_err(net(x, t=t), ref(x, t=t)) < 1e-5, step
    st = toca_fx.stats(net)
    assert st.calls["partial"] >= 6 and st.sites["blocks.0.mlp0"]["partial"] >= 6


def test_duca_cycle_alternates_token_wise_and_aggressive_calls():
    model = make_dit()
    toca_fx.transform(model, "duca", interval=4, fresh_ratio=0.25)
    sample_dit(model, steps=8)
    st = toca_fx.stats(model).sites["transformer_blocks.0.mlp0"]
    # calls 0 and 4 fresh; offsets 1, 3 token-wise; offset 2 aggressive (reused)
    assert st["fresh"] == 2 and st["partial"] == 4 and st["reuse"] == 2


def test_adaptive_fresh_calls_follow_the_input_change():
    model = make_dit()
    toca_fx.transform(model, interval=6, fresh_ratio=0.0, adaptive_threshold=1e-9)   # any change: always fresh
    sample_dit(model, steps=6)
    assert toca_fx.stats(model).calls == {"fresh": 6, "partial": 0}
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.0, adaptive_threshold=1e9)    # never: every 3rd call
    sample_dit(model, steps=7)
    assert toca_fx.stats(model).calls == {"fresh": 3, "partial": 4}


def test_forecast_error_score_needs_forecasting():
    with pytest.raises(ValueError, match="forecast-error"):
        toca_fx.ToCaConfig(score="forecast-error")
