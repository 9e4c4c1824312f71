"""Any transformer: the diffusers zoo (and transformers' ViT / GPT-2) without adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import toca_fx
from conftest import programs, rel_err
from toca_fx.passes.bindings import Buffer, StateInput, TokenCount
from zoo import ZOO

EXACT = dict(interval=2, fresh_ratio=1.0, ratio_schedule="constant", self_attention="partial")
EXACT_KV = dict(EXACT, self_attention="partial-kv")
# Self-attention sites whose keys/values "partial-kv" computes on k rows (the others say why not in explain).
KV_SITES = {"dit": ["self_attn0"], "pixart-sigma": ["self_attn0"], "hunyuan-dit": ["self_attn0"], "latte": ["self_attn0"],
            "flux": ["parallel0"], "auraflow": ["self_attn0"], "vit": ["self_attn0"], "sd3": [], "sd3.5-dual": [],
            "cogvideox": [], "sana": [], "gpt2": []}

# The sites found per block class (what the README's table says), in block order.
EXPECTED = {
    "dit": {"BasicTransformerBlock": ["self_attn", "mlp"]},
    "pixart-sigma": {"BasicTransformerBlock": ["self_attn", "cross_attn", "mlp"]},
    "sd3": {"JointTransformerBlock": ["joint_attn", "mlp", "joint_attn", "mlp"]},
    "sd3.5-dual": {"JointTransformerBlock": ["joint_attn", "self_attn", "mlp", "joint_attn", "mlp"]},
    "flux": {"FluxTransformerBlock": ["joint_attn", "mlp", "joint_attn", "mlp"],
             "FluxSingleTransformerBlock": ["parallel"]},
    "hunyuan-dit": {"HunyuanDiTBlock": ["self_attn", "cross_attn", "mlp"]},
    "cogvideox": {"CogVideoXBlock": ["joint_attn", "other", "joint_attn", "other"]},
    "latte": {"BasicTransformerBlock": ["self_attn", "cross_attn", "mlp"]},
    "sana": {"SanaTransformerBlock": ["other", "cross_attn", "other"]},
    "auraflow": {"AuraFlowJointTransformerBlock": ["joint_attn", "mlp", "joint_attn", "mlp"],
                 "AuraFlowSingleTransformerBlock": ["self_attn", "mlp"]},
    "vit": {"ViTLayer": ["self_attn", "mlp"]},
    "gpt2": {"GPT2Block": ["self_attn", "mlp"]},
}


def _out(o):
    if hasattr(o, "sample"):
        return o.sample
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    return o[0] if isinstance(o, (tuple, list)) else o


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_model(request):
    model, inputs = ZOO[request.param]()
    return request.param, model.eval(), inputs


@pytest.mark.parametrize("overrides", [dict(interval=1), EXACT, EXACT_KV], ids=["all-fresh", "all-tokens", "all-tokens-kv"])
def test_exact_over_consecutive_calls(zoo_model, overrides):
    name, model, inputs = zoo_model
    m = copy.deepcopy(model)
    toca_fx.transform(m, **overrides)
    with torch.no_grad():
        for step in range(3):
            assert rel_err(_out(m(**inputs(step))), _out(model(**inputs(step)))) <= 1e-5, (name, step)
    st = toca_fx.stats(m)
    if overrides.get("interval") == 2:
        assert st.calls == {"fresh": 2, "partial": 1}
    if overrides.get("self_attention") == "partial-kv":
        used = sorted({s for e in toca_fx.explain(m).programs for v in e.partials.values()
                       for s, a in v.actions.items() if a == "partial_kv"})
        assert used == KV_SITES[name]


def test_explain_lists_block_lists_and_sites(zoo_model):
    name, model, inputs = zoo_model
    m = copy.deepcopy(model)
    toca_fx.transform(m)
    with torch.no_grad():
        m(**inputs(0))
    rep = toca_fx.explain(m)
    got = {}
    for e in rep.entries:
        assert e.method == "torch.export" and e.status == "rewritten", (name, e.reason)
        got.setdefault(e.block_class, [s.kind for s in e.sites])
    assert got == EXPECTED[name]
    text = str(rep)
    for bl in rep.lists:
        assert bl["name"] in text
    for s in rep.sites:
        assert s.tokens > 0 and s.token_axis == 1
        if not s.token_wise:
            assert s.reason, (name, s.name)          # every refusal carries its reason


def test_partial_calls_cost_fewer_flops(zoo_model):
    """Default config: a partial call costs measurably fewer FLOPs than a fresh one, per block class."""
    name, model, inputs = zoo_model
    m = copy.deepcopy(model)
    toca_fx.transform(m, interval=2)
    flops = []
    with torch.no_grad():
        for step in range(2):
            with FlopCounterMode(display=False) as fc:
                m(**inputs(step))
            flops.append(fc.get_total_flops())
    assert flops[1] < 0.97 * flops[0], (name, flops)
    for e, block in programs(m):
        if e.failed is not None:
            continue
        for v in e.partials.values():
            ks = {s.site: e.analysis.site(s.site).n_tokens // 10 for s in v.inputs if isinstance(s, TokenCount)}
            assert e.variant_flops(v, block, ks) < e.fresh_flops(block), (name, e.cls_name)


def test_pass_changes_no_parameter_and_no_state_dict_entry(zoo_model):
    name, model, inputs = zoo_model
    m = copy.deepcopy(model)
    keys = list(m.state_dict())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    toca_fx.transform(m, interval=2, fresh_ratio=0.3)
    with torch.no_grad():
        for step in range(3):
            m(**inputs(step))
    assert list(m.state_dict()) == keys
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    toca_fx.remove(m)
    with torch.no_grad():
        assert torch.equal(_out(m(**inputs(5))), _out(model(**inputs(5))))


def test_parallel_block_recomputes_mlp_half_with_cached_attention_rows():
    """FLUX single blocks (attention and MLP into one projection): ToCa's FLUX port recomputes the
    MLP half for selected tokens and combines it with cached attention rows."""
    model, inputs = ZOO["flux"]()
    model.eval()
    m = copy.deepcopy(model)
    # no timestep keyword: every call is the next step; identical inputs keep the attention cache exact
    toca_fx.transform(m, interval=2, fresh_ratio=1.0, timestep_arg="no_such_input")
    with torch.no_grad():
        m(**inputs(0))
        out = _out(m(**inputs(0)))
        ref = _out(model(**inputs(0)))
    assert rel_err(out, ref) <= 1e-5
    (e,) = [e for e in toca_fx.explain(m).programs if e.cls_name == "FluxSingleTransformerBlock"]
    (site,) = e.sites
    assert site.kind == "parallel" and len(site.parallel.attn_values) == 1
    (v,) = e.partials.values()
    assert v.actions == {"parallel0": "partial_mlp"}
    ops = [n.target for n in v.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops      # attention rows from the cache
    assert ops.count(torch.ops.aten.gather.default) == 2                        # stream input + attention rows
    assert StateInput(Buffer("parallel0", "attn0")) in v.inputs
