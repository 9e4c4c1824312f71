"""Models written the way research code bases write them (tests/research_models.py, hand-written):
a timm-style ViT whose blocks sit in an ``nn.Sequential``, blocks around ``nn.MultiheadAttention``
(sequence-first and batch-first), and a PixArt-alpha research-code-style DiT whose cross-attention
merges the batch into the token axis under a block-diagonal mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import toca_fx
from conftest import rel_err
from research_models import MHAModel, TinyPixArtAlpha, TinyViT, ViTBlock, ViTMlp
from toca_fx.capture.discover import find_block_lists

torch.set_num_threads(1)

EXACT = dict(interval=3, fresh_ratio=1.0, ratio_schedule="constant", self_attention="partial")
EXACT_KV = dict(EXACT, self_attention="partial-kv")
PARTIAL = dict(interval=3, fresh_ratio=0.3, ratio_schedule="constant", self_attention="partial")


def _g(step):
    return torch.Generator().manual_seed(step)


def _vit():
    torch.manual_seed(0)
    return TinyViT().eval(), lambda s: ((torch.randn(2, 3, 8, 8, generator=_g(s)),), {})


def _mha(batch_first, need_weights=False):
    def build():
        torch.manual_seed(0)
        return MHAModel(batch_first=batch_first, need_weights=need_weights).eval(), lambda s: ((torch.randn(2, 16, 6, generator=_g(s)),), {})
    return build


_TEXT_MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()


def _pixart(layout="merged"):
    def build():
        torch.manual_seed(0)
        m = TinyPixArtAlpha(layout=layout).eval()
        y = torch.randn(2, 5, 12, generator=_g(99))
        return m, lambda s: ((torch.randn(2, 4, 8, 8, generator=_g(s)),),
                             dict(timestep=torch.full((2,), 900.0 - 100 * s), y=y, mask=_TEXT_MASK))
    return build


MODELS = {"vit-sequential": _vit, "mha-batch-first": _mha(True), "mha-sequence-first": _mha(False),
          "pixart-alpha-merged": _pixart()}


def _run(model, inputs, steps, reference=None):
    outs = []
    with torch.no_grad():
        for s in range(steps):
            args, kw = inputs(s)
            out = model(*args, **kw)
            if reference is not None:
                assert rel_err(out, reference(*args, **kw)) <= 1e-5, s
            outs.append(out)
    return outs


def _sites(model):
    return {s.name: s for s in toca_fx.explain(model).sites}


# -- exactness and partial calls, per model ------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("overrides", [dict(interval=1), EXACT, EXACT_KV], ids=["all-fresh", "all-tokens", "all-tokens-kv"])
def test_exact_when_every_step_or_every_token_is_computed(name, overrides):
    model, inputs = MODELS[name]()
    original = copy.deepcopy(model)
    toca_fx.transform(model, **overrides)
    _run(model, inputs, 4, reference=original)
    st = toca_fx.stats(model)
    if overrides.get("interval") == 1:
        assert st.calls == {"fresh": 4}
    else:
        assert st.calls == {"fresh": 2, "partial": 2}
        # every site of every block ran select -> gather -> compute -> scatter on all its tokens
        assert st.sites and all(d.get("partial", 0) == 2 and d["tokens"] == d["of"] for d in st.sites.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_every_site_is_token_wise_and_partial_calls_cost_less(name):
    model, inputs = MODELS[name]()
    toca_fx.transform(model, **PARTIAL)
    _run(model, inputs, 3)
    rep = toca_fx.explain(model)
    assert [e.status for e in rep.entries] == ["rewritten"]
    kinds = [s.kind for s in rep.sites]
    assert kinds == (["self_attn", "cross_attn", "mlp"] if name.startswith("pixart") else ["self_attn", "mlp"])
    assert all(s.token_wise for s in rep.sites), [(s.name, s.reason) for s in rep.sites]
    st = toca_fx.stats(model)
    assert st.calls == {"fresh": 1, "partial": 2}
    for block, d in st.sites.items():
        assert d["partial"] == 2 and d["tokens"] < d["of"], block
    assert st.flops_ratio > 1.3, st.flops_ratio


# -- 1. nn.Sequential block containers ------------------------------------------------------------

def test_sequential_of_blocks_is_a_block_list():
    model, _ = _vit()
    found, notes = find_block_lists(model)
    assert [(bl.name, bl.cls, len(bl)) for bl in found] == [("blocks", ViTBlock, 3)] and notes == []
    assert found[0].names == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(a is b for a, b in zip(found[0].modules, model.blocks))


def test_sequential_of_layers_or_around_a_module_list_is_not_a_block_list():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([ViTBlock(8, 2), ViTBlock(8, 2)])

    model = nn.Module()
    model.stem = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))     # bare layers: not blocks
    model.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())             # mixed classes: not noted
    model.stages = nn.Sequential(Stage(), Stage())                    # the ModuleLists inside win
    found, notes = find_block_lists(model)
    assert [bl.name for bl in found] == ["stages.0.layers", "stages.1.layers"] and notes == []


def test_lists_inside_a_sequential_of_blocks_are_not_noted():
    class NotedBlock(ViTBlock):
        def __init__(self):
            super().__init__(8, 2)
            self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])   # would be noted on its own

    model = nn.Module()
    model.blocks = nn.Sequential(NotedBlock(), NotedBlock())
    model.other = nn.ModuleList([nn.Linear(2, 2), nn.GELU()])
    found, notes = find_block_lists(model)
    assert [bl.name for bl in found] == ["blocks"]
    assert len(notes) == 1 and notes[0].startswith("other:")


def test_sequential_of_mixed_blocks_is_refused():
    torch.manual_seed(0)
    model = TinyViT(blocks=nn.Sequential(ViTBlock(32, 2), ViTMlp(32, 64)))
    with pytest.raises(toca_fx.ToCaError, match="no transformer blocks"):
        toca_fx.transform(model)


# -- 2. nn.MultiheadAttention ---------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_multihead_attention_sites(batch_first):
    model, inputs = _mha(batch_first)()
    toca_fx.transform(model, **EXACT_KV)
    _run(model, inputs, 2)
    (prog,) = toca_fx.explain(model).programs
    sa = prog.analysis.site("self_attn0")
    assert sa.local and sa.kv is not None and sa.n_tokens == 16 and sa.axes.token == (1 if batch_first else 0)
    assert prog.score.ingredient.name == "received" and prog.score.refusal is None


def test_multihead_attention_with_weights_is_refused_with_its_reason():
    """need_weights=True: nn.MultiheadAttention computes softmax(QK^T) with bmm on (B*heads, N, d)
    rows: arithmetic on a batch folded with heads is not followed; the branch is computed in full."""
    model, inputs = _mha(True, need_weights=True)()
    original = copy.deepcopy(model)
    toca_fx.transform(model, **EXACT)
    _run(model, inputs, 3, reference=original)
    # (the kind is read from where the attention's keys come from; with their axes lost at the
    # bmm, the branch is labelled by its softmax alone)
    attn, mlp = toca_fx.explain(model).sites
    assert attn.module == "attn" and not attn.token_wise and "flattened batch x heads" in attn.reason
    assert mlp.kind == "mlp" and mlp.token_wise
    st = toca_fx.stats(model)
    assert st.calls == {"fresh": 1, "partial": 2}
    assert all(d.get("full", 0) == 2 for k, d in st.sites.items() if not k.endswith("mlp0"))


# -- 3. PixArt-alpha research code: batch merged into the cross-attention's token axis -----------

def test_merged_batch_cross_attention_is_token_wise_and_scores_from_its_map():
    model, inputs = _pixart()()
    toca_fx.transform(model)                                    # the default config: score "toca"
    _run(model, inputs, 4)
    (prog,) = toca_fx.explain(model).programs
    ca = prog.analysis.site("cross_attn0")
    assert ca.local and ca.probe == "confirmed"
    assert (prog.score.ingredient.name, prog.score.site.name, prog.score.refusal) == ("cross_map", "cross_attn0", None)
    assert toca_fx.stats(model).calls == {"fresh": 2, "partial": 2}


def test_merged_batch_model_caches_like_the_per_sample_model():
    """The merged-batch cross-attention and the usual per-sample one are the same function: under
    ToCa (s2 from the cross-attention map, 30% of the tokens on partial steps) they select the same
    tokens, so the sampled outputs agree; the s2 score of both is the same."""
    merged, inputs = _pixart("merged")()
    per_sample, _ = _pixart("per-sample")()
    per_sample.load_state_dict(merged.state_dict())
    outs = []
    for m in (merged, per_sample):
        toca_fx.transform(m, toca_fx.ToCaConfig.preset("toca-pixart"), interval=2)
        outs.append(_run(m, inputs, 5))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 1e-4
    scores = [toca_fx.explain(m).programs[0] for m in (merged, per_sample)]
    assert all(p.score.ingredient.name == "cross_map" for p in scores)
    sm, sp = (m.get_submodule("_toca_fx_state.blocks__0.branch_0").score for m in (merged, per_sample))
    assert sm.shape == (2, 16) and torch.allclose(sm, sp, atol=1e-5)
    st = toca_fx.stats(merged)
    assert st.calls["partial"] == 2
    assert all(d["partial"] == 2 and d["tokens"] < d["of"] for k, d in st.sites.items() if "cross_attn" in k)


def test_token_major_merged_cross_attention_drops_its_score_with_the_reason():
    """Queries flattened tokens-first (N*B rows): not token-wise, and its map's rows are not the
    stream's (B, N): s2 is dropped (explain says why) and s1 comes from the self-attention."""
    model, inputs = _pixart("token-major")()
    original = copy.deepcopy(model)
    toca_fx.transform(model)
    _run(model, inputs, 4)
    prog = toca_fx.explain(model).programs[0]
    assert not prog.analysis.site("cross_attn0").local
    assert (prog.score.ingredient.name, prog.score.site.name) == ("received", "self_attn0")
    assert prog.score.refusal.code == "score-layout" and "cross_map of cross_attn0 dropped" in prog.score.refusal.message
    assert "cross_map of cross_attn0 dropped" in str(toca_fx.explain(model))
    assert toca_fx.stats(model).calls == {"fresh": 2, "partial": 2}
    # and with every token computed it is still the original model
    toca_fx.remove(model)
    toca_fx.transform(model, **EXACT)
    _run(model, inputs, 3, reference=original)
