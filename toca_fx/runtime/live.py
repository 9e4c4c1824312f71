"""Follow the live block: notice every change a captured graph could depend on, on every call.

A capture bakes in what the block's forward read while it was traced: which submodules, which
attention processor, plain attributes (``rescale_output_factor``, ``residual_connection``), train /
eval, and whatever hooks ran. The user may change any of these after ``transform`` (``set_processor``,
``load_state_dict(assign=True)``, a LoRA wrapper around a linear layer, ``eval()``, a hook), so each
block call first asks its ``Watch`` whether anything of its submodules was reassigned or hooked
since its program was chosen. Only then does the block recompute its structure key, re-check what
it cannot run cached, re-read its parameters and invalidate its caches (``BlockRuntime.refresh``).

The check reads CPython's per-dict version tags (PEP 509), as torch.compile's guards do, through
torch's own reader: every module's ``__dict__`` (attributes, processors, ``training``), its
parameter, buffer and submodule dicts and its hook dicts. A version tag is drawn from one global
counter on every change of a dict, so the sum of a block's tags grows exactly when one of them
changed: one C-level pass over ~8 dicts per submodule, no Python per attribute. Where torch has
no such reader, an identity fingerprint of the same dicts stands in (slower, same answers).

Example::

    watch = Watch(list(block.modules()))
    block.attn1.set_processor(MyProcessor())
    watch.changed()        # True: the block re-checks before its next call
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.nn as nn
import torch.utils._pytree

from ..errors import Refusal

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _version_reader():
    """torch's reader of a dict's version tag, if it works on this Python (checked, not assumed)."""
    try:
        from torch._C._dynamo.guards import dict_version
        d: dict = {}
        v0 = dict_version(d)
        d["a"] = 1
        v1 = dict_version(d)
        d["a"] = 2
        v2 = dict_version(d)
        return dict_version if v0 < v1 < v2 else None
    except Exception:  # noqa: BLE001 - any failure means: use the fingerprint
        return None


_dict_version = _version_reader()
_values = operator.methodcaller("values")


def _dicts(modules: list[nn.Module]) -> list[dict]:
    out = []
    for m in modules:
        d = m.__dict__
        out += [d, m._parameters, m._buffers, m._modules]
        out += [d[h] for h in _HOOKS if h in d]
    return out


class Watch:
    """Has anything of ``modules`` been reassigned, added, removed or hooked since the last ``arm()``?

    Covers attributes (processors, flags, callables, ``training``), parameters, buffers, submodules
    and hooks of every module. A value mutated in place (a list attribute appended to, a tensor
    attribute written into) keeps its dict unchanged and is not seen. Global module hooks
    (``FlopCounterMode``'s module tracker, profilers) are not watched: they observe what runs.
    """

    def __init__(self, modules: list[nn.Module]):
        self.dicts = _dicts(modules)
        self.arm()

    def _read(self):
        if _dict_version is not None:
            return sum(map(_dict_version, self.dicts))
        # identity fingerprint: the objects themselves are kept, so an id cannot be reused meanwhile
        return (tuple(itertools.chain.from_iterable(map(_values, self.dicts))), tuple(map(len, self.dicts)))

    def arm(self) -> None:
        """What is there now is what the block's structure was read from."""
        self._seen = self._read()

    def changed(self) -> bool:
        now = self._read()
        if _dict_version is not None:
            return now != self._seen
        a, b = now, self._seen
        return a[1] != b[1] or len(a[0]) != len(b[0]) or not all(map(operator.is_, a[0], b[0]))


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


_NUMBER_LEAF = ("int", "float")


def changed_numbers(old_key: tuple, new_key: tuple, args, kwargs) -> Refusal | None:
    """A refusal when a call's program key differs from the one its caches were filled for only in
    Python numbers among the block's arguments (a float that changes every call, such as a scale a
    sampler passes down): a capture bakes such a number in, so every value would be captured anew
    and the caches, filled under another value, could not serve it. The block then runs unchanged
    for the rest of the generation.

    Keys are ``(class, structure, signature_of(args, kwargs))``.
    """
    (cls_a, _, (spec_a, leaves_a)), (cls_b, _, (spec_b, leaves_b)) = old_key, new_key
    if cls_a is not cls_b or spec_a != spec_b or len(leaves_a) != len(leaves_b):
        return None
    diff = [i for i, (a, b) in enumerate(zip(leaves_a, leaves_b)) if a != b]
    if not diff or not all(leaves_a[i][0] == "V" and leaves_a[i][1] in _NUMBER_LEAF and leaves_b[i][0] == "V"
                           and leaves_b[i][1] in _NUMBER_LEAF for i in diff):
        return None
    paths = [path for path, _ in torch.utils._pytree.tree_flatten_with_path((args, kwargs))[0]]
    names = ", ".join(_argument_name(paths[i]) for i in diff[:3])
    values = ", ".join(f"{leaves_a[i][2]!r} -> {leaves_b[i][2]!r}" for i in diff[:3])
    return Refusal("changing-number", f"the Python number(s) {names} changed between calls of one generation "
                   f"({values}): a capture bakes them in and the caches were filled under the old value, so the "
                   "block runs unchanged until the next generation; pass such a value as a tensor to cache the "
                   "block", stage="live")


def _argument_name(path) -> str:
    where, *rest = path
    if where.idx == 1 and rest:            # kwargs
        return repr(rest[0].key) + "".join(str(k) for k in rest[1:])
    return f"positional argument {rest[0].idx}" + "".join(str(k) for k in rest[1:]) if rest else "an argument"
