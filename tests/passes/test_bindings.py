"""Typed bindings (``toca_fx.passes.bindings``): buffer labels, state allocation, and the slots a
variant graph takes and returns beyond the block's own inputs and outputs."""

from __future__ import annotations

import pytest
import torch

import toca_fx
from conftest import make_dit
from toca_fx.passes.bindings import (Buffer, ScoreInput, ScoreOutput, StateInput, StateSpec, StepInput,
                                     TokenCount)


def _dit(**config):
    """A transformed 1-block DiT after its first (fresh) call: (model, program)."""
    model = make_dit(num_layers=1)
    toca_fx.transform(model, **config)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    (p,) = toca_fx.explain(model).programs
    return model, p


@pytest.fixture(scope="module")
def dit():
    return _dit()


def V(site, name="value"):
    return StateInput(Buffer(site, name))


def test_buffer_label():
    assert [Buffer("mlp0", n).label for n in ("value", "stale", "kv0", "d2", "t_upd")] == [
        "mlp0", "mlp0_stale", "mlp0_kv0", "mlp0_d2", "mlp0_t_upd"]
    assert Buffer("s1_mlp0", "attn0").label == "s1_mlp0_attn0"


def test_slots_are_values():
    """Slots are compared and hashed by value (the graph builder keys placeholders by slot)."""
    assert StateInput(Buffer("a", "value")) == StateInput(Buffer("a", "value"))
    assert len({StateInput(Buffer("a", "value")), StateInput(Buffer("a", "value")), StateInput(Buffer("a", "stale")),
                ScoreInput(0), ScoreInput(0), ScoreInput(1), TokenCount("a"), StepInput(), StepInput()}) == 6
    assert StateInput(Buffer("a", "value")) != StateInput(Buffer("a", "stale"))


def test_allocate_value_buffer_in_the_cache_dtype(dit):
    _, p = dit
    site = p.analysis.site("mlp0")
    spec = StateSpec(Buffer("mlp0", "value"), site.value)
    a = spec.allocate(2, "cpu", None)
    assert a.shape == (2, 16, 32) and a.dtype == torch.float32 and not a.any()
    b = spec.allocate(2, "cpu", torch.bfloat16)
    assert b.shape == (2, 16, 32) and b.dtype == torch.bfloat16 and not b.any()
    assert spec.is_filled and not StateSpec(Buffer("mlp0", "d1"), site.value, filled=False).is_filled


def test_allocate_counters_are_float32_batch_by_tokens():
    spec = StateSpec(Buffer("mlp0", "stale"), None, 16)
    for dtype in (None, torch.bfloat16, torch.float16):
        c = spec.allocate(3, "cpu", dtype)
        assert c.shape == (3, 16) and c.dtype == torch.float32 and not c.any()
    assert not spec.is_filled                     # nothing is copied into a counter on fresh steps


def test_allocated_branch_state_matches_the_specs():
    """Every buffer of a block's branch state is allocated from its spec (bf16 caches, f32 counters)."""
    model, p = _dit(cache_dtype="bfloat16", self_attention="partial-kv")
    st = model.get_submodule("_toca_fx_state.transformer_blocks__0.branch_0")
    got = {n: (tuple(b.shape), b.dtype) for n, b in st.named_buffers()}
    bf, f32 = torch.bfloat16, torch.float32
    assert got == {"score": ((2, 16), f32),
                   "value_self_attn0": ((2, 16, 32), bf), "stale_self_attn0": ((2, 16), f32),
                   "kv0_self_attn0": ((2, 2, 16, 16), bf), "kv1_self_attn0": ((2, 2, 16, 16), bf),
                   "value_mlp0": ((2, 16, 32), bf), "stale_mlp0": ((2, 16), f32)}


class FakeCtx:
    """What the runtime binds slots to (``runtime.block._Binding``), recording every call."""

    def __init__(self):
        self.buffers = {Buffer("mlp0", "value"): torch.zeros(2, 3), Buffer("mlp0", "stale"): torch.ones(2, 3)}
        self.scores = {0: torch.full((2, 3), 0.5), 1: torch.full((2, 5), 0.25)}
        self.ks = {"mlp0": 7}
        self.step = torch.tensor([4.0])
        self.set_scores = []

    def state_buffer(self, buf):
        return self.buffers[buf]

    def base_score(self, stream):
        return self.scores[stream]

    def step_value(self):
        return self.step

    def set_score(self, value):
        self.set_scores.append(value)


def test_input_slots_fetch_from_the_context():
    ctx = FakeCtx()
    assert StateInput(Buffer("mlp0", "stale")).fetch(ctx) is ctx.buffers[Buffer("mlp0", "stale")]
    assert ScoreInput(1).fetch(ctx) is ctx.scores[1]
    assert ScoreInput(0).fetch(ctx) is ctx.scores[0]
    assert TokenCount("mlp0").fetch(ctx) == 7
    assert StepInput().fetch(ctx) is ctx.step
    with pytest.raises(KeyError):
        StateInput(Buffer("mlp0", "kv0")).fetch(ctx)


def test_output_slots_store():
    ctx = FakeCtx()
    m = torch.rand(2, 3, 4)
    ScoreOutput("cross_map").store(ctx, m)
    assert len(ctx.set_scores) == 1 and ctx.set_scores[0] is m


def _extra_placeholders(v, p):
    phs = [n.name for n in v.gm.graph.nodes if n.op == "placeholder"]
    n_own = len([n for n in p.capture.gm.graph.nodes if n.op == "placeholder"])
    return phs[n_own:]


def _n_outputs(gm):
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return len(out.args[0])


def test_fresh_variant_slots(dit):
    _, p = dit
    v = p.fresh
    assert v.outputs == (ScoreOutput("received"),)       # caches are written in the graph, not returned
    assert v.inputs == (V("self_attn0"), V("self_attn0", "stale"), V("mlp0"), V("mlp0", "stale"))
    assert v.mutated == (0, 1, 2, 3)                      # F copied in, staleness zeroed: all in place
    assert _extra_placeholders(v, p) == ["cache_self_attn0", "stale_self_attn0", "cache_mlp0", "stale_mlp0"]
    assert _n_outputs(v.gm) == v.n_user_outputs + 1 and v.n_user_outputs == _n_outputs(p.capture.gm)
    copies = [n for n in v.gm.graph.nodes if n.target == torch.ops.aten.copy_.default]
    assert len(copies) == 2 and list(v.gm.graph.nodes)[-2] is copies[-1]   # the graph's last ops
    assert v.actions == {"self_attn0": "fresh", "mlp0": "fresh"}


def test_fresh_variant_slots_partial_kv():
    _, p = _dit(self_attention="partial-kv", score="staleness")
    assert p.fresh.outputs == ()
    written = {p.fresh.inputs[i] for i in p.fresh.mutated}
    assert {V("self_attn0"), V("self_attn0", "kv0"), V("self_attn0", "kv1"), V("mlp0")} <= written


def test_partial_variant_slots(dit):
    _, p = dit
    v = p.variant({"self_attn0": "reuse", "mlp0": "partial"}, paired=False)
    # in the order the techniques ask for them: reuse reads the cache and bumps staleness; partial
    # selects (score, staleness, k) and then scatters into its cache
    assert v.inputs == (V("self_attn0"), V("self_attn0", "stale"), ScoreInput(0), V("mlp0", "stale"),
                        TokenCount("mlp0"), V("mlp0"))
    assert _extra_placeholders(v, p) == ["cache_self_attn0", "stale_self_attn0", "score", "stale_mlp0", "k_mlp0",
                                         "cache_mlp0"]
    assert v.outputs == () and _n_outputs(v.gm) == v.n_user_outputs
    assert p.variant({"self_attn0": "reuse", "mlp0": "partial"}, paired=False) is v     # built once


def test_partial_variant_slots_all_reused(dit):
    _, p = dit
    v = p.variant({"self_attn0": "reuse", "mlp0": "reuse"}, paired=True)
    assert v.inputs == (V("self_attn0"), V("self_attn0", "stale"), V("mlp0"), V("mlp0", "stale"))


def test_forecast_variant_slots():
    _, p = _dit(forecast_order=1)
    assert p.fresh.outputs == (ScoreOutput("received"),)
    assert StepInput() in p.fresh.inputs                  # the tables are refreshed at the step value
    v = p.variant({"self_attn0": "forecast", "mlp0": "partial_forecast"}, paired=False)
    assert StepInput() in v.inputs and TokenCount("mlp0") in v.inputs
    assert {s.buffer.name for s in v.inputs if isinstance(s, StateInput)} == {"value", "stale", "d1", "t_upd", "n_upd"}
