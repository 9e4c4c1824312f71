"""The step controller: generations, CFG branches, and one fresh/partial decision per model call.

Decisions are made here, in Python, before the model runs; the block graphs only execute them.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..config import ToCaConfig
from ..errors import ToCaError
from . import replay, schedule
from .captures import CaptureStore
from .state import mark_static

log = logging.getLogger("toca_fx")

_TIMESTEP_KEYS = ("timestep", "timesteps", "t")


@dataclass
class BranchCounter:
    step: int = 0
    last_fresh: int | None = None
    seen_t: set = field(default_factory=set)
    change: float = 0.0                  # adaptive: accumulated relative change since the last fresh call
    previous: Any = None                 # adaptive: the first block's input on the previous call


@dataclass
class CallInfo:
    branch: Any
    step: int
    fresh: bool
    progress: float | None
    aggressive: bool = False             # DuCa's aggressive step: every branch reused or forecast
    s: float = 0.0                       # the forecast's expansion variable (call index or timestep)
    adapted: bool = False                # adaptive: the first block has decided fresh / partial
    forced: bool = False                 # a block ran it fresh although it was planned partial
    implicit: bool = False               # started by a block (the model was entered around its __call__)
    position: int = -1                   # implicit calls: the last block that ran (in model order)
    _s_tensors: dict = field(default_factory=dict)

    def s_tensor(self, device) -> torch.Tensor:
        """``s`` as a one-element float32 tensor on ``device`` (made once per call, shared by all blocks)."""
        t = self._s_tensors.get(device)
        if t is None:
            t = self._s_tensors[device] = torch.tensor([self.s], dtype=torch.float32, device=device)
        return t


def host_read_is_free(t: torch.Tensor) -> bool:
    """Reading a CPU tensor's value does not wait for an accelerator."""
    return t.device.type in ("cpu", "meta")


def _shape_signature(args, kwargs) -> tuple:
    flat, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec), tuple((tuple(x.shape), x.dtype) for x in flat if isinstance(x, torch.Tensor)))


class Controller:
    def __init__(self, config: ToCaConfig):
        self.config = config
        self.blocks: list = []                 # BlockRuntime, in model order
        # (class, structure, signature) -> BlockProgram, least recently used evicted past max_captures
        self.programs = CaptureStore(config.max_captures, self._evicted)
        self.evicted_flops = (0, 0, 0)         # FLOPs (original, actual, score) of calls of evicted programs
        self.lists: list = []
        self.discovery_notes: list[str] = []
        self.current: CallInfo | None = None
        self.context_name: str | None = None   # set by diffusers' cache_context("cond"/"uncond")
        self.calls = Counter()
        self.generations = 0               # generations that made at least one call
        self.timestep_reads = 0            # timestep tensors read on the host (a sync on accelerators)
        self.timestep_names = (config.timestep_arg,) if config.timestep_arg else _TIMESTEP_KEYS
        self.timestep_position: int | None = None   # the timestep's index among positional arguments
        self.direction: int | None = None  # -1: timesteps fall within a generation, +1: they rise (learned once)
        self._first_call_checked = False
        self._snapshot = None              # the counters before the call in flight (restored if it fails)
        self._call_thread: int | None = None
        self.owner: int | None = None      # the thread whose calls make up the current generation
        # whole-model torch.compile (runtime/replay.py): the next call, decided ahead
        self.uid = replay.register(self)
        self.replay_kind = None            # the prepared call's CallKind (what compiled graphs are chosen by)
        self._pending = None               # (its CallInfo, the counters before it)
        self.kinds: dict = {}              # interned CallKinds (kept across generations: same kind, same graph)
        self.last_layout = None            # the last eager call's argument layout (replay.layout)
        self.replayed = 0                  # calls run from a prepared kind (compiled)
        self.paired_last = None            # what the last generation learned (a prepared call cannot look)
        self.pattern_last = None
        self._step_buffers: dict = {}      # device -> (1,) float32: the prepared call's forecast variable
        self.new_generation(None)

    # -- copies ------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """``copy.deepcopy`` / pickle of a transformed model: the copy gets its own controller with no
        compiled programs (recaptured on its first call), no call in flight, and starts with a new
        generation and zeroed stats; the original is untouched."""
        d = self.__dict__.copy()
        d.update(programs=CaptureStore(self.config.max_captures, None), evicted_flops=(0, 0, 0), calls=Counter(),
                 current=None, _snapshot=None, _call_thread=None, owner=None, generations=0, _copied=True,
                 replay_kind=None, _pending=None, kinds={}, last_layout=None, replayed=0, _step_buffers={})
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.programs.on_evict = self._evicted
        self.uid = replay.register(self)

    _copied = False

    def _evicted(self, key, program) -> None:
        """A program left the capture store: its calls' FLOPs are kept as totals, and no block refers to it."""
        o, a, s = self.evicted_flops
        for b in self.blocks:
            for rec, n in b.fold_away(key):
                fo, fa, fs = program.call_flops(b.module, rec.variant, dict(rec.ks))
                o, a, s = o + n * fo, a + n * fa, s + n * fs
            b.forget(key)
        self.kinds.clear()                     # prepared kinds hold plans of the evicted program
        self.evicted_flops = (o, a, s)

    @property
    def flop_log(self) -> Counter:
        """CallRecord -> calls, over every block (blocks count their calls per plan; this folds them)."""
        log_ = Counter()
        for b in self.blocks:
            for plan, n in b.tally.items():
                log_[plan.record] += n
        return log_

    def bind_signature(self, forward) -> None:
        """Find where the model's forward takes its timestep, so ``model(x, t, y)`` is read too."""
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            return
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for name in self.timestep_names:
            if name in positional:
                self.timestep_position = positional.index(name)
                self.timestep_names = (name,)
                return

    # -- generations -----------------------------------------------------------------------
    def new_generation(self, num_steps: int | None = None) -> None:
        replay.discard(self)
        if getattr(self, "paired", None) is not None:
            self.paired_last = self.paired
        if getattr(self, "_pattern", None) is not None:
            self.pattern_last = self._pattern
        self.num_steps = num_steps if num_steps is not None else self.config.num_steps
        self.signature = None
        self.branches: dict[Any, BranchCounter] = {}
        self.last_t = None
        self.branch_idx = 0
        self._pattern: int | None = None       # calls per step (CFG branches), once seen
        self.paired: bool | None = None         # the batch's halves are CFG copies of the same latents
        self.owner = None
        for b in self.blocks:
            b.clear()
        self._started = False

    def reset(self, stats: bool = False) -> None:
        self.new_generation(None)
        self.kinds.clear()
        for b in self.blocks:                  # the user's reset: every block re-reads its structure too
            b.reread()
        self.direction = None
        if stats:
            self.replayed = 0
            self.evicted_flops = (0, 0, 0)
            self.calls.clear()
            self.generations = 0
            for b in self.blocks:
                b.reset_stats()

    # -- per model call --------------------------------------------------------------------
    def _timestep_arg(self, args, kwargs, positional: bool = True):
        for k in self.timestep_names if positional else (self.config.timestep_arg,) if self.config.timestep_arg \
                else _TIMESTEP_KEYS:
            t = kwargs.get(k)
            if t is not None:
                return t
        i = self.timestep_position
        if positional and i is not None and i < len(args):
            return args[i]
        return None

    def _timestep(self, t) -> float | None:
        if isinstance(t, torch.Tensor):
            if not t.numel() or t.device.type == "meta":
                return None
            self.timestep_reads += 1
            return float(t.reshape(-1)[0])
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return float(t)
        return None

    def _can_skip_timestep(self, t) -> bool:
        """Inside an explicit generation (a pipeline call or ``generation()``), reading the timestep
        from an accelerator (a host sync) is skipped when it cannot change a decision: the branch
        comes from diffusers' cache context, or every call so far is one branch (one-batch CFG or
        no CFG; a change of batch size is seen from the shapes). With several branches per step
        and no context name, a CFG cut-off (cond only from some step on) is only visible in the
        timesteps, so they are read. CPU tensors are always read (free)."""
        return (self._keep_steps and isinstance(t, torch.Tensor) and not host_read_is_free(t)
                and (self.context_name is not None or self._pattern == 1)
                and self.config.forecast_variable != "timestep")

    def begin_call(self, args, kwargs, implicit: bool = False) -> None:
        if self._copied:                           # the first call of a copy: its state is its own from here
            self._copied = False
            self.reset(stats=True)
        if self._pending is not None:              # an eager call after one was prepared: decided here instead
            replay.discard(self)
        if not implicit:
            self.last_layout = replay.layout(args, kwargs)
        tid = threading.get_ident()
        if self.current is not None:
            if self._call_thread != tid:
                raise ToCaError("toca_fx: the transformed model was called from a second thread while a call from "
                                "another thread is running; toca_fx keeps one generation's state per model, so use "
                                "one model per thread (copy.deepcopy of the transformed model gives an independent one)")
            if self.current.implicit:
                self.end_call()
            else:                                 # the previous call never returned (KeyboardInterrupt, ...)
                self.abort_call()
        self._snapshot = self._save()
        self._snapshot["exception"] = sys.exc_info()[1]    # one being handled around the call is not its failure
        self._call_thread = tid
        started = self._begin(args, kwargs, positional=not implicit)
        if self.owner is not None and self.owner != tid and not started:
            self._restore(self._snapshot)
            self.current, self._call_thread, self._snapshot = None, None, None
            raise ToCaError("toca_fx: a second thread called the transformed model in the middle of another thread's "
                            "generation; start a new generation in that thread (toca_fx.generation(model) or "
                            "toca_fx.reset(model)), or use one model per thread")
        self.owner = tid
        self.current.implicit = implicit

    def _begin(self, args, kwargs, positional: bool = True) -> bool:
        """Decide the call's branch and step; True if it starts a new generation."""
        sig = _shape_signature(args, kwargs)
        started = not self._started
        if self.signature is not None and sig != self.signature:
            log.info("toca_fx: input shapes changed: new generation")
            self.new_generation(self.num_steps if self._keep_steps else None)
            started = True
        self.signature = sig
        t_arg = self._timestep_arg(args, kwargs, positional)   # a block's arguments: by keyword only
        if self._can_skip_timestep(t_arg):
            key = self.context_name if self.context_name is not None else 0
            self._decide(key, self.branches.setdefault(key, BranchCounter()))
            return started
        t = self._timestep(t_arg)
        if t is not None and self.last_t is not None and t != self.last_t and self._reverses(t):
            log.info("toca_fx: the timesteps went back: new generation")
            self.new_generation(self.num_steps if self._keep_steps else None)
            self.signature = sig
            started = True
        if self.context_name is not None:
            key = self.context_name
        elif t is None:
            key = 0
        elif self.last_t is not None and t == self.last_t:
            # the same timestep again: the next CFG branch, or (once the branches per step are known and all
            # were seen) the next step of a sampler that calls twice at one timestep (Heun)
            limit = self._pattern if self._pattern is not None else self.config.max_branches
            if self.branch_idx + 1 < limit:
                self.branch_idx += 1
            elif self._pattern is None:           # the same timestep over and over: every call a generation
                self.new_generation(self.num_steps if self._keep_steps else None)
                self.signature = sig
                started = True
            else:
                self.branch_idx = 0
            key = self.branch_idx
        else:
            if self.last_t is not None and self._pattern is None:
                self._pattern = len(self.branches)       # a new timestep: every branch has been seen
            self.branch_idx = 0
            key = 0
        if t is not None:
            self.last_t = t
        self._decide(key, self.branches.setdefault(key, BranchCounter()), t)
        return started

    def _reverses(self, t: float) -> bool:
        """Does ``t`` run against the direction the timesteps have moved in so far?"""
        step = 1 if t > self.last_t else -1
        if self.direction is None:
            self.direction = step
            return False
        return step != self.direction

    # -- faults ----------------------------------------------------------------------------
    _FIELDS = ("num_steps", "signature", "last_t", "branch_idx", "_pattern", "paired", "owner", "_started",
               "generations", "direction")

    def _save(self) -> dict:
        snap = {f: getattr(self, f) for f in self._FIELDS}
        snap["branches"] = {k: dataclasses.replace(b, seen_t=set(b.seen_t)) for k, b in self.branches.items()}
        snap["calls"] = Counter(self.calls)
        return snap

    def _restore(self, snap: dict) -> None:
        for f in self._FIELDS:
            setattr(self, f, snap[f])
        self.branches = snap["branches"]
        self.calls = snap["calls"]

    def abort_call(self) -> None:
        """The call in flight raised: counters back to before it, and its branch's caches (which the
        blocks that ran have partly overwritten) invalidated, so a retry is the same step, computed fresh."""
        call = self.current
        self.current = None
        self._call_thread = None
        if self._snapshot is not None:
            self._restore(self._snapshot)
            self._snapshot = None
        if call is not None:
            for b in self.blocks:
                b.invalidate(call.branch)

    def _decide(self, key, br: BranchCounter, t: float | None = None) -> None:
        cfg = self.config
        progress = None
        if self.num_steps:
            progress = min(br.step / self.num_steps, 1.0)
        if cfg.adaptive_threshold is not None:       # refined by adapt() at the call's first block
            fresh = br.last_fresh is None or br.step < cfg.warmup
        else:
            fresh = schedule.is_fresh(cfg, br.step, br.last_fresh, progress, self.num_steps)
        if fresh:
            br.last_fresh = br.step
        aggressive = schedule.is_aggressive(cfg, br.step, br.last_fresh, fresh)
        s = float(br.step) if cfg.forecast_variable == "step" or t is None else t
        self.current = CallInfo(branch=key, step=br.step, fresh=fresh, progress=progress, aggressive=aggressive, s=s,
                                adapted=cfg.adaptive_threshold is None)
        if not self._started:
            self._started = True
            self.generations += 1
        self.calls["fresh" if fresh else "partial"] += 1

    def adapt(self, x: torch.Tensor) -> None:
        """Adaptive fresh steps, decided by the call's first block from its input ``x``: fresh when the
        relative L1 change since the previous call, accumulated since the last fresh call, reaches
        ``adaptive_threshold`` (or after ``interval`` non-fresh calls, or during the warm-up).
        One host read per call (the change), none per block."""
        call, cfg = self.current, self.config
        call.adapted = True
        br = self.branches[call.branch]
        if br.previous is not None and br.previous.shape == x.shape:
            prev = br.previous
            br.change += float((x - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        br.previous = x.detach().clone()
        fresh = (call.fresh or br.change >= cfg.adaptive_threshold
                 or call.step - br.last_fresh >= cfg.interval)
        if fresh and not call.fresh:
            self.calls["partial"] -= 1
            self.calls["fresh"] += 1
            call.fresh = True
            br.last_fresh = call.step
        if fresh:
            br.change = 0.0
        call.aggressive = schedule.is_aggressive(cfg, call.step, br.last_fresh, fresh)

    _keep_steps = False

    def after_call(self) -> None:
        """The model's forward returned or raised (a forward hook with ``always_call``)."""
        if self.current is None or self._call_thread != threading.get_ident():
            return                                # not this thread's call (its pre-hook refused it)
        exc = sys.exc_info()[1]
        if exc is not None and self._snapshot is not None and exc is not self._snapshot["exception"]:
            self.abort_call()
        else:
            self.end_call()
            if self._keep_steps and self.num_steps:
                replay.prepare(self)          # the next call decided ahead, for a compiled model

    def begin_implicit(self, rt, args, kwargs) -> None:
        """A block ran with no model call in progress (a method called ``self.forward`` directly, or
        the blocks are driven by hand): the block starts the call, and the call ends when a block at
        or before the last one that ran (in model order) starts again."""
        self.begin_call(args, kwargs, implicit=True)

    def step_buffer(self, device) -> torch.Tensor:
        """The prepared call's forecast variable on ``device``: one static (1,) tensor, written ahead."""
        t = self._step_buffers.get(device)
        if t is None:
            t = self._step_buffers[device] = torch.zeros(1, dtype=torch.float32, device=device)
            mark_static((t,))
        return t

    def step_value(self, s: float) -> None:
        for t in self._step_buffers.values():
            t.fill_(s)

    def end_call(self) -> None:
        if self.current is not None:
            br = self.branches.get(self.current.branch)
            if br is not None:
                br.step += 1
        self.current = None
        self._snapshot = None
        self._call_thread = None
