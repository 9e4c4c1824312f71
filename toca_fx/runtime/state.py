"""Per-block, per-branch cache state, held as non-persistent buffers of named submodules.

``transform`` adds one submodule to the model, ``_toca_fx_state``: a ``ToCaState`` with a
``BlockState`` per transformed block and, under it, a ``BranchState`` per CFG branch whose
buffers are the caches. So ``print(model)`` shows where the caches live, ``model.to(...)`` moves
them, and ``state_dict()`` gains no entry (the buffers are not persistent). ``remove`` deletes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..passes.bindings import Buffer


class BranchState(nn.Module):
    """Caches of one block for one CFG branch, as non-persistent buffers named ``<name>_<site>``:
    each site's value F (``value_<site>``), its staleness counters (``stale_<site>``), whatever its
    techniques need (``kv0_<site>``, ``attn0_<site>``, ...), and the block's base score (``score``).

    Buffers are allocated once per (block, branch, program) from the program's state specs and
    written in place (fresh steps copy into them, partial steps scatter into them); a new generation
    zeroes them (``restart``), so their addresses stay fixed across generations.
    """

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.ready = False
        self.epoch = 0                         # bumped when model.to(...) replaces the buffers (bound inputs re-bound)
        self.register_buffer("score", None, persistent=False)
        self.site_buffers: dict[str, list[str]] = {}     # site -> names of its buffers (for bytes per site)

    @staticmethod
    def _name(buf: Buffer) -> str:
        return f"{buf.name}_{buf.site}"

    def allocate(self, program, device) -> None:
        # the program is specialised to its input shapes: its batch size is the call's
        batch = program.batch
        for specs in program.state.values():
            for spec in specs:
                self.register_buffer(self._name(spec.buffer), spec.allocate(batch, device, program.cache_dtype),
                                     persistent=False)
                self.site_buffers.setdefault(spec.buffer.site, []).append(self._name(spec.buffer))
        self.score = torch.zeros(batch, program.analysis.n_tokens, device=device)
        for i in range(1, len(program.analysis.streams)):   # other streams rank by staleness alone
            self.register_buffer(f"score_s{i}", torch.zeros(batch, program.analysis.stream_tokens(i), device=device),
                                 persistent=False)
        mark_static(self._buffers.values())

    def restart(self) -> None:
        """A new generation: every buffer zeroed in place (counters and difference tables start from
        zero), so the addresses stay what compiled graphs and CUDA graphs were recorded with."""
        self.ready = False
        with torch.no_grad():
            for t in self._buffers.values():
                if t is not None:
                    t.zero_()

    def buffer(self, buf: Buffer) -> torch.Tensor:
        return self._buffers[self._name(buf)]

    def score_of(self, stream: int) -> torch.Tensor:
        """Stream 0's base score (the last fresh step's); other streams rank by staleness alone."""
        return self.score if stream == 0 else self._buffers[f"score_s{stream}"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def site_nbytes(self) -> dict[str, int]:
        """Bytes of each site's buffers (the block's score buffers belong to no site)."""
        return {site: sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in names
                          if self._buffers.get(n) is not None)
                for site, names in self.site_buffers.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k[len('value_'):]}: {tuple(v.shape)}" for k, v in self._buffers.items()
                         if k.startswith("value_"))


class BlockState(nn.Module):
    """The branch states of one block, as submodules ``branch_<key>``."""

    def get(self, branch) -> BranchState | None:
        return self._modules.get(f"branch_{branch}")

    def set(self, branch, state: BranchState) -> None:
        self.add_module(f"branch_{branch}", state)

    def restart(self) -> None:
        """A new generation: the branch states are kept (zeroed), not re-allocated."""
        for st in self._modules.values():
            st.restart()

    def values(self):
        return list(self._modules.values())


class ToCaState(nn.Module):
    """All caches of a transformed model, one ``BlockState`` per block (dots become ``__``)."""

    def _apply(self, fn, recurse=True):
        # model.to(...) / half() / to_empty(): the caches are converted or (to_empty, "meta") left
        # uninitialised, so every branch recomputes them on its next call
        for block in self._modules.values():
            for st in block.values():
                st.ready = False
                st.epoch += 1
        out = super()._apply(fn, recurse)
        mark_static(self.buffers())
        return out

    def block(self, qualname: str) -> BlockState:
        name = qualname.replace(".", "__") or "root"
        if name not in self._modules:
            self.add_module(name, BlockState())
        return self._modules[name]


def mark_static(tensors) -> None:
    """Tell dynamo these addresses never change (caches written in place, kept across generations), so
    a whole-model compiled graph may mutate them under CUDA graphs (``mode="reduce-overhead"``)."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t, guard=False)
