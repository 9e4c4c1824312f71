"""Wall-clock speed of toca_fx against the original model, side by side in one process.

Usage:
  python benchmarks/speed.py --shape dit-xl --steps 50 [--layers 28] [--device cpu|cuda]
         [--dtype float32|bfloat16] [--compile] [--repeats 3] [--threads 1] [--memory] [--json out.json]

Shapes (random weights; speed does not depend on the weights):
  dit-xl     DiT-XL/2: 28 blocks, width 1152, 16 heads, 32x32 latent, patch 2 (256 tokens), batch 2 (CFG),
             DDIM with `toca-dit-ddim50`
  pixart-xl  PixArt-alpha: 28 blocks, width 1152, 256 image tokens, 120 text tokens, CFG, `toca-pixart`
  dit-s      a small DiT (12 blocks, width 384, 64 tokens) for quick checks

For each configuration: one warm-up generation (compilation included, timed separately), then the
median of --repeats generations; FLOPs of one generation with FlopCounterMode; the wall ratio
and how close it comes to the FLOPs ratio; the time split of one partial call (select / gather /
scatter vs everything else) from torch.profiler; the transform time (capture + analysis + rewrite).

--compile compiles both models the same way, region by region: every block of the original's
block lists (the lists toca_fx found) gets `Module.compile()` (dynamo + inductor, default
options), and toca_fx (ToCaConfig(compile=True)) compiles each variant graph of each block class
with fullgraph=True and bucketed k; everything outside the blocks stays eager in both. FLOPs of a
compiled run: the original's from FlopCounterMode on one eager model call times the number of
calls (every call has the same shapes), toca_fx's from its stats() (FlopCounterMode on fake
tensors of the variant graphs; compiled code cannot run under FlopCounterMode).

--memory (CPU) measures the peak tensor memory of one generation, original vs toca_fx, with
torch.profiler's memory events (see `cpu_peak_memory`), and checks the issue's bound
peak_toca <= peak_original + cache bytes + 10 % of peak_original.
"""

from __future__ import annotations

import argparse
import copy
import gc
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


def inputs(shape, device, dtype, seed=0):
    """Noise for one image (the CFG batch doubles it) and the conditioning of a CFG batch of 2:
    class 1 and the null class (DiT), or a random caption and an empty one (PixArt)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 4, shape["sample"], shape["sample"], generator=g).to(device, dtype)
    if shape["kind"] == "dit":
        cond = dict(class_labels=torch.tensor([1, 1000], device=device))
    else:
        emb = torch.randn(1, shape["text"], 64, generator=g).to(device, dtype)
        cond = dict(encoder_hidden_states=torch.cat([emb, torch.zeros_like(emb)]),
                    encoder_attention_mask=torch.ones(2, shape["text"], device=device),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return x0, cond


def sampler(shape, steps, device, dtype):
    """A sampling loop with CFG in one batch (as DiTPipeline / PixArtAlphaPipeline), fixed noise."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    x0, cond = inputs(shape, device, dtype)

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
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (and inductor's compile threads)")
    ap.add_argument("--memory", action="store_true",
                    help="CPU: also measure peak tensor memory of one generation (torch.profiler memory events)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.compile:
            import torch._inductor.config as inductor_config
            inductor_config.compile_threads = args.threads
    shape = SHAPES[args.shape]
    layers = args.layers or shape["layers"]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    preset = args.preset or shape["preset"]
    run = sampler(shape, args.steps, args.device, dtype)

    original = build(shape, layers, args.device, dtype)
    cached = copy.deepcopy(original)
    toca_fx.transform(cached, preset, compile=args.compile)

    def gen_cached():
        with toca_fx.generation(cached, num_steps=args.steps):
            return run(cached)

    result = dict(shape=args.shape, layers=layers, steps=args.steps, device=args.device, dtype=str(dtype),
                  compile=args.compile, preset=preset, machine=machine(args.device), torch=torch.__version__)
    # FLOPs first (eager, so the counter sees the ATen ops)
    if not args.compile:
        with FlopCounterMode(display=False) as fc:
            run(original)
        f0 = fc.get_total_flops()
    else:
        f0 = one_call_flops(original, shape, args.device, dtype) * args.steps
    graphs = dynamo_graphs()
    warm_c, _ = timed(gen_cached, args.device)             # captures, analysis, rewrite (+ compile)
    graphs_toca = dynamo_graphs() - graphs
    toca_fx.reset(cached, stats=True)
    if not args.compile:
        with FlopCounterMode(display=False) as fc:
            gen_cached()
        f1 = fc.get_total_flops()
        stats = toca_fx.stats(cached)
        k_shapes = k_shapes_by_class(cached)
    rep = toca_fx.explain(cached)
    if args.compile:
        # the original's blocks, compiled region by region as toca_fx compiles its block graphs
        compiled_blocks = 0
        for bl in rep.lists:
            if bl["rejected"] is None:
                for block in original.get_submodule(bl["name"]):
                    block.compile()
                    compiled_blocks += 1
        result.update(original_compiled_blocks=compiled_blocks)
    graphs = dynamo_graphs()
    warm_o, _ = timed(lambda: run(original), args.device)
    graphs_original = dynamo_graphs() - graphs
    t_orig, t_toca = [], []
    graphs = dynamo_graphs()
    for _ in range(args.repeats):                          # interleaved: drifts hit both alike
        t_orig.append(timed(lambda: run(original), args.device)[0])
        t_toca.append(timed(gen_cached, args.device)[0])
    graphs_timed = dynamo_graphs() - graphs
    if args.compile:
        # stats of the timed generations (reset above), per generation: blocks-only FLOPs saved
        stats = toca_fx.stats(cached)
        f1 = f0 - (stats.flops_original - stats.flops_actual) / args.repeats
        stats.calls = {k: v // args.repeats for k, v in stats.calls.items()}
        k_shapes = k_shapes_by_class(cached)
    programs = [p for p in toca_fx.explain(cached).programs if p.failed is None]
    transform_s = sum(r.seconds for p in programs for r in p.stages.values())
    flops_ratio = f0 / f1
    wall_ratio = statistics.median(t_orig) / statistics.median(t_toca)
    result.update(
        flops_original=f0, flops_toca=f1, flops_ratio=flops_ratio,
        seconds_original=statistics.median(t_orig), seconds_toca=statistics.median(t_toca),
        wall_ratio=wall_ratio, wall_over_flops=wall_ratio / flops_ratio,
        warmup_seconds_original=warm_o, warmup_seconds_toca=warm_c, transform_seconds=transform_s,
        variants=sum(len(p.variants) for p in programs), compiled_variants=sum(len(p.compiled) for p in programs),
        cache_bytes=toca_fx.stats(cached).cache_bytes, calls=dict(stats.calls),
        flops_toca_blocks_ratio=stats.flops_ratio, k_shapes=k_shapes,
        seconds_original_all=t_orig, seconds_toca_all=t_toca,
    )
    if args.compile:
        # dynamo graphs compiled (counters["stats"]["unique_graphs"]): in the warm-up generations, and
        # during the timed ones (must be 0, or compilation was timed)
        result.update(dynamo_graphs_toca=graphs_toca, dynamo_graphs_original=graphs_original,
                      dynamo_graphs_during_timing=graphs_timed,
                      compile_overhead_seconds_original=warm_o - statistics.median(t_orig),
                      compile_overhead_seconds_toca=warm_c - statistics.median(t_toca))
    result["partial_call_profile"] = profile_overhead(cached, shape, args, dtype)
    if args.device == "cuda":
        result.update(peak_memory=peak_memory(original, gen_cached, run, args.device))
    elif args.memory:
        result.update(peak_memory=cpu_peak_memory(original, cached, gen_cached, run))
    if "peak_memory" in result:
        pm = result["peak_memory"]
        pm["cache_bytes"] = cb = toca_fx.stats(cached).cache_bytes
        pm["bound"] = pm["original"] + cb + 0.1 * pm["original"]
        pm["within_bound"] = pm["toca"] <= pm["bound"]
    print(markdown([result]))
    prof = result["partial_call_profile"]
    print(f"\none partial call ({prof['partial_call_ms']:.1f} ms of self time): select {prof['select']:.2%}, "
          f"gather {prof['gather']:.2%}, scatter {prof['scatter']:.2%} "
          f"(together {prof['select+gather+scatter']:.2%})")
    print(f"warm-up generation (capture / compilation included): original {warm_o:.1f} s, toca_fx {warm_c:.1f} s; "
          f"variant graphs {result['variants']}, compiled {result['compiled_variants']}")
    for cls, d in k_shapes.items():
        print(f"  {cls}: {d['variants']} variant graph(s), {d['compiled']} compiled, "
              f"{len(d['k'])} distinct k per partial call: {d['k']}")
    if args.compile:
        print(f"dynamo graphs compiled: toca_fx warm-up {graphs_toca}, original warm-up {graphs_original}, "
              f"during the timed generations {graphs_timed}")
    if "peak_memory" in result:
        pm = result["peak_memory"]
        mib = 2 ** 20
        line = (f"peak tensor memory of one generation: original {pm['original'] / mib:.1f} MiB, "
                f"toca_fx {pm['toca'] / mib:.1f} MiB, cache {pm['cache_bytes'] / mib:.1f} MiB; "
                f"bound original + cache + 10% = {pm['bound'] / mib:.1f} MiB: "
                f"{'within' if pm['within_bound'] else 'EXCEEDED'}")
        if "above_weights" in pm:
            aw = pm["above_weights"]
            line += (f"\n  above the weights ({pm['weights'] / mib:.1f} MiB): original {aw['original'] / mib:.1f} MiB, "
                     f"toca_fx {aw['toca'] / mib:.1f} MiB; bound {aw['bound'] / mib:.1f} MiB: "
                     f"{'within' if aw['within_bound'] else 'EXCEEDED'}")
        print(line)
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
    x, cond = inputs(shape, device, dtype, seed=1)
    x = torch.cat([x, x])                 # both halves alike, as in the sampler: the same (CFG) variant
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0, t1 = sch.timesteps[:2]
    with torch.no_grad():
        # the first pass warms up (a variant not met in the timed generations would compile here);
        # the second profiles its partial call
        for profiled in (False, True):
            with toca_fx.generation(cached, num_steps=args.steps):
                cached(x, timestep=torch.full((2,), int(t0), device=device), **cond)          # fresh
                sync(device)
                partial_before = toca_fx.stats(cached).calls["partial"]
                with profile(activities=acts, profile_memory=False) as prof:
                    cached(x, timestep=torch.full((2,), int(t1), device=device), **cond)      # partial
                    sync(device)
                assert toca_fx.stats(cached).calls["partial"] == partial_before + 1
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = prof.key_averages()
    total = sum(getattr(r, key) for r in rows)
    names = {"select": ["aten::topk"], "gather": ["aten::gather"], "scatter": ["aten::scatter_"]}
    share = {k: sum(getattr(r, key) for r in rows if r.key in v) / total for k, v in names.items()}
    share["select+gather+scatter"] = sum(share.values())
    share["partial_call_ms"] = total / 1000.0
    return share


def one_call_flops(model, shape, device, dtype):
    """FLOPs of one (eager) model call with the sampler's shapes: every call of the original has the
    same shapes, so a whole loop costs steps times this (the scheduler step has no matmul)."""
    x, cond = inputs(shape, device, dtype)
    x = torch.cat([x, x])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, timestep=torch.full((2,), 999, device=device), **cond)
    return fc.get_total_flops()


def dynamo_graphs():
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def k_shapes_by_class(cached):
    """Per block class (and input signature): variant graphs, compiled ones, and the distinct k
    tuples of its partial calls since the last stats reset (each a shape a compiled graph meets)."""
    records = [r for r in toca_fx.stats(cached).records if r.variant is not None]
    out = {}
    for e in toca_fx.explain(cached).programs:
        if e.failed is not None:
            continue
        ks = sorted({tuple(v for _, v in r.ks) for r in records if r.program == e.key})
        sites = sorted({s for r in records if r.program == e.key for s, _ in r.ks})
        name = e.cls_name if e.cls_name not in out else f"{e.cls_name}#{len(out)}"
        out[name] = dict(variants=1 + len(e.partials), compiled=len(e.compiled), sites=sites, k=[list(k) for k in ks])
    return out


def cpu_peak_memory(original, cached, gen_cached, run):
    """Peak tensor memory of one generation on CPU, original vs toca_fx, in bytes.

    Measured with torch.profiler(profile_memory=True): every allocation and free made through c10's
    CPU allocator while profiling (all tensors: op outputs, temporaries inside ops such as SDPA's
    buffers, inductor's buffers, toca_fx's caches) is a "[memory]" event with +/- its byte count;
    the running sum of the events in time order is the tensor memory allocated since the start, its
    maximum the peak above what was alive before (frees of tensors allocated before profiling are
    not reported, so nothing older can lower the sum). Allocator slack and Python objects are not
    counted; RSS would mix them in with the allocator's caching and the weights' pages.

    What is alive at the start (the weights; the inputs and the noise, the same for both) is added as
    the bytes of the model's parameters and buffers. toca_fx's caches from an earlier generation are
    freed first (toca_fx.reset), so the measured generation allocates its own caches and they are
    part of its peak. The second figure, ``above_weights``, leaves the weights out: the same bound on
    the activation memory alone, a much stricter test.
    """
    from torch.profiler import ProfilerActivity, profile

    def resident(m):
        seen, n = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                n += t.untyped_storage().nbytes()
        return n

    def peak(fn):
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
        total = top = 0
        for _, n in events:
            total += n
            top = max(top, total)
        return top, total, len(events)

    weights = resident(original)
    p0, end0, n0 = peak(lambda: run(original))
    toca_fx.reset(cached)                       # frees the previous generation's caches
    toca_weights = resident(cached)             # the caches are gone: parameters only
    p1, end1, n1 = peak(gen_cached)
    cb = toca_fx.stats(cached).cache_bytes
    return dict(original=weights + p0, toca=toca_weights + p1, weights=weights, toca_resident_at_start=toca_weights,
                events=dict(original=n0, toca=n1), left_allocated=dict(original=end0, toca=end1),
                method="torch.profiler profile_memory: running sum of CPU allocator events + parameter/buffer bytes",
                above_weights=dict(original=p0, toca=p1, bound=p0 + cb + 0.1 * p0, within_bound=p1 <= p0 + cb + 0.1 * p0))


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
