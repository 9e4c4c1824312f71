"""FLOPs measured independently with FlopCounterMode, and stats() against the measurement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

import toca_fx
from conftest import make_dit, sample_dit
from toca_fx.flops import attention_flops


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


# -- the CPU fused-attention formula (toca_fx.flops) and the score's FLOPs -------------------------

@pytest.mark.parametrize("b,hq,hkv,sq,sk,d", [(2, 4, 4, 10, 12, 16), (1, 2, 2, 7, 7, 8), (2, 4, 2, 10, 12, 16),
                                               (3, 6, 1, 5, 9, 8)], ids=["mha", "square", "gqa-2", "mqa"])
def test_one_fused_sdpa_call_on_cpu_is_counted(b, hq, hkv, sq, sk, d):
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry   # after import toca_fx
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    expect = 2 * b * hq * sq * sk * (d + d)
    assert counts == {"aten._scaled_dot_product_flash_attention_for_cpu": expect}
    assert fc.get_total_flops() == expect


def test_unfused_attention_counts_the_same():
    """Value head size != query head size: CPU runs the math path (two bmm), with the same total."""
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 8)
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 2 * 2 * 4 * 10 * 12 * (16 + 8) == attention_flops(q.shape, k.shape, v.shape)


@pytest.mark.parametrize("q,k,v", [
    ((2, 4, 10, 16), (2, 4, 12, 16), (2, 4, 12, 16)),
    ((2, 4, 10, 16), (2, 4, 12, 16), (2, 4, 12, 8)),
    ((1, 8, 33, 64), (1, 2, 17, 64), (1, 2, 17, 32)),       # grouped-query: 4 query heads per key/value head
    ((3, 6, 5, 8), (3, 1, 9, 8), (3, 1, 9, 8)),             # multi-query
])
def test_attention_flops_matches_torch_sdpa_flop_count(q, k, v):
    assert attention_flops(q, k, v) == sdpa_flop_count(q, k, v)
    assert attention_flops(torch.Size(q), torch.Size(k), torch.Size(v)) == sdpa_flop_count(q, k, v)


def test_attention_flops_any_leading_rank():
    assert attention_flops((2, 3, 4, 10, 8), (2, 3, 4, 12, 8), (2, 3, 4, 12, 6)) == 2 * 24 * 10 * 12 * (8 + 6)
    assert attention_flops((10, 8), (12, 8), (12, 6)) == 2 * 10 * 12 * (8 + 6)


def _score_run(score):
    model = make_dit(num_layers=2)                     # heads 2, head dim 16, 16 tokens
    ref = copy.deepcopy(model)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25, score=score)
    x = torch.randn(2, 4, 8, 8)
    kw = dict(class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        for t in (900, 800, 700, 600):                 # fresh, partial, partial, fresh
            model(x, timestep=torch.tensor([t, t]), **kw)
    st = toca_fx.stats(model)
    assert st.calls == {"fresh": 2, "partial": 2}
    toca_fx.reset(model)                               # the next call is fresh: measure it against the original
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, timestep=torch.tensor([500, 500]), **kw)
    with torch.no_grad(), FlopCounterMode(display=False) as fc_ref:
        ref(x, timestep=torch.tensor([500, 500]), **kw)
    return model, st, fc.get_total_flops() - fc_ref.get_total_flops()


def test_flops_score_is_the_attention_map_of_fresh_calls():
    model, st, measured = _score_run("toca")
    fresh_block_calls = sum(b["fresh"] for b in st.blocks.values())
    assert fresh_block_calls == 4
    per_call = 2 * 2 * 2 * 16 * 16 * 16                # QK^T of the s1 map: 2 B H N N D (softmax is not counted)
    assert st.flops_score == fresh_block_calls * per_call == 131072
    (p,) = toca_fx.explain(model).programs
    blk = model.transformer_blocks[0]
    assert st.flops_score == (p.fresh_flops(blk) - p.original_flops(blk)) * fresh_block_calls
    assert measured == 2 * per_call                    # one fresh model call: 2 blocks, measured independently
    assert 0 < st.flops_score < st.flops_actual


def test_flops_score_is_zero_for_staleness():
    model, st, measured = _score_run("staleness")
    (p,) = toca_fx.explain(model).programs
    blk = model.transformer_blocks[0]
    assert st.flops_score == 0 and measured == 0
    assert p.fresh_flops(blk) == p.original_flops(blk)
    assert st.flops_actual > 0
