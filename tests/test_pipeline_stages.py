"""The pass as named stages (``toca_fx.pipeline.compile_block``): the stage records of a program,
the programs that fail (the block then runs unchanged), and the refusals ``explain`` collects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import toca_fx
from blocks import Attention, EscapingBlock, MLPOnlyBlock, PreNormBlock, Stack
from conftest import make_dit
from toca_fx import Refusal, ToCaConfig
from toca_fx.passes.bindings import ScoreOutput
from toca_fx.pipeline import compile_block

STAGES = ["capture", "analyse", "probe", "score", "state", "fresh"]


def _dit_call(model, t=10):
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t)),
                     timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2])).sample


def test_stage_records_of_a_dit_program():
    model = make_dit(num_layers=2)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25)
    _dit_call(model, 10)
    (p,) = toca_fx.explain(model).programs
    assert p.failed is None
    assert list(p.stages) == STAGES
    assert all(r.name == n and r.runs == 1 and r.seconds > 0 and r.refusals == [] for n, r in p.stages.items())
    assert {n: r.counts for n, r in p.stages.items()} == {
        "capture": {}, "analyse": {"sites": 2, "token_wise": 2}, "probe": {"probed": 1}, "score": {},
        "state": {"buffers": 4}, "fresh": {"variants": 1, "attention_maps": 1, "cache_writes": 2, "nodes_removed": 0}}
    (e,) = toca_fx.explain(model).entries
    assert e.seconds == {n: r.seconds for n, r in p.stages.items()} and e.variants == 1

    _dit_call(model, 9)                                    # the first partial call builds the partial variant
    assert list(p.stages) == STAGES + ["partial"]
    part = p.stages["partial"]
    assert part.runs == 1 and part.seconds > 0
    assert part.counts == {"variants": 1, "reused_sites": 1, "partial_sites": 1, "gathers": 1, "scatters": 1, "selections": 1,
                           "region_nodes": 7, "nodes_removed": 31}
    before = {n: (r.runs, r.seconds) for n, r in p.stages.items()}
    _dit_call(model, 8)                                    # same techniques and k: the variant is reused
    assert {n: (r.runs, r.seconds) for n, r in p.stages.items()} == before
    assert len(p.variants) == 2 and toca_fx.stats(model).calls == {"fresh": 1, "partial": 2}


def test_no_probe_stage_without_probe():
    model = make_dit(num_layers=1)
    toca_fx.transform(model, probe=False)
    _dit_call(model)
    (p,) = toca_fx.explain(model).programs
    assert list(p.stages) == [s for s in STAGES if s != "probe"]
    assert all(s.probe == "not run" for s in p.sites)


def test_compile_block_directly():
    """compile_block is the pass on one block and one call; it never raises for a block it refuses."""
    mlp = MLPOnlyBlock(8)
    p = compile_block(("key",), mlp, (torch.randn(2, 4, 8),), {}, mlp.forward, ToCaConfig())
    assert p.key == ("key",) and p.cls_name == "MLPOnlyBlock"
    assert p.failed == Refusal("no-attention", "no attention (scaled_dot_product_attention or softmax(QK^T)V) "
                               "in the captured graph")
    assert p.failed.stage == "analyse" and p.stages["analyse"].refusals == [p.failed]
    assert list(p.stages) == ["capture", "analyse"] and p.fresh is None and p.sites == []
    assert p.variants == [] and not p.analysis.has_attention
    # the recorded example inputs are dropped once the program is compiled (metadata only)
    assert all(not isinstance(t, torch.Tensor) for t in p.capture.example_inputs)


class _DataDependent(nn.Module):
    """A Python ``if`` on a tensor value: torch.export cannot capture it in one graph."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = Attention(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.attn(x)
        if x.sum() > 0:
            return x + self.fc(x)
        return x - self.fc(x)


def test_capture_failure_leaves_the_block_unchanged():
    model = Stack([_DataDependent() for _ in range(2)]).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model, interval=2, fresh_ratio=0.5)
    with torch.no_grad():
        for t in (3, 2, 1):
            x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(t))
            assert torch.equal(model(x, timestep=t), ref(x))
    rep = toca_fx.explain(model)
    (p,) = rep.programs
    assert p.failed.code == "capture-failed" and p.failed.stage == "capture" and not p.failed
    assert list(p.stages) == ["capture"] and p.stages["capture"].refusals == [p.failed]
    assert p.analysis is None and p.fresh is None and p.variants == []
    assert rep.refusals == [p.failed]
    assert rep.entries[0].status == "unchanged" and rep.entries[0].refusal is p.failed
    st = toca_fx.stats(model)
    assert st.blocks == {"blocks.0": {"fresh": 0, "partial": 0, "original": 3},
                         "blocks.1": {"fresh": 0, "partial": 0, "original": 3}}
    assert st.flops_actual == 0 and st.cache_bytes == 0


class _Block(PreNormBlock):
    """A pre-norm attention block (its class name is what the tests below read)."""


class _TwoLists(nn.Module):
    """Attention blocks and, after them, a list of MLP-only blocks (no attention: rejected)."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        self.mlps = nn.ModuleList([MLPOnlyBlock(d) for _ in range(2)])

    def forward(self, x, timestep=None):
        for b in self.blocks:
            x = b(x)
        for b in self.mlps:
            x = b(x)
        return x


def test_block_without_attention_is_refused_and_runs_unchanged():
    model = _TwoLists().eval()
    toca_fx.transform(model, interval=2, fresh_ratio=0.5)
    with torch.no_grad():
        for t in (3, 2, 1):
            model(torch.randn(2, 4, 8), timestep=t)
    rep = toca_fx.explain(model)
    by_cls = {p.cls_name: p for p in rep.programs}
    assert set(by_cls) == {"_Block", "MLPOnlyBlock"}
    mlp = by_cls["MLPOnlyBlock"]
    assert mlp.failed.code == "no-attention" and mlp.failed.stage == "analyse"
    assert list(mlp.stages) == ["capture", "analyse"]
    assert by_cls["_Block"].failed is None and [s.kind for s in by_cls["_Block"].sites] == ["self_attn", "mlp"]
    assert [(bl["name"], bl["rejected"]) for bl in rep.lists] == [("blocks", None), ("mlps", str(mlp.failed))]
    assert [r.code for r in rep.refusals] == ["no-attention"]
    st = toca_fx.stats(model)
    assert st.blocks["mlps.0"] == st.blocks["mlps.1"] == {"fresh": 0, "partial": 0, "original": 3}
    assert st.blocks["blocks.0"] == {"fresh": 2, "partial": 1, "original": 0}


def test_analysis_error_leaves_the_block_unchanged(monkeypatch):
    import toca_fx.pipeline as pipeline

    def boom(gm, n_lifted):
        raise IndexError("synthetic")

    monkeypatch.setattr(pipeline, "analyze_block", boom)
    model = Stack([_Block() for _ in range(2)]).eval()
    ref = copy.deepcopy(model)
    toca_fx.transform(model)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.equal(model(x, timestep=1), ref(x))
    (p,) = toca_fx.explain(model).programs
    assert p.failed == Refusal("analysis-error", "analysis failed: IndexError: synthetic", stage="analyse")
    assert list(p.stages) == ["capture", "analyse"]


def test_explain_collects_site_refusals():
    model = Stack([EscapingBlock(8) for _ in range(2)]).eval()
    toca_fx.transform(model, interval=2, fresh_ratio=0.5)
    with torch.no_grad():
        for t in (3, 2):
            model(torch.randn(2, 6, 8), timestep=t)
    rep = toca_fx.explain(model)
    (p,) = rep.programs
    mlp = p.analysis.site("mlp0")
    (r,) = rep.refusals
    assert r is mlp.refusal and r in p.stages["analyse"].refusals
    assert (r.code, r.stage, r.node) == ("escapes", "analyse", mlp.value.name)
    assert not mlp.cacheable and not mlp.local and str(r) == mlp.reason
    assert r.message.startswith(f"branch output {mlp.value.name} escapes to ")
    assert p.failed is None and toca_fx.stats(model).calls == {"fresh": 1, "partial": 1}
    assert toca_fx.stats(model).sites["blocks.0.mlp0"]["compute"] == 1      # computed as captured


class _BroadcastKeys(nn.Module):
    """Keys/values broadcast over an axis of the queries ((B, 2, 2, N, d) queries, (B, 1, 2, N, d)
    keys): no attention map for s1 (grouped-query attention has one: its keys are repeated per group)."""

    def __init__(self, d=16):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.o, self.fc = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, n, 2, 2, 4).permute(0, 2, 3, 1, 4)
        k, v = self.kv(h).view(b, n, 2, 1, 2, 4).permute(2, 0, 3, 4, 1, 5)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.permute(0, 3, 1, 2, 4).reshape(b, n, d))
        return x + self.fc(self.n2(x))


def test_score_without_an_attention_map_falls_back_to_staleness():
    model = Stack([_BroadcastKeys() for _ in range(2)]).eval()
    toca_fx.transform(model, interval=2, fresh_ratio=0.5)
    with torch.no_grad():
        for t in (3, 2):
            model(torch.randn(2, 16, 16), timestep=t)
    rep = toca_fx.explain(model)
    (p,) = rep.programs
    (r,) = rep.refusals
    assert (r.code, r.stage) == ("score-layout", "fresh") and r in p.stages["fresh"].refusals
    assert p.score.score.name == "staleness" and p.score.ingredient is None
    assert str(r) in p.notes and not any(isinstance(o, ScoreOutput) for o in p.fresh.outputs)
    assert "attention_maps" not in p.stages["fresh"].counts
    assert toca_fx.stats(model).flops_score == 0


def test_refusal_is_falsy_and_prints_its_message():
    r = Refusal("escapes", "branch output mul_3 escapes to getitem_2", stage="analyse", node="mul_3")
    assert not r and bool(r) is False and (r or "fallback") == "fallback"
    assert str(r) == "branch output mul_3 escapes to getitem_2" and f"{r}" == str(r)
    w = r.wrap("site mlp0: ")
    assert w == Refusal("escapes", "site mlp0: branch output mul_3 escapes to getitem_2", "analyse", "mul_3")
    assert r.wrap("x: ", code="other").code == "other"
    assert Refusal("a", "b").stage == "analyse" and Refusal("a", "b").node is None
    with pytest.raises(Exception):
        r.code = "other"                                     # frozen
