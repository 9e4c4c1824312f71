"""Host time per transformer block, toca_fx against the original and diffusers' caches (CPU).

Usage:
  python benchmarks/host_overhead.py [--calls 40] [--rounds 7] [--layers 28] [--no-compile] [--json out.json]

The model is diffusers' ``DiTTransformer2DModel`` with 28 blocks of width 64 (2 heads of 32) on a
4x4 latent with patch 2 (4 tokens), batch 2 (one-batch CFG): the compute is negligible, so what is
measured is the host's work per block call, which on a GPU is what decides whether a FLOPs saving
becomes a wall-clock one (a DiT-XL/2 block is 40-150 us of H100 time).

Every configuration runs ``--calls`` model calls per round, inside one long generation, so the
steady state is measured (captures and the first fresh call happen in the warm-up); rounds
alternate the configurations side by side and the median over rounds is reported, as thread CPU
time (``time.thread_time_ns``: other processes do not count) per call, less the time of the same
model with blocks that do nothing (its embedding and final layer), divided by the number of blocks.

Rows: the original; toca_fx with every call fresh (interval 1), with ToCa's score (its fresh calls
also compute the attention map for s1: extra graph ops, not bookkeeping) and with the staleness
score (nothing extra computed, so the difference is toca_fx's own host work); ToCa partial calls (fresh_ratio 0.5,
attention reused); FORA reuse calls (fresh_ratio 0); with --compile also the original with every
block compiled (``Module.compile()``) against toca_fx ``compile=True`` partial calls, and the original
against toca_fx partial calls with the whole model ``torch.compile(fullgraph=True)``'d after three
eager calls (calls decided ahead: ``runtime/replay.py``; the model's own work subtracted compiled the
same way); diffusers
FirstBlockCache computing every call (threshold 0) and skipping (threshold 1e9), TaylorSeerCache
forecasting. The column "vs original" is the difference to the original's block, in microseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

import diffusers
import toca_fx


def build(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                           num_layers=layers, sample_size=4, patch_size=2,
                                           num_embeds_ada_norm=1000).eval()


class Runner:
    """One configuration: a model and how a round of calls runs on it."""

    def __init__(self, name: str, model, toca: bool = False, hooks=None, whole: bool = False):
        self.name, self.model, self.toca, self.hooks, self.whole = name, model, toca, hooks, whole
        self.handle = model                    # what is called: the model, or it torch.compile'd whole
        self.t = 999.0
        self.samples: list[float] = []
        self._gen = None
        if toca:
            self._gen = toca_fx.generation(model, num_steps=10 ** 6)
            self._gen.__enter__()

    def call(self, x, y):
        self.t -= 1e-3                      # always falling: one generation, one branch
        ts = torch.full((x.shape[0],), self.t)
        if self.hooks is not None:             # diffusers' cache hooks need a cache context
            from diffusers.models.cache_utils import CacheMixin
            with CacheMixin.cache_context(self.model, "cfg"):
                return self.handle(x, timestep=ts, class_labels=y).sample
        return self.handle(x, timestep=ts, class_labels=y).sample

    def close(self):
        if self._gen is not None:
            self._gen.__exit__(None, None, None)


class _Skip(torch.nn.Module):
    """A block that does nothing (keeps ``norm1``: DiT's final layer reads block 0's embedding)."""

    def __init__(self, norm1):
        super().__init__()
        self.norm1 = norm1

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _diffusers_hook(model, kind: str):
    from diffusers import hooks as H

    if kind == "fbc-compute":
        H.apply_first_block_cache(model, H.FirstBlockCacheConfig(threshold=0.0))
    elif kind == "fbc-skip":
        H.apply_first_block_cache(model, H.FirstBlockCacheConfig(threshold=1e9))
    elif kind == "taylorseer":
        H.apply_taylorseer_cache(model, H.TaylorSeerCacheConfig(
            cache_interval=10 ** 6, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]))
    return H.HookRegistry.check_if_exists_or_initialize(model)


def runners(layers: int, compile_: bool) -> list[Runner]:
    base = build(layers)
    shell = copy.deepcopy(base)
    shell.transformer_blocks = torch.nn.ModuleList(_Skip(b.norm1) for b in shell.transformer_blocks)
    out = [Runner("no blocks (the model's own work)", shell), Runner("original", copy.deepcopy(base))]
    out.append(Runner("toca_fx fresh (interval 1)", toca_fx.transform(copy.deepcopy(base), interval=1), toca=True))
    out.append(Runner("toca_fx fresh, staleness score (no attention map)", toca_fx.transform(
        copy.deepcopy(base), interval=1, score="staleness"), toca=True))
    out.append(Runner("toca_fx partial (ToCa, r0 0.5)", toca_fx.transform(
        copy.deepcopy(base), interval=10 ** 6, fresh_ratio=0.5), toca=True))
    out.append(Runner("toca_fx reuse (FORA)", toca_fx.transform(copy.deepcopy(base), interval=10 ** 6, fresh_ratio=0.0),
                      toca=True))
    if compile_:
        orig_c = copy.deepcopy(base)
        for b in orig_c.transformer_blocks:
            b.compile()
        out.append(Runner("original, blocks compiled", orig_c))
        out.append(Runner("toca_fx partial, compile=True", toca_fx.transform(
            copy.deepcopy(base), interval=10 ** 6, fresh_ratio=0.5, compile=True), toca=True))
        # whole-model torch.compile(fullgraph=True): toca_fx's calls decided ahead (runtime/replay.py)
        out.append(Runner("no blocks, whole-model compiled", copy.deepcopy(shell), whole=True))
        out.append(Runner("original, whole-model compiled", copy.deepcopy(base), whole=True))
        out.append(Runner("toca_fx partial, whole-model compiled", toca_fx.transform(
            copy.deepcopy(base), interval=10 ** 6, fresh_ratio=0.5), toca=True, whole=True))
    for kind, name in (("fbc-compute", "diffusers FirstBlockCache, computing"),
                       ("fbc-skip", "diffusers FirstBlockCache, skipping"),
                       ("taylorseer", "diffusers TaylorSeerCache, forecasting")):
        m = copy.deepcopy(base)
        out.append(Runner(name, m, hooks=_diffusers_hook(m, kind)))
    return out


def measure(layers=28, calls=40, rounds=7, compile_=True) -> dict:
    torch.set_num_threads(1)
    x = torch.randn(1, 4, 4, 4).repeat(2, 1, 1, 1)       # one-batch CFG: the halves are the same latents
    y = torch.tensor([1, 1000])
    rs = runners(layers, compile_)
    with torch.no_grad():
        for r in rs:                                       # warm-up: captures, compilation, the first fresh call
            for i in range(6):
                if r.whole and i == 3:                     # toca_fx: compiled after eager calls of the layout
                    r.handle = torch.compile(r.model, fullgraph=True)
                r.call(x, y)
        for _ in range(rounds):
            for r in rs:
                t0 = time.thread_time_ns()
                for _ in range(calls):
                    r.call(x, y)
                r.samples.append((time.thread_time_ns() - t0) / 1e3 / calls / layers)
    for r in rs:
        r.close()
    per_block = {r.name: statistics.median(r.samples) for r in rs}
    # per block: what the model's call costs beyond the same model without blocks (embedding, final layer)
    shell = per_block.pop("no blocks (the model's own work)")
    shell_c = per_block.pop("no blocks, whole-model compiled", None)
    per_block = {n: v - (shell_c if "whole-model" in n else shell) for n, v in per_block.items()}
    base = per_block["original"]
    rows = [dict(config=n, us_per_block=round(v, 1), vs_original_us=round(v - base, 1),
                 of_original=round(v / base, 3)) for n, v in per_block.items()]
    if compile_:
        cb = per_block["original, blocks compiled"]
        for row in rows:
            row["of_original_compiled"] = round(per_block[row["config"]] / cb, 3)
        wb = per_block["original, whole-model compiled"]
        for row in rows:
            if "whole-model" in row["config"]:
                row["of_original_whole"] = round(per_block[row["config"]] / wb, 3)
    ctl_stats = {r.name: dict(toca_fx.stats(r.model).calls, compiled=toca_fx.stats(r.model).compiled_calls)
                 for r in rs if r.toca}
    return dict(shell_us_per_call=round(shell * layers, 1), machine=f"{platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
                        f"diffusers {diffusers.__version__}, 1 thread",
                layers=layers, calls=calls, rounds=rounds, rows=rows, toca_calls=ctl_stats)


def watch_cost(layers=28, calls=3000, rounds=7) -> dict:
    """Thread CPU time of one live-model check (``runtime/live.py`` ``Watch.changed``) on one block."""
    from toca_fx.runtime.live import Watch

    torch.set_num_threads(1)
    block = build(layers).transformer_blocks[0]
    w = Watch(list(block.modules()))
    w.arm()
    samples = []
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            w.changed()
        samples.append((time.thread_time_ns() - t0) / 1e3 / calls)
    return dict(us_per_check=round(statistics.median(samples), 2), dicts=len(w.dicts))


def table(res: dict) -> str:
    lines = [f"host time per block call ({res['layers']} blocks, width 64, 4 tokens, batch 2; median of "
             f"{res['rounds']} rounds x {res['calls']} calls; thread CPU time) on {res['machine']}",
             "| configuration | us per block | vs original (us) | of original |",
             "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['us_per_block']:.1f} | {r['vs_original_us']:+.1f} | {r['of_original']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--watch-only", action="store_true", help="only the live-model check's cost per block call")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    watch = watch_cost(a.layers)
    print(f"live-model watch: {watch['us_per_check']} us per block call ({watch['dicts']} dicts read)")
    if a.watch_only:
        return
    res = measure(a.layers, a.calls, a.rounds, not a.no_compile)
    res["watch"] = watch
    print(table(res))
    print("toca_fx model calls:", res["toca_calls"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
