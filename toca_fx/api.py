"""The public entry points: transform, remove, reset, generation, explain, stats."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn as nn

from .capture import find_block_lists
from .config import ToCaConfig
from .errors import ToCaError
from .report import Explanation, Stats, build_explanation, build_stats
from .runtime import diffusers_context, replay
from .runtime.block import BlockRuntime
from .runtime.controller import Controller
from .runtime.state import ToCaState

log = logging.getLogger("toca_fx")
_ATTR = "_toca_fx"
STATE_NAME = "_toca_fx_state"


def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "transformer", None), nn.Module)


def _resolve_config(config, overrides) -> ToCaConfig:
    if config is None:
        config = ToCaConfig()
    elif isinstance(config, str):
        config = ToCaConfig.preset(config)
    elif isinstance(config, dict):
        config = ToCaConfig.from_dict(config)
    elif not isinstance(config, ToCaConfig):
        raise TypeError(f"config must be a ToCaConfig, a preset name or a dict, not {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _compiled_inner(model):
    """The module a ``torch.compile``'d module wraps (toca_fx's state lives there), else ``model``."""
    inner = getattr(model, "_orig_mod", None) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else None
    return inner if isinstance(inner, nn.Module) else model


def _controller(model) -> Controller:
    target = _compiled_inner(model.transformer if _is_pipeline(model) else model)
    ctl = target.__dict__.get(_ATTR)
    if ctl is None:
        raise ToCaError(f"{type(target).__name__} is not transformed by toca_fx (call toca_fx.transform first)")
    return ctl


def transform(model, config: ToCaConfig | str | dict | None = None, **overrides):
    """Make a diffusion transformer (or a diffusers pipeline) cache features across steps.

    Works in place and returns its argument. Blocks are captured on the first forward call.

    Example::

        import toca_fx
        model = toca_fx.transform(model, toca_fx.ToCaConfig.preset("toca-dit-ddim50"))
        pipe = toca_fx.transform(pipe, interval=3, fresh_ratio=0.3)   # a diffusers pipeline
    """
    config = _resolve_config(config, overrides)
    if _is_pipeline(model):
        transform(model.transformer, config)
        _wrap_pipeline(model)
        return model
    if not isinstance(model, nn.Module):
        raise ToCaError(f"toca_fx.transform takes an nn.Module or a pipeline with .transformer, not {type(model).__name__}")
    if _ATTR in model.__dict__:
        raise ToCaError(f"{type(model).__name__} is already transformed by toca_fx; call toca_fx.remove(model) first")
    lists, notes = find_block_lists(model)
    if not lists:
        searched = "; ".join(notes) if notes else "the model has no nn.ModuleList or nn.Sequential"
        raise ToCaError(f"no transformer blocks found in {type(model).__name__}: looked for an nn.ModuleList "
                        f"(or nn.Sequential) of same-class blocks holding attention ({searched})")
    ctl = Controller(config)
    ctl.lists = lists
    ctl.discovery_notes = notes
    state = ToCaState()
    for bl in lists:
        for i, (mod, name) in enumerate(zip(bl.modules, bl.names)):
            rt = BlockRuntime(mod, name, i, len(bl), ctl, bl, state.block(name))
            ctl.blocks.append(rt)
    model.add_module(STATE_NAME, state)
    for i, rt in enumerate(ctl.blocks):
        rt.index = i
        rt.install()
    ctl.bind_signature(model.forward)
    hooks = _CallHooks(ctl)
    ctl.hooks = [
        model.register_forward_pre_hook(hooks.before, with_kwargs=True),
        model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True),
    ]
    diffusers_context.attach(model, ctl)
    model.__dict__[_ATTR] = ctl
    log.info("toca_fx: %d block list(s): %s", len(lists), ", ".join(f"{b.name} x{len(b)}" for b in lists))
    return model


_EAGER_REASON = ("toca_fx decides this call eagerly: whole-model compiled calls need a call of the same input "
                 "layout made before without torch.compile, and a generation of known length "
                 "(toca_fx.generation(model, num_steps=N) or a diffusers pipeline call); adaptive fresh steps, "
                 "a random score and forecast_variable='timestep' always run eagerly")


class _CallHooks:
    """The model-level hooks, as bound methods (not closures) so that ``copy.deepcopy`` and pickle
    carry them over to the copy's own controller."""

    def __init__(self, ctl: Controller):
        self.ctl = ctl

    # torch.compile of the transformed model: a call decided ahead (runtime/replay.py) is compiled
    # whole, the controller reads nothing inside the graph and counts the call after it; any other
    # call runs the controller eagerly (a graph break; its decisions read Python counters, which
    # dynamo would guard on and recompile for)
    def before(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            kind = self.ctl.replay_kind
            if kind is not None and replay.layout(args, kwargs) == kind.layout:
                return None
        self._before(module, args, kwargs)

    def after(self, module, args, kwargs, out):
        if torch.compiler.is_compiling() and self.ctl.replay_kind is not None:
            replay.advance(self.ctl.uid)
            return None
        self._after(module, args, kwargs, out)

    @torch.compiler.disable(reason=_EAGER_REASON)
    def _before(self, module, args, kwargs):
        self.ctl.begin_call(args, kwargs)

    @torch.compiler.disable(reason=_EAGER_REASON)
    def _after(self, module, args, kwargs, out):
        _after_call(module, self.ctl)


def _after_call(model, ctl: Controller) -> None:
    ctl.after_call()
    if ctl._first_call_checked:
        return
    ctl._first_call_checked = True
    for bl in ctl.lists:
        programs = [ctl.programs[k] for rt in ctl.blocks if rt.blist is bl for k in rt.program_keys]
        if programs and all(p.failed is not None and p.analysis is not None and not p.analysis.has_attention for p in programs):
            bl.rejected = programs[0].failed
    if all(bl.rejected is not None for bl in ctl.lists):
        reasons = "; ".join(f"{bl.name or '<root>'} ({bl.cls.__name__}): {bl.rejected}" for bl in ctl.lists)
        remove(model)
        raise ToCaError(f"no transformer blocks in {type(model).__name__}: every candidate block list was rejected: "
                        f"{reasons}. The model was left unchanged.")


def remove(model):
    """Undo ``transform``: the original forward of every block, no hooks, no caches. Returns model."""
    if _is_pipeline(model):
        _unwrap_pipeline(model)
        remove(model.transformer)
        return model
    ctl = model.__dict__.pop(_ATTR, None)
    if ctl is None:
        raise ToCaError(f"{type(model).__name__} is not transformed by toca_fx")
    wrapped = []
    for rt in ctl.blocks:
        if not rt.uninstall():
            wrapped.append(rt.qualname)
        rt.clear()
    if wrapped:
        log.warning("toca_fx.remove: %d block(s) (%s) have another library's hook wrapped around toca_fx's forward "
                    "(applied after transform); toca_fx stays in their chain as a pass-through so that hook keeps "
                    "working", len(wrapped), ", ".join(wrapped[:3]) + (", ..." if len(wrapped) > 3 else ""))
    for h in getattr(ctl, "hooks", []):
        h.remove()
    if STATE_NAME in model._modules:
        del model._modules[STATE_NAME]
    diffusers_context.detach(model)
    return model


def is_transformed(model) -> bool:
    """Whether ``toca_fx.transform`` was applied to ``model`` (a module or a pipeline) and not removed.

    Example::

        toca_fx.is_transformed(pipe.transformer)    # False
        toca_fx.transform(pipe); toca_fx.is_transformed(pipe)    # True
    """
    target = _compiled_inner(model.transformer if _is_pipeline(model) else model)
    return isinstance(target, nn.Module) and _ATTR in target.__dict__


def reset(model, stats: bool = False) -> None:
    """Forget all caches: the next call starts a new generation (and is fresh).

    ``stats=True`` also zeroes what ``toca_fx.stats`` reports (it counts since ``transform``).
    """
    _controller(model).reset(stats=stats)


@contextlib.contextmanager
def generation(model, num_steps: int | None = None):
    """One generation of ``num_steps`` model calls per CFG branch.

    Example::

        with toca_fx.generation(model, num_steps=50):
            for t in scheduler.timesteps:
                ...model(x, t)...
    """
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ToCaError(f"toca_fx.generation: num_steps must be None or an integer >= 1, not {num_steps!r}")
    ctl = _controller(model)
    ctl.new_generation(num_steps)
    ctl._keep_steps = True
    replay.prepare(ctl)                        # a compiled model's first call of the generation, decided ahead
    try:
        yield ctl
    finally:
        ctl._keep_steps = False
        replay.discard(ctl)


def explain(model) -> Explanation:
    """Which block lists, block classes and residual branches were matched, and why not.

    ``print(toca_fx.explain(model))`` prints a table; the object also holds the data.
    """
    return build_explanation(_controller(model))


def stats(model) -> Stats:
    """Fresh / partial calls, tokens recomputed per site, cache bytes, FLOPs (blocks only).

    Counts accumulate since ``transform`` or the last ``reset(model, stats=True)``.
    """
    return build_stats(_controller(model))


# -- diffusers pipelines ------------------------------------------------------------------------

def _wrap_pipeline(pipe) -> None:
    cls = type(pipe)
    if getattr(cls, "_toca_fx_wrapped", False):
        return
    original_call = cls.__call__
    sig = inspect.signature(original_call)
    default_steps = sig.parameters.get("num_inference_steps")
    default_steps = default_steps.default if default_steps is not None else None

    @functools.wraps(original_call)
    def __call__(self, *args, **kwargs):
        if not is_transformed(self.transformer):
            # toca_fx was taken off the transformer (every block list rejected on the first call, or
            # remove(pipe.transformer)): the pipeline is the original again
            _unwrap_pipeline(self)
            return original_call(self, *args, **kwargs)
        try:
            bound = sig.bind_partial(self, *args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        steps = bound.get("num_inference_steps", default_steps)
        for name in ("timesteps", "sigmas"):          # a custom schedule sets the step count (diffusers does too)
            custom = bound.get(name)
            if custom is not None and hasattr(custom, "__len__") and len(custom):
                steps = len(custom)
                break
        ok = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
        try:
            with generation(self.transformer, num_steps=steps if ok else None):
                return original_call(self, *args, **kwargs)
        finally:
            if not is_transformed(self.transformer):
                _unwrap_pipeline(self)

    wrapped = type(cls.__name__, (cls,), {"__call__": __call__, "_toca_fx_wrapped": True,
                                           "_toca_fx_original_class": cls, "__module__": cls.__module__})
    pipe.__class__ = wrapped


def _unwrap_pipeline(pipe) -> None:
    original = getattr(type(pipe), "_toca_fx_original_class", None)
    if original is not None:
        pipe.__class__ = original
