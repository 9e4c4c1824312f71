"""Turn the fresh step's score ingredients into the per-token base score (DESIGN.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def received_attention(col: torch.Tensor) -> torch.Tensor:
    """s1: attention received (head-mean, summed over queries), L2-normalised over tokens."""
    return F.normalize(col.float(), dim=1, p=2)


def cross_entropy_score(cmap: torch.Tensor, cfg: bool) -> torch.Tensor:
    """s2: norm(1 + H_i), H_i = -sum_j C_ij log(C_ij + 1e-7); CFG halves' maps averaged first."""
    c = cmap.float()
    if cfg:
        half = c.shape[0] // 2
        c = 0.5 * (c[:half] + c[half:])
    h = -(c * torch.log(c + 1e-7)).sum(dim=-1)
    s = F.normalize(1.0 + h, dim=1, p=2)
    return torch.cat([s, s], dim=0) if cfg else s


def norm_score(norm: torch.Tensor) -> torch.Tensor:
    """k-norm / v-norm (DuCa's flash-compatible scores): per-token norm, L2-normalised."""
    return F.normalize(norm.float(), dim=1, p=2)


def base_score(role: str | None, value: torch.Tensor | None, cfg: bool, batch: int, n: int,
               device) -> torch.Tensor:
    if role == "received":
        return received_attention(value)
    if role == "cross_map":
        return cross_entropy_score(value, cfg)
    if role in ("knorm", "vnorm"):
        return norm_score(value)
    return torch.zeros(batch, n, device=device)
