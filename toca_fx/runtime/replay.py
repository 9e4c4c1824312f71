"""Whole-model ``torch.compile``: the controller outside the compiled region, one graph per kind of call.

Eagerly, the model-level hooks decide each call (``Controller.begin_call``) and every block looks up
its plan (``runtime/block.py``). Under ``torch.compile(model, fullgraph=True)`` neither may run:
Python counters read inside the compiled region would become guards (a recompile per call). So the
decision for the *next* call is made ahead, on the host, when a call ends (``prepare``): its branch
and step, and for every block the plan it will run, interned as a ``CallKind``. The compiled model
reads only the prepared kind; dynamo guards on it, so each kind of call (fresh, and each distinct
vector of per-site k after bucketing) gets one graph, chosen by the guards, and the same kind of a
later generation reuses it. The bookkeeping of a compiled call (stats, step counters, the next
prepared call) is ``advance``, which dynamo runs after the graph (a reorderable call: no graph break).

What a prepared call cannot know: the timestep (never read, so no host sync; a new generation starts
with ``toca_fx.generation`` / a pipeline call, or after ``num_steps`` calls per branch), and a
change of the model between calls that dynamo does not guard (e.g. an attention processor swapped):
``toca_fx.reset(model)`` re-reads it on the next (eager) call. A call that cannot be prepared (first
call of a layout, adaptive fresh steps, a random score, a block that changed) runs eagerly: under
``fullgraph=True`` dynamo then stops with the reason.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ..errors import ToCaError

_LIVE: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)
MAX_KINDS = 64          # far above what dynamo compiles for one frame (its recompile_limit, 8 by default)


class CallKind:
    """One kind of model call: per block (model order) ``(plan, entry)``, or None (runs unchanged)."""

    __slots__ = ("fresh", "plans", "layout", "paired")

    def __init__(self, fresh: bool, plans: tuple, layout, paired: bool):
        self.fresh, self.plans, self.layout, self.paired = fresh, plans, layout, paired

    def __repr__(self) -> str:
        return f"CallKind({'fresh' if self.fresh else 'partial'}, {sum(p is not None for p in self.plans)} blocks)"


def register(ctl) -> int:
    uid = next(_ids)
    _LIVE[uid] = ctl
    return uid


def layout(args, kwargs):
    """What a prepared call assumes of the next call's arguments: tensor shapes / dtypes / devices
    and plain values other than floats (a float timestep changes every call), nested through
    tuples, lists and dicts; None when an argument is anything else (then calls are not prepared)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return (v.shape, v.dtype, v.device)
        if v is None or isinstance(v, (bool, int, str)):
            return (type(v), v)
        if isinstance(v, float):
            return (float,)
        if isinstance(v, (tuple, list)):
            inner = tuple(one(x) for x in v)
            return None if any(x is None for x in inner) else (type(v), inner)
        if isinstance(v, dict):
            inner = tuple((k, one(x)) for k, x in v.items())
            return None if any(x is None for _, x in inner) else (dict, inner)
        return None
    return one((tuple(args), dict(kwargs)))


def discard(ctl) -> None:
    """An eager call, a new generation or a new CFG context: the prepared call is dropped (its
    counters put back as they were)."""
    pending = ctl._pending
    ctl.replay_kind = None
    ctl._pending = None
    if pending is not None:
        ctl._restore(pending[1])


def _next_branch(ctl):
    """The next call's CFG branch and branch index, from what the eager calls learned (diffusers'
    cache context, or the calls per step); the timestep is not read."""
    if ctl.context_name is not None:
        return ctl.context_name, ctl.branch_idx
    pattern = ctl._pattern if ctl._pattern is not None else ctl.pattern_last
    if ctl._started and pattern is not None and ctl.branch_idx + 1 < pattern:
        return ctl.branch_idx + 1, ctl.branch_idx + 1
    return 0, 0


def prepare(ctl) -> CallKind | None:
    """Decide the next call ahead and set ``ctl.replay_kind`` (None when it cannot be prepared: the
    next call then runs the controller eagerly). Only inside a generation of known length, whose
    calls cannot start a new generation unseen (a new loop is visible only in the timesteps)."""
    discard(ctl)
    cfg = ctl.config
    if (not (ctl._keep_steps and ctl.num_steps) or ctl.last_layout is None or cfg.adaptive_threshold is not None or cfg.forecast_variable == "timestep"
            or not ctl.blocks):
        return None
    key, idx = _next_branch(ctl)
    br = ctl.branches.get(key)
    if br is not None and br.step >= ctl.num_steps:   # past the generation: the eager path reads the timestep
        return None
    snap = ctl._save()
    ctl.branch_idx = idx
    if ctl.paired is None:                    # a prepared call cannot look at the batch: the last generation's
        ctl.paired = ctl.paired_last
    if ctl._pattern is None:                  # (the calls per step: one per CFG branch)
        ctl._pattern = ctl.pattern_last
    from .controller import BranchCounter
    ctl._decide(key, ctl.branches.setdefault(key, BranchCounter()))
    call, ctl.current = ctl.current, None
    plans = []
    for rt in ctl.blocks:
        slot = rt.replay_plan(call, ctl.paired)
        if slot is False:                     # this block cannot run a prepared call
            ctl._restore(snap)
            return None
        plans.append(slot)
    # the same plans (canonical per record and state: block.py) make the same kind, whatever the step
    ident = (call.fresh, bool(ctl.paired), tuple(None if s is None else id(s[0]) for s in plans))
    kind = ctl.kinds.get(ident)
    if kind is None or kind.layout != ctl.last_layout:
        if len(ctl.kinds) >= MAX_KINDS:       # kinds of plans since replaced (a changed block) are let go
            ctl.kinds.clear()
        kind = ctl.kinds[ident] = CallKind(call.fresh, tuple(plans), ctl.last_layout, bool(ctl.paired))
    ctl.step_value(call.s)
    ctl._pending = (call, snap)
    ctl.replay_kind = kind
    return kind


def advance(uid: int) -> None:
    """After a compiled call (dynamo runs it after the graph): count the prepared call that ran,
    end it, and prepare the next."""
    ctl = _LIVE.get(uid)
    if ctl is None or ctl._pending is None:
        return
    kind, (call, _) = ctl.replay_kind, ctl._pending
    ctl._pending = None
    for rt, slot in zip(ctl.blocks, kind.plans):
        if slot is None:
            rt.stats["original"] += 1
            continue
        plan = slot[0]
        rt.tally[plan] += 1
        rt.stats[plan.label] += 1
        if plan.label == "fresh":
            plan.owner.ready = True
    ctl.current = call
    ctl.end_call()
    ctl.replayed += 1
    prepare(ctl)


def mismatch(qualname: str) -> ToCaError:
    return ToCaError(f"toca_fx: {qualname}: under torch.compile, the block's inputs differ from the call toca_fx "
                     "prepared for it (same model inputs, other block inputs); run this model without "
                     "torch.compile, or report the model")


# dynamo runs ``advance`` after each compiled graph instead of breaking the graph at it
torch._dynamo.config.reorderable_logging_functions.add(advance)
