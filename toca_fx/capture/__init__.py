"""Stage 1 of the pipeline: find transformer blocks structurally and capture them as graphs."""

from .discover import BlockList, find_block_lists
from .export import Capture, CaptureFailure, capture_block, signature_of, structure_of

__all__ = ["BlockList", "find_block_lists", "Capture", "CaptureFailure", "capture_block", "signature_of", "structure_of"]
