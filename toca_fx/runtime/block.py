"""The forward installed on every transformer block: capture on first call, then run variants."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.utils._pytree

from ..capture import CaptureFailure, capture_block, signature_of, structure_of
from . import schedule
from .entry import Entry, build_entry, partial_variant, runner
from .scores import base_score
from .state import BlockState, BranchState

log = logging.getLogger("toca_fx")

_MIXING = ("self_attn", "joint_attn", "parallel")


class BlockRuntime:
    """Replaces ``block.forward`` (an instance attribute, removed again by ``toca_fx.remove``)."""

    def __init__(self, module: nn.Module, qualname: str, layer: int, num_layers: int, controller, blist,
                 states: BlockState):
        self.module = module
        self.qualname = qualname
        self.layer = layer
        self.num_layers = num_layers
        self.controller = controller
        self.blist = blist
        self.had_instance_forward = "forward" in module.__dict__
        self.original_forward = module.forward
        self.states = states                   # branch -> BranchState (submodules: visible in print(model))
        self._lifted: dict = {}
        self.entry_keys: set = set()
        cfg = controller.config
        self._cache_dtype = getattr(torch, cfg.cache_dtype) if cfg.cache_dtype else None
        self._k_buckets = cfg.k_buckets if cfg.k_buckets is not None else (8 if cfg.compile else None)
        self.structure = structure_of(module, numbers=False)
        self.fine_structure = structure_of(module)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"fresh": 0, "partial": 0, "original": 0}
        self.site_stats: dict = {}             # site -> {"tokens": n computed, "of": n possible, actions...}

    # -- install / uninstall ----------------------------------------------------------------
    def install(self) -> None:
        self.module.forward = self

    def uninstall(self) -> None:
        if self.had_instance_forward:
            self.module.forward = self.original_forward
        else:
            self.module.__dict__.pop("forward", None)

    def clear(self) -> None:
        self.states.clear()
        self._lifted = {}

    # -- the call --------------------------------------------------------------------------
    def _entry(self, args, kwargs) -> Entry:
        ctl = self.controller
        sig = signature_of(args, kwargs)
        key = (type(self.module), self.structure, sig)
        e = ctl.entries.get(key)
        if e is not None and self.fine_structure not in e.peers:
            if e.failed or self._same_through(e, args, kwargs):
                e.peers.add(self.fine_structure)
            else:
                key = (type(self.module), self.fine_structure, sig)
                e = ctl.entries.get(key)
        if e is None:
            try:
                cap = capture_block(self.module, args, kwargs, self.original_forward)
            except CaptureFailure as exc:
                e = Entry(key=key, cls_name=type(self.module).__name__, failed=str(exc))
            else:
                try:
                    e = build_entry(key, self.module, cap, ctl.config)
                except Exception as exc:  # never a silently wrong graph: run the block unchanged
                    log.warning("toca_fx: %s: analysis failed, block runs unchanged: %s", self.qualname, exc)
                    e = Entry(key=key, cls_name=type(self.module).__name__, capture=cap,
                              failed=f"analysis failed: {type(exc).__name__}: {exc}")
            if e.failed:
                log.info("toca_fx: %s (%s) runs unchanged: %s", self.qualname, e.cls_name, e.failed)
            e.peers.add(self.fine_structure)
            ctl.entries[key] = e
        self.entry_keys.add(key)
        return e

    def _same_through(self, e: Entry, args, kwargs) -> bool:
        """Does the shared graph reproduce this block (same class, other int/float attributes)?"""
        with torch.no_grad():
            ref = self.original_forward(*args, **kwargs)
            got = e.capture.unflatten_outputs(
                e.capture.gm(*e.capture.lifted_values(self.module), *e.capture.flatten_inputs(args, kwargs)))
        a, _ = torch.utils._pytree.tree_flatten(ref)
        b, _ = torch.utils._pytree.tree_flatten(got)
        same = len(a) == len(b) and all(
            (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
            for x, y in zip(a, b))
        if not same:
            log.info("toca_fx: %s differs from its class's capture: captured separately", self.qualname)
        return same

    def __call__(self, *args, **kwargs):
        ctl = self.controller
        call = ctl.current
        if call is None or self.blist.rejected or (self.module.training and torch.is_grad_enabled()):
            self.stats["original"] += 1
            return self.original_forward(*args, **kwargs)
        e = self._entry(args, kwargs)
        if e.failed:
            self.stats["original"] += 1
            return self.original_forward(*args, **kwargs)
        flat = e.capture.flatten_inputs(args, kwargs)
        lifted = self._lifted.get(id(e))
        if lifted is None:
            # the block's own parameters, in the captured graph's order; refreshed by reset()
            lifted = self._lifted[id(e)] = e.capture.lifted_values(self.module)
        st = self.states.get(call.branch)
        if st is None or st.key != e.key:
            st = BranchState(e.key)
            self.states.set(call.branch, st)
        if ctl.cfg is None:
            x = flat[e.stream_index]
            b = x.shape[0]
            ctl.cfg = bool(b % 2 == 0 and b > 0 and torch.equal(x[: b // 2], x[b // 2:]))
        if call.fresh or not st.ready:
            out = self._fresh(e, st, lifted, flat)
        else:
            out = self._partial(e, st, lifted, flat, call)
        return e.capture.unflatten_outputs(out)

    def _fresh(self, e: Entry, st: BranchState, lifted, flat):
        ctl = self.controller
        v = e.fresh
        outs = runner(e, v, ctl.config)(*lifted, *flat)
        n = v.n_user_outputs
        x = flat[e.stream_index]
        score_val = None
        for (role, site), val in zip(v.extra_outputs, outs[n:]):
            if role == "value":
                self._store(st.values, site, val)
                if "__" not in site:       # "<site>__attn<i>": an attention cache inside a site
                    if site in st.stale:
                        st.stale[site].zero_()
                    else:
                        st.stale[site] = torch.zeros(x.shape[0], e.analysis.site(site).n_tokens, device=x.device)
            else:
                score_val = val
        score = base_score(e.score_role, score_val, bool(ctl.cfg), x.shape[0], e.analysis.n_tokens, x.device)
        if st.score is not None and st.score.shape == score.shape:
            st.score.copy_(score)
        else:
            st.score = score
        st.ready = True
        self.stats["fresh"] += 1
        for s in e.sites:
            self._count(s.name, "fresh", s.n_tokens, s.n_tokens)
        ctl.flop_log[(e.key, "fresh", self.module_id)] += 1
        return outs[:n]

    @property
    def module_id(self):
        return self.qualname

    def _actions(self, e: Entry, call) -> tuple[dict, dict]:
        cfg = self.controller.config
        actions, ks = {}, {}
        for s in e.sites:
            if not s.cacheable:
                actions[s.name] = "compute"
                continue
            mlp_half = s.kind == "parallel" and bool(s.mlp_region) and cfg.self_attention == "reuse"
            if s.kind in _MIXING and cfg.self_attention == "reuse" and not mlp_half:
                actions[s.name] = "reuse"
                continue
            r = schedule.ratio(cfg, call.progress, self.layer, self.num_layers, s.kind)
            k = schedule.bucket(schedule.tokens_for(r, s.n_tokens), s.n_tokens, self._k_buckets)
            if mlp_half and k > 0:
                # ToCa's parallel blocks: the MLP half on k tokens, attention rows from the cache
                actions[s.name] = "partial_mlp"
                ks[s.name] = k
                continue
            if k == 0:
                actions[s.name] = "reuse"
            elif cfg.self_attention == "partial-kv" and s.kv_values and s.local:
                actions[s.name] = "partial_kv"
                ks[s.name] = k
            elif not s.local:
                actions[s.name] = "full"
            else:
                # k == N goes through the same gather/compute/scatter path: exactness at r = 1
                # then proves the partial machinery, not a shortcut around it
                actions[s.name] = "partial"
                ks[s.name] = k
        return actions, ks

    def _partial(self, e: Entry, st: BranchState, lifted, flat, call):
        ctl = self.controller
        actions, ks = self._actions(e, call)
        v = partial_variant(e, actions, bool(ctl.cfg), ctl.config)
        x = flat[e.stream_index]
        extra = []
        for role, site in v.extra_inputs:
            if role == "cache":
                extra.append(st.values[site])
            elif role == "stale":
                extra.append(st.stale[site])
            elif role == "score":
                extra.append(self._score(e, st, int(site), x))
            elif role == "k":
                extra.append(ks[site])
        outs = runner(e, v, ctl.config)(*lifted, *flat, *extra)
        n = v.n_user_outputs
        for (role, site), val in zip(v.extra_outputs, outs[n:]):
            if role == "value":
                self._store(st.values, site, val)
                if "__" not in site:
                    st.stale[site].zero_()
        for s in e.sites:
            act = actions[s.name]
            if act == "reuse":
                st.stale[s.name].add_(1)
                self._count(s.name, act, 0, s.n_tokens)
            elif act in ("partial", "partial_mlp", "partial_kv"):
                self._count(s.name, "partial", ks[s.name], s.n_tokens)
            else:
                self._count(s.name, act, s.n_tokens, s.n_tokens)
        self.stats["partial"] += 1
        ctl.flop_log[(e.key, ("partial", id(v)), self.module_id, tuple(sorted(ks.items())))] += 1
        return outs[:n]

    def _store(self, values, site: str, val: torch.Tensor) -> None:
        """Write a freshly computed value into its cache buffer in place, so cache tensors keep
        their addresses across steps (what CUDA graphs and compiled graphs with static inputs need);
        the first time, the value itself (cast to ``cache_dtype``) becomes the buffer."""
        old = values.get(site)
        if old is not None and old.shape == val.shape:
            old.copy_(val)
        else:
            values[site] = val if self._cache_dtype is None else val.to(self._cache_dtype)

    def _score(self, e: Entry, st: BranchState, stream: int, x: torch.Tensor) -> torch.Tensor:
        """Base score of one stream: the fresh step's (main stream) or zeros (staleness alone)."""
        n = e.analysis.streams[stream].input.meta["val"].shape[1]
        if self.controller.config.score == "random":
            return torch.rand(x.shape[0], n, generator=self._generator(x.device), device=x.device)
        if stream == 0 and st.score is not None:
            return st.score
        return torch.zeros(x.shape[0], n, device=x.device)

    def _generator(self, device):
        g = getattr(self, "_gen", None)
        if g is None or g.device != torch.device(device):
            g = torch.Generator(device=device)
            g.manual_seed(self.controller.config.seed + self.layer)
            self._gen = g
        return g

    def _count(self, site: str, action: str, tokens: int, of: int) -> None:
        d = self.site_stats.setdefault(site, {"tokens": 0, "of": 0, "n": of})
        d["tokens"] += tokens
        d["of"] += of
        d[action] = d.get(action, 0) + 1
