"""Graph structure: sites found per block, ops in each variant, and cases that must not match."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import toca_fx
from blocks import EscapingBlock, MixerBlock, MLPOnlyBlock, Stack
from conftest import make_dit, make_pixart, pixart_text, program
from toca_fx.analysis import probe_site, run_with_override
from toca_fx.passes.bindings import Buffer, ScoreInput, ScoreOutput, StateInput, TokenCount

aten = torch.ops.aten


def _dit_call(model):
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))


def _pixart_call(model):
    emb, mask = pixart_text(2)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), encoder_hidden_states=emb, encoder_attention_mask=mask,
              timestep=torch.tensor([10, 10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _entry(model):
    return program(model)


def _ops(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("make,call,kinds", [
    (make_dit, _dit_call, ["self_attn", "mlp"]),
    (make_pixart, _pixart_call, ["self_attn", "cross_attn", "mlp"]),
], ids=["dit", "pixart"])
def test_sites_per_block_and_one_capture_per_class(make, call, kinds):
    model = make(num_layers=3)
    toca_fx.transform(model)
    call(model)
    assert len(toca_fx.explain(model).programs) == 1     # one capture for 3 blocks of one class
    e = _entry(model)
    assert e.capture.method == "torch.export"
    assert [s.kind for s in e.sites] == kinds
    assert all(s.cacheable and s.local and s.axes.token == 1 and s.n_tokens == 16 for s in e.sites)
    assert all(s.probe == "confirmed" for s in e.sites if s.kind != "self_attn")
    rep = toca_fx.explain(model)
    assert [s.kind for s in rep.sites] == kinds
    assert rep.entries[0].blocks == [f"transformer_blocks.{i}" for i in range(3)]
    text = str(rep)
    for k in kinds:
        assert k in text


def test_dit_variant_ops():
    model = make_dit(num_layers=2)
    toca_fx.transform(model)
    _dit_call(model)
    e = _entry(model)
    orig, fresh = e.capture.gm, e.fresh.gm
    sdpa = aten.scaled_dot_product_attention.default
    assert _ops(orig, sdpa) == _ops(fresh, sdpa) == 1
    assert _ops(orig, aten._softmax.default) == 0 and _ops(fresh, aten._softmax.default) == 1   # s1 map, fresh only
    assert e.fresh.outputs == (ScoreOutput("received"),)
    assert {StateInput(Buffer("self_attn0", "value")), StateInput(Buffer("mlp0", "value"))} <= set(e.fresh.inputs)
    v = e.variant({"self_attn0": "reuse", "mlp0": "partial"}, True)
    g = v.gm
    assert _ops(g, sdpa) == 0                                # reused attention is not computed at all
    assert _ops(g, aten._softmax.default) == 0               # no attention map on partial steps
    assert _ops(g, aten.topk.default) == 1                   # the selection, as ATen ops in the graph
    assert _ops(g, aten.gather.default) == 1 and _ops(g, aten.scatter_.src) == 1
    # 3 conditioning linears (per-sample, not per-token) + 2 MLP linears; q/k/v/out are gone
    assert _ops(orig, aten.linear.default) == 9 and _ops(g, aten.linear.default) == 5
    assert v.counts["partial_sites"] == 1 and v.counts["reused_sites"] == 1
    names = [n.name for n in g.graph.nodes if n.op == "placeholder"]
    assert {"cache_self_attn0", "cache_mlp0", "stale_mlp0", "k_mlp0", "score"} <= set(names)
    assert set(v.inputs) == {StateInput(Buffer("self_attn0", "value")), StateInput(Buffer("self_attn0", "stale")),
                             StateInput(Buffer("mlp0", "value")), StateInput(Buffer("mlp0", "stale")),
                             ScoreInput(0), TokenCount("mlp0")}


def test_pixart_partial_attention_keeps_fused_sdpa_with_all_keys():
    model = make_pixart(num_layers=2)
    toca_fx.transform(model, self_attention="partial")
    _pixart_call(model)
    e = _entry(model)
    v = e.variant({s.name: "partial" for s in e.sites}, True)
    g = v.gm
    sdpas = [n for n in g.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert len(sdpas) == 2 and _ops(g, aten._softmax.default) == 0
    # self-attention: queries gathered (k rows), keys/values from linears over all tokens
    q, k, vv = sdpas[0].args[:3]
    assert k.target != aten.gather.default and vv.target != aten.gather.default
    assert _ops(g, aten.gather.default) == 3 and _ops(g, aten.scatter_.src) == 3
    assert _ops(g, aten.topk.default) == 3
    key_linears = [n for n in g.graph.nodes if n.target == aten.linear.default
                   and n.args[0].target != aten.gather.default]
    assert key_linears, "key/value projections must run on all tokens"


def _one_dit_block():
    """A transformed 1-block DiT after its first call: (model, entry, block)."""
    model = make_dit(num_layers=1)
    toca_fx.transform(model)
    _dit_call(model)
    return model, _entry(model), model.transformer_blocks[0]


def test_partial_variant_skips_unselected_rows_numerically():
    """Rows not selected keep the cached value exactly; selected rows are recomputed."""
    model, e, blk = _one_dit_block()
    v = e.variant({"self_attn0": "reuse", "mlp0": "partial"}, False)
    x = torch.randn(2, 16, 32)
    flat = [x, None, None, None, torch.tensor([5, 5]), None, torch.tensor([1, 2])]
    lifted = e.capture.lifted_values(blk)
    sentinel = torch.full((2, 16, 32), 123.0)
    cache = {"self_attn0": torch.zeros(2, 16, 32), "mlp0": sentinel.clone()}
    stale = torch.zeros(2, 16)
    score = torch.zeros(2, 16)
    score[:, 3] = 1.0
    score[:, 7] = 0.9
    stale_attn = torch.zeros(2, 16)
    bound = {StateInput(Buffer("self_attn0", "value")): cache["self_attn0"], StateInput(Buffer("mlp0", "value")): cache["mlp0"],
             StateInput(Buffer("self_attn0", "stale")): stale_attn, StateInput(Buffer("mlp0", "stale")): stale,
             ScoreInput(0): score, TokenCount("mlp0"): 2}
    extra = [bound[slot] for slot in v.inputs]
    with torch.no_grad():
        v.gm(*lifted, *flat, *extra)
    changed = (cache["mlp0"] != 123.0).any(-1)
    assert changed[:, [3, 7]].all() and changed.sum() == 4
    assert stale[:, [3, 7]].eq(0).all() and stale.sum() == 2 * 14
    assert stale_attn.eq(1).all()                        # the reused branch's tokens are one call staler


# -- negative cases --------------------------------------------------------------------------

def test_escaping_branch_output_is_not_cached():
    model = Stack([EscapingBlock(16) for _ in range(2)]).eval()
    toca_fx.transform(model, interval=2, fresh_ratio=0.5)
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        for t in (3, 2, 1):
            model(x, timestep=t)
    e = _entry(model)
    mlp = [s for s in e.sites if s.kind == "mlp"]
    assert len(mlp) == 1 and not mlp[0].cacheable
    assert mlp[0].refusal.code == "escapes" and mlp[0].refusal.stage == "analyse"
    assert mlp[0].reason in str(toca_fx.explain(model))
    assert e.fresh.outputs == (ScoreOutput("received"),)
    assert StateInput(Buffer("self_attn0", "value")) in e.fresh.inputs
    assert st_actions(model, mlp[0].name) == {"fresh", "compute"}
    # the attention site is still cached: partial calls reuse it
    assert st_actions(model, "self_attn0") == {"fresh", "reuse"}


def st_actions(model, site):
    st = toca_fx.stats(model)
    acts = set()
    for key, d in st.sites.items():
        if key.endswith("." + site):
            acts |= {a for a in ("fresh", "partial", "reuse", "full", "compute") if d.get(a)}
    return acts


def test_token_mixing_mlp_is_not_rewritten_token_wise():
    model = Stack([MixerBlock(16, 8) for _ in range(2)]).eval()
    toca_fx.transform(model, interval=2, fresh_ratio=0.5, self_attention="partial")
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        model(x, timestep=2)
        model(x, timestep=1)
    e = _entry(model)
    mix = [s for s in e.sites if s.kind == "other"]
    assert len(mix) == 1 and mix[0].cacheable and not mix[0].local
    assert mix[0].refusal.code == "contracts-token-axis"
    assert mix[0].reason in str(toca_fx.explain(model))
    # partial step: the mixing branch is computed in full, never gathered
    st = toca_fx.stats(model)
    assert all(d.get("full", 0) == 1 for k, d in st.sites.items() if k.endswith(mix[0].name))


def test_probe_refutes_a_false_locality_claim():
    model, e, blk = _one_dit_block()
    inputs = e.capture.lifted_values(blk) + [torch.randn(2, 16, 32), None, None, None, torch.tensor([5, 5]), None,
                                             torch.tensor([1, 2])]
    attn = e.sites[0]
    base = run_with_override(e.capture.gm, inputs, watch=[attn.value])
    assert probe_site(e.capture.gm, inputs, attn, base).code == "probe-refuted"   # self-attention mixes tokens
    mlp = e.sites[1]
    base = run_with_override(e.capture.gm, inputs, watch=[mlp.value])
    assert probe_site(e.capture.gm, inputs, mlp, base) is None


def test_no_transformer_blocks():
    with pytest.raises(toca_fx.ToCaError, match="no transformer blocks.*no nn.ModuleList"):
        toca_fx.transform(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
    model = Stack([MLPOnlyBlock(8) for _ in range(3)])
    toca_fx.transform(model)
    with pytest.raises(toca_fx.ToCaError, match="blocks.*no attention"):
        with torch.no_grad():
            model(torch.randn(1, 4, 8), timestep=1)
    assert "_toca_fx" not in model.__dict__              # left unchanged
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_transform_twice_raises():
    model = make_dit(num_layers=1)
    toca_fx.transform(model)
    with pytest.raises(toca_fx.ToCaError, match="already transformed"):
        toca_fx.transform(model)
    toca_fx.remove(model)
    with pytest.raises(toca_fx.ToCaError, match="not transformed"):
        toca_fx.remove(model)


def test_partial_kv_variant_computes_every_projection_on_k_tokens():
    """self_attention="partial-kv": q, k and v of the selected rows only; SDPA reads the key/value caches."""
    model = make_dit(num_layers=2)
    toca_fx.transform(model, self_attention="partial-kv")
    _dit_call(model)
    e = _entry(model)
    att = e.analysis.site("self_attn0")
    assert len(att.kv.values) == 2 and att.kv_refusal is None
    assert [e.fresh.inputs[i].buffer for i in e.fresh.mutated if e.fresh.inputs[i].buffer.name != "stale"] == [
        Buffer("self_attn0", "value"), Buffer("self_attn0", "kv0"), Buffer("self_attn0", "kv1"), Buffer("mlp0", "value")]
    v = e.variant({"self_attn0": "partial_kv", "mlp0": "partial"}, True)
    g = v.gm
    sdpa = [n for n in g.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1
    # keys and values: the caches after the recomputed rows were scattered in
    for arg, i in zip(sdpa[0].args[1:3], (0, 1)):
        assert arg.target == aten.scatter_.src and arg.args[0].name == f"cache_self_attn0_kv{i}"
    # every linear of the branches reads gathered rows (none runs on all tokens): q, k, v, out + 2 MLP
    gathered, stack = set(), [n for n in g.graph.nodes if n.target == aten.gather.default]
    while stack:
        n = stack.pop()
        if n not in gathered:
            gathered.add(n)
            stack.extend(n.users)
    linears = [n for n in g.graph.nodes if n.target == aten.linear.default]
    assert sum(n in gathered for n in linears) == 6 and len(linears) == 6 + 3   # + 3 conditioning linears
    stream = [n for n in g.graph.nodes if n.op == "placeholder"][len(e.capture.lifted) + e.stream_index]
    assert not any(n not in gathered and stream in n.all_input_nodes for n in linears)
    assert _ops(g, aten.gather.default) == 2 and _ops(g, aten.scatter_.src) == 4
    assert {type(s) for s in v.inputs} == {StateInput, ScoreInput, TokenCount}


class _KeySideShared(nn.Module):
    """Queries and keys from two norms; the key norm also feeds a second branch."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.nq, self.nk = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.out, self.side = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        hq, hk = self.nq(x), self.nk(x)
        q = self.q(hq).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(hk).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(o.transpose(1, 2).reshape(b, n, d))
        return x + self.side(hk)


def test_partial_kv_refused_when_the_key_side_feeds_another_branch():
    """Negative case: keys computed by a norm another branch also reads cannot be computed on k rows;
    the site falls back to "partial" (queries on k rows, keys/values for all) and stays exact."""
    torch.manual_seed(0)
    net = Stack([_KeySideShared(), _KeySideShared()]).eval()
    ref = copy.deepcopy(net)
    toca_fx.transform(net, self_attention="partial-kv", interval=2, fresh_ratio=1.0)
    xs = [torch.randn(2, 16, 32) for _ in range(3)]
    with torch.no_grad():
        for i, x in enumerate(xs):
            assert torch.allclose(net(x, timestep=torch.tensor([3.0 - i])), ref(x, timestep=torch.tensor([3.0 - i])),
                                  atol=1e-5)
    sites = {s.name: s for s in toca_fx.explain(net).sites}
    assert sites["self_attn0"].token_wise and sites["self_attn0"].kv.startswith("layer_norm")
    assert sites["self_attn0"].kv_refusal.code == "read-outside" and "partial-kv: no" in str(toca_fx.explain(net))
    e = program(net)
    assert {v.actions["self_attn0"] for v in e.partials.values()} == {"partial"}
