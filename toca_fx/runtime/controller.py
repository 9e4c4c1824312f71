"""The step controller: generations, CFG branches, and one fresh/partial decision per model call.

Decisions are made here, in Python, before the model runs; the block graphs only execute them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..config import ToCaConfig
from . import schedule

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
        self.programs: dict = {}               # (class, structure, signature) -> BlockProgram
        self.lists: list = []
        self.discovery_notes: list[str] = []
        self.current: CallInfo | None = None
        self.context_name: str | None = None   # set by diffusers' cache_context("cond"/"uncond")
        self.flop_log: Counter = Counter()
        self.calls = Counter()
        self.generations = 0               # generations that made at least one call
        self.timestep_reads = 0            # timestep tensors read on the host (a sync on accelerators)
        self._first_call_checked = False
        self.new_generation(None)

    # -- generations -----------------------------------------------------------------------
    def new_generation(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps if num_steps is not None else self.config.num_steps
        self.signature = None
        self.branches: dict[Any, BranchCounter] = {}
        self.last_t = None
        self.branch_idx = 0
        self._pattern: int | None = None       # calls per step (CFG branches), once seen
        self.paired: bool | None = None         # the batch's halves are CFG copies of the same latents
        for b in self.blocks:
            b.clear()
        self._started = False

    def reset(self, stats: bool = False) -> None:
        self.new_generation(None)
        if stats:
            self.flop_log.clear()
            self.calls.clear()
            self.generations = 0
            for b in self.blocks:
                b.reset_stats()

    # -- per model call --------------------------------------------------------------------
    def _timestep_arg(self, kwargs):
        keys = (self.config.timestep_arg,) if self.config.timestep_arg else _TIMESTEP_KEYS
        for k in keys:
            t = kwargs.get(k)
            if t is not None:
                return t
        return None

    def _timestep(self, t) -> float | None:
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            self.timestep_reads += 1
            return float(t.reshape(-1)[0])
        if isinstance(t, (int, float)):
            return float(t)
        return None

    def _can_skip_timestep(self, t) -> bool:
        """Inside an explicit generation (a pipeline call or ``generation()``) whose branch pattern
        is known, the timestep adds nothing; reading it from an accelerator would be a host sync on
        every call, so it is not read there (reading a CPU tensor costs nothing and is kept)."""
        return (self._keep_steps and isinstance(t, torch.Tensor) and not host_read_is_free(t)
                and (self.context_name is not None or self._pattern is not None)
                and self.config.forecast_variable != "timestep")

    def begin_call(self, args, kwargs) -> None:
        sig = _shape_signature(args, kwargs)
        if self.signature is not None and sig != self.signature:
            log.info("toca_fx: input shapes changed: new generation")
            self.new_generation(None)
        self.signature = sig
        t_arg = self._timestep_arg(kwargs)
        if self._can_skip_timestep(t_arg):
            self._begin_known_pattern()
            return
        t = self._timestep(t_arg)
        if self.context_name is not None:
            key = self.context_name
            br = self.branches.get(key)
            if br is not None and t is not None and t in br.seen_t:
                self.new_generation(self.num_steps if self._keep_steps else None)
                self.signature = sig
        elif t is not None:
            if self.last_t is not None and t == self.last_t and self.branch_idx + 1 < self.config.max_branches:
                self.branch_idx += 1
            elif any(t in b.seen_t for b in self.branches.values()):
                self.new_generation(self.num_steps if self._keep_steps else None)
                self.signature = sig
                self.branch_idx = 0
            else:
                if self.last_t is not None and self._pattern is None:
                    self._pattern = len(self.branches)       # a new timestep: every branch has been seen
                self.branch_idx = 0
            key = self.branch_idx
        else:
            key = 0
        br = self.branches.setdefault(key, BranchCounter())
        if t is not None:
            br.seen_t.add(t)
        self.last_t = t
        self._decide(key, br, t)

    def _begin_known_pattern(self) -> None:
        """A call whose branch follows from the call count (or from diffusers' cache context)."""
        if self.context_name is not None:
            key = self.context_name
        else:
            self.branch_idx = (self.branch_idx + 1) % self._pattern
            key = self.branch_idx
        self._decide(key, self.branches.setdefault(key, BranchCounter()))

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

    def end_call(self) -> None:
        if self.current is not None:
            br = self.branches.get(self.current.branch)
            if br is not None:
                br.step += 1
        self.current = None
