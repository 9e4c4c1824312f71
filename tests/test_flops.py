"""FLOPs measured independently with FlopCounterMode, and stats() against the measurement."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import toca_fx
from conftest import make_dit, sample_dit


def _measure(model, **kw):
    with FlopCounterMode(display=False) as fc:
        out = sample_dit(model, **kw)
    return out, fc.get_total_flops()


def test_toca_ddim50_cuts_flops_like_the_paper():
    """28 blocks, 64 tokens, width 288 (DiT-XL/2's tokens/width ratio), DDIM-50 with CFG."""
    model = make_dit(num_layers=28, heads=4, head_dim=72, sample=16)
    kw = dict(steps=50, batch=1, sample=16)
    _, f_orig = _measure(model, **kw)
    toca_fx.transform(model, toca_fx.ToCaConfig.preset("toca-dit-ddim50"))
    with toca_fx.generation(model, num_steps=50):
        _, f_toca = _measure(model, **kw)
    ratio = f_orig / f_toca
    assert ratio >= 2.2, ratio                       # the paper: 2.32x on DiT-XL/2 blocks
    st = toca_fx.stats(model)
    # stats() counts the transformer blocks only; the saving is all in the blocks
    measured_saving = f_orig - f_toca
    assert abs((st.flops_original - st.flops_actual) - measured_saving) <= 0.05 * measured_saving
    assert abs(st.flops_ratio - ratio) <= 0.05 * ratio
    assert st.calls["fresh"] + st.calls["partial"] == 50     # one model call per step (CFG in the batch)


def test_partial_calls_cost_fewer_flops_than_fresh_calls():
    model = make_dit(num_layers=2)
    x = torch.randn(2, 4, 8, 8)
    kw = dict(timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
    toca_fx.transform(model, interval=2, fresh_ratio=0.25)
    flops = []
    with torch.no_grad():
        for step in range(2):
            kw["timestep"] = torch.tensor([500 - step, 500 - step])
            with FlopCounterMode(display=False) as fc:
                model(x, **kw)
            flops.append(fc.get_total_flops())
    fresh, partial = flops
    assert partial < 0.5 * fresh
