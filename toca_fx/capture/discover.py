"""Find the candidate block lists of a model by structure alone.

A candidate is an ``nn.ModuleList`` or ``nn.Sequential`` (timm's ``VisionTransformer.blocks``) whose
children all share one class and hold parameters (a Sequential's children must be composite modules,
not bare layers, and a ModuleList candidate inside or around it wins). A skipped ``nn.ModuleList`` is noted with why; a
skipped ``nn.Sequential`` is not (most are small layer stacks inside a model, e.g. Linear-GELU-Linear).
Whether a candidate really is a list of transformer blocks (contains attention) is decided on
the captured graph (``analysis.attention``): this module knows no model, class or attribute name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class BlockList:
    name: str                      # qualified name of the ModuleList / Sequential inside the model
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

    An ``nn.Sequential`` of same-class composite children (modules with submodules, not bare layers)
    holding parameters is a candidate too (calling it calls each child's ``forward``, which the runtime
    replaces), unless it lies inside or around a ModuleList candidate; one that is not is skipped silently.

    Lists nested inside an accepted candidate are skipped: the outermost list of blocks wins.

    Example::

        lists, notes = find_block_lists(model)
        [(bl.name, len(bl)) for bl in lists]      # [('transformer_blocks', 28)]
    """
    found: list[BlockList] = []
    notes: list[tuple[str, str]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(_inside(name, bl.name) for bl in found):
            continue   # inside an accepted candidate (a root candidate, name '', holds every module)
        children = list(mod)
        label = name or "<root>"
        if not children:
            notes.append((name, f"{label}: empty ModuleList"))
            continue
        classes = {type(c) for c in children}
        if len(classes) != 1:
            notes.append((name, f"{label}: children of {len(classes)} classes ({', '.join(sorted(c.__name__ for c in classes))})"))
            continue
        if not _has_parameters(children[0]):
            notes.append((name, f"{label}: children hold no parameters"))
            continue
        found.append(_block_list(name, children))
    lists = [bl.name for bl in found]
    for name, mod in model.named_modules():
        # an nn.Sequential of same-class composite children (blocks, not bare layers) holding
        # parameters, neither inside nor around an accepted candidate (a ModuleList of blocks wins)
        if not isinstance(mod, nn.Sequential) or any(_inside(name, bl.name) for bl in found):
            continue
        children = list(mod)
        if (not children or len({type(c) for c in children}) != 1 or not _has_parameters(children[0])
                or next(children[0].children(), None) is None or isinstance(children[0], (nn.Sequential, nn.ModuleList))
                or any(_inside(other, name) for other in lists)):
            continue
        found.append(_block_list(name, children))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found.sort(key=lambda bl: order[bl.name])
    # lists inside an accepted Sequential are not noted (as inside an accepted ModuleList)
    return found, [text for name, text in notes if not any(_inside(name, bl.name) for bl in found)]


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


def _block_list(name: str, children: list) -> BlockList:
    return BlockList(name=name, modules=children, cls=type(children[0]),
                     names=[f"{name}.{i}" if name else str(i) for i in range(len(children))])
