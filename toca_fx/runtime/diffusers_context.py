"""Listen to diffusers' ``cache_context("cond" / "uncond")`` so each CFG branch has its own caches.

diffusers pipelines that call the transformer separately per CFG branch open
``transformer.cache_context(name)`` around each call; it notifies every stateful hook of the
model's ``HookRegistry``. toca_fx registers one pass-through hook there that only records the name.
"""

from __future__ import annotations

HOOK_NAME = "toca_fx_context"


def attach(model, controller) -> bool:
    """Register the listener when diffusers' hook registry is available; False otherwise."""
    if not hasattr(model, "cache_context"):
        return False
    try:
        from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
    except Exception:
        return False

    class _State:
        def reset(self):
            pass

    class _ContextManager(StateManager):
        def set_context(self, context):
            name = None if context is None else getattr(context, "name", context)
            controller.context_name = name
            super().set_context(context)
            if controller._pending is not None or (controller._keep_steps and name is not None):
                from . import replay
                replay.prepare(controller)     # a compiled call decided ahead: for this branch

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = _ContextManager(_State)

        def reset_state(self, module):
            return module

    registry = HookRegistry.check_if_exists_or_initialize(model)
    if HOOK_NAME in registry.hooks:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(_ContextHook(), HOOK_NAME)
    return True


def detach(model) -> None:
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and HOOK_NAME in registry.hooks:
        registry.remove_hook(HOOK_NAME, recurse=False)
