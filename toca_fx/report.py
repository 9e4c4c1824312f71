"""``explain`` and ``stats``: what the pass matched and what the caches did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import Refusal
from .runtime import live


@dataclass
class SiteReport:
    block_class: str
    name: str
    kind: str
    module: str
    token_axis: int
    tokens: int
    cached: bool
    token_wise: bool
    reason: str | None
    probe: str
    kv: str = "-"          # "yes": self_attention="partial-kv" can cache its keys/values; else why not
    refusal: Refusal | None = None        # code + message of ``reason``
    kv_refusal: Refusal | None = None     # code + message of ``kv`` when not "yes"


@dataclass
class EntryReport:
    block_class: str
    blocks: list[str]
    signature: str
    method: str | None
    status: str
    reason: str | None
    sites: list[SiteReport] = field(default_factory=list)
    refusal: Refusal | None = None        # code + message of ``reason``
    seconds: dict = field(default_factory=dict)
    variants: int = 0
    compiled: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    """What ``toca_fx.explain(model)`` returns; ``str()`` of it is a readable table.

    ``programs`` are the live ``BlockProgram``s (one per block class and input signature, in the
    order of ``entries``): their ``analysis.sites``, ``fresh`` and ``partials`` variant graphs (each
    with ``gm``, ``inputs`` / ``outputs`` binding slots and ``counts``), ``variant(actions, paired)``
    to build one, and ``stages`` (the pipeline's seconds / counts / refusals). That is the
    inspection seam tests and tools use instead of private attributes.
    """

    lists: list[dict]
    entries: list[EntryReport]
    notes: list[str]
    config: dict
    programs: list = field(default_factory=list)
    unchanged: dict = field(default_factory=dict)   # block -> Refusal (stage "live"): why it runs unchanged now
    captures: dict = field(default_factory=dict)    # kept / limit / evicted / recaptured (runtime/captures.py)

    @property
    def refusals(self) -> list[Refusal]:
        """Every refusal of every stage of every program, and why blocks run unchanged right now."""
        out = [r for p in self.programs for rec in p.stages.values() for r in rec.refusals]
        return out + list(self.unchanged.values())

    @property
    def sites(self) -> list[SiteReport]:
        return [s for e in self.entries for s in e.sites]

    def __str__(self) -> str:
        lines = ["toca_fx: " + ", ".join(f"{k}={v}" for k, v in self.config.items()
                                        if k in ("interval", "fresh_ratio", "ratio_schedule", "self_attention", "score", "compile"))]
        lines.append("block lists:")
        for bl in self.lists:
            status = f"REJECTED: {bl['rejected']}" if bl["rejected"] is not None else "transformed"
            lines.append(f"  {bl['name'] or '<root>'}: {bl['count']} x {bl['class']} ({status})")
        if not self.entries:
            lines.append("  (not captured yet: blocks are captured on the first forward call)")
        for e in self.entries:
            lines.append(f"block class {e.block_class} [{e.method or '-'}] for {len(e.blocks)} block(s), "
                         f"inputs {e.signature}: {e.status}" + (f" -- {e.reason}" if e.reason else ""))
            if e.seconds:
                secs = ", ".join(f"{k} {v:.2f}s" for k, v in e.seconds.items())
                lines.append(f"    {e.variants} variant graph(s)" + (f", {e.compiled} compiled" if e.compiled else "")
                             + f"; {secs}")
            if e.sites:
                lines.append(f"    {'site':<12} {'kind':<11} {'module':<14} {'axis':>4} {'tokens':>6}  cached  token-wise  note")
            for s in e.sites:
                note = s.reason or (f"probe {s.probe}" if s.probe != "not run" else "")
                if s.kv not in ("-", "yes"):
                    note += ("; " if note else "") + f"partial-kv: no ({s.kv})"
                lines.append(f"    {s.name:<12} {s.kind:<11} {s.module or '-':<14} {s.token_axis:>4} {s.tokens:>6}  "
                             f"{'yes' if s.cached else 'no':<6}  {'yes' if s.token_wise else 'no':<10}  {note}")
            for n in e.notes:
                lines.append(f"    note: {n}")
        if self.captures:
            c = self.captures
            lines.append(f"captures: {c['kept']} kept of at most {c['limit']} (max_captures); {c['evicted']} evicted, "
                         f"{c['recaptured']} captured again after eviction")
        for block, r in self.unchanged.items():
            lines.append(f"block {block!r} runs unchanged: {r.message}")
        for n in self.notes:
            lines.append(f"skipped: {n}")
        return "\n".join(lines)


def _sig_str(sig) -> str:
    tensors = [f"{tuple(k[1])}" for k in sig[1] if k[0] == "T"]
    return ", ".join(tensors)


def build_explanation(ctl) -> Explanation:
    lists = [dict(name=bl.name, count=len(bl), cls=bl.cls, **{"class": bl.cls.__name__},
                  rejected=str(bl.rejected) if bl.rejected is not None else None) for bl in ctl.lists]
    entries = []
    for key, p in ctl.programs.items():
        blocks = [rt.qualname for rt in ctl.blocks if key in rt.program_keys]
        rep = EntryReport(block_class=p.cls_name, blocks=blocks, signature=_sig_str(key[-1]),
                          method=p.capture.method if p.capture else None,
                          status="unchanged" if p.failed is not None else "rewritten",
                          reason=str(p.failed) if p.failed is not None else None, refusal=p.failed,
                          seconds={name: r.seconds for name, r in p.stages.items()}, variants=len(p.variants),
                          compiled=len(p.compiled),
                          notes=list(p.notes) + (list(p.analysis.notes) if p.analysis is not None else []))
        for s in p.sites:
            rep.sites.append(SiteReport(block_class=p.cls_name, name=s.name, kind=s.kind, module=s.module,
                                        token_axis=s.axes.token, tokens=s.n_tokens, cached=s.cacheable,
                                        token_wise=s.local, reason=s.reason, probe=s.probe,
                                        kv="yes" if s.kv is not None else (s.kv_refusal.message if s.kv_refusal is not None else "-"),
                                        refusal=s.refusal, kv_refusal=s.kv_refusal))
        entries.append(rep)
    unchanged = {}
    for rt in ctl.blocks:                  # a Refusal is falsy: compared with None, never chained with `or`
        r = live.unsupported(rt.module, rt, rt.wrapped)
        r = r if r is not None else rt.changing
        if r is not None:
            unchanged[rt.qualname] = r
    return Explanation(lists=lists, entries=entries, notes=list(ctl.discovery_notes), config=ctl.config.to_dict(),
                       programs=list(ctl.programs.values()), unchanged=unchanged,
                       captures=dict(kept=len(ctl.programs), limit=ctl.programs.limit, evicted=ctl.programs.evicted,
                                     recaptured=ctl.programs.recaptured))


@dataclass
class Stats:
    """What ``toca_fx.stats(model)`` returns; ``str()`` of it is a readable summary."""

    calls: dict
    blocks: dict
    sites: dict
    cache_bytes: int
    flops_original: int
    flops_actual: int
    generations: int
    flops_score: int = 0                           # of flops_actual: the score's attention maps on fresh calls
    records: dict = field(default_factory=dict)   # CallRecord (program, block, variant, ks) -> calls
    timestep_reads: int = 0                        # timestep tensors read on the host
    paired: bool | None = None                     # CFG halves detected in one batch (None: no call yet)
    branches: dict = field(default_factory=dict)   # CFG branch -> {"step": calls so far, "last_fresh": step}
    num_steps: int | None = None                   # calls per branch of the current generation, if known
    site_bytes: dict = field(default_factory=dict)  # "<block>.<site>" -> cache bytes, all CFG branches
    compiled_calls: int = 0                        # calls decided ahead and run whole-model compiled (replay.py)
    call_kinds: int = 0                            # kinds of call decided ahead so far (a compiled graph each)

    @property
    def flops_ratio(self) -> float:
        return self.flops_original / self.flops_actual if self.flops_actual else float("nan")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __str__(self) -> str:
        lines = [f"toca_fx stats: {self.calls.get('fresh', 0)} fresh / {self.calls.get('partial', 0)} partial model calls, "
                 f"{self.generations} generation(s)",
                 f"  transformer-block FLOPs: {self.flops_original / 1e9:.3f} G original -> {self.flops_actual / 1e9:.3f} G "
                 + (f"({self.flops_ratio:.2f}x)" if self.flops_actual else "(no block ran from a capture)"),
                 f"  of which the token score on fresh calls: {self.flops_score / 1e9:.3f} G "
                 f"({self.flops_score / max(self.flops_actual, 1):.1%})",
                 f"  cache memory: {self.cache_bytes / 2**20:.2f} MiB"]
        if self.compiled_calls:
            lines.append(f"  whole-model compiled calls: {self.compiled_calls}, {self.call_kinds} kind(s) of call")
        ran = {k: sum(b.get(k, 0) for b in self.blocks.values()) for k in ("fresh", "partial", "original")}
        lines.insert(1, f"  block calls: {ran['fresh']} fresh, {ran['partial']} partial, {ran['original']} unchanged "
                        "(toca_fx.explain says why a block runs unchanged)")
        w = max([len(n) for n in self.sites] + [4])
        lines.append(f"  {'site':<{w}} {'fresh':>6} {'partial':>7} {'reuse':>6} {'fcast':>6} {'full':>5} {'KiB':>8}  "
                     "tokens computed (all calls / partial calls)")
        for name, d in self.sites.items():
            frac = d["tokens"] / d["of"] if d["of"] else 0.0
            fresh_tokens = d.get("fresh", 0) * d.get("n", 0)
            p_of = d["of"] - fresh_tokens
            p_frac = (d["tokens"] - fresh_tokens) / p_of if p_of else 0.0
            lines.append(f"  {name:<{w}} {d.get('fresh', 0):>6} {d.get('partial', 0):>7} {d.get('reuse', 0):>6} "
                         f"{d.get('forecast', 0):>6} {d.get('full', 0):>5} {self.site_bytes.get(name, 0) / 1024:>8.1f}  "
                         f"{frac:6.1%} / {p_frac:6.1%}")
        return "\n".join(lines)


def build_stats(ctl) -> Stats:
    sites, blocks, site_bytes = {}, {}, {}
    cache = 0
    by_name = {rt.qualname: rt for rt in ctl.blocks}
    for rt in ctl.blocks:
        blocks[rt.qualname] = dict(rt.stats)
        for s, d in rt.site_stats.items():
            sites[f"{rt.qualname}.{s}"] = dict(d)
        cache += sum(st.nbytes() for st in rt.states.values())
        for st in rt.states.values():
            for s, n in st.site_nbytes().items():
                site_bytes[f"{rt.qualname}.{s}"] = site_bytes.get(f"{rt.qualname}.{s}", 0) + n
    f_orig, f_act, f_score = ctl.evicted_flops         # calls of programs evicted since (captures.py)
    flop_log = ctl.flop_log                            # folded from the blocks' tallies: once
    for rec, count in flop_log.items():
        o, a, sc = ctl.programs[rec.program].call_flops(by_name[rec.block].module, rec.variant, dict(rec.ks))
        f_orig, f_act, f_score = f_orig + count * o, f_act + count * a, f_score + count * sc
    return Stats(calls=dict(ctl.calls), blocks=blocks, sites=sites, cache_bytes=cache,
                 flops_original=f_orig, flops_actual=f_act, generations=ctl.generations, flops_score=f_score,
                 records=dict(flop_log), timestep_reads=ctl.timestep_reads, paired=ctl.paired,
                 branches={k: {"step": b.step, "last_fresh": b.last_fresh} for k, b in ctl.branches.items()},
                 num_steps=ctl.num_steps, site_bytes=site_bytes, compiled_calls=ctl.replayed,
                 call_kinds=len(ctl.kinds))
