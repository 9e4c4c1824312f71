"""The structure that makes compiled variants fast: one graph, no breaks, bounded shapes."""

from __future__ import annotations

import copy

import pytest
import torch

import toca_fx
from conftest import make_dit, make_pixart, program, programs, rel_err, sample_dit, sample_pixart
from toca_fx.flops import TensorSpec
from toca_fx.passes.bindings import TokenCount


def _inputs(e, v, block, ks):
    specs = e.capture.lifted_values(block) + list(e.capture.example_inputs) + e.extra_input_specs(v, ks)
    out = []
    for s in specs:
        if isinstance(s, TensorSpec):
            t = torch.zeros(s.shape, dtype=s.dtype) if s.dtype.is_floating_point else torch.zeros(s.shape, dtype=s.dtype)
            out.append(t)
        else:
            out.append(s)
    return out


@pytest.mark.parametrize("attention", ["partial", "partial-kv"])
@pytest.mark.parametrize("make,sample", [(make_dit, sample_dit), (make_pixart, sample_pixart)], ids=["dit", "pixart"])
def test_every_variant_is_one_graph_without_breaks(make, sample, attention):
    model = make(num_layers=2)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25, self_attention=attention)
    sample(model, steps=4)
    ((e, block),) = programs(model)
    variants = [e.fresh] + list(e.partials.values())
    variants.append(e.variant({s.name: "reuse" for s in e.sites}, True))
    for v in variants:
        ks = {s.site: 4 for s in v.inputs if isinstance(s, TokenCount)}
        torch._dynamo.reset()
        report = torch._dynamo.explain(v.gm)(*_inputs(e, v, block, ks))
        assert report.graph_break_count == 0 and report.graph_count == 1, (v.actions, report.break_reasons)


def test_compiled_model_matches_eager():
    model = make_dit(num_layers=2)
    reference = sample_dit(copy.deepcopy(model), steps=4)
    toca_fx.transform(model, interval=2, fresh_ratio=1.0, self_attention="partial", compile=True)
    out = sample_dit(model, steps=4)
    assert rel_err(out, reference) <= 1e-4          # inductor fuses differently from eager
    e = program(model)
    assert len(e.compiled) == 2                     # the fresh and one partial variant, shared by all blocks


@pytest.mark.parametrize("preset", ["fora", "toca-dit-ddim50"])
def test_no_recompiles_after_the_first_generation(preset):
    """compile=True: every graph (fresh, partial per k) is compiled in the first generation; the
    second, with the same schedule, compiles nothing (guards hold: no Python counter is guarded on)."""
    from torch._dynamo.utils import counters

    model = make_dit(num_layers=2)
    toca_fx.transform(model, toca_fx.ToCaConfig.preset(preset, compile=True))
    torch._dynamo.reset()
    counters.clear()
    with toca_fx.generation(model, num_steps=10):
        sample_dit(model, steps=10)
    first = counters["stats"]["unique_graphs"]
    assert 2 <= first <= 8 and not counters["graph_break"]   # fresh + partial (+ block 0: another layout), no breaks
    with toca_fx.generation(model, num_steps=10):
        sample_dit(model, steps=10)
    assert counters["stats"]["unique_graphs"] == first
    assert toca_fx.stats(model).calls["partial"] > 0


def test_torch_compile_of_the_transformed_model_runs_the_runtime_eagerly():
    """torch.compile(transformed model): the model's own code is compiled, toca_fx's controller and
    block runtime run eagerly (torch.compiler.disable), so dynamo never guards on its counters:
    the same output and schedule as eager, and no new graph in the second generation."""
    from torch._dynamo.utils import counters

    model = make_dit(num_layers=2)
    eager = copy.deepcopy(model)
    for m in (model, eager):
        toca_fx.transform(m, interval=3, fresh_ratio=0.25)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    first = sample_dit(compiled, steps=6)
    graphs = counters["stats"]["unique_graphs"]
    second = sample_dit(compiled, steps=6)
    assert counters["stats"]["unique_graphs"] == graphs
    reference = sample_dit(eager, steps=6)
    assert rel_err(first, reference) <= 1e-4 and rel_err(second, reference) <= 1e-4
    assert toca_fx.stats(eager).calls == {"fresh": 2, "partial": 4}
    assert toca_fx.stats(model).calls == {"fresh": 4, "partial": 8}          # two generations, same schedule
