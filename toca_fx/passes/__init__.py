"""Stage 3 of the pipeline: rewrite a captured block graph into cache-aware variants."""

from .common import VariantGraph
from .fresh import build_fresh, score_source
from .partial import build_partial

__all__ = ["VariantGraph", "build_fresh", "build_partial", "score_source"]
