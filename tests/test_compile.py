"""The structure that makes compiled variants fast: one graph, no breaks, bounded shapes."""

from __future__ import annotations

import copy

import pytest
import torch

import toca_fx
from conftest import make_dit, make_pixart, rel_err, sample_dit, sample_pixart
from toca_fx.runtime.entry import partial_variant


def _inputs(e, v, block, ks):
    from toca_fx.runtime.flops import TensorSpec
    from toca_fx.runtime.entry import extra_inputs_meta
    specs = e.capture.lifted_values(block) + list(e.capture.example_inputs) + extra_inputs_meta(e, v, ks)
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
    ctl = model._toca_fx
    (e,) = ctl.entries.values()
    block = ctl.blocks[0].module
    variants = [e.fresh] + list(e.partials.values())
    variants.append(partial_variant(e, {s.name: "reuse" for s in e.sites}, True, ctl.config))
    for v in variants:
        ks = {s: 4 for r, s in v.extra_inputs if r == "k"}
        torch._dynamo.reset()
        report = torch._dynamo.explain(v.gm)(*_inputs(e, v, block, ks))
        assert report.graph_break_count == 0 and report.graph_count == 1, (v.actions, report.break_reasons)


def test_compiled_model_matches_eager():
    model = make_dit(num_layers=2)
    reference = sample_dit(copy.deepcopy(model), steps=4)
    toca_fx.transform(model, interval=2, fresh_ratio=1.0, self_attention="partial", compile=True)
    out = sample_dit(model, steps=4)
    assert rel_err(out, reference) <= 1e-4          # inductor fuses differently from eager
    (e,) = model._toca_fx.entries.values()
    assert len(e.compiled) == 2                     # the fresh and one partial variant, shared by all blocks
