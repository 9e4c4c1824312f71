"""Unit tests of the token selection as the partial variants run it (``passes/select.py``, ATen
nodes in the graph) and of ``spatial_bonus``.

Arguments are passed positionally: (score, stale, k, stale_weight, inv_interval, bonus, grid,
cfg-pairing flag), as ``toca_fx.ops.select_tokens`` (the reference) takes them.
"""

from __future__ import annotations

import pytest
import torch

from selection import emitted_select
from toca_fx.ops import spatial_bonus

torch.set_num_threads(1)
select = emitted_select                      # what the partial variants run


def picked(idx: torch.Tensor) -> list[list[int]]:
    """Selected tokens per sample, sorted (topk runs with sorted=False)."""
    return [sorted(row) for row in idx.tolist()]


def test_top_k_of_score_plus_weighted_staleness():
    score = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2, 0.75, 0.4, 0.0, 0.7]])
    stale = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 8.0, 0.0]])
    score_before = score.clone()
    # effective: token 2: 0.3 + 0.25 * 0.5 * 4 = 0.8, token 7: 0.0 + 0.25 * 0.5 * 8 = 1.0
    idx = select(score, stale, 3, 0.25, 0.5, 0.0, 1, False)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (1, 3)
    assert picked(idx) == [[1, 2, 7]]
    assert stale.tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]   # chosen 0, others +1
    assert torch.equal(score, score_before)
    # without the staleness term the plain top-3 of the score is chosen
    idx = select(score, torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 8.0, 0.0]]), 3, 0.0, 0.5, 0.0, 1, False)
    assert picked(idx) == [[1, 5, 8]]


@pytest.mark.parametrize("weight,inv_interval,expect", [
    (0.25, 0.2, 1),       # 0.5 + 0.25 * 0.2 * 1 = 0.55 < 0.6
    (0.25, 1.0, 0),       # 0.5 + 0.25 * 1.0 * 1 = 0.75 > 0.6
    (1.0, 0.05, 1),       # 0.5 + 0.05 < 0.6
    (1.0, 0.2, 0),        # 0.5 + 0.2 > 0.6
])
def test_staleness_term_is_weight_times_inverse_interval(weight, inv_interval, expect):
    idx = select(torch.tensor([[0.5, 0.6]]), torch.tensor([[1.0, 0.0]]), 1, weight, inv_interval, 0.0, 1, False)
    assert idx.tolist() == [[expect]]


def test_selection_is_per_sample_without_cfg():
    score = torch.tensor([[0.9, 0.0, 0.5, 0.0], [0.0, 0.8, 0.5, 0.0], [0.0, 0.0, 0.1, 1.0], [0.3, 0.2, 0.1, 0.0]])
    stale = torch.zeros(4, 4)
    idx = select(score, stale, 1, 0.25, 1 / 3, 0.0, 1, False)
    assert idx.tolist() == [[0], [1], [3], [0]]
    assert stale.tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]]


def test_cfg_halves_get_the_same_tokens_from_their_mean_score():
    # sample 0: cond prefers token 0, uncond token 1; their mean prefers token 2 (0.45, 0.4, 0.5, 0)
    score = torch.tensor([[0.9, 0.0, 0.5, 0.0],       # cond, sample 0
                          [0.0, 0.0, 0.0, 1.0],       # cond, sample 1
                          [0.0, 0.8, 0.5, 0.0],       # uncond, sample 0
                          [0.0, 0.0, 0.0, 1.0]])      # uncond, sample 1
    stale = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    idx = select(score, stale, 1, 0.0, 1.0, 0.0, 1, True)
    assert idx.tolist() == [[2], [3], [2], [3]]
    assert stale.tolist() == [[1, 1, 0, 1], [3, 1, 1, 0], [1, 1, 0, 1], [6, 1, 1, 0]]


def test_cfg_staleness_of_both_halves_is_averaged():
    score = torch.tensor([[0.5, 0.6], [0.5, 0.6]])
    # mean staleness of token 0: (4 + 0) / 2 = 2 -> 0.5 + 0.1 * 2 = 0.7 > 0.6
    idx = select(score, torch.tensor([[4.0, 0.0], [0.0, 0.0]]), 1, 0.1, 1.0, 0.0, 1, True)
    assert idx.tolist() == [[0], [0]]
    idx = select(score, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1, 0.1, 1.0, 0.0, 1, True)
    assert idx.tolist() == [[1], [1]]                 # 0.5 + 0.1 * 0.5 < 0.6


def test_k_equal_to_n_recomputes_every_token():
    stale = torch.tensor([[3.0, 1.0, 0.0, 7.0]] * 2)
    idx = select(torch.rand(2, 4), stale, 4, 0.25, 1 / 3, 0.6, 2, False)
    assert picked(idx) == [[0, 1, 2, 3]] * 2
    assert torch.equal(stale, torch.zeros(2, 4))


def test_k_zero_selects_nothing_and_ages_every_token():
    stale = torch.tensor([[3.0, 1.0, 0.0, 7.0]])
    idx = select(torch.rand(1, 4), stale, 0, 0.25, 1 / 3, 0.0, 1, False)
    assert tuple(idx.shape) == (1, 0)
    assert stale.tolist() == [[4.0, 2.0, 1.0, 8.0]]


def test_integer_staleness_is_updated_in_place():
    stale = torch.tensor([[0, 2, 0, 0]], dtype=torch.int64)
    ref = stale
    idx = select(torch.tensor([[0.4, 0.3, 0.2, 0.1]]), stale, 2, 1.0, 1.0, 0.0, 1, False)
    assert picked(idx) == [[0, 1]]                    # token 1: 0.3 + 2 = 2.3
    assert stale is ref and stale.dtype == torch.int64 and stale.tolist() == [[0, 0, 1, 1]]


def test_grid_bonus_spreads_selection_over_tiles():
    # 4x4 grid, 2x2 tiles; the four largest scores all lie in the top-left tile
    score = torch.tensor([[0.90, 0.80, 0.10, 0.20,
                           0.85, 0.95, 0.30, 0.05,
                           0.15, 0.25, 0.35, 0.40,
                           0.45, 0.02, 0.01, 0.03]])
    assert picked(select(score, torch.zeros(1, 16), 4, 0.0, 1.0, 0.0, 2, False)) == [[0, 1, 4, 5]]
    # with a large bonus each tile's top token wins: 5 (0.95), 6 (0.30), 12 (0.45), 11 (0.40)
    assert picked(select(score, torch.zeros(1, 16), 4, 0.0, 1.0, 10.0, 2, False)) == [[5, 6, 11, 12]]
    # grid 1: the bonus is off
    assert picked(select(score, torch.zeros(1, 16), 4, 0.0, 1.0, 10.0, 1, False)) == [[0, 1, 4, 5]]


# -- spatial_bonus -----------------------------------------------------------------------------

def _bonus_reference(score, bonus, grid):
    b, n = score.shape
    side = int(round(n ** 0.5))
    out = score.clone()
    for s in range(b):
        for tr in range(0, side, grid):
            for tc in range(0, side, grid):
                tile = [(tr + r) * side + tc + c for r in range(grid) for c in range(grid)]
                top = max(tile, key=lambda i: float(score[s, i]))
                out[s, top] = score[s, top] * (1 + bonus)
    return out


@pytest.mark.parametrize("n,grid", [(16, 2), (16, 4), (36, 2), (36, 3)])
def test_spatial_bonus_top_token_of_each_tile(n, grid):
    g = torch.Generator().manual_seed(n + grid)
    score = torch.rand(3, n, generator=g)
    out = spatial_bonus(score, 0.6, grid)
    expect = _bonus_reference(score, 0.6, grid)
    assert torch.allclose(out, expect, rtol=0, atol=1e-6)      # s + s * b vs s * (1 + b): an ulp
    assert int((out != score).sum()) == 3 * (n // (grid * grid))      # exactly one token per tile moved


def test_spatial_bonus_exact_values():
    score = torch.tensor([[0.1, 0.5, 0.2, 0.3,
                           0.4, 0.0, 0.8, 0.6,
                           0.9, 0.7, 0.05, 0.15,
                           0.25, 0.35, 0.45, 0.55]])
    out = spatial_bonus(score, 0.5, 2)
    expect = score.clone()
    for i in (1, 6, 8, 15):                 # tile tops: 0.5, 0.8, 0.9, 0.55
        expect[0, i] *= 1.5
    assert torch.allclose(out, expect, rtol=0, atol=1e-6)      # s + s * b vs s * (1 + b): an ulp


@pytest.mark.parametrize("n,bonus,grid", [
    (16, 0.6, 1),        # grid 1: off
    (16, 0.0, 2),        # no bonus
    (15, 0.6, 2),        # not a square grid
    (9, 0.6, 2),         # side 3 not divisible by the grid
], ids=["grid-1", "bonus-0", "not-square", "indivisible"])
def test_spatial_bonus_off(n, bonus, grid):
    score = torch.rand(2, n)
    assert spatial_bonus(score, bonus, grid) is score
