"""Typed bindings: what a variant graph takes and returns beyond the block's own inputs/outputs.

A variant graph lists one *slot* per extra placeholder (``VariantGraph.inputs``) and per extra
output (``VariantGraph.outputs``). The runtime binds every slot the same way for fresh and partial
calls (``runtime.block``: ``slot.fetch(ctx)`` for inputs, ``slot.store(ctx, value)`` for outputs),
so neither side decodes names: a state buffer is addressed by a ``Buffer`` (site, name), not by a
string that encodes both.

Example::

    v.inputs    # (StateInput(Buffer('mlp0', 'value')), ScoreInput(0), StateInput(Buffer('mlp0', 'stale')),
                #  TokenCount('mlp0'))
    v.outputs   # (ScoreOutput('received'),)   (the fresh variant's; caches are written in the graph)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Buffer:
    """One state buffer of a (block, CFG branch): ``name`` within ``site`` ("value", "stale", "kv0", ...)."""

    site: str
    name: str

    @property
    def label(self) -> str:
        """How the buffer is named in ``print(model)`` and in graph placeholders."""
        return self.site if self.name == "value" else f"{self.site}_{self.name}"


@dataclass(frozen=True)
class StateSpec:
    """A buffer a technique needs: shaped like ``node``'s value (``node`` set), or a per-token
    float32 counter of ``tokens`` columns (``node`` None). ``filled``: fresh steps (and ``full``
    steps) copy ``node``'s value into it; otherwise the technique that declares it maintains it."""

    buffer: Buffer
    node: fx.Node | None = None
    tokens: int = 0
    filled: bool = True

    @property
    def is_filled(self) -> bool:
        return self.node is not None and self.filled

    def allocate(self, batch: int, device, cache_dtype: torch.dtype | None) -> torch.Tensor:
        if self.node is None:
            return torch.zeros(batch, self.tokens, device=device)
        val = self.node.meta["val"]
        return torch.zeros(tuple(val.shape), dtype=cache_dtype or val.dtype, device=device)


# -- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateInput:
    """A state buffer, read (and possibly updated in place) by the graph."""

    buffer: Buffer

    def fetch(self, ctx):
        return ctx.state_buffer(self.buffer)


@dataclass(frozen=True)
class ScoreInput:
    """The per-token base score of one stream, (B, N): the last fresh step's, or drawn per call."""

    stream: int

    def fetch(self, ctx):
        return ctx.base_score(self.stream)


@dataclass(frozen=True)
class TokenCount:
    """k of one site on this call (a Python int: one graph per distinct k)."""

    site: str

    def fetch(self, ctx):
        return ctx.ks[self.site]


@dataclass(frozen=True)
class StepInput:
    """The forecast's expansion variable of this call (call index or timestep), a (1,) float32 tensor."""

    def fetch(self, ctx):
        return ctx.step_value()


# -- outputs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreOutput:
    """A score ingredient of the fresh step (attention received, cross-attention map, k/v norm)."""

    ingredient: str

    def store(self, ctx, value: torch.Tensor) -> None:
        ctx.set_score(value)
