"""Follow the live block: notice every change a captured graph could depend on, on every call.

A capture bakes in what the block's forward read while it was traced: which submodules, which
attention processor, plain attributes (``rescale_output_factor``, ``residual_connection``), train /
eval, and whatever hooks ran. The user may change any of these after ``transform`` (``set_processor``,
``load_state_dict(assign=True)``, a LoRA wrapper around a linear layer, ``eval()``, a hook), so each
block call first compares a cheap identity fingerprint of its submodules with the one its program
was chosen for. Only when it differs does the block recompute its structure key, re-check what it
cannot run cached, re-read its parameters and invalidate its caches (``BlockRuntime.refresh``).

Example::

    fp = fingerprint(list(block.modules()))
    block.attn1.set_processor(MyProcessor())
    fingerprint(list(block.modules())) != fp      # True: the block re-checks before its next call
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import Refusal

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def fingerprint(modules: list[nn.Module]) -> tuple:
    """Identities of everything of ``modules`` that a capture may have read: public attributes
    (processors, flags, callables, ``training``), parameters, buffers, submodules, and the number of
    hooks on each. Equal fingerprints: nothing was reassigned or hooked. (A value mutated in place,
    such as a list attribute appended to, keeps its identity and is not seen.) Global module hooks
    (``FlopCounterMode``'s module tracker, profilers) are not part of it: they observe what runs.
    """
    parts = []
    for m in modules:
        d = m.__dict__
        parts.append(tuple([id(v) for k, v in d.items() if k[0] != "_"]))
        parts.append(tuple(map(id, m._parameters.values())))
        parts.append(tuple(map(id, m._buffers.values())))
        parts.append(tuple(map(id, m._modules.values())))
        parts.append(tuple([len(d[h]) for h in _HOOKS if h in d]))
    return tuple(parts)


def _describe(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


def unsupported(block: nn.Module, own_forward, wrapped=None) -> Refusal | None:
    """Why ``block`` cannot run from a capture right now, or None.

    - a hook on one of its submodules: user code that must run on every call, with side effects a
      cached step would skip (and a capture would replay the hook's effect after it was removed);
    - a submodule (or the block itself, under toca_fx) whose ``forward`` was replaced by another
      library (diffusers' ``FirstBlockCache`` and other hooks do this): capturing it would bake the
      other cache's compute path into the graph. ``own_forward`` is toca_fx's runtime on the block;
      ``wrapped``: the block's instance ``forward`` that toca_fx found there and wraps, if any.
    """
    for name, m in block.named_modules():
        forward = m.__dict__.get("forward")
        if not name and wrapped is not None:
            forward = wrapped                  # the block's, found when toca_fx was applied
        if forward is not None and forward is not own_forward:
            where = f"submodule {name!r}" if name else "the block"
            return Refusal("foreign-forward", f"{where} has its forward replaced by {_describe(forward)} (another "
                           "library's hook or cache, e.g. diffusers' FirstBlockCache); apply toca_fx to the model "
                           "without it", stage="live")
        if not name:
            continue                       # the block's own hooks run around toca_fx's forward: they still fire
        for h in _HOOKS:
            hooks = m.__dict__.get(h)
            if hooks:
                fn = next(iter(hooks.values()))
                return Refusal("submodule-hooks", f"submodule {name!r} has a {h[1:-1].replace('_', ' ')} "
                               f"({_describe(fn)}): it must run on every call, which a cached step skips",
                               stage="live")
    return None
