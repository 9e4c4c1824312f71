"""What the analysis finds: residual branch sites and the per-block result.

A ``Site`` holds what every technique needs (the branch's F, its axes, whether it may be cached and
computed on k tokens); what only one technique needs lives in an optional sub-record: ``site.kv``
(``self_attention="partial-kv"``) and ``site.parallel`` (the MLP half of a parallel block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import Refusal
from .axes import Axes

KINDS = ("self_attn", "cross_attn", "joint_attn", "mlp", "parallel", "other")
MIXING_KINDS = ("self_attn", "joint_attn", "parallel")      # kinds whose F mixes tokens


@dataclass
class Region:
    """Nodes computed on k tokens (topological order) and the token-carrying inputs gathered for them."""

    nodes: list[fx.Node]
    boundary: dict                    # node -> Axes (stream rows) or External (RoPE tables, masks)


@dataclass
class KeyValueSide:
    """``partial-kv``: the attention's key/value inputs (cached) and the whole branch on k tokens."""

    values: list[fx.Node]             # key, value inputs of the attention, in graph order
    region: Region                    # query side + key/value side


@dataclass
class ParallelSplit:
    """A parallel block's MLP half: computed on k tokens with the attention rows from a cache."""

    attn_values: list[fx.Node]        # attention outputs entering the MLP half (cached at fresh steps)
    region: Region                    # the region without the attention side


@dataclass
class Site:
    """One residual branch ``x_out = x_in + g * F(...)``; the cache holds F's output."""

    name: str                         # e.g. "self_attn0" (kind + index in the block)
    kind: str                         # one of KINDS
    module: str                       # module path inside the block, e.g. "attn1"
    add: fx.Node                      # the residual add on the stream
    value: fx.Node                    # F: the cached value (before gate and add)
    gate: fx.Node | None              # g, when the branch is gated
    stream_in: fx.Node                # x_in: the stream value the branch reads
    axes: Axes                        # batch/token axes of F
    n_tokens: int
    stream: int = 0                   # index of the token stream (0: the one with most tokens)
    attention: fx.Node | None = None  # the attention op of the branch (SDPA), if any
    key_segment: tuple | None = None  # joint attention: (offset, length) of this stream on the key axis
    attention_axes: tuple = (None, None)  # stream axes of the attention's (query, key) inputs (None: unknown)
    stream_axes: Axes = Axes(0, 1)    # batch/token axes of the stream value the branch reads (stream_in)
    refusal: Refusal | None = None    # why not cached / not token-local (None: cached and token-local)
    cacheable: bool = True            # F may be reused from the cache
    local: bool = False               # F may be computed on a subset of tokens
    region: Region | None = None      # the query side on k tokens (when local)
    region_axes: dict = field(default_factory=dict)   # node -> Axes, for every node any region holds
    probe: str = "not run"            # result of the numeric locality probe
    kv: KeyValueSide | None = None
    kv_refusal: Refusal | None = None  # why "partial-kv" is not possible (when local)
    parallel: ParallelSplit | None = None

    @property
    def reason(self) -> str | None:
        return self.refusal.message if self.refusal is not None else None

    @property
    def shape(self):
        return tuple(self.value.meta["val"].shape)

    @property
    def dtype(self):
        return self.value.meta["val"].dtype


@dataclass
class BlockAnalysis:
    """Result of analysing one captured block graph."""

    sites: list[Site] = field(default_factory=list)
    stream_input: fx.Node | None = None
    stream_output: fx.Node | None = None
    has_attention: bool = False
    rejected: Refusal | None = None   # why the whole block is left unchanged
    notes: list[str] = field(default_factory=list)
    n_tokens: int = 0
    streams: list = field(default_factory=list)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def stream_tokens(self, stream: int) -> int:
        st = self.streams[stream]
        return int(st.input.meta["val"].shape[st.axes.token])

    def stream_batch(self, stream: int = 0) -> int:
        """The batch size of a stream (axis 0 of a (B, N, C) stream, axis 1 of a sequence-first one)."""
        st = self.streams[stream]
        return int(st.input.meta["val"].shape[st.axes.batch])
