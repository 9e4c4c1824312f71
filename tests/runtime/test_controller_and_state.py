"""Generations, CFG branches, reset/remove, and what the pass must never touch."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import toca_fx
from blocks import EscapingBlock, MixerBlock, Stack
from conftest import branch_state, diffusers, make_dit, program, rel_err, sample_dit

EXACT = dict(interval=3, fresh_ratio=1.0, ratio_schedule="constant", self_attention="partial")


def _call(model, t, x=None, labels=(1, 2)):
    x = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(0)) if x is None else x
    with torch.no_grad():
        return model(x, timestep=torch.full((len(labels),), t), class_labels=torch.tensor(labels)).sample


def test_state_dict_and_parameters_untouched():
    model = make_dit()
    keys = list(model.state_dict().keys())
    params = {k: v.clone() for k, v in model.named_parameters()}
    ids = {k: id(v) for k, v in model.named_parameters()}
    toca_fx.transform(model, interval=2, fresh_ratio=0.3)
    sample_dit(model, steps=5)
    assert list(model.state_dict().keys()) == keys
    for k, v in model.named_parameters():
        assert id(v) == ids[k] and torch.equal(v, params[k])
    toca_fx.remove(model)
    assert list(model.state_dict().keys()) == keys


def test_timestep_restart_and_shape_change_start_new_generations():
    model = make_dit()
    toca_fx.transform(model, interval=3, fresh_ratio=0.3)
    for t in (900, 800, 700):
        _call(model, t)
    assert toca_fx.stats(model).calls == {"fresh": 1, "partial": 2}
    _call(model, 900)                                   # the sequence starts again
    st = toca_fx.stats(model)
    assert st.generations == 2 and st.calls["fresh"] == 2
    _call(model, 800, x=torch.randn(1, 4, 8, 8), labels=(3,))  # new batch size mid-generation
    st = toca_fx.stats(model)
    assert st.generations == 3 and st.calls["fresh"] == 3
    toca_fx.reset(model)
    _call(model, 700)
    assert toca_fx.stats(model).calls["fresh"] == 4


def test_new_shape_recaptures_and_reuses_old_capture():
    model = make_dit()
    toca_fx.transform(model)
    _call(model, 900)
    _call(model, 900, x=torch.randn(1, 4, 8, 8), labels=(3,))
    assert len(toca_fx.explain(model).programs) == 2
    _call(model, 900)
    assert len(toca_fx.explain(model).programs) == 2


def _separate_cfg(model, steps=9, guidance=4.0, context=False):
    """CFG as two model calls per step (cond, then uncond), like pipelines with true CFG."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sch.timesteps:
            tt = torch.full((2,), int(t))
            outs = []
            for name, labels in (("cond", torch.tensor([0, 1])), ("uncond", torch.tensor([10, 10]))):
                if context:
                    with model.cache_context(name):
                        outs.append(model(x, timestep=tt, class_labels=labels).sample[:, :4])
                else:
                    outs.append(model(x, timestep=tt, class_labels=labels).sample[:, :4])
            e_c, e_u = outs
            x = sch.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x


@pytest.mark.parametrize("context", [False, True], ids=["same-timestep", "cache_context"])
def test_separate_cfg_calls_get_one_cache_per_branch(context):
    """Per-branch caches make two-call CFG equal to one-batch CFG under FORA reuse."""
    model = make_dit()
    batched = copy.deepcopy(model)
    if context:
        # diffusers models that support caching inherit CacheMixin, which provides cache_context()
        from diffusers.models.cache_utils import CacheMixin

        model.__class__ = type("DiTWithCacheContext", (CacheMixin, type(model)), {})
    toca_fx.transform(batched, "fora")
    toca_fx.transform(model, "fora")
    with toca_fx.generation(batched, num_steps=9):
        ref = sample_dit(batched, steps=9)
    with toca_fx.generation(model, num_steps=9):
        out = _separate_cfg(model, steps=9, context=context)
    st = toca_fx.stats(model)
    assert set(st.branches) == ({"cond", "uncond"} if context else {0, 1})
    assert all(b["step"] == 9 for b in st.branches.values())    # steps counted per branch
    assert st.calls == {"fresh": 6, "partial": 12}
    assert rel_err(out, ref) < 1e-4
    # and the branches really are cached: FORA differs from the uncached model
    toca_fx.remove(model)
    assert rel_err(_separate_cfg(model, steps=9), out) > 1e-4


def test_non_cfg_batch_selects_tokens_per_sample():
    model = make_dit()
    toca_fx.transform(model, interval=2, fresh_ratio=0.25)
    x = torch.randn(2, 4, 8, 8)
    _call(model, 900, x=x)
    assert toca_fx.stats(model).paired is False
    toca_fx.reset(model)
    _call(model, 900, x=torch.cat([x[:1], x[:1]]))
    assert toca_fx.stats(model).paired is True


@pytest.mark.parametrize("block", [lambda: EscapingBlock(16), lambda: MixerBlock(16, 8)], ids=["escaping", "mixer"])
@pytest.mark.parametrize("overrides", [dict(interval=1), EXACT], ids=["all-fresh", "all-tokens"])
def test_hand_written_blocks_stay_exact(block, overrides):
    model = Stack([block() for _ in range(2)]).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, **overrides)
    for t in (5, 4, 3, 2):
        x = torch.randn(2, 8, 16)
        with torch.no_grad():
            assert rel_err(model(x, timestep=t), ref(x)) <= 1e-5


def test_training_mode_runs_unchanged():
    model = make_dit()
    model.train()
    toca_fx.transform(model, interval=1)
    x = torch.randn(2, 4, 8, 8)
    model(x, timestep=torch.tensor([5, 5]), class_labels=torch.tensor([1, 2]))
    assert all(b["original"] == 1 for b in toca_fx.stats(model).blocks.values())


def test_stats_accumulate_until_reset_with_stats():
    model = make_dit()
    toca_fx.transform(model, interval=2, fresh_ratio=0.25)
    sample_dit(model, steps=4)
    sample_dit(model, steps=4)
    st = toca_fx.stats(model)
    assert st.calls == {"fresh": 4, "partial": 4} and st.generations == 2
    assert "tokens computed" in str(st)
    toca_fx.reset(model, stats=True)
    st = toca_fx.stats(model)
    assert st.calls == {} and st.flops_actual == 0 and st.sites == {}


def test_caches_are_named_non_persistent_buffers():
    model = make_dit(num_layers=2)
    keys = list(model.state_dict().keys())
    toca_fx.transform(model, interval=2, fresh_ratio=0.25)
    sample_dit(model, steps=3)
    names = dict(model.named_buffers())
    assert "_toca_fx_state.transformer_blocks__1.branch_0.value_mlp0" in names
    assert "_toca_fx_state.transformer_blocks__0.branch_0.stale_self_attn0" in names
    assert "value_mlp0" not in "".join(model.state_dict().keys()) and list(model.state_dict().keys()) == keys
    assert "BranchState(self_attn0: (4, 16, 32), mlp0: (4, 16, 32))" in str(model)
    assert toca_fx.stats(model).cache_bytes == sum(b.numel() * b.element_size() for n, b in names.items()
                                                   if n.startswith("_toca_fx_state."))
    toca_fx.remove(model)
    assert not any(n.startswith("_toca_fx_state") for n, _ in model.named_buffers())


class _DataDependent(torch.nn.Module):
    """A block whose control flow depends on tensor values (as MoE routing or per-sample masks)."""

    def __init__(self, d=8):
        super().__init__()
        self.inner = EscapingBlock(d)

    def forward(self, x):
        if x.abs().mean() > 0.5:          # a Python branch on data: no single graph exists
            return self.inner(x)[0]
        return x


def test_data_dependent_block_runs_unchanged_with_reason():
    model = Stack([_DataDependent() for _ in range(2)]).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, interval=2)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        for t in (3, 2, 1):
            assert torch.equal(model(x, timestep=t), ref(x))
    e = program(model)
    assert e.failed.code == "capture-failed" and e.failed.stage == "capture"
    assert "unchanged" in str(toca_fx.explain(model)) and "could not capture" in str(toca_fx.explain(model))


def test_resolution_change_recaptures_and_stays_exact():
    from test_property import Model
    torch.manual_seed(0)
    model = Model(2, d=8, heads=2, gated=True, glu=False, cross=False, ctx_dim=6, cond_dim=8).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, **EXACT)
    with torch.no_grad():
        for tokens in (16, 9, 16):
            for step in range(3):
                x = torch.randn(2, tokens, 8)
                t = torch.full((2,), 900.0 - 100 * step)
                assert rel_err(model(x, timestep=t), ref(x, timestep=t)) <= 1e-5
    assert len(toca_fx.explain(model).programs) == 2  # 16 tokens reuses its first capture
    assert toca_fx.stats(model).generations == 3      # each resolution change starts a generation


@pytest.mark.parametrize("attention", ["reuse", "partial-kv"])
def test_cache_dtype_bf16_close_and_stored_in_bf16(attention):
    model = make_dit()
    ref_model = copy.deepcopy(model)
    toca_fx.transform(ref_model, interval=3, fresh_ratio=0.3, self_attention=attention)
    toca_fx.transform(model, interval=3, fresh_ratio=0.3, cache_dtype="bfloat16", self_attention=attention)
    a, b = sample_dit(model, steps=6), sample_dit(ref_model, steps=6)
    st = branch_state(model, "transformer_blocks.0")
    caches = {n: b for n, b in st.named_buffers() if not n.startswith(("stale_", "score"))}
    assert caches and all(v.dtype == torch.bfloat16 for v in caches.values())
    assert any(n.startswith("kv") for n in caches) == (attention == "partial-kv")   # key/value caches too
    assert 0 < rel_err(a, b) < 0.05                 # bf16 caches: a small, measured difference
    assert toca_fx.stats(model).cache_bytes < toca_fx.stats(ref_model).cache_bytes


def test_k_buckets_limit_distinct_token_counts():
    from toca_fx.runtime.schedule import bucket
    assert [bucket(k, 64, 8) for k in (0, 1, 8, 9, 63, 64)] == [0, 8, 8, 16, 64, 64]
    model = make_dit(num_layers=4)
    toca_fx.transform(model, "toca-dit-ddim50", k_buckets=4)
    with toca_fx.generation(model, num_steps=20):
        sample_dit(model, steps=20)
    ks = {k for rec in toca_fx.stats(model).records if rec.variant is not None for _, k in rec.ks}
    assert ks and ks <= {4, 8, 12, 16}


def test_cache_buffers_keep_their_addresses_across_steps():
    """Fresh steps write into the existing buffers: static addresses for CUDA graphs / compile."""
    model = make_dit(num_layers=1)
    toca_fx.transform(model, interval=2, fresh_ratio=0.25)
    ptrs = []
    with toca_fx.generation(model, num_steps=6):
        sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
        sch.set_timesteps(6)
        for t in sch.timesteps:
            _call(model, int(t))
            st = branch_state(model, "transformer_blocks.0")
            ptrs.append(tuple(v.data_ptr() for v in st.buffers()))
    assert len(set(ptrs)) == 1


@pytest.mark.parametrize("start", ["reset", "new loop", "generation()"])
def test_cache_buffers_keep_their_addresses_across_generations(start):
    """A new generation zeroes the buffers in place instead of re-allocating them; a new batch size
    (another program) gets new ones. Outputs stay those of a freshly transformed model."""
    model, twin = make_dit(num_layers=2), make_dit(num_layers=2)
    for m in (model, twin):
        toca_fx.transform(m, interval=2, fresh_ratio=0.25, forecast_order=1)

    def generation(m):
        with toca_fx.generation(m, num_steps=4) if start == "generation()" else contextlib.nullcontext():
            outs = [_call(m, t) for t in (900, 600, 300, 100)]
        if start == "reset":
            toca_fx.reset(m)
        return outs

    def buffers():
        return [v for i in range(2) for v in branch_state(model, f"transformer_blocks.{i}").buffers()]

    generation(model)
    kept = buffers()                                 # held: a re-allocation could not reuse their memory
    second = generation(model)
    assert [v.data_ptr() for v in buffers()] == [v.data_ptr() for v in kept]
    for a, b in zip(second, generation(twin)):       # zeroed state: the same as a freshly transformed model
        assert torch.equal(a, b)
    _call(model, 900, labels=(1, 2, 3))              # a new shape: its own buffers
    assert [v.data_ptr() for v in buffers()] != [v.data_ptr() for v in kept]


@pytest.mark.parametrize("loop", ["one-batch CFG", "two calls per step", "cache_context"])
def test_accelerator_timestep_is_read_only_where_it_can_change_a_decision(loop, monkeypatch):
    """On an accelerator, reading the timestep is a host sync. Inside an explicit generation
    toca_fx reads it only until it knows it cannot change a decision (one branch per call, or
    diffusers' cache context names the branch): the same decisions and output as reading it always."""
    from toca_fx.runtime import controller as controller_mod

    def run(model, pretend_accelerator):
        if pretend_accelerator:
            monkeypatch.setattr(controller_mod, "host_read_is_free", lambda t: False)
        try:
            with toca_fx.generation(model, num_steps=9):
                out = sample_dit(model, steps=9) if loop == "one-batch CFG" else \
                    _separate_cfg(model, steps=9, context=loop == "cache_context")
        finally:
            monkeypatch.undo()
        st = toca_fx.stats(model)
        return out, dict(st.calls), st.branches, st.timestep_reads

    model = make_dit()
    if loop == "cache_context":
        from diffusers.models.cache_utils import CacheMixin

        model.__class__ = type("DiTWithCacheContext", (CacheMixin, type(model)), {})
    other = copy.deepcopy(model)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25)
    toca_fx.transform(other, interval=3, fresh_ratio=0.25)
    out, calls, branches, reads = run(model, pretend_accelerator=False)
    out2, calls2, branches2, reads2 = run(other, pretend_accelerator=True)
    n_calls = 9 if loop == "one-batch CFG" else 18
    assert reads == n_calls                                   # on the CPU every call reads it (free)
    # two branches per step without a context name: read on every call (a CFG cut-off shows only there)
    assert reads2 == {"one-batch CFG": 2, "two calls per step": 18, "cache_context": 0}[loop]
    assert calls2 == calls and branches2 == branches
    assert torch.equal(out2, out)


@pytest.mark.parametrize("schedule", ["constant", "toca-ddim50"])
def test_call_plans_are_made_once_per_kind_of_call(schedule, monkeypatch):
    """Steady-state calls reuse their block's plan (variant, k, bound state): a constant ratio schedule
    needs one fresh and one partial plan per block; a varying one a plan per step, made in the first
    generation only."""
    from toca_fx.runtime.block import BlockRuntime

    made = []
    plan_call = BlockRuntime._plan_call
    monkeypatch.setattr(BlockRuntime, "_plan_call",
                        lambda self, *a, **k: made.append(self.qualname) or plan_call(self, *a, **k))
    model = make_dit(num_layers=2)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25, ratio_schedule=schedule)
    per_generation = []
    for _ in range(2):
        before = len(made)
        with toca_fx.generation(model, num_steps=6):
            sample_dit(model, steps=6)
        per_generation.append(len(made) - before)
    partial = toca_fx.stats(model).calls["partial"] // 2
    # per block: a fresh plan, and one partial plan (constant) or one per partial step (each its own progress)
    assert per_generation == [2 * (1 + (1 if schedule == "constant" else partial)), 0]
    assert partial == (4 if schedule == "constant" else 3)
