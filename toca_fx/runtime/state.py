"""Per-block, per-branch cache state, held as non-persistent buffers of named submodules.

``transform`` adds one submodule to the model, ``_toca_fx_state``: a ``ToCaState`` with a
``BlockState`` per transformed block and, under it, a ``BranchState`` per CFG branch whose
buffers are the caches. So ``print(model)`` shows where the caches live, ``model.to(...)`` moves
them, and ``state_dict()`` gains no entry (the buffers are not persistent). ``remove`` deletes it.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch.nn as nn


class _Buffers(MutableMapping):
    """A dict view onto the module's buffers whose names start with ``prefix``."""

    def __init__(self, module: nn.Module, prefix: str):
        self._m, self._p = module, prefix

    def __getitem__(self, key):
        try:
            return self._m._buffers[self._p + key]
        except KeyError:
            raise KeyError(key) from None

    def __setitem__(self, key, value):
        self._m.register_buffer(self._p + key, value, persistent=False)

    def __delitem__(self, key):
        del self._m._buffers[self._p + key]

    def __iter__(self):
        return (k[len(self._p):] for k in list(self._m._buffers) if k.startswith(self._p))

    def __len__(self):
        return sum(1 for _ in self)


class BranchState(nn.Module):
    """Caches of one block for one CFG branch: each site's value F (``value_<site>``), its
    staleness counters (``stale_<site>``) and the block's base score (``score``).

    A cache is the site's F tensor from the last fresh step, updated in place by the partial
    variant's scatter; no copy is made at fresh steps.
    """

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.ready = False
        self.values = _Buffers(self, "value_")
        self.stale = _Buffers(self, "stale_")
        self.register_buffer("score", None, persistent=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.values.items())


class BlockState(nn.Module):
    """The branch states of one block, as submodules ``branch_<key>``."""

    def get(self, branch) -> BranchState | None:
        return self._modules.get(f"branch_{branch}")

    def set(self, branch, state: BranchState) -> None:
        self.add_module(f"branch_{branch}", state)

    def clear(self) -> None:
        self._modules.clear()

    def values(self):
        return list(self._modules.values())


class ToCaState(nn.Module):
    """All caches of a transformed model, one ``BlockState`` per block (dots become ``__``)."""

    def block(self, qualname: str) -> BlockState:
        name = qualname.replace(".", "__") or "root"
        if name not in self._modules:
            self.add_module(name, BlockState())
        return self._modules[name]
