"""Stage 3 of the pipeline: rewrite a captured block graph into cache-aware variants."""

from .bindings import Buffer, StateSpec
from .common import VariantGraph
from .fresh import build_fresh
from .partial import SelectSettings, build_partial
from .scores import SCORES, resolve_score
from .techniques import TECHNIQUES, choose, site_state

__all__ = ["Buffer", "StateSpec", "VariantGraph", "build_fresh", "SelectSettings", "build_partial", "SCORES",
           "resolve_score", "TECHNIQUES", "choose", "site_state"]
