"""Speed-quality benchmark on the bundled digit DiT: toca_fx vs diffusers' cache hooks vs cache-dit.

Usage::

    python benchmarks/bench.py                 # the full sweep (also: toca-fx bench)
    python benchmarks/bench.py --quick         # a few configurations, fewer images
    python benchmarks/bench.py --only 'fora|dbcache'

Every configuration samples the same labels from the same noise with the same DDIM scheduler, in one
process (``toca_fx.demo.sample``), and is compared with the uncached run: FLOPs ratio (whole model,
``FlopCounterMode``), wall-clock ratio (median of --repeats timed runs after a warm-up), PSNR / SSIM
against the uncached samples, Frechet distance to the real digits in the bundled classifier's
feature space, class agreement. Writes ``bench.json``, ``bench.md`` and ``pareto.png`` to --out.

cache-dit is optional (``pip install --no-deps cache-dit``: its declared dependencies would replace
the CPU torch); without it, its rows are recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import toca_fx  # noqa: E402
from toca_fx import demo  # noqa: E402
from toca_fx.cli import fora_at  # noqa: E402
from toca_fx.demo import quality  # noqa: E402
from toca_fx.demo.evaluate import compare, format_table, machine_info, measure  # noqa: E402


@dataclass
class Prepared:
    """A model ready to sample with one configuration, and how to undo it."""

    model: Any
    before_run: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    family: str
    params: dict
    prepare: Callable[[Any, int], Prepared]     # (base model, num_steps) -> Prepared


class HookedModel(torch.nn.Module):
    """What a pipeline would do around the model for diffusers' hooks: remember the current timestep (for a
    ``current_timestep_callback``), enter a ``cache_context`` for each call (diffusers' ``CacheMixin.cache_context``;
    ``DiTTransformer2DModel`` does not inherit ``CacheMixin``), and, for hooks that expect the CFG batch as
    [unconditional, conditional] (FasterCache), reorder ``toca_fx.demo.sample``'s [conditional, unconditional]."""

    def __init__(self, model, swap_cfg_halves: bool = False):
        super().__init__()
        self.model = model
        self.swap = swap_cfg_halves
        self.current_timestep = 1000

    @property
    def config(self):
        return self.model.config              # demo.sample reads the sample size from it

    def forward(self, hidden_states, timestep=None, class_labels=None):
        from diffusers.models.cache_utils import CacheMixin

        def swap(x):
            return torch.cat(x.chunk(2)[::-1]) if self.swap else x

        self.current_timestep = int(timestep.flatten()[0])
        with CacheMixin.cache_context(self.model, "inference"):
            out = self.model(swap(hidden_states), timestep=swap(timestep), class_labels=swap(class_labels))
        out.sample = swap(out.sample)
        return out


# -- toca_fx ------------------------------------------------------------------------------------------

def toca_method(name: str, family: str, config: toca_fx.ToCaConfig) -> Method:
    def prepare(base, steps):
        toca_fx.transform(base, config)
        return Prepared(base, teardown=lambda: toca_fx.remove(base), info=dict(config=config.to_dict()))

    return Method(name, family, {k: v for k, v in config.to_dict().items() if k in
                                 ("interval", "fresh_ratio", "ratio_schedule", "score", "self_attention")}, prepare)


def toca_methods(quick: bool) -> list[Method]:
    P = toca_fx.ToCaConfig.preset
    out = [toca_method("toca-digits", "toca_fx ToCa (presets)", P("toca-digits")),
           toca_method("toca-dit-ddim50", "toca_fx ToCa (presets)", P("toca-dit-ddim50"))]
    if quick:
        return out + [toca_method("fora N=2", "toca_fx FORA", P("fora", interval=2))]
    # Every step fresh: the cost of running the captured graphs instead of diffusers' eager blocks.
    out.append(toca_method("toca_fx N=1 (all fresh)", "toca_fx N=1", toca_fx.ToCaConfig(interval=1)))
    for n in (2, 3, 4, 5):
        for r in (0.1, 0.3):
            out.append(toca_method(f"toca N={n} r0={r}", "toca_fx ToCa (N, r0 sweep)",
                                   toca_fx.ToCaConfig(interval=n, fresh_ratio=r)))
    for n, r in ((3, 0.2), (4, 0.1), (3, 0.5)):
        out.append(toca_method(f"toca N={n} r0={r} partial attn", "toca_fx ToCa (N, r0 sweep)",
                               toca_fx.ToCaConfig(interval=n, fresh_ratio=r, self_attention="partial")))
    for n, r in ((3, 0.1), (3, 0.2), (3, 0.3), (4, 0.3)):
        out.append(toca_method(f"toca N={n} r0={r} partial-kv", "toca_fx ToCa partial-kv",
                               toca_fx.ToCaConfig(interval=n, fresh_ratio=r, self_attention="partial-kv")))
    # Partial steps that recompute the MLP of every token while self-attention is reused (ToCa's DiT module
    # choice at r = 1): what recomputing MLP tokens alone is worth against FORA's reuse of both.
    out.append(toca_method("toca N=3 r0=1.0 (MLP of all tokens, attention reused)", "toca_fx ToCa (N, r0 sweep)",
                           toca_fx.ToCaConfig(interval=3, fresh_ratio=1.0)))
    for n in (2, 3, 4, 5):
        out.append(toca_method(f"fora N={n}", "toca_fx FORA", P("fora", interval=n)))
    # forecasting (TaylorSeer per site, toca_fx's end-anchored grids, token-wise forecasting), DuCa, adaptive
    for name in ("taylorseer", "forecast-n4", "forecast-n6", "toca-taylor", "duca", "toca-adaptive"):
        out.append(toca_method(name, "toca_fx forecasting / DuCa / adaptive (presets)", P(name)))
    for n in (4, 5, 6, 7, 8):
        out.append(toca_method(f"forecast N={n} O=2 end", "toca_fx forecasting (N sweep)",
                               P("forecast-n4", interval=n)))
    # Warm-up and order around forecast-n4 (warm-up 3: one fresh call more at the start, one partial less)
    out.append(toca_method("forecast N=4 O=2 end warmup=3", "toca_fx forecasting (N sweep)",
                           P("forecast-n4", warmup=3)))
    out.append(toca_method("forecast N=4 O=3 end", "toca_fx forecasting (N sweep)", P("forecast-n4", forecast_order=3)))
    # Token-wise forecasting along the same N sweep: its curve against module-wise forecasting's at equal FLOPs.
    for n in (4, 6, 8):
        for r in (0.05, 0.1):
            out.append(toca_method(f"toca-taylor N={n} r0={r}", "toca_fx token-wise forecasting (N, r0 sweep)",
                                   P("toca-taylor", interval=n, fresh_ratio=r)))
    # Adaptive fresh calls: the threshold against the fixed grids (interval = the most calls between fresh ones).
    for n, thr in ((6, 0.2), (6, 0.5), (8, 0.3), (8, 0.5)):
        out.append(toca_method(f"toca-adaptive N<={n} thr={thr}", "toca_fx adaptive (threshold sweep)",
                               P("toca-adaptive", interval=n, adaptive_threshold=thr)))
    # Difference tables in bf16 (half their memory): what it costs the forecast.
    for name in ("forecast-n4", "forecast-n6"):
        out.append(toca_method(f"{name} cache_dtype=bfloat16", "toca_fx cache dtype",
                               P(name, cache_dtype="bfloat16")))
    base = P("toca-digits")
    # bf16 caches for the fp32 model (half the cache memory): the quality it costs
    out.append(toca_method("toca-digits cache_dtype=bfloat16", "toca_fx cache dtype", base.replace(cache_dtype="bfloat16")))
    for score in toca_fx.config.SCORES:
        if score not in (base.score, "forecast-error"):      # forecast-error: with forecasting only (below)
            out.append(toca_method(f"toca-digits score={score}", "toca_fx scores", base.replace(score=score)))
    return out


# -- diffusers' cache hooks ----------------------------------------------------------------------------

def diffusers_method(name: str, family: str, params: dict, make_config: Callable[..., Any],
                     calibrate: Callable[[Any, int], dict] | None = None, swap_cfg_halves: bool = False) -> Method:
    """A fresh copy of the model with one of diffusers' cache hooks applied (``apply_*`` on the module)."""

    def prepare(base, steps):
        from diffusers.hooks import HookRegistry

        model = copy.deepcopy(base)
        wrapped = HookedModel(model, swap_cfg_halves)
        extra = calibrate(model, steps) if calibrate is not None else {}
        cfg = make_config(wrapped, steps, **extra)
        _apply_diffusers_cache(model, cfg)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        return Prepared(wrapped, before_run=registry.reset_stateful_hooks,
                        info=dict(config=" ".join(repr(cfg).split())))

    return Method(name, family, params, prepare)


def _apply_diffusers_cache(model, cfg) -> None:
    from diffusers import hooks as H

    appliers = {"FirstBlockCacheConfig": H.apply_first_block_cache, "TaylorSeerCacheConfig": H.apply_taylorseer_cache,
                "PyramidAttentionBroadcastConfig": H.apply_pyramid_attention_broadcast,
                "FasterCacheConfig": H.apply_faster_cache, "MagCacheConfig": H.apply_mag_cache}
    appliers[type(cfg).__name__](model, cfg)


def _calibrate_mag(model, steps, labels, seed, guidance):
    """MagCache needs per-model magnitude ratios: one uncached run in diffusers' calibration mode, which prints
    them at the end of the loop (and does not keep them)."""
    import ast

    from diffusers import hooks as H

    calib = copy.deepcopy(model)
    H.apply_mag_cache(calib, H.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo.sample(HookedModel(calib), labels, num_steps=steps, seed=seed, guidance_scale=guidance)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return dict(mag_ratios=ast.literal_eval(lists[-1]))


def diffusers_methods(quick: bool, labels, seed, guidance) -> list[Method]:
    from diffusers import hooks as H

    out = []
    for thr in ((0.2,) if quick else (0.1, 0.2, 0.3, 0.5)):
        out.append(diffusers_method(f"FirstBlockCache thr={thr}", "diffusers FirstBlockCache", dict(threshold=thr),
                                    lambda p, s, thr=thr: H.FirstBlockCacheConfig(threshold=thr)))
    # TaylorSeer on the attention AND feed-forward outputs of every block (the paper's granularity; diffusers'
    # default identifiers forecast attention only and match nothing in DiTTransformer2DModel), orders 1 and 2.
    modules = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
    for n in ((4,) if quick else (3, 4, 5, 6, 7, 8)):
        for order in ((1,) if quick else (1, 2)):
            out.append(diffusers_method(
                f"TaylorSeerCache N={n} O={order}", "diffusers TaylorSeerCache", dict(cache_interval=n, max_order=order),
                lambda p, s, n=n, order=order: H.TaylorSeerCacheConfig(
                    cache_interval=n, disable_cache_before_step=3, max_order=order,
                    taylor_factors_dtype=torch.float32, cache_identifiers=modules)))
    for n in ((2,) if quick else (2, 3, 4)):
        out.append(diffusers_method(
            f"PAB spatial={n}", "diffusers PyramidAttentionBroadcast",
            dict(spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800)),
            lambda p, s, n=n: H.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: p.current_timestep)))
    for n in ((2,) if quick else (2, 3)):
        out.append(diffusers_method(
            f"FasterCache spatial={n}", "diffusers FasterCache",
            dict(spatial_attention_block_skip_range=n, unconditional_batch_skip_range=5),
            lambda p, s, n=n: H.FasterCacheConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 681),
                unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
                current_timestep_callback=lambda: p.current_timestep, tensor_format="BCHW",
                _unconditional_conditional_input_kwargs_identifiers=("hidden_states", "timestep", "class_labels")),
            swap_cfg_halves=True))
    calibrate = lambda m, s: _calibrate_mag(m, s, labels, seed, guidance)  # noqa: E731
    for thr in ((0.06,) if quick else (0.03, 0.06, 0.12, 0.24)):
        out.append(diffusers_method(
            f"MagCache thr={thr}", "diffusers MagCache", dict(threshold=thr, max_skip_steps=3, retention_ratio=0.2),
            lambda p, s, thr=thr, mag_ratios=None: H.MagCacheConfig(
                threshold=thr, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=s, mag_ratios=mag_ratios),
            calibrate=calibrate))
    return out


# What diffusers 0.42 ships and this benchmark does not run, with the reason (checked on this model).
NOT_APPLICABLE = [
    dict(name="SeaCache", family="diffusers SeaCache", params={},
         reason="needs per-call scheduler metadata with a flow-matching sigma in [0, 1] "
                "(cache_context(step_index=, sigma=, num_inference_steps=)) and video latents (C, T, H, W) from a "
                "raw_vision_callback; diffusers has adapters only for Cosmos3 and Wan T2V. On this DDIM model it "
                "runs fail-open (logs a warning, caches nothing)."),
    dict(name="TextKVCache", family="diffusers TextKVCache", params={},
         reason="caches the text keys/values of cross-attention (exact); the class-conditional DiT has no text "
                "encoder states and no cross-attention."),
]


# -- cache-dit ---------------------------------------------------------------------------------------

def cache_dit_methods(quick: bool) -> list[Method]:
    def method(name, family, params, taylorseer):
        def prepare(base, steps):
            import cache_dit
            from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

            _cache_dit_block_indexing()
            model = copy.deepcopy(base)
            adapter = BlockAdapter(transformer=model, blocks=model.transformer_blocks,
                                   forward_pattern=ForwardPattern.Pattern_3, has_separate_cfg=False)
            cal = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
            cfg = DBCacheConfig(num_inference_steps=steps, **params)
            with _quiet():
                cache_dit.enable_cache(adapter, cache_config=cfg, calibrator_config=cal)
            return Prepared(model, before_run=None, info=dict(config=repr(cfg)))

        return Method(name, family, params, prepare)

    out = []
    grid = [(1, 0, 0.2)] if quick else [(1, 0, 0.1), (1, 0, 0.2), (1, 0, 0.4), (1, 0, 0.8)]
    for fn, bn, thr in grid:
        params = dict(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=thr,
                      max_warmup_steps=4, max_continuous_cached_steps=3)
        out.append(method(f"DBCache F{fn}B{bn} thr={thr}", "cache-dit DBCache", params, False))
        out.append(method(f"DBCache+TaylorSeer F{fn}B{bn} thr={thr}", "cache-dit DBCache+TaylorSeer", params, True))
    return out


def _cache_dit_block_indexing() -> None:
    """DiTTransformer2DModel.forward reads ``self.transformer_blocks[0].norm1.emb`` after its block loop (the final
    adaLN reuses block 0's embedder), while cache-dit has swapped ``transformer_blocks`` for a list holding its
    ``CachedBlocks`` wrapper. Let the wrapper answer ``norm1`` with its first block's (the only change made to
    cache-dit; what it caches and skips is untouched)."""
    from cache_dit.caching.cache_blocks.pattern_base import CachedBlocks_Pattern_Base

    if not hasattr(CachedBlocks_Pattern_Base, "norm1"):
        CachedBlocks_Pattern_Base.norm1 = property(lambda self: self.transformer_blocks[0].norm1)


@contextlib.contextmanager
def _quiet():
    """Silence third-party loggers and prints during setup."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# -- the run ---------------------------------------------------------------------------------------

def fd_floor(n: int, classifier, draws: int = 10) -> dict:
    """Frechet distance of n random real digits to all 1797, over ``draws`` draws: what a perfect sampler scores
    at n samples, and how much the distance moves from sampling alone."""
    images, _ = demo.real_digits(classifier.config.get("image_size", demo.IMAGE_SIZE))
    every = quality.features(images, classifier)
    values = [quality.frechet_distance(every[torch.randperm(len(images), generator=torch.Generator().manual_seed(s))[:n]],
                                       every) for s in range(draws)]
    return dict(n=n, draws=draws, mean=sum(values) / draws, min=min(values), max=max(values))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model = demo.load_model(args.weights)
    classifier = demo.load_classifier(args.weights)
    labels = torch.arange(args.images) % demo.NUM_CLASSES
    kw = dict(num_steps=args.steps, seed=args.seed, guidance_scale=args.guidance, repeats=args.repeats,
              progress=not args.no_progress)

    methods = toca_methods(args.quick) + diffusers_methods(args.quick, labels, args.seed, args.guidance) \
        + cache_dit_methods(args.quick)
    if args.only:
        methods = [m for m in methods if re.search(args.only, m.name, re.I) or re.search(args.only, m.family, re.I)]
    t0 = time.perf_counter()
    base = measure(model, labels, "uncached", **kw)
    base.info.update(family="uncached", params={})
    runs, skipped = [base], list(NOT_APPLICABLE)
    for i, m in enumerate(methods):
        print(f"[{i + 1}/{len(methods)}] {m.name}", file=sys.stderr, flush=True)
        prepared = None
        try:
            prepared = m.prepare(model, args.steps)
            r = measure(prepared.model, labels, m.name, before_run=prepared.before_run, **kw)
            r.info.update(family=m.family, params=m.params, **prepared.info)
            runs.append(r)
        except Exception as e:  # a method that does not apply here is recorded, not fatal
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            if args.verbose:
                traceback.print_exc()
            skipped.append(dict(name=m.name, family=m.family, params=m.params, reason=reason))
            print(f"  skipped: {reason}", file=sys.stderr)
        finally:
            if prepared is not None and prepared.teardown is not None:
                prepared.teardown()
            elif toca_fx.is_transformed(model):
                toca_fx.remove(model)
    # The uncached baseline again at the end: its wall time is the median over both sets of timed runs,
    # and the drift between them (another process, thermal state) is recorded.
    first = list(base.wall_times)
    again = measure(model, labels, "uncached (again)", flops=False, **kw)
    base.wall_times = first + again.wall_times
    rows = compare(runs, labels, classifier)
    return dict(uncached_wall_s=dict(first=first, last=again.wall_times,
                                     drift=statistics.median(again.wall_times) / statistics.median(first) - 1.0),
                settings=dict(steps=args.steps, images=args.images, seed=args.seed, guidance=args.guidance,
                              weights=None if args.weights is None else str(args.weights),
                              repeats=args.repeats, threads=args.threads, quick=args.quick, only=args.only),
                machine=machine_info(), seconds=time.perf_counter() - t0,
                fd_real_digits=fd_floor(args.images, classifier),
                results=rows, skipped=skipped)


def merge(shards: list[dict]) -> dict:
    """One report from shards (runs of ``--only``, e.g. one per core; each times its own uncached baseline, so
    every wall ratio is still against an uncached run of the same process): the first shard's uncached row,
    then every shard's other rows in order; settings must agree except ``only``."""
    keys = ("steps", "images", "seed", "guidance", "repeats", "threads", "weights")
    first = shards[0]
    for s in shards[1:]:
        if any(s["settings"].get(k) != first["settings"].get(k) for k in keys):
            raise SystemExit(f"bench --merge: shards differ in settings {keys}")
    rows = [first["results"][0]] + [r for s in shards for r in s["results"] if r["family"] != "uncached"]
    skipped = list({json.dumps(k, sort_keys=True): k for s in shards for k in s["skipped"]}.values())
    walls = [s["uncached_wall_s"] for s in shards]
    return dict(first, results=rows, skipped=skipped, seconds=max(s["seconds"] for s in shards),
                settings=dict(first["settings"], only=[s["settings"]["only"] for s in shards]),
                uncached_wall_s=dict(first=[t for w in walls for t in w["first"]], last=[t for w in walls for t in w["last"]],
                                     drift=statistics.median([w["drift"] for w in walls]), shards=walls))


def versus_fora(row: dict, rows: list[dict]) -> dict | None:
    """PSNR and FD of a row minus FORA's at the same FLOPs ratio (interpolated between the FORA runs around it);
    None outside FORA's range or for FORA itself."""
    fora = [r for r in rows if r["family"] == "toca_fx FORA"]
    if row["family"] in ("toca_fx FORA", "uncached") or not fora:
        return None
    lo, hi = min(r["flops_ratio"] for r in fora), max(r["flops_ratio"] for r in fora)
    if not lo <= row["flops_ratio"] <= hi:
        return None
    f = fora_at(row["flops_ratio"], fora)
    return dict(psnr=row["psnr"] - f["psnr"], frechet_distance=row["frechet_distance"] - f["frechet_distance"])


def markdown(report: dict) -> str:
    s = report["settings"]
    rows = report["results"]
    lines = [f"DDIM {s['steps']} steps, CFG {s['guidance']}, {s['images']} images (classes 0-9), seed {s['seed']}, "
             f"{s['threads']} thread(s), wall time the median of {s['repeats']} run(s) after a warm-up; "
             f"{report['machine']['cpu']} ({report['machine']['cores']} cores), torch {report['machine']['torch']}, "
             f"diffusers {report['machine']['diffusers']}."
             + (f" Model: `{s['weights']}` (not the bundled one)." if s.get("weights") else ""), "",
             "| family | config | FLOPs ratio | wall ratio | PSNR dB | SSIM | FD | class agr. | PSNR - FORA's | FD - FORA's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.2f}"
        v = versus_fora(r, rows)
        vs = "| - | - |" if v is None else f"| {v['psnr']:+.2f} | {v['frechet_distance']:+.1f} |"
        lines.append(f"| {r['family']} | {r['name']} | {r['flops_ratio']:.2f}x | {r['wall_ratio']:.2f}x | {psnr} | "
                     f"{r['ssim']:.5f} | {r['frechet_distance']:.1f} | {r['class_agreement']:.2f} {vs}")
    lines += ["", "Best at a FLOPs ratio of at least 3x / 4x (highest PSNR of each side; SSIM of the same row):", "",
              *frontier_lines([report])]
    u = report.get("uncached_wall_s")
    secs = lambda ts: ", ".join(f"{t:.1f}" for t in ts)  # noqa: E731
    if u and u.get("shards"):
        lines += ["", f"Run as {len(u['shards'])} shards (`--only` {', '.join(repr(o) if o else '(all)' for o in s['only'])}, "
                  "joined with `--merge`); each shard times its own uncached baseline, so a wall ratio compares "
                  "runs of one process: " + "; ".join(
                      f"shard {i + 1} uncached {secs(w['first'])} s before, {secs(w['last'])} s after "
                      f"(drift {w['drift']:+.1%})" for i, w in enumerate(u["shards"])) + "."]
    elif u:
        lines += ["", f"Uncached wall time, timed before all configurations: {secs(u['first'])} s; after all of them: "
                  f"{secs(u['last'])} s (drift {u['drift']:+.1%}); the wall ratios use the median of both."]
    f = report["fd_real_digits"]
    lines += ["", "PSNR / FD - FORA's: the row minus FORA's value at the same FLOPs ratio, linear between the two FORA "
              "runs around it (positive PSNR / negative FD: ahead of FORA); '-' outside FORA's range.",
              "", f"FD of {f['n']} random real digits to all 1797 (what a perfect sampler scores at this count), "
              f"{f['draws']} draws: mean {f['mean']:.1f}, min {f['min']:.1f}, max {f['max']:.1f}."]
    if report["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k['name']} ({k['family']}): {k['reason']}" for k in report["skipped"]]
    return "\n".join(lines) + "\n"


FRONTIER_AT = (3.0, 4.0)


def is_toca_fx(row: dict) -> bool:
    return row["family"].startswith("toca_fx")


def best_at(rows: list[dict], at: float, side) -> dict | None:
    """The row of ``side`` (a predicate) with the highest PSNR among those at a FLOPs ratio >= ``at``."""
    pts = [r for r in rows if side(r) and r["psnr"] is not None and r["flops_ratio"] >= at]
    return max(pts, key=lambda r: r["psnr"], default=None)


def frontier_lines(reports: list[dict]) -> list[str]:
    """A table, one row per (seed, FLOPs threshold): toca_fx's best configuration against the best anchor
    (every diffusers / cache-dit method), on PSNR and on SSIM, and whether toca_fx is ahead on both."""
    lines = ["| seed | at | toca_fx best | FLOPs | PSNR dB | SSIM | best anchor | FLOPs | PSNR dB | SSIM | ahead on both |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    anchor = lambda r: r["family"].startswith(("diffusers", "cache-dit"))  # noqa: E731
    for rep in reports:
        rows = rep["results"]
        for at in FRONTIER_AT:
            ours, theirs = best_at(rows, at, is_toca_fx), best_at(rows, at, anchor)
            if ours is None:
                continue
            # SSIM of the anchors: their best SSIM at this ratio, which need not be the best-PSNR row.
            their_ssim = max((r["ssim"] for r in rows if anchor(r) and r["flops_ratio"] >= at), default=None)
            cell = lambda r: "none | - | - | -" if r is None else (  # noqa: E731
                f"{r['family']}: {r['name']} | {r['flops_ratio']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.5f}")
            ahead = theirs is None or (ours["psnr"] > theirs["psnr"] and ours["ssim"] > their_ssim)
            lines.append(f"| {rep['settings']['seed']} | >= {at:g}x | {cell(ours)} | {cell(theirs)} | "
                         f"{'yes' if ahead else 'no'} |")
    return lines


FAMILY_STYLE = {
    "uncached": ("*", "black"),
    "toca_fx ToCa (presets)": ("o", "C3"),
    "toca_fx ToCa (N, r0 sweep)": ("o", "C1"),
    "toca_fx ToCa partial-kv": ("d", "C1"),
    "toca_fx FORA": ("s", "C0"),
    "toca_fx scores": ("P", "C5"),
    "toca_fx cache dtype": ("*", "C5"),
    "toca_fx N=1": ("+", "gray"),
    "toca_fx forecasting / DuCa / adaptive (presets)": ("*", "C3"),
    "toca_fx forecasting (N sweep)": ("p", "C3"),
    "toca_fx token-wise forecasting (N, r0 sweep)": ("h", "C1"),
    "toca_fx adaptive (threshold sweep)": ("8", "C5"),
    "diffusers FirstBlockCache": ("^", "C2"),
    "diffusers TaylorSeerCache": ("v", "C4"),
    "diffusers PyramidAttentionBroadcast": ("<", "C6"),
    "diffusers FasterCache": (">", "C7"),
    "diffusers MagCache": ("D", "C8"),
    "cache-dit DBCache": ("X", "C9"),
    "cache-dit DBCache+TaylorSeer": ("h", "olive"),
}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    rows = report["results"]
    for fam in dict.fromkeys(r["family"] for r in rows):
        pts = [r for r in rows if r["family"] == fam]
        marker, color = FAMILY_STYLE.get(fam, ("o", None))
        axes[0].scatter([r["flops_ratio"] for r in pts], [r["frechet_distance"] for r in pts], marker=marker,
                        color=color, label=fam, s=45, alpha=0.85)
        pts = [r for r in pts if r["psnr"] is not None]
        axes[1].scatter([r["flops_ratio"] for r in pts], [min(r["psnr"], 60) for r in pts], marker=marker,
                        color=color, label=fam, s=45, alpha=0.85)
    for r in rows:
        if r["family"] in ("toca_fx ToCa (presets)", "toca_fx forecasting / DuCa / adaptive (presets)"):
            axes[0].annotate(r["name"], (r["flops_ratio"], r["frechet_distance"]), fontsize=7, xytext=(4, 4),
                             textcoords="offset points")
            axes[1].annotate(r["name"], (r["flops_ratio"], r["psnr"]), fontsize=7, xytext=(4, 4),
                             textcoords="offset points")
    f = report["fd_real_digits"]
    axes[0].axhspan(f["min"], f["max"], color="gray", alpha=0.12, label=f"{f['n']} real digits ({f['draws']} draws)")
    axes[0].axhline(f["mean"], color="gray", lw=0.8, ls="--")
    fds = [r["frechet_distance"] for r in rows]
    pad = 0.15 * (max(fds) - min(fds) + 1e-9)
    axes[0].set_ylim(min(fds) - pad, max(fds) + pad)     # the real-digit band (FD noise at this count) is wider
    axes[0].set(xlabel="FLOPs ratio (uncached / method)", ylabel="Frechet distance to real digits (lower is better)",
                title=f"FLOPs ratio vs Frechet distance (band: {f['n']} real digits, {f['min']:.0f}-{f['max']:.0f})")
    axes[1].set(xlabel="FLOPs ratio (uncached / method)", ylabel="PSNR vs uncached, dB (higher is better)",
                title="FLOPs ratio vs PSNR")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="toca-fx bench", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=demo.DEFAULT_GUIDANCE)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--weights", type=Path, default=None,
                    help="a directory written by toca_fx.demo.train (default: the bundled model)")
    ap.add_argument("--only", help="regular expression: run only matching configuration names / families")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of skipped configurations")
    ap.add_argument("--replot", action="store_true", help="no runs: rewrite bench.md and pareto.png from bench.json")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="no runs: join the bench.json of shards (runs of --only on separate cores) into --out")
    ap.add_argument("--frontier", type=Path, nargs="+", metavar="DIR",
                    help="no runs: the best-at-3x/4x table over the bench.json of several runs (e.g. one per seed), "
                         "written to --out/frontier.md")
    args = ap.parse_args(argv)
    if args.frontier:
        text = "\n".join(frontier_lines([json.loads((d / "bench.json").read_text()) for d in args.frontier])) + "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "frontier.md").write_text(text)
        print(text)
        return 0
    torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        report = merge([json.loads((d / "bench.json").read_text()) for d in args.merge])
    elif args.replot:
        report = json.loads((args.out / "bench.json").read_text())
        report.pop("fd_real_digits_floor", None)
        report["skipped"] += [k for k in NOT_APPLICABLE if k not in report["skipped"]]
        report.setdefault("fd_real_digits", fd_floor(report["settings"]["images"],
                                                     demo.load_classifier(report["settings"].get("weights"))))
    else:
        report = run(args)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    plot(report, args.out / "pareto.png")
    print(format_table(report["results"]))
    print(f"\nwrote {args.out / 'bench.json'}, bench.md, pareto.png ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
