"""Following the live model (toca_fx/runtime/live.py): changes after ``transform`` are picked up.

Each test changes a transformed model and an untransformed twin the same way and compares them with
every call fresh (``interval=1``: exact), or asserts what ``explain`` / ``stats`` report. Every test
fails on a runtime that keeps its first capture.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import toca_fx
from blocks import Attention, PreNormBlock, Stack
from conftest import ScaledProcessor, diffusers, make_dit

T = [900, 700, 500, 300, 100, 50]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 10])


def _call(model, t, seed=0):
    x, y = _inputs(seed)
    with torch.no_grad():
        return model(x, timestep=torch.full((2,), t), class_labels=y).sample


def _twin(**overrides):
    model = make_dit()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, **overrides)
    return model, ref


def _same(model, ref, steps=T):
    for t in steps:
        a, b = _call(model, t), _call(ref, t)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"t={t}: {float((a - b).abs().max())}"


def _attn(model, i):
    return model.transformer_blocks[i].attn1


# -- blocks of one class that differ non-numerically -----------------------------------------

def test_a_processor_on_one_block_gets_its_own_capture():
    model, ref = _twin(interval=1)
    for m in (model, ref):
        _attn(m, 1).set_processor(ScaledProcessor(0.5))
    _same(model, ref)
    blocks = [e.blocks for e in toca_fx.explain(model).entries]
    assert ["transformer_blocks.1"] in blocks and len(blocks) == 2


def test_blocks_with_different_tensor_tuple_and_callable_attributes():
    class Block(nn.Module):
        def __init__(self, d, i):
            super().__init__()
            self.n = nn.LayerNorm(d)
            self.attn = Attention(d)
            self.fc = nn.Linear(d, d)
            self.gain = torch.full((d,), 1.0 + i)       # a tensor attribute (not a buffer)
            self.mix = (1.0, 0.5 * i)                   # numbers in a tuple
            self.act = F.gelu if i % 2 else F.silu      # a callable

        def forward(self, x):
            x = x + self.attn(self.n(x)) * self.gain
            return x * self.mix[0] + self.act(self.fc(x)) * self.mix[1]

    torch.manual_seed(0)
    model = Stack([Block(16, i) for i in range(4)]).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, interval=1)
    x = torch.randn(2, 6, 16)
    for t in (900, 500, 100):
        with torch.no_grad():
            assert torch.allclose(model(x, timestep=torch.tensor([t])), ref(x, timestep=torch.tensor([t])), atol=1e-5)


# -- changes after the first call ------------------------------------------------------------

def test_set_processor_after_the_first_call_is_followed():
    model, ref = _twin(interval=1)
    _same(model, ref, T[:2])
    for m in (model, ref):
        for b in m.transformer_blocks:
            b.attn1.set_processor(ScaledProcessor(2.0))
    _same(model, ref, T[2:])


@pytest.mark.parametrize("attr, value", [("rescale_output_factor", 2.0), ("residual_connection", True)])
def test_attribute_change_after_the_first_call_is_followed(attr, value):
    model, ref = _twin(interval=1)
    _same(model, ref, T[:2])
    for m in (model, ref):
        for b in m.transformer_blocks:
            setattr(b.attn1, attr, value)
    _same(model, ref, T[2:])


def test_load_state_dict_with_assign_is_followed():
    model, ref = _twin(interval=1)
    _same(model, ref, T[:2])
    new = make_dit(seed=5).state_dict()
    model.load_state_dict(new, assign=True, strict=False)
    ref.load_state_dict(new, assign=True)
    _same(model, ref, T[2:])


def test_a_replaced_submodule_and_a_lora_wrapper_are_followed_also_after_reset():
    class LoRA(nn.Module):
        def __init__(self, base, rank=2):
            super().__init__()
            self.base = base
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
            nn.init.normal_(self.up.weight)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    model, ref = _twin(interval=1)
    _same(model, ref, T[:2])
    torch.manual_seed(3)
    new_linear = nn.Linear(128, 32)
    for m in (model, ref):
        b = m.transformer_blocks[0]
        b.attn1.to_q = LoRA(b.attn1.to_q)
        b.ff.net[2] = copy.deepcopy(new_linear)
    ref.load_state_dict({k: v for k, v in model.state_dict().items()})
    _same(model, ref, T[2:4])
    toca_fx.reset(model)
    _same(model, ref, T[4:])


def test_train_mode_capture_does_not_keep_dropout_after_eval():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10, dropout=0.5)
    ref = copy.deepcopy(model).eval()
    toca_fx.transform(model, interval=1)
    model.train()
    _call(model, 900)                     # captured in train mode (no_grad): dropout in the graph
    model.eval()
    _same(model, ref, T[1:3])


def test_random_draws_in_train_mode_match_the_original_also_on_the_capturing_call():
    # DiT drops class labels at random in train mode (inside each block's AdaLayerNormZero): capture
    # and probe run the block, and must not move the global random state the call then draws from
    model, ref = _twin(interval=1)
    model.train(), ref.train()
    for seed, t in enumerate(T[:3]):
        outs = []
        for m in (ref, model):
            torch.manual_seed(seed)
            outs.append(_call(m, t))
            outs.append(torch.rand(3))     # the state after the call, too
        assert torch.allclose(outs[0], outs[2], atol=1e-5) and torch.equal(outs[1], outs[3]), f"t={t}"


def test_random_draws_match_when_peers_are_compared_numerically():
    # processors differing only in a number: the second block is checked against the first's graph by
    # running both (found by the stateful test): those runs must not move the random state either
    model, ref = _twin(interval=1)
    for m in (model, ref):
        _attn(m, 0).set_processor(ScaledProcessor(1.1))
        _attn(m, 1).set_processor(ScaledProcessor(0.5))
        m.train()
    for seed, t in enumerate(T[:2]):
        torch.manual_seed(seed)
        a = _call(ref, t)
        torch.manual_seed(seed)
        b = _call(model, t)
        assert torch.allclose(a, b, atol=1e-5), f"t={t}"


def test_to_empty_then_reload_recomputes_the_caches():
    model, ref = _twin(interval=3, fresh_ratio=0.0)
    _call(model, 900), _call(ref, 900)
    model.to_empty(device="cpu")
    theirs = dict(ref.named_parameters()) | dict(ref.named_buffers())
    with torch.no_grad():                 # the model's own tensors back (also its non-persistent buffers)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in theirs:
                t.copy_(theirs[name])
    fresh_before = toca_fx.stats(model).blocks["transformer_blocks.0"]["fresh"]
    out = _call(model, 700)               # planned partial: the caches are gone, so computed fresh
    assert torch.isfinite(out).all()
    assert torch.allclose(out, _call(ref, 700), atol=1e-5)
    assert toca_fx.stats(model).blocks["transformer_blocks.0"]["fresh"] == fresh_before + 1


# -- hooks and other libraries' forwards -----------------------------------------------------

def test_a_hook_added_to_a_submodule_fires_and_its_removal_is_followed():
    model, ref = _twin(interval=1)
    _same(model, ref, T[:1])
    seen = []

    def double(mod, args, out):
        seen.append(1)
        return out * 2

    handles = [m.transformer_blocks[0].ff.register_forward_hook(double) for m in (model, ref)]
    _same(model, ref, T[1:3])
    assert len(seen) == 4                          # twice per call: the model's and the twin's
    assert toca_fx.explain(model).unchanged["transformer_blocks.0"].code == "submodule-hooks"
    for h in handles:
        h.remove()
    _same(model, ref, T[3:])
    assert len(seen) == 4 and not toca_fx.explain(model).unchanged


def test_a_hook_on_one_blocks_submodule_leaves_the_others_cached():
    model = make_dit()
    model.transformer_blocks[1].attn1.register_forward_pre_hook(lambda m, a: None)
    toca_fx.transform(model, interval=3, fresh_ratio=0.0)
    for t in T[:3]:
        _call(model, t)
    blocks = toca_fx.stats(model).blocks
    assert blocks["transformer_blocks.1"] == {"fresh": 0, "partial": 0, "original": 3}
    assert blocks["transformer_blocks.0"] == {"fresh": 1, "partial": 2, "original": 0}
    assert "submodule-hooks" in [r.code for r in toca_fx.explain(model).refusals]


def test_hooks_on_the_block_itself_still_fire_on_cached_calls():
    model = make_dit()
    seen = []
    model.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(1))
    toca_fx.transform(model, interval=3, fresh_ratio=0.0)
    for t in T[:3]:
        _call(model, t)
    assert len(seen) == 3 and toca_fx.stats(model).blocks["transformer_blocks.0"]["partial"] == 2


def _with_fbc(model):
    diffusers.hooks.apply_first_block_cache(model, diffusers.hooks.FirstBlockCacheConfig(threshold=0.5))
    return model


def _fbc_calls(model, steps=T):
    from diffusers.models.cache_utils import CacheMixin    # DiTTransformer2DModel does not inherit it

    outs = []
    for t in steps:
        with CacheMixin.cache_context(model, "cond"):
            outs.append(_call(model, t))
    return outs


def test_first_block_cache_applied_before_is_refused_and_runs_as_itself():
    ref = _with_fbc(make_dit())
    model = _with_fbc(make_dit())
    toca_fx.transform(model, interval=3, fresh_ratio=0.0)
    for a, b in zip(_fbc_calls(model), _fbc_calls(ref)):
        assert torch.equal(a, b)
    codes = {r.code for r in toca_fx.explain(model).unchanged.values()}
    assert codes == {"foreign-forward"}
    assert toca_fx.stats(model).blocks["transformer_blocks.1"]["partial"] == 0


def test_remove_keeps_a_first_block_cache_applied_after(caplog):
    model = make_dit()
    ref = _with_fbc(make_dit())
    toca_fx.transform(model)
    _with_fbc(model)
    with caplog.at_level(logging.WARNING, logger="toca_fx"):
        toca_fx.remove(model)
    assert "pass-through" in caplog.text
    assert not toca_fx.is_transformed(model)
    for a, b in zip(_fbc_calls(model), _fbc_calls(ref)):
        assert torch.equal(a, b)


# -- autograd and inference mode -------------------------------------------------------------

def test_backward_through_several_calls_with_grad_matches_the_original_when_every_call_is_fresh():
    model, ref = _twin(interval=1)
    grads = []
    for m in (model, ref):
        x = _inputs()[0].requires_grad_()
        loss = sum(m(x, timestep=torch.full((2,), t), class_labels=torch.tensor([1, 10])).sample.square().sum()
                   for t in T[:3])
        loss.backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_backward_through_cached_calls_runs():
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.5)
    x = _inputs()[0].requires_grad_()
    loss = sum(model(x, timestep=torch.full((2,), t), class_labels=torch.tensor([1, 10])).sample.square().sum()
               for t in T[:4])
    loss.backward()
    assert torch.isfinite(x.grad).all() and toca_fx.stats(model).calls == {"fresh": 2, "partial": 2}


@pytest.mark.parametrize("overrides", [dict(fresh_ratio=0.25), dict(fresh_ratio=0.25, forecast_order=1)],
                         ids=["toca", "token-wise forecast"])
def test_calls_with_grad_update_the_caches_as_calls_without(overrides):
    # with grad enabled the graph runs on copies of the caches (autograd may save them); what it writes
    # (caches, staleness, difference tables) must still reach the buffers
    model, _ = _twin(interval=3, **overrides)
    other, _ = _twin(interval=3, **overrides)
    for t in T:
        x, y = _inputs(1)
        with torch.no_grad():
            a = model(x, timestep=torch.full((2,), t), class_labels=y).sample
        b = other(x, timestep=torch.full((2,), t), class_labels=y).sample.detach()
        assert torch.allclose(a, b, atol=1e-6), f"t={t}: {float((a - b).abs().max())}"
    assert toca_fx.stats(other).calls == {"fresh": 2, "partial": 4}


def test_inference_mode_calls_then_no_grad_calls_in_one_generation():
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.5)
    other = make_dit()
    toca_fx.transform(other, interval=3, fresh_ratio=0.5)
    outs = []
    for i, t in enumerate(T):
        with torch.inference_mode() if i < 2 else torch.no_grad():
            outs.append(_call(model, t))
    assert all(torch.equal(a, _call(other, t)) for a, t in zip(outs, T))


# -- copies --------------------------------------------------------------------------------------

def _sample(model):
    return [_call(model, t) for t in T]


@pytest.mark.parametrize("when", ["before", "after"])
def test_deepcopy_gives_an_independent_transformed_model(when):
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.5)
    twin = make_dit()
    toca_fx.transform(twin, interval=3, fresh_ratio=0.5)
    if when == "after":
        _call(model, 900)
    copied = copy.deepcopy(model)
    calls_before = dict(toca_fx.stats(model).calls)
    got = _sample(copied)
    assert all(torch.equal(a, b) for a, b in zip(got, _sample(twin)))
    assert toca_fx.stats(copied).calls == {"fresh": 2, "partial": 4}
    assert dict(toca_fx.stats(model).calls) == calls_before          # the original's schedule did not move


def test_pickle_round_trip_of_a_transformed_model():
    import io

    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.5)
    _call(model, 900)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = make_dit()
    toca_fx.transform(twin, interval=3, fresh_ratio=0.5)
    assert toca_fx.is_transformed(loaded)
    assert all(torch.equal(a, b) for a, b in zip(_sample(loaded), _sample(twin)))
    assert toca_fx.stats(loaded).calls == {"fresh": 2, "partial": 4}


# -- a Python number among the block's arguments that changes per call ------------------------------

class ScaledStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([PreNormBlock(16) for _ in range(2)])   # takes a Python float

    def forward(self, x, timestep=None, scale=1.0):
        for b in self.blocks:
            x = b(x, scale=scale)
        return x


def _scaled_twin(**cfg):
    torch.manual_seed(0)
    model = ScaledStack().eval()
    ref = copy.deepcopy(model)
    return toca_fx.transform(model, **cfg), ref


def test_a_number_changing_per_call_runs_unchanged_instead_of_a_capture_per_call():
    model, ref = _scaled_twin(interval=3)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        for i, t in enumerate([900, 800, 700, 600, 500]):
            scale = 1.0 + 0.1 * i
            torch.testing.assert_close(model(x, timestep=torch.tensor([t]), scale=scale), ref(x, scale=scale))
    rep = toca_fx.explain(model)
    assert len(rep.programs) == 1                          # not one capture per value
    assert {r.code for r in rep.unchanged.values()} == {"changing-number"}
    assert "'scale'" in str(rep.unchanged["blocks.0"]) and "1.0 -> 1.1" in str(rep.unchanged["blocks.0"])
    assert toca_fx.stats(model).blocks["blocks.0"] == {"fresh": 1, "partial": 0, "original": 4}
    assert "2 fresh, 0 partial, 8 unchanged" in str(toca_fx.stats(model))   # what ran, both blocks


def test_a_number_constant_within_each_generation_is_cached():
    model, ref = _scaled_twin(interval=3)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        for scale in (0.5, 2.0):                           # one value per generation
            toca_fx.reset(model)
            first = model(x, timestep=torch.tensor([900]), scale=scale)
            torch.testing.assert_close(first, ref(x, scale=scale))      # a fresh call under the new value
            for t in [800, 700]:
                model(x, timestep=torch.tensor([t]), scale=scale)
    rep = toca_fx.explain(model)
    assert not rep.unchanged and len(rep.programs) == 2
    assert toca_fx.stats(model).blocks["blocks.0"] == {"fresh": 2, "partial": 4, "original": 0}


# -- the watch itself (toca_fx/runtime/live.py) ------------------------------------------------------

def _changes():
    """(name, change) pairs: each must be seen by the watch of a diffusers DiT block."""
    def attr(b): b.attn1.rescale_output_factor = 2.0
    def processor(b): b.attn1.set_processor(ScaledProcessor(0.5))
    def param(b): b.ff.net[2].weight = nn.Parameter(b.ff.net[2].weight.detach().clone())
    def param_dict(b): b.ff.net[2]._parameters["bias"] = nn.Parameter(torch.zeros(b.ff.net[2].out_features))
    def module(b): b.ff.net[2] = nn.Linear(b.ff.net[2].in_features, b.ff.net[2].out_features)
    def hook(b): b.attn1.to_q.register_forward_hook(lambda *a: None)
    def pre_hook(b): b.norm1.register_forward_pre_hook(lambda *a: None)
    def train(b): b.train()
    def new_attr(b): b.norm1.extra = 1
    def delete(b): del b.attn1.rescale_output_factor
    return [(f.__name__, f) for f in (attr, processor, param, param_dict, module, hook, pre_hook, train, new_attr,
                                      delete)]


@pytest.mark.parametrize("tags", [True, False], ids=["version-tags", "fingerprint"])
@pytest.mark.parametrize("name,change", _changes(), ids=[n for n, _ in _changes()])
def test_watch_sees_every_reassignment_and_hook(name, change, tags, monkeypatch):
    from toca_fx.runtime import live
    if not tags:
        monkeypatch.setattr(live, "_dict_version", None)
    block = make_dit().transformer_blocks[0]
    watch = live.Watch(list(block.modules()))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        block(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    block.attn1.rescale_output_factor = block.attn1.rescale_output_factor     # the same object again
    assert not watch.changed()             # a forward call and a no-op assignment change nothing
    change(block)
    assert watch.changed()
    watch.arm()
    assert not watch.changed()


def test_a_removed_hook_is_seen():
    from toca_fx.runtime import live
    block = make_dit().transformer_blocks[0]
    handle = block.attn1.to_q.register_forward_hook(lambda *a: None)
    watch = live.Watch(list(block.modules()))
    handle.remove()
    assert watch.changed()


def test_meta_tensors_run_like_the_original():
    # shape inference on the meta device: no values, so nothing can be probed or cached
    model, ref = _twin(interval=3)
    model.to("meta"), ref.to("meta")
    x, y = torch.randn(2, 4, 8, 8, device="meta"), torch.tensor([1, 10], device="meta")
    for t in T[:3]:
        with torch.no_grad():
            a = ref(x, timestep=torch.full((2,), t, device="meta"), class_labels=y).sample
            b = model(x, timestep=torch.full((2,), t, device="meta"), class_labels=y).sample
        assert b.device.type == "meta" and b.shape == a.shape
    st = toca_fx.stats(model)
    assert st.blocks["transformer_blocks.0"] == {"fresh": 0, "partial": 0, "original": 3}
    assert "no block ran from a capture" in str(st)
    assert "meta" in str(toca_fx.explain(model))
