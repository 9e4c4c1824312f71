"""Per-block, per-branch cache state."""

from __future__ import annotations

import torch


class BranchState:
    """Caches of one block for one CFG branch: each site's value F, staleness, base score.

    A cache is the site's value tensor from the last fresh step, updated in place by the partial
    variant's scatter; no copy is made at fresh steps.
    """

    def __init__(self, key):
        self.key = key
        self.values: dict[str, torch.Tensor] = {}
        self.stale: dict[str, torch.Tensor] = {}
        self.score: torch.Tensor | None = None
        self.ready = False

    def nbytes(self) -> int:
        tensors = list(self.values.values()) + list(self.stale.values())
        if self.score is not None:
            tensors.append(self.score)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.values.items())
        return f"BranchState({parts})"
