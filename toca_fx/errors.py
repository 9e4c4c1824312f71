"""The one exception type for what the pass refuses, and the one falsy type for a failed match."""

from __future__ import annotations

from dataclasses import dataclass


class ToCaError(RuntimeError):
    """Raised when toca_fx refuses a model or a call.

    The message names the block (qualified module name or class), the graph node and the reason,
    e.g. ``block 'transformer_blocks.0', node 'linear_3': ...``.
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


@dataclass(frozen=True)
class Refusal:
    """Why a stage did not match, cache or rewrite something: falsy, so ``if not result`` reads as
    "refused" (as inductor's pattern matcher returns a falsy ``FailedMatch``).

    ``code`` is stable (tests and tools compare it); ``message`` is the sentence ``explain`` prints;
    ``stage`` is the pipeline stage that refused; ``node`` the graph node it is about, if any.

    Example::

        r = Refusal("escapes", "branch output mul_3 escapes to getitem_2 outside the residual add",
                    stage="analyse", node="mul_3")
        bool(r), r.code, str(r)     # (False, 'escapes', 'branch output mul_3 escapes ...')
    """

    code: str
    message: str
    stage: str = "analyse"
    node: str | None = None

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.message

    def wrap(self, prefix: str, code: str | None = None) -> "Refusal":
        """The same refusal with ``prefix`` before its message (and optionally another code)."""
        return Refusal(code or self.code, f"{prefix}{self.message}", self.stage, self.node)
