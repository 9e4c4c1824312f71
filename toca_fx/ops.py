"""The token selection in plain Python: the reference ``passes/select.py`` is tested against.

Variant graphs do not call these: the partial pass writes the same computation into the graph as
ATen nodes (``passes.select.emit_select``), so inductor fuses it and no custom-op dispatch runs per
call. Kept here, small and readable, as the definition of what a selection is.
"""

from __future__ import annotations

import math

import torch


def spatial_bonus(score: torch.Tensor, bonus: float, grid: int) -> torch.Tensor:
    """s4: in every ``grid x grid`` tile of the (square) token grid, the top token gets +bonus*score."""
    b, n = score.shape
    side = math.isqrt(n)
    if grid <= 1 or bonus == 0 or side * side != n or side % grid:
        return score
    t = score.view(b, side // grid, grid, side // grid, grid).permute(0, 1, 3, 2, 4).reshape(b, -1, grid * grid)
    top, where = t.max(dim=-1, keepdim=True)
    t = t + torch.zeros_like(t).scatter_(-1, where, 1.0) * top * bonus
    return t.view(b, side // grid, side // grid, grid, grid).permute(0, 1, 3, 2, 4).reshape(b, n)


def select_tokens(score: torch.Tensor, stale: torch.Tensor, k: int, stale_weight: float,
                  inv_interval: float, bonus: float, grid: int, paired: bool) -> torch.Tensor:
    """Top-k tokens per sample to recompute, and the staleness update (s3).

    score: (B, N) base score (s1 / s2 / norm / random), higher = recompute.
    stale: (B, N) calls since each token was last computed; updated in place (+1, 0 for the chosen).
    paired: the two halves of the batch are the cond / uncond copies of the same samples: both
           halves get the same tokens (chosen from the mean of their scores).
    Returns (B, k) int64 token indices.
    """
    s = score.float() + stale_weight * inv_interval * stale.float()
    b = s.shape[0]
    if paired:
        s = 0.5 * (s[: b // 2] + s[b // 2:])
    s = spatial_bonus(s, bonus, grid)
    idx = torch.topk(s, k, dim=1, sorted=False).indices
    if paired:
        idx = torch.cat([idx, idx], dim=0)
    stale.add_(1)
    stale.scatter_(1, idx, 0)
    return idx
