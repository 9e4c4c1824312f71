"""The forward installed on every transformer block: compile on first call, then execute programs.

Nothing here rewrites graphs or decodes names: the block finds its ``BlockProgram`` (compiled by
``toca_fx.pipeline``), asks the planner for the step's per-site techniques, and binds the chosen
variant's slots (``passes.bindings``) to its own state.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils._pytree

from ..capture import signature_of, structure_of
from ..passes import TECHNIQUES, choose
from ..passes.bindings import Buffer, ScoreInput, ScoreOutput, StepInput
from ..pipeline import compile_block, rng_devices
from ..program import BlockProgram
from . import live, replay, schedule
from .state import BlockState, BranchState

log = logging.getLogger("toca_fx")


@dataclass(frozen=True)
class CallRecord:
    """One kind of block call, counted in ``Controller.flop_log`` (``stats()`` turns it into FLOPs)."""

    program: tuple                  # the program's key
    block: str                      # the block's qualified name
    variant: tuple | None           # the partial variant's key; None: the fresh variant
    ks: tuple = ()                  # (site, k) of the partial sites


class _Binding:
    """What a variant's slots are bound to on one call of one block."""

    def __init__(self, rt: "BlockRuntime", program: BlockProgram, st: BranchState, ks: dict, x: torch.Tensor):
        self.rt, self.program, self.st, self.ks, self.x = rt, program, st, ks, x

    def state_buffer(self, buf: Buffer) -> torch.Tensor:
        return self.st.buffer(buf)

    def base_score(self, stream: int) -> torch.Tensor:
        """The stream's base score: drawn per call ("random"), the last fresh step's (stream 0), or zeros."""
        if self.program.score.score.random:
            n = self.program.analysis.stream_tokens(stream)
            return torch.rand(self.program.batch, n, generator=self.rt.generator(self.x.device), device=self.x.device)
        return self.st.score_of(stream)

    def step_value(self) -> torch.Tensor:
        return self.rt.controller.current.s_tensor(self.x.device)

    def set_score(self, value: torch.Tensor) -> None:
        plan = self.program.score
        self.st.score.copy_(plan.ingredient.finish(value, bool(self.rt.controller.paired)))


class _Entry:
    """What a block's calls of one input layout share (runtime fast path): the program, the block's
    lifted parameters, the branch states it runs on, and its plans. Found by comparing the call's
    ``call_key`` (tensor shapes / dtypes / devices, plain values) with the last call's; the slow
    path (signature, structure key, capture store) runs only when it differs."""

    __slots__ = ("call_key", "program", "lifted", "branch_states", "plans", "single_output")

    def __init__(self, call_key, program: BlockProgram, lifted: list):
        self.call_key = call_key
        self.program = program
        self.lifted = lifted
        self.branch_states: dict = {}          # branch -> BranchState with this program's key
        self.plans: dict = {}                  # (branch, fresh, progress, aggressive, paired) -> _Plan
        self.single_output = program.capture.out_spec.is_leaf()


class _Plan:
    """One kind of call of one block on one branch: the variant, its per-site k, the bound state
    inputs (static buffers, so bound once), and what ``stats`` counts for it."""

    __slots__ = ("variant", "ks", "label", "record", "increments", "state", "dynamic", "owner", "epoch", "runner",
                 "canon")

    def __init__(self, variant, ks, label, record, increments, state, dynamic, owner, runner):
        self.variant, self.ks, self.label, self.record = variant, ks, label, record
        self.increments = increments           # ((site, stats label, tokens computed, tokens), ...)
        self.state, self.dynamic = state, dynamic   # bound inputs; positions re-fetched per call
        self.owner, self.epoch = owner, owner.epoch   # the BranchState bound (re-bound if replaced / moved)
        self.runner = runner
        self.canon = self                      # the first plan of the same record and state (replay.py's kinds)


_PLAIN = (int, float, bool, str, type(None))


def _call_key(args: tuple, kwargs: dict):
    """A cheap key of a call whose arguments are all tensors or plain values (None otherwise)."""
    key = [len(args), tuple(kwargs)]
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            key.append((v.shape, v.dtype, v.device, v.requires_grad))
        elif type(v) in _PLAIN:
            key.append((type(v), v))
        else:
            return None
    return tuple(key)


class BlockRuntime:
    """Replaces ``block.forward`` (an instance attribute, removed again by ``toca_fx.remove``)."""

    def __init__(self, module: nn.Module, qualname: str, layer: int, num_layers: int, controller, blist,
                 states: BlockState):
        self.module = module
        self.qualname = qualname
        self.layer = layer
        self.index = -1                        # position in the controller's blocks (model order)
        self.num_layers = num_layers
        self.controller = controller
        self.blist = blist
        self.original_forward = module.forward
        self.wrapped = module.__dict__.get("forward")   # an instance forward found at transform (refused)
        self.states = states                   # branch -> BranchState (submodules: visible in print(model))
        self._lifted: dict = {}
        self.program_keys: set = set()
        self._gen = None
        self.removed = False                   # toca_fx.remove() could not unwrap (another hook wraps this one)
        self._watch = None                     # live.Watch over the block's modules, armed when its structure was read
        self.changing = None                   # live.changed_numbers: runs unchanged until the next generation
        self._entry: _Entry | None = None      # the last call's layout, program and plans (the fast path)
        self._canon: dict = {}                 # (record, state) -> the first plan made for it
        self._ratio_varies = schedule.ratio_varies(controller.config)
        self.reset_stats()

    def refresh(self) -> None:
        """The block changed (or this is its first call): recompute its structure keys, what it cannot
        run cached, and its parameters; caches computed before the change are invalidated."""
        m = self.module
        self._entry = None
        self._canon = {}
        self.structure = structure_of(m, numbers=False)
        self.fine_structure = structure_of(m)
        self.refused = live.unsupported(m, self, self.wrapped)
        if self._watch is not None:
            log.info("toca_fx: %s changed since its last call: structure re-read, caches invalidated", self.qualname)
            self._lifted = {}
            for st in self.states.values():
                st.ready = False
        self._watch = live.Watch(list(m.modules()))

    def __getstate__(self) -> dict:
        # a copy (deepcopy / pickle) re-reads its structure and parameters; generators are not copied
        d = self.__dict__.copy()
        d.update(_lifted={}, program_keys=set(), _gen=None, _watch=None, _entry=None, tally=Counter(), _canon={})
        if self.wrapped is None:
            # pickle stores a bound method as getattr(module, "forward"): that would be this runtime
            d["original_forward"] = None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        if self.original_forward is None:
            self.original_forward = types.MethodType(type(self.module).forward, self.module)

    def reset_stats(self) -> None:
        self.stats = {"fresh": 0, "partial": 0, "original": 0}
        self.tally: Counter = Counter()        # _Plan -> calls (one increment per call; stats() folds it)
        self._site_base: dict = {}             # site stats of plans folded away (evicted programs)

    @property
    def site_stats(self) -> dict:
        """site -> {"tokens": n computed, "of": n possible, "n": tokens, then calls per stats label}."""
        out = {site: dict(d) for site, d in self._site_base.items()}
        for plan, n in self.tally.items():
            _fold(out, plan, n)
        return out

    def fold_away(self, program_key) -> list:
        """The program was evicted: its plans' site stats are kept as totals; returns (record, calls)."""
        gone = []
        for plan in [pl for pl in self.tally if pl.record.program == program_key]:
            n = self.tally.pop(plan)
            _fold(self._site_base, plan, n)
            gone.append((plan.record, n))
        return gone

    # -- install / uninstall ----------------------------------------------------------------
    def install(self) -> None:
        self.module.forward = self

    def uninstall(self) -> bool:
        """Put the block's forward back; False when another library has wrapped toca_fx's since (then
        this runtime stays in its chain as a pass-through, so the other library's hook survives)."""
        if self.module.__dict__.get("forward") is not self:
            self.removed = True
            return False
        if self.wrapped is not None:
            self.module.forward = self.wrapped
        else:
            self.module.__dict__.pop("forward", None)
        return True

    def forget(self, key) -> None:
        """The controller evicted the program ``key`` (runtime/captures.py)."""
        self.program_keys.discard(key)
        self._lifted.pop(key, None)
        if self._entry is not None and self._entry.program.key == key:
            self._entry = None
        self._canon = {k: v for k, v in self._canon.items() if k[0].program != key}

    def clear(self) -> None:
        """A new generation: caches invalid (kept, zeroed: static addresses across generations); the
        program, lifted parameters and call plans stay (the watch says when they must not)."""
        self.states.restart()
        self.changing = None

    def reread(self) -> None:
        """``toca_fx.reset``: re-read the structure and parameters on the next call (also what the
        watch cannot see, a value changed in place inside an attribute)."""
        self._lifted = {}
        self._entry = None
        self._watch = None

    # -- the program of this call ------------------------------------------------------------
    def _program(self, args, kwargs, branch) -> BlockProgram | None:
        """The program of this call, captured if new; None when the block must run unchanged for now."""
        ctl = self.controller
        sig = signature_of(args, kwargs)
        key = (type(self.module), self.structure, sig)
        p = ctl.programs.get(key)
        if p is not None and self.fine_structure not in p.peers:
            if p.failed is not None or self._same_through(p, args, kwargs):
                p.peers.add(self.fine_structure)
            else:
                key = (type(self.module), self.fine_structure, sig)
                p = ctl.programs.get(key)
        st = self.states.get(branch)
        if st is not None and st.key != key and st.ready:
            self.changing = live.changed_numbers(st.key, key, args, kwargs)
            if self.changing is not None:
                log.info("toca_fx: %s runs unchanged: %s", self.qualname, self.changing)
                return None
        if p is None:
            p = compile_block(key, self.module, args, kwargs, self.original_forward, ctl.config)
            if p.failed is not None:
                log.info("toca_fx: %s (%s) runs unchanged: %s", self.qualname, p.cls_name, p.failed)
            p.peers.add(self.fine_structure)
            ctl.programs.put(key, p)
            # export restores the attributes it traced through as new objects (equal values): not a change
            self._watch.arm()
        self.program_keys.add(key)
        return p

    def _same_through(self, p: BlockProgram, args, kwargs) -> bool:
        """Does the shared graph reproduce this block (same class, other int/float attributes)?"""
        # both runs from the caller's random state, which they leave as it was (a block that draws
        # random numbers compares equal, and the call then draws what the original would)
        devices = rng_devices(args, kwargs)
        with torch.no_grad():
            with torch.random.fork_rng(devices=devices):
                ref = self.original_forward(*args, **kwargs)
            with torch.random.fork_rng(devices=devices):
                got = p.capture.unflatten_outputs(
                    p.capture.gm(*p.capture.lifted_values(self.module), *p.capture.flatten_inputs(args, kwargs)))
        a, _ = torch.utils._pytree.tree_flatten(ref)
        b, _ = torch.utils._pytree.tree_flatten(got)
        same = len(a) == len(b) and all(
            (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
            for x, y in zip(a, b))
        if not same:
            log.info("toca_fx: %s differs from its class's capture: captured separately", self.qualname)
        return same

    def plan(self, program: BlockProgram, call) -> tuple[dict, dict]:
        """Per-site technique names and k of a partial call of this block."""
        cfg = self.controller.config
        actions, ks = {}, {}
        for s in program.sites:
            if not s.cacheable:
                actions[s.name] = "compute"
                continue
            if call.aggressive:            # DuCa's aggressive step: nothing recomputed
                k = 0
            else:
                r = schedule.ratio(cfg, call.progress, self.layer, self.num_layers, s.kind)
                k = schedule.bucket(schedule.tokens_for(r, s.n_tokens), s.n_tokens, cfg.resolved_k_buckets)
            t = choose(s, k, cfg)
            actions[s.name] = t.name
            if t.uses_k:
                ks[s.name] = k
        return actions, ks

    # -- the call ----------------------------------------------------------------------------
    def invalidate(self, branch) -> None:
        """The branch's caches are partly overwritten (a call failed): its next call is fresh."""
        st = self.states.get(branch)
        if st is not None:
            st.ready = False

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._replay(args, kwargs)
        return self._call(*args, **kwargs)

    def _replay(self, args, kwargs):
        """Inside a whole-model compiled call: run the plan prepared for this block (runtime/replay.py);
        dynamo traces only this, so the graph holds the variant and reads no counter."""
        kind = self.controller.replay_kind
        if kind is None:                       # the controller decided this call eagerly: so does the block
            return self._call(*args, **kwargs)
        slot = kind.plans[self.index]
        if slot is None:                       # runs unchanged (refused, or another list was rejected)
            return self.original_forward(*args, **kwargs)
        plan, entry, step = slot
        if _call_key(args, kwargs) != entry.call_key:
            raise replay.mismatch(self.qualname)
        p, v = entry.program, plan.variant
        state = plan.state
        if step is not None:
            state = list(state)
            for i, _ in plan.dynamic:
                state[i] = step
        flat = [*args, *kwargs.values()] if entry.call_key is not None else p.capture.flatten_inputs(args, kwargs)
        # the block's parameters read from the module as the graph runs (a reassigned one is what runs)
        outs = v.gm(*p.capture.lifted_values(self.module), *flat, *state)
        n = v.n_user_outputs
        if v.outputs:                          # the fresh step's score ingredient -> the block's base score
            with torch.no_grad():
                for val in outs[n:]:
                    plan.owner.score.copy_(p.score.ingredient.finish(val, kind.paired))
        return outs[0] if entry.single_output else p.capture.unflatten_outputs(outs[:n])

    def replay_plan(self, call, paired):
        """What this block runs on a call decided ahead: (plan, entry, step buffer); None: it runs
        unchanged; False: the call cannot be decided ahead (the block must run eagerly first)."""
        if self.removed or self.blist.rejected is not None or self.refused is not None:
            return None
        entry = self._entry
        if entry is None or self._watch is None or self.changing is not None:
            return False
        st = entry.branch_states.get(call.branch)
        if st is None or st is not self.states.get(call.branch) or not (call.fresh or st.ready):
            return False
        plan = self._plan_for(entry, st, call, call.fresh, paired)
        step = None
        for _, slot in plan.dynamic:
            if not isinstance(slot, StepInput):   # a score drawn per call
                return False
            step = self.controller.step_buffer(st.score.device)
        if plan.variant.outputs and not all(isinstance(o, ScoreOutput) for o in plan.variant.outputs):
            return False
        return plan.canon, entry, step

    # torch.compile of the transformed model runs this eagerly (a graph break) unless the call was
    # decided ahead (_replay); compile=True compiles the variant graphs, one per kind of call
    @torch.compiler.disable(reason="toca_fx: this block's call is decided eagerly (see toca_fx's README, "
                                   "'Whole-model torch.compile')")
    def _call(self, *args, **kwargs):
        if self.removed:
            return self.original_forward(*args, **kwargs)
        ctl = self.controller
        call = ctl.current
        if call is None or (call.implicit and self.index <= call.position):
            # entered around the model's __call__ (e.g. a method calling self.forward): this block starts the call
            ctl.begin_implicit(self, args, kwargs)
            call = ctl.current
        if call.implicit:
            call.position = self.index
        if self._watch is None or self._watch.changed():
            self.refresh()
        if (self.blist.rejected is not None or self.refused is not None
                or (self.module.training and torch.is_grad_enabled())):
            self.stats["original"] += 1
            return self.original_forward(*args, **kwargs)
        ck = _call_key(args, kwargs)
        entry = self._entry
        st = None
        if entry is not None and ck is not None and self.changing is None and ck == entry.call_key:
            st = entry.branch_states.get(call.branch)
        if st is None:                         # the slow path: program lookup (capture), lifted values, state
            entry, st = self._resolve(args, kwargs, call, ck)
            if entry is None:
                self.stats["original"] += 1
                return self.original_forward(*args, **kwargs)
        p = entry.program
        flat = [*args, *kwargs.values()] if ck is not None else p.capture.flatten_inputs(args, kwargs)
        x = flat[p.stream_index]
        if not call.adapted:               # adaptive fresh steps: the call's first block decides
            ctl.adapt(x)
        if ctl.paired is None:                 # once per generation: are the batch halves CFG copies?
            b = x.shape[0]
            ctl.paired = bool(b % 2 == 0 and b > 0 and torch.equal(x[: b // 2], x[b // 2:]))
        fresh = call.fresh or not st.ready
        if fresh and not call.fresh and not call.forced:
            call.forced = True                 # a partial call whose caches are gone (a fault): counted as fresh
            ctl.calls["partial"] -= 1
            ctl.calls["fresh"] += 1
        plan = self._plan_for(entry, st, call, fresh, ctl.paired)
        v = plan.variant
        ctx = None
        state = plan.state
        if plan.dynamic:                       # a per-call score draw ("random") or the step variable
            ctx = _Binding(self, p, st, plan.ks, x)
            state = list(state)
            for i, slot in plan.dynamic:
                state[i] = slot.fetch(ctx)
        grad = torch.is_grad_enabled()
        if grad:
            # autograd may save a cache for backward; later calls overwrite caches in place, so it gets a
            # copy, and what the graph wrote into the copies is copied back (values, not history)
            buffers = state
            state = [t.clone() if isinstance(t, torch.Tensor) else t for t in state]
        outs = plan.runner(*entry.lifted, *flat, *state)
        if grad and v.mutated:
            with torch.no_grad():
                for i in v.mutated:
                    buffers[i].copy_(state[i])
        n = v.n_user_outputs
        if v.outputs:
            ctx = ctx or _Binding(self, p, st, plan.ks, x)
            with torch.no_grad():              # caches hold values, not autograd history (gradients stop there)
                for slot, val in zip(v.outputs, outs[n:]):
                    slot.store(ctx, val)
        self.tally[plan] += 1
        self.stats[plan.label] += 1
        if fresh:
            st.ready = True
        return outs[0] if entry.single_output else p.capture.unflatten_outputs(outs[:n])

    def _resolve(self, args, kwargs, call, ck):
        """The slow path: this call's program (captured if new), the block's lifted values, and the
        branch's state (allocated if new); remembered as the block's entry. (None, None): run unchanged."""
        p = self._program(args, kwargs, call.branch) if self.changing is None else None
        if p is None or p.failed is not None:
            return None, None
        entry = self._entry
        if entry is None or entry.program is not p or entry.call_key != ck:
            lifted = self._lifted.get(p.key)
            if lifted is None:
                # the block's own parameters, in the captured graph's order; refreshed by reset()
                lifted = self._lifted[p.key] = p.capture.lifted_values(self.module)
            entry = self._entry = _Entry(ck, p, lifted)   # ck None (containers): found by program only
        st = self.states.get(call.branch)
        if st is None or st.key != p.key:
            st = BranchState(p.key)
            x = p.capture.flatten_inputs(args, kwargs)[p.stream_index]
            with torch.inference_mode(False):   # caches made in an inference_mode call serve later no_grad calls
                st.allocate(p, x.device)
            self.states.set(call.branch, st)
        entry.branch_states[call.branch] = st
        return entry, st

    def _plan_for(self, entry: _Entry, st: BranchState, call, fresh: bool, paired) -> _Plan:
        """The plan of this kind of call, made once: keyed by what its variant and k depend on (the
        progress only under a varying ratio schedule), re-made when its branch state was replaced."""
        pk = (call.branch, True) if fresh else (
            call.branch, False, call.progress if self._ratio_varies else None, call.aggressive, paired)
        plan = entry.plans.get(pk)
        if plan is None or plan.owner is not st or plan.epoch != st.epoch:
            plan = entry.plans[pk] = self._plan_call(entry, st, call, fresh)
        return plan

    def _plan_call(self, entry: _Entry, st: BranchState, call, fresh: bool) -> _Plan:
        """The variant, k per site, bound state inputs and stats increments of this kind of call."""
        p, ctl = entry.program, self.controller
        if fresh:
            v, actions, ks = p.fresh, None, {}
            increments = tuple((s.name, "fresh", s.n_tokens, s.n_tokens) for s in p.sites)
            record = CallRecord(p.key, self.qualname, None)
        else:
            actions, ks = self.plan(p, call)
            v = p.variant(actions, bool(ctl.paired), self.qualname)
            techs = {s.name: TECHNIQUES[actions[s.name]] for s in p.sites}
            increments = tuple((s.name, techs[s.name].stats_label, techs[s.name].tokens(s, ks.get(s.name, 0)), s.n_tokens)
                               for s in p.sites)
            record = CallRecord(p.key, self.qualname, v.key, tuple(sorted(ks.items())))
        ctx = _Binding(self, p, st, ks, None)
        state, dynamic = [], []
        for i, slot in enumerate(v.inputs):
            if isinstance(slot, StepInput) or (isinstance(slot, ScoreInput) and p.score.score.random):
                dynamic.append((i, slot))
                state.append(None)
            else:
                state.append(slot.fetch(ctx))
        plan = _Plan(v, ks, "fresh" if fresh else "partial", record, increments, tuple(state), tuple(dynamic),
                     st, p.runner(v))
        # plans of other progress values that run the same variant and k on the same state are one
        # kind of call for a compiled model (one graph); hashed here, once per plan
        plan.canon = self._canon.setdefault((record, id(st), st.epoch), plan)
        return plan

    def generator(self, device):
        g = self._gen
        if g is None or g.device != torch.device(device):
            g = torch.Generator(device=device)
            g.manual_seed(self.controller.config.seed + self.layer)
            self._gen = g
        return g


def _fold(out: dict, plan: _Plan, n: int) -> None:
    for site, label, tokens, of in plan.increments:
        d = out.setdefault(site, {"tokens": 0, "of": 0, "n": of})
        d["tokens"] += n * tokens
        d["of"] += n * of
        d[label] = d.get(label, 0) + n
