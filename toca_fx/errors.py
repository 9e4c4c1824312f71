"""The one exception type for what the pass refuses."""

from __future__ import annotations


class ToCaError(RuntimeError):
    """Raised when toca_fx refuses a model or a call.

    The message names the block (qualified module name), the graph node and the reason,
    e.g. ``transformer_blocks.0: node 'linear_3': ...``.
    """

    def __init__(self, message: str, *, block: str | None = None, node: str | None = None):
        parts = []
        if block:
            parts.append(f"block {block!r}")
        if node:
            parts.append(f"node {node!r}")
        prefix = (", ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)
        self.block = block
        self.node = node
