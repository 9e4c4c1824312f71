"""What the analysis finds: residual branch sites and the per-block result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .axes import Axes

KINDS = ("self_attn", "cross_attn", "joint_attn", "mlp", "parallel", "other")


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
    cacheable: bool = True            # F may be reused from the cache
    local: bool = False               # F may be computed on a subset of tokens
    reason: str | None = None         # why not cacheable / not local
    region: list[fx.Node] = field(default_factory=list)        # computed on k tokens (topological order)
    boundary: dict = field(default_factory=dict)               # node -> Axes, gathered before the region
    region_axes: dict = field(default_factory=dict)            # region node -> Axes of its output
    attention: fx.Node | None = None  # the attention op of the branch (SDPA), if any
    probe: str = "not run"            # result of the numeric locality probe
    stream: int = 0                   # index of the token stream (0: the one with most tokens)
    key_segment: tuple | None = None  # joint attention: (offset, length) of this stream on the key axis
    attn_values: list = field(default_factory=list)   # parallel: attention outputs cached for partial steps
    mlp_region: list = field(default_factory=list)    # parallel: region without the attention side
    mlp_boundary: dict = field(default_factory=dict)  # parallel: its inputs (attn_values come from caches)
    kv_values: list = field(default_factory=list)     # keys/values of the attention, cached for "partial-kv"
    kv_region: list = field(default_factory=list)     # region + the key/value side, computed on k tokens
    kv_boundary: dict = field(default_factory=dict)   # its inputs
    kv_reason: str | None = None                      # why "partial-kv" is not possible

    @property
    def shape(self):
        return tuple(self.value.meta["val"].shape)


@dataclass
class BlockAnalysis:
    """Result of analysing one captured block graph."""

    sites: list[Site] = field(default_factory=list)
    stream_input: fx.Node | None = None
    stream_output: fx.Node | None = None
    has_attention: bool = False
    rejected: str | None = None       # reason the whole block is left unchanged
    notes: list[str] = field(default_factory=list)
    n_tokens: int = 0
    streams: list = field(default_factory=list)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def cached_node(self, name: str) -> fx.Node:
        """The node a cache holds: a site's F (``"mlp0"``), an attention value inside a parallel
        site (``"parallel0__attn0"``) or an attention's key/value input (``"self_attn0__kv1"``)."""
        if "__attn" in name:
            site, i = name.split("__attn")
            return self.site(site).attn_values[int(i)]
        if "__kv" in name:
            site, i = name.split("__kv")
            return self.site(site).kv_values[int(i)]
        return self.site(name).value
