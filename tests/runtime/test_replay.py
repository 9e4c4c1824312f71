"""Whole-model torch.compile(fullgraph=True) of a transformed model (runtime/replay.py).

Each generation runs inside ``toca_fx.generation(model, num_steps)``; the first one runs eagerly
(captures, plans), the later ones compiled. Outputs are compared with an eager transformed twin
(same schedule) and the graphs dynamo made are counted (``unique_graphs``)."""

import copy

import numpy as np

import pytest
import torch
from torch._dynamo.utils import counters

import toca_fx
from conftest import make_dit, make_pixart, rel_err, sample_dit, sample_pixart


def _generation(model, sampler, steps, handle=None):
    with toca_fx.generation(model, num_steps=steps):
        return sampler(handle if handle is not None else model, steps=steps)


def _compiled_twins(make, config, **overrides):
    model = make(num_layers=2)
    eager = copy.deepcopy(model)
    for m in (model, eager):
        toca_fx.transform(m, config, **overrides)
    torch._dynamo.reset()
    counters.clear()
    return model, eager


@pytest.mark.parametrize("make,sampler,config,overrides,steps,kinds", [
    (make_dit, sample_dit, None, dict(interval=3, fresh_ratio=0.25), 6, 2),
    (make_dit, sample_dit, "toca-dit-ddim50", {}, 50, 5),
    (make_pixart, sample_pixart, None, dict(interval=3, fresh_ratio=0.25), 6, 2),
    (make_dit, sample_dit, "forecast-n4", {}, 12, 2),     # the forecast's step variable: a static buffer
])
def test_fullgraph_one_graph_per_kind_of_call_none_after_the_first_generation(make, sampler, config, overrides,
                                                                              steps, kinds):
    model, eager = _compiled_twins(make, config, **overrides)
    reference = _generation(eager, sampler, steps)
    _generation(model, sampler, steps)                        # eager: capture, plans, the call layout
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    first = _generation(model, sampler, steps, compiled)
    graphs = counters["stats"]["unique_graphs"]
    second = _generation(model, sampler, steps, compiled)
    third = _generation(model, sampler, steps, compiled)
    assert graphs == kinds                                    # one graph per kind of call, bounded
    assert counters["stats"]["unique_graphs"] == graphs       # no recompile in later generations
    for out in (first, second, third):
        assert rel_err(out, reference) <= 1e-4
    ctl_stats, ref_stats = toca_fx.stats(model), toca_fx.stats(eager)
    assert ctl_stats.calls == {k: 4 * v for k, v in ref_stats.calls.items()}   # the same schedule, counted
    assert ctl_stats.compiled_calls == 3 * steps and ctl_stats.call_kinds == kinds
    assert ctl_stats.flops_ratio == pytest.approx(ref_stats.flops_ratio, rel=1e-9)


def test_inductor_whole_model_matches_eager():
    model, eager = _compiled_twins(make_dit, None, interval=3, fresh_ratio=0.25)
    reference = _generation(eager, sample_dit, 6)
    _generation(model, sample_dit, 6)
    compiled = torch.compile(model, fullgraph=True)
    outs = [_generation(model, sample_dit, 6, compiled) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == 2
    assert all(rel_err(out, reference) <= 1e-4 for out in outs)


def test_compiled_calls_read_no_timestep():
    """A compiled call is decided ahead: the timestep is never read on the host (no sync on GPUs)."""
    model, _ = _compiled_twins(make_dit, None, interval=3, fresh_ratio=0.25)
    _generation(model, sample_dit, 6)
    reads = toca_fx.stats(model).timestep_reads
    assert reads > 0                                          # the eager generation reads CPU timesteps
    _generation(model, sample_dit, 6, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert toca_fx.stats(model).timestep_reads == reads and toca_fx.stats(model).compiled_calls == 6


def test_fullgraph_without_an_eager_call_first_says_why():
    model, _ = _compiled_twins(make_dit, None, interval=3, fresh_ratio=0.25)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="toca_fx decides this call eagerly"):
        _generation(model, sample_dit, 3, compiled)


def test_adaptive_fresh_steps_are_decided_eagerly():
    """Adaptive fresh steps read the first block's input change: never decided ahead."""
    model, _ = _compiled_twins(make_dit, "toca-adaptive")
    _generation(model, sample_dit, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="toca_fx decides this call eagerly"):
        _generation(model, sample_dit, 4, compiled)
    assert toca_fx.stats(model).compiled_calls == 0


def test_fullgraph_outside_a_generation_says_why():
    """A plain loop (no generation of known length) is decided eagerly: a new loop is only visible in
    the timesteps, which a compiled call does not read."""
    model, _ = _compiled_twins(make_dit, None, interval=3, fresh_ratio=0.25)
    sample_dit(model, steps=3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="toca_fx decides this call eagerly"):
        sample_dit(compiled, steps=3)


def test_eager_call_between_compiled_calls_takes_over_the_decision():
    """An eager call after a call was prepared decides itself (the prepared counters are put back):
    mixing compiled and eager calls within a generation gives the eager schedule."""
    model, eager = _compiled_twins(make_dit, None, interval=3, fresh_ratio=0.25)
    _generation(model, sample_dit, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    calls = iter([compiled, model, compiled, model, model, compiled])

    class Alternating:
        def __call__(self, *args, **kwargs):
            return next(calls)(*args, **kwargs)

    out = _generation(model, sample_dit, 6, Alternating())
    assert rel_err(out, _generation(eager, sample_dit, 6)) <= 1e-4
    assert toca_fx.stats(model).compiled_calls == 3


def test_compiled_model_is_seen_through_by_the_api():
    model, _ = _compiled_twins(make_dit, None)
    compiled = torch.compile(model)
    assert toca_fx.is_transformed(compiled)
    assert toca_fx.stats(compiled).calls == toca_fx.stats(model).calls


@pytest.mark.parametrize("context", [False, True], ids=["two calls per step", "cache_context"])
def test_separate_cfg_calls_are_decided_ahead_per_branch(context):
    """CFG as two calls per step: the branch of a call decided ahead comes from diffusers' cache
    context (set before the call, outside the graph) or from the calls per step the eager
    generation learned."""
    from test_controller_and_state import _separate_cfg

    def make(**kw):
        m = make_dit(**kw)
        if context:   # diffusers models that support caching inherit CacheMixin (cache_context)
            from diffusers.models.cache_utils import CacheMixin
            m.__class__ = type("DiTWithCacheContext", (CacheMixin, type(m)), {})
        return m

    model, eager = _compiled_twins(make, None, interval=3, fresh_ratio=0.25)
    sampler = lambda m, steps: _separate_cfg(m, steps=steps, context=context)   # noqa: E731
    reference = _generation(eager, sampler, 6)
    _generation(model, sampler, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = [_generation(model, sampler, 6, compiled) for _ in range(2)]
    assert all(rel_err(out, reference) <= 1e-4 for out in outs)
    st = toca_fx.stats(model)
    assert st.compiled_calls == 24 and set(st.branches) == ({"cond", "uncond"} if context else {0, 1})
    assert st.calls == {k: 3 * v for k, v in toca_fx.stats(eager).calls.items()}


def test_weights_changed_between_compiled_generations_are_what_runs():
    """The compiled graph reads the block's parameters from the module: an in-place edit and a
    reassigned parameter are what the next compiled call computes with (compared with an eager
    twin given the same edits)."""
    model, eager = _compiled_twins(make_dit, None, interval=1)
    _generation(model, sample_dit, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _generation(model, sample_dit, 4, compiled)
    for m in (model, eager):
        with torch.no_grad():
            m.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
        m.transformer_blocks[1].attn1.to_v.weight = torch.nn.Parameter(m.transformer_blocks[1].attn1.to_v.weight * -1)
    got = _generation(model, sample_dit, 4, compiled)
    toca_fx.remove(eager)
    assert rel_err(got, sample_dit(eager, steps=4)) <= 1e-4


def test_a_diffusers_pipeline_with_a_compiled_transformer():
    from test_pipelines import _dit_pipe, _run_dit

    pipe = _dit_pipe()
    reference_pipe = copy.deepcopy(pipe)
    for p in (pipe, reference_pipe):
        toca_fx.transform(p, interval=3, fresh_ratio=0.25)
    torch._dynamo.reset()
    counters.clear()
    reference = _run_dit(reference_pipe, 6)
    _run_dit(pipe, 6)                                         # eager warm-up
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        np.testing.assert_allclose(_run_dit(pipe, 6), reference, rtol=0, atol=1e-4)
    assert toca_fx.stats(pipe).compiled_calls == 12 and counters["stats"]["unique_graphs"] == 2
