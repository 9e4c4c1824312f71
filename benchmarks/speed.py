"""Wall-clock speed of toca_fx against the original model, side by side in one process.

Usage:
  python benchmarks/speed.py --shape dit-xl --steps 50 [--layers 28] [--device cpu|cuda]
         [--dtype float32|bfloat16] [--compile] [--repeats 3] [--json out.json]

Shapes (random weights; speed does not depend on the weights):
  dit-xl     DiT-XL/2: 28 blocks, width 1152, 16 heads, 32x32 latent, patch 2 (256 tokens), batch 2 (CFG),
             DDIM with `toca-dit-ddim50`
  pixart-xl  PixArt-alpha: 28 blocks, width 1152, 256 image tokens, 120 text tokens, CFG, `toca-pixart`
  dit-s      a small DiT (12 blocks, width 384, 64 tokens) for quick checks

For each configuration: one warm-up generation (compilation included, timed separately), then the
median of --repeats generations; FLOPs of one generation with FlopCounterMode; the wall ratio
and how close it comes to the FLOPs ratio; the time split of one partial call (select / gather /
scatter vs everything else) from torch.profiler; the transform time (capture + analysis + rewrite).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import diffusers
import toca_fx

SHAPES = {
    "dit-xl": dict(kind="dit", layers=28, heads=16, head_dim=72, sample=32, preset="toca-dit-ddim50"),
    "pixart-xl": dict(kind="pixart", layers=28, heads=16, head_dim=72, sample=32, text=120, preset="toca-pixart"),
    "dit-s": dict(kind="dit", layers=12, heads=6, head_dim=64, sample=16, preset="toca-dit-ddim50"),
}


def build(shape, layers, device, dtype):
    torch.manual_seed(0)
    if shape["kind"] == "dit":
        m = diffusers.DiTTransformer2DModel(num_attention_heads=shape["heads"], attention_head_dim=shape["head_dim"],
                                            in_channels=4, out_channels=8, num_layers=layers,
                                            sample_size=shape["sample"], patch_size=2, num_embeds_ada_norm=1000)
    else:
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=shape["heads"], attention_head_dim=shape["head_dim"],
                                               in_channels=4, out_channels=8, num_layers=layers,
                                               sample_size=shape["sample"], patch_size=2,
                                               cross_attention_dim=shape["heads"] * shape["head_dim"],
                                               caption_channels=64, norm_type="ada_norm_single",
                                               use_additional_conditions=False)
    return m.eval().to(device=device, dtype=dtype)


def sampler(shape, steps, device, dtype):
    """A sampling loop with CFG in one batch (as DiTPipeline / PixArtAlphaPipeline), fixed noise."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, shape["sample"], shape["sample"], generator=g).to(device, dtype)
    if shape["kind"] == "dit":
        cond = dict(class_labels=torch.tensor([1, 1000], device=device))
    else:
        emb = torch.randn(1, shape["text"], 64, generator=g).to(device, dtype)
        cond = dict(encoder_hidden_states=torch.cat([emb, torch.zeros_like(emb)]),
                    encoder_attention_mask=torch.ones(2, shape["text"], device=device),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def run(model):
        sch.set_timesteps(steps)
        x = x0.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                out = model(torch.cat([x, x]), timestep=torch.full((2,), int(t), device=device), **cond).sample
                e_c, e_u = out[:, :4].chunk(2)
                x = sch.step(e_u + 4.0 * (e_c - e_u), t, x).prev_sample
        return x
    return run


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dit-xl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    layers = args.layers or shape["layers"]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    preset = args.preset or shape["preset"]
    run = sampler(shape, args.steps, args.device, dtype)

    original = build(shape, layers, args.device, dtype)
    cached = copy.deepcopy(original)
    if args.compile:
        original = torch.compile(original)
    toca_fx.transform(cached, preset, compile=args.compile)

    def gen_cached():
        with toca_fx.generation(cached, num_steps=args.steps):
            return run(cached)

    result = dict(shape=args.shape, layers=layers, steps=args.steps, device=args.device, dtype=str(dtype),
                  compile=args.compile, preset=preset, machine=machine(args.device), torch=torch.__version__)
    # FLOPs first (eager, so the counter sees the ATen ops)
    with FlopCounterMode(display=False) as fc:
        run(original if not args.compile else original._orig_mod)
    f0 = fc.get_total_flops()
    warm_c, _ = timed(gen_cached, args.device)             # captures, analysis, rewrite (+ compile)
    toca_fx.reset(cached, stats=True)
    if not args.compile:
        with FlopCounterMode(display=False) as fc:
            gen_cached()
        f1 = fc.get_total_flops()
    else:
        f1 = None
    stats = toca_fx.stats(cached)
    f1 = f1 if f1 is not None else stats.flops_actual + (f0 - stats.flops_original)
    warm_o, _ = timed(lambda: run(original), args.device)
    t_orig, t_toca = [], []
    for _ in range(args.repeats):                          # interleaved: drifts hit both alike
        t_orig.append(timed(lambda: run(original), args.device)[0])
        t_toca.append(timed(gen_cached, args.device)[0])
    ctl = cached._toca_fx
    entries = [e for e in ctl.entries.values() if not e.failed]
    transform_s = sum(sum(v for k, v in e.seconds.items() if k in ("capture", "analysis", "rewrite")) for e in entries)
    flops_ratio = f0 / f1
    wall_ratio = statistics.median(t_orig) / statistics.median(t_toca)
    result.update(
        flops_original=f0, flops_toca=f1, flops_ratio=flops_ratio,
        seconds_original=statistics.median(t_orig), seconds_toca=statistics.median(t_toca),
        wall_ratio=wall_ratio, wall_over_flops=wall_ratio / flops_ratio,
        warmup_seconds_original=warm_o, warmup_seconds_toca=warm_c, transform_seconds=transform_s,
        variants=sum(1 + len(e.partials) for e in entries), compiled_variants=sum(len(e.compiled) for e in entries),
        cache_bytes=toca_fx.stats(cached).cache_bytes, calls=dict(stats.calls),
    )
    result["partial_call_profile"] = profile_overhead(cached, shape, args, dtype)
    if args.device == "cuda":
        result.update(peak_memory=peak_memory(original, gen_cached, run, args.device))
    print(markdown([result]))
    prof = result["partial_call_profile"]
    print(f"\none partial call ({prof['partial_call_ms']:.1f} ms of self time): select {prof['select']:.2%}, "
          f"gather {prof['gather']:.2%}, scatter {prof['scatter']:.2%} "
          f"(together {prof['select+gather+scatter']:.2%})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def profile_overhead(cached, shape, args, dtype):
    """Share of select / gather / scatter in the time of one partial model call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    device = args.device
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(args.steps)
    x = torch.randn(2, 4, shape["sample"], shape["sample"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if shape["kind"] == "dit":
        cond = dict(class_labels=torch.tensor([1, 1000], device=device))
    else:
        emb = torch.randn(2, shape["text"], 64, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        cond = dict(encoder_hidden_states=emb, encoder_attention_mask=torch.ones(2, shape["text"], device=device),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    ctl = cached._toca_fx
    with torch.no_grad(), toca_fx.generation(cached, num_steps=args.steps):
        t0, t1 = sch.timesteps[:2]
        cached(x, timestep=torch.full((2,), int(t0), device=device), **cond)          # fresh
        sync(device)
        with profile(activities=acts) as prof:
            cached(x, timestep=torch.full((2,), int(t1), device=device), **cond)      # partial
            sync(device)
        assert ctl.calls["partial"] >= 1
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = prof.key_averages()
    total = sum(getattr(r, key) for r in rows)
    names = {"select": ["toca_fx::select_tokens"], "gather": ["aten::gather"], "scatter": ["aten::scatter_"]}
    share = {k: sum(getattr(r, key) for r in rows if r.key in v) / total for k, v in names.items()}
    share["select+gather+scatter"] = sum(share.values())
    share["partial_call_ms"] = total / 1000.0
    return share


def peak_memory(original, gen_cached, run, device):
    torch.cuda.reset_peak_memory_stats()
    run(original)
    p0 = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gen_cached()
    return dict(original=p0, toca=torch.cuda.max_memory_allocated())


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
    except OSError:
        name = platform.processor()
    return f"{name} ({torch.get_num_threads()} threads)"


def markdown(rows):
    lines = ["| shape | device | dtype | compile | preset | FLOPs ratio | wall ratio | wall / FLOPs | original s | toca_fx s | transform s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['layers']} blocks, {r['steps']} steps) | {r['machine']} | {r['dtype']} | "
                     f"{r['compile']} | {r['preset']} | {r['flops_ratio']:.2f}x | {r['wall_ratio']:.2f}x | "
                     f"{r['wall_over_flops']:.2f} | {r['seconds_original']:.2f} | {r['seconds_toca']:.2f} | "
                     f"{r['transform_seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
