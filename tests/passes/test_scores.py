"""Token selection and the scores of DESIGN.md section 3."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import toca_fx
from conftest import branch_state, make_dit, make_pixart, program, sample_dit, sample_pixart
from selection import emitted_select
from toca_fx.ops import select_tokens, spatial_bonus
from toca_fx.passes.bindings import ScoreOutput
from toca_fx.passes.scores import cross_entropy_score, received_attention

select = emitted_select                      # the selection the partial variants run


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 3), n=st.sampled_from([4, 16, 64]), frac=st.floats(0.05, 1.0), cfg=st.booleans(),
       seed=st.integers(0, 1000))
def test_select_tokens_invariants(half, n, frac, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    b = 2 * half
    score = torch.rand(b, n, generator=g)
    stale = torch.randint(0, 5, (b, n), generator=g).float()
    before = stale.clone()
    k = max(1, int(frac * n))
    idx = select(score, stale, k, 0.25, 1 / 3, 0.6, 2, cfg)
    assert idx.shape == (b, k)
    for row in idx:
        assert len(set(row.tolist())) == k and row.min() >= 0 and row.max() < n
    if cfg:
        assert torch.equal(idx[:half], idx[half:])           # cond and uncond select the same tokens
    chosen = torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(stale[chosen], torch.zeros(int(chosen.sum())))
    assert torch.equal(stale[~chosen], before[~chosen] + 1)   # s3: +1 for every token not recomputed


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 3), n=st.sampled_from([4, 9, 16, 64]), frac=st.floats(0.0, 1.0), cfg=st.booleans(),
       grid=st.sampled_from([1, 2, 4]), bonus=st.sampled_from([0.0, 0.4, 0.6]), seed=st.integers(0, 1000))
def test_the_graphs_selection_is_the_reference(half, n, frac, cfg, grid, bonus, seed):
    g = torch.Generator().manual_seed(seed)
    b = 2 * half
    score = torch.rand(b, n, generator=g)
    stale = torch.randint(0, 5, (b, n), generator=g).float()
    k = int(frac * n)
    stale_ref = stale.clone()
    got = select(score, stale, k, 0.25, 1 / 3, bonus, grid, cfg)
    ref = select_tokens(score, stale_ref, k, 0.25, 1 / 3, bonus, grid, cfg)
    assert torch.equal(got.sort(dim=1).values, ref.sort(dim=1).values)
    assert torch.equal(stale, stale_ref)


def test_selection_is_per_sample_without_cfg():
    score = torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.5, 0.0]])
    idx = select(score, torch.zeros(2, 4), 1, 0.0, 1.0, 0.0, 1, False)
    assert idx.tolist() == [[0], [1]]


def test_staleness_raises_rank():
    score = torch.tensor([[0.5, 0.4]])
    idx = select(score, torch.tensor([[0.0, 3.0]]), 1, 0.25, 1 / 3, 0.0, 1, False)
    assert idx.tolist() == [[1]]                             # 0.4 + 0.25 * 3/3 > 0.5


def test_spatial_bonus_top_token_per_tile():
    s = torch.arange(16.0).view(1, 16) / 16
    out = spatial_bonus(s, 0.6, 2)
    grid = s.view(4, 4)
    tops = {(r * 2 + 1) * 4 + c * 2 + 1 for r in range(2) for c in range(2)}   # max of each 2x2 tile
    for i in range(16):
        expect = s[0, i] * (1.6 if i in tops else 1.0)
        assert torch.isclose(out[0, i], expect), i
    assert torch.equal(spatial_bonus(s[:, :15], 0.6, 2), s[:, :15])          # not a square grid: off
    del grid


def test_cross_attention_entropy_averages_cfg_halves():
    c = torch.softmax(torch.randn(4, 6, 5), -1)
    got = cross_entropy_score(c, paired=True)
    avg = 0.5 * (c[:2] + c[2:])
    h = -(avg * torch.log(avg + 1e-7)).sum(-1)
    ref = torch.nn.functional.normalize(1 + h, dim=1)
    assert torch.allclose(got, torch.cat([ref, ref]))
    assert torch.allclose(received_attention(torch.ones(1, 4), paired=False), torch.full((1, 4), 0.5))


def test_fresh_step_computes_the_attention_map_dit():
    model = make_dit(num_layers=1)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25)
    sample_dit(model, steps=4)
    e = program(model)
    assert e.score.ingredient.name == "received"
    st = branch_state(model, "transformer_blocks.0")
    # s1 is the L2-normalised attention received by each token: unit norm, positive
    assert torch.allclose(st.score.norm(dim=1), torch.ones(st.score.shape[0]))
    assert (st.score > 0).all()


def test_pixart_scores_from_cross_attention_entropy():
    model = make_pixart(num_layers=1)
    toca_fx.transform(model, interval=3, fresh_ratio=0.25)
    sample_pixart(model, steps=4)
    e = program(model)
    assert e.score.ingredient.name == "cross_map" and e.score.bonus == 0.4 and e.score.grid == 4
    st = branch_state(model, "transformer_blocks.0")
    b = st.score.shape[0]
    assert torch.equal(st.score[: b // 2], st.score[b // 2:])        # CFG halves share one score


def test_flash_compatible_scores_run_and_differ():
    picks = {}
    for score in ("v-norm", "k-norm", "random", "staleness", "toca"):
        model = make_dit(num_layers=2)
        toca_fx.transform(model, interval=3, fresh_ratio=0.25, score=score)
        out = sample_dit(model, steps=6)
        assert torch.isfinite(out).all()
        e = program(model)
        roles = [s.ingredient for s in e.fresh.outputs if isinstance(s, ScoreOutput)]
        assert roles == {"v-norm": ["vnorm"], "k-norm": ["knorm"], "toca": ["received"]}.get(score, [])
        picks[score] = out
    assert not torch.equal(picks["v-norm"], picks["random"])
