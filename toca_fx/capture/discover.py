"""Find the candidate block lists of a model by structure alone.

A candidate is an ``nn.ModuleList`` whose children all share one class and hold parameters.
Whether a candidate really is a list of transformer blocks (contains attention) is decided on
the captured graph (``analysis.attention``): this module knows no model, class or attribute name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class BlockList:
    name: str                      # qualified name of the ModuleList inside the model
    modules: list[nn.Module]
    cls: type
    rejected: object = None        # the Refusal, once the captured graph shows it is not a block list
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.modules)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_block_lists(model: nn.Module) -> tuple[list[BlockList], list[str]]:
    """Return (candidate block lists, notes on every ModuleList that was looked at and skipped).

    Lists nested inside an accepted candidate are skipped: the outermost list of blocks wins.

    Example::

        lists, notes = find_block_lists(model)
        [(bl.name, len(bl)) for bl in lists]      # [('transformer_blocks', 28)]
    """
    found: list[BlockList] = []
    notes: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(bl.name == "" or name.startswith(bl.name + ".") for bl in found):
            continue   # inside an accepted candidate (a root candidate, name '', holds every module)
        children = list(mod)
        label = name or "<root>"
        if not children:
            notes.append(f"{label}: empty ModuleList")
            continue
        classes = {type(c) for c in children}
        if len(classes) != 1:
            notes.append(f"{label}: children of {len(classes)} classes ({', '.join(sorted(c.__name__ for c in classes))})")
            continue
        if not _has_parameters(children[0]):
            notes.append(f"{label}: children hold no parameters")
            continue
        found.append(BlockList(name=name, modules=children, cls=type(children[0]),
                               names=[f"{name}.{i}" if name else str(i) for i in range(len(children))]))
    return found, notes
