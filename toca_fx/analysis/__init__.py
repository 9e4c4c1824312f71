"""Stage 2 of the pipeline: token axes, residual branches, kinds and token-locality."""

from .analyze import analyze_block, graph_has_attention
from .axes import Axes, NotLocal
from .probe import probe_site, run_with_override
from .sites import BlockAnalysis, Site

__all__ = ["analyze_block", "graph_has_attention", "Axes", "NotLocal", "probe_site", "run_with_override",
           "BlockAnalysis", "Site"]
