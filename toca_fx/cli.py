"""The ``toca-fx`` command line: ``demo`` (the default), ``bench``, ``explain`` and ``presets``.

Example::

    toca-fx demo                         # uncached vs ToCa vs FORA on the bundled digit DiT
    toca-fx demo --quick --out /tmp/d    # a short run (fewer steps and images)
    toca-fx bench                        # the speed-quality benchmark (benchmarks/bench.py)
    toca-fx explain ./my-dit             # a diffusers model directory (save_pretrained)
    toca-fx explain DiTTransformer2DModel --config '{"num_layers": 2}'
    toca-fx presets
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

import toca_fx

from .config import PRESETS, ToCaConfig
from .errors import ToCaError

PROG = "toca-fx"
DEMO_PRESET = "toca-digits"
FORECAST_PRESET = "forecast-n4"     # toca_fx's best measured preset at >= 3x FLOPs on the digit model


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, without a traceback."""


# -- demo ------------------------------------------------------------------------------------------

def _check_device(device: str) -> None:
    """Fail in one line on a device string torch does not know, or a GPU that is not there."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available")


def _check_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")


def _out_dir(path: str) -> Path:
    """``--out``, created if needed; a one-line error if it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path!r}: cannot create the directory ({e.strerror})") from None
    return out


def fora_intervals_for(ratio: float, steps: int) -> list[int]:
    """FORA's N values that bracket a FLOPs ratio: [N, N + 1] with N >= 2 the largest whose FLOPs ratio, about
    steps / ceil(steps / N) (one fresh call in N; the blocks are nearly all of the FLOPs), is at most ``ratio``;
    [2] when even N = 2 is above it."""
    estimate = lambda n: steps / -(-steps // n)  # noqa: E731
    if estimate(2) > ratio or steps < 3:
        return [2]
    n = 2
    while n + 1 < steps and estimate(n + 1) <= ratio:
        n += 1
    return [n, n + 1]


METRIC_KEYS = ("psnr", "ssim", "frechet_distance", "class_agreement")


def fora_at(ratio: float, fora_rows: list[dict]) -> dict:
    """FORA's metrics at a FLOPs ratio: linear in the FLOPs ratio between the two FORA runs that bracket it,
    else those of the nearest run (FORA's N is an integer, so no single FORA run has exactly ToCa's ratio)."""
    rows = sorted(fora_rows, key=lambda r: r["flops_ratio"])
    lo = [r for r in rows if r["flops_ratio"] <= ratio]
    hi = [r for r in rows if r["flops_ratio"] > ratio]
    if lo and hi:
        a, b = lo[-1], hi[0]
        w = (ratio - a["flops_ratio"]) / (b["flops_ratio"] - a["flops_ratio"])
        values = {k: a[k] + w * (b[k] - a[k]) for k in METRIC_KEYS}
        return dict(flops_ratio=ratio, **values, method=f"linear in FLOPs ratio between {a['name']} and {b['name']}")
    near = min(rows, key=lambda r: abs(r["flops_ratio"] - ratio))
    return dict(flops_ratio=near["flops_ratio"], **{k: near[k] for k in METRIC_KEYS}, method=f"{near['name']} (nearest)")


def demo_checks(base: dict, toca: dict, fora: dict) -> dict:
    """The issue's bars for the demo: the uncached run, the ToCa run, and FORA at ToCa's FLOPs ratio."""
    return {
        "uncached class agreement >= 0.9": base["class_agreement"] >= 0.9,
        "ToCa FLOPs ratio >= 2": toca["flops_ratio"] >= 2.0,
        "ToCa PSNR >= 25 dB": toca["psnr"] >= 25.0,
        "ToCa SSIM >= 0.9": toca["ssim"] >= 0.9,
        "ToCa PSNR > FORA's at the same FLOPs ratio": toca["psnr"] > fora["psnr"],
        "ToCa Frechet distance < FORA's at the same FLOPs ratio": toca["frechet_distance"] < fora["frechet_distance"],
    }


def _measure_toca(model, config: ToCaConfig, name: str, labels, kw: dict, flops_kw: dict):
    """One toca_fx configuration on ``model`` (transformed, measured, removed). A compiled configuration's FLOPs are
    counted with the same configuration run eagerly (same graphs; compiled code cannot run under FlopCounterMode)."""
    from .demo.evaluate import count_flops, measure

    toca_fx.transform(model, config)
    try:
        run = measure(model, labels, name, flops=not config.compile, **kw)
        run.info.update(config=config.to_dict(), stats_flops_ratio=toca_fx.stats(model).flops_ratio)
    finally:
        toca_fx.remove(model)
    if config.compile:
        toca_fx.transform(model, config.replace(compile=False))
        try:
            run.flops = count_flops(model, labels, **flops_kw)
        finally:
            toca_fx.remove(model)
    return run


def cmd_demo(args) -> int:
    """Uncached vs ``--preset`` vs FORA on the bundled digit DiT: same labels, same noise, same scheduler."""
    quick = dict(steps=25, images=20) if args.quick else dict(steps=50, images=100)
    for name, default in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    # Validate user input before loading anything, so mistakes fail fast and in one line.
    config = ToCaConfig.preset(args.preset, compile=args.compile)
    _check_positive(args, "steps", "images", "repeats")
    if args.fora_interval is not None:
        _check_positive(args, "fora_interval")
    _check_device(args.device)
    out = _out_dir(args.out)

    from . import demo
    from .demo.evaluate import compare, count_flops, format_table, machine_info, measure, save_grid

    if args.guidance is None:
        args.guidance = demo.DEFAULT_GUIDANCE

    model = demo.load_model(device=args.device)
    classifier = demo.load_classifier(device=args.device)
    labels = torch.arange(args.images) % demo.NUM_CLASSES
    flops_kw = dict(num_steps=args.steps, seed=args.seed, guidance_scale=args.guidance)
    kw = dict(repeats=args.repeats, **flops_kw)
    print(f"{PROG} demo: bundled digit DiT ({model.config.num_layers} blocks, 64 tokens), {args.images} images "
          f"(x2 for CFG, guidance {args.guidance}), DDIM {args.steps} steps, seed {args.seed}, device {args.device}"
          f"{', torch.compile' if args.compile else ''}", flush=True)

    # Uncached. With --compile its blocks are compiled too (a copy, so the toca_fx runs below get plain blocks).
    # FLOPs are always counted on the eager model (see count_flops).
    if args.compile:
        import copy

        compiled = copy.deepcopy(model)
        for block in compiled.transformer_blocks:
            block.compile()
        uncached = measure(compiled, labels, "uncached", flops=False, **kw)
        uncached.flops = count_flops(model, labels, **flops_kw)
    else:
        uncached = measure(model, labels, "uncached", **kw)
    toca_run = _measure_toca(model, config, args.preset, labels, kw, flops_kw)
    ratio = uncached.flops / toca_run.flops
    intervals = [args.fora_interval] if args.fora_interval else fora_intervals_for(ratio, args.steps)
    runs = [uncached, toca_run]
    for interval in intervals:
        fora_config = ToCaConfig.preset("fora", interval=interval, compile=args.compile)
        runs.append(_measure_toca(model, fora_config, f"fora N={interval}", labels, kw, flops_kw))
    runs.append(_measure_toca(model, ToCaConfig.preset(FORECAST_PRESET, compile=args.compile), FORECAST_PRESET,
                              labels, kw, flops_kw))

    rows = compare(runs, labels, classifier)
    forecast = rows.pop()
    fora = fora_at(rows[1]["flops_ratio"], rows[2:])
    checks = demo_checks(rows[0], rows[1], fora)
    checks[f"{FORECAST_PRESET} FLOPs ratio >= 3"] = forecast["flops_ratio"] >= 3.0
    checks[f"{FORECAST_PRESET} PSNR > ToCa's and > FORA's at ToCa's FLOPs ratio"] = (
        forecast["psnr"] > rows[1]["psnr"] and forecast["psnr"] > fora["psnr"])
    checks[f"{FORECAST_PRESET} SSIM >= ToCa's"] = forecast["ssim"] >= rows[1]["ssim"]
    print(format_table(rows + [forecast]))
    print(f"FORA at ToCa's FLOPs ratio {fora['flops_ratio']:.2f}x ({fora['method']}): PSNR {fora['psnr']:.2f} dB, "
          f"SSIM {fora['ssim']:.4f}, FD {fora['frechet_distance']:.3f}")
    print("FLOPs ratio: uncached / this run, whole model, torch FlopCounterMode over one sampling loop; wall ratio: "
          f"median of {args.repeats} timed loop(s) after a warm-up. PSNR / SSIM: against the uncached samples. "
          f"class agr.: the bundled classifier's agreement with the requested digit. FD: Frechet distance to the "
          f"1797 real digits in the classifier's feature space ({args.images} samples; compare at equal counts).")
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")
    print("  (on this model the Frechet distance falls with any approximation and varies more between draws of real "
          "digits than between methods; BENCHMARKS.md has the full comparison)")
    if not checks["ToCa PSNR > FORA's at the same FLOPs ratio"]:
        print("  (ToCa trails FORA on PSNR on this model: recomputing some tokens on top of reused outputs costs more "
              "than the staleness it removes, and the change is spread over the tokens; measured in BENCHMARKS.md, "
              "'Why')")

    grid_path, json_path = out / "demo_grid.png", out / "demo.json"
    titles = [f"{r['name']}: {r['flops_ratio']:.2f}x FLOPs" + ("" if r["psnr"] is None else f", PSNR {r['psnr']:.1f} dB")
              for r in rows + [forecast]]
    save_grid([(t, r.images) for t, r in zip(titles, runs)], grid_path)
    settings = dict(steps=args.steps, images=args.images, preset=args.preset, seed=args.seed, guidance=args.guidance,
                    device=args.device, compile=args.compile, repeats=args.repeats, fora_intervals=intervals,
                    quick=args.quick)
    report = dict(settings=settings, machine=machine_info(), results=rows, forecast=forecast, fora_at_toca_ratio=fora,
                  checks=checks, grid=str(grid_path))
    try:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {json_path}: {e.strerror}") from None
    print(f"\nwrote {grid_path} and {json_path}")
    return 0


# -- bench -----------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Run ``benchmarks/bench.py`` of a source checkout with the remaining arguments."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not path.is_file():
        raise UsageError(f"the benchmark is not installed with the package: {path} is missing "
                         f"(run it from a source checkout: pip install -e .)")
    spec = importlib.util.spec_from_file_location("toca_fx_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(args.bench_args)


# -- explain ---------------------------------------------------------------------------------------

def load_model(target: str, config_json: str) -> torch.nn.Module:
    """A diffusers model from a ``save_pretrained`` directory, or built from a class name and JSON kwargs."""
    import diffusers

    if os.path.isdir(target):
        config_path = os.path.join(target, "config.json")
        try:
            with open(config_path) as f:
                class_name = json.load(f)["_class_name"]
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{config_path}: cannot read '_class_name' ({type(e).__name__}: {e})") from None
        cls = _diffusers_model_class(diffusers, class_name)
        if cls is None:
            raise UsageError(f"{config_path}: '_class_name' {class_name!r} is not a diffusers model class")
        # Without accelerate, diffusers warns at length unless told plainly not to use low-memory loading.
        extra = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
        return cls.from_pretrained(target, **extra).eval()

    cls = _diffusers_model_class(diffusers, target)
    if cls is None:
        what = ("a file, not a model directory" if os.path.exists(target)
                else "no such directory" if os.sep in target else "not a directory")
        raise UsageError(f"{target!r}: {what}, and not the name of a diffusers model class")
    try:
        kwargs = json.loads(config_json)
    except ValueError as e:
        raise UsageError(f"--config is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--config must be a JSON object, not {type(kwargs).__name__}")
    try:
        return cls(**kwargs).eval()
    except TypeError as e:  # unknown or missing constructor arguments
        raise UsageError(f"cannot build {target} from --config: {e}") from None


def _diffusers_model_class(diffusers, name: str):
    """``diffusers.<name>`` if it is a model class (an nn.Module subclass), else None."""
    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # diffusers' lazy import may fail for a name whose extras are missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def example_inputs(model, batch: int = 2) -> dict[str, Any]:
    """Keyword inputs for one forward call, from the model's config.

    The right inputs are model-specific; this covers image-token transformers that take
    ``hidden_states`` (B, C, H, W) and ``timestep``, plus class labels (DiT) or text embeddings (PixArt).
    """
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("hidden_states", "timestep") if p not in params]
    if missing:
        raise UsageError(f"{type(model).__name__}.forward has no {', '.join(missing)} argument: "
                         f"explain only supports models called as model(hidden_states, timestep=...)")
    size = cfg.get("sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], h, w, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
    )
    if cfg.get("num_embeds_ada_norm"):
        inputs["class_labels"] = torch.randint(0, cfg["num_embeds_ada_norm"], (batch,), device=device)
    # With a caption projection (PixArt) the text input has caption_channels features; otherwise
    # it goes straight into cross-attention with cross_attention_dim features.
    text_dim = cfg.get("caption_channels") or cfg.get("cross_attention_dim")
    if text_dim:
        inputs["encoder_hidden_states"] = torch.randn(batch, 8, text_dim, device=device, dtype=dtype)
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    # Drop what this forward does not take (e.g. added_cond_kwargs), unless it has **kwargs.
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inputs = {k: v for k, v in inputs.items() if k in params}
    return inputs


def cmd_explain(args) -> int:
    """Transform a model with the default config, run one forward, print what was matched."""
    model = load_model(args.model, args.config)
    inputs = example_inputs(model)
    toca_fx.transform(model)
    try:
        with torch.no_grad():
            model(**inputs)
    except ToCaError:
        raise
    except Exception as e:  # the guessed inputs did not fit this model
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
        raise UsageError(f"one forward call of {type(model).__name__} with generated inputs ({shapes}) failed: "
                         f"{type(e).__name__}: {e}") from None
    print(toca_fx.explain(model))
    return 0


# -- presets ---------------------------------------------------------------------------------------

def cmd_presets(args) -> int:
    """Print every preset name and the ToCaConfig fields it sets."""
    width = max(map(len, PRESETS))
    for name, values in PRESETS.items():
        print(f"{name:<{width}}  {values}")
    return 0


# -- entry point -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog=PROG, description="Token-wise feature caching (ToCa) for diffusion "
                                     "transformers. Without a command, runs 'demo'.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {toca_fx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,explain,presets}")

    demo = sub.add_parser("demo", help="uncached vs ToCa vs FORA on the bundled digit DiT (the default)",
                          description="Sample the bundled class-conditional digit DiT (DDIM, classifier-free "
                          "guidance) without caching, with a ToCa preset and with FORA at the two intervals around "
                          "ToCa's FLOPs ratio, "
                          "from the same noise; print FLOPs and wall-clock ratios, PSNR / SSIM against the "
                          "uncached samples, class agreement and the Frechet distance to real digits; write a PNG "
                          "grid and a JSON report to --out.")
    demo.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 25 with --quick)")
    demo.add_argument("--images", type=int, default=None,
                      help="images per configuration, classes 0-9 in turn (default 100; 20 with --quick)")
    demo.add_argument("--preset", default=DEMO_PRESET,
                      help=f"ToCa preset to compare (default {DEMO_PRESET}; one of {', '.join(PRESETS)})")
    demo.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    demo.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale (default: toca_fx.demo.DEFAULT_GUIDANCE)")
    demo.add_argument("--fora-interval", type=int, default=None,
                      help="run FORA with this N only (default: the two N whose FLOPs ratios bracket ToCa's; FORA's "
                      "metrics at ToCa's ratio are interpolated between them)")
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per configuration after one warm-up; "
                      "the median is reported (default 1)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--compile", action="store_true",
                      help="torch.compile the uncached blocks and toca_fx's variant graphs")
    demo.add_argument("--out", default="toca-fx-demo", metavar="DIR",
                      help="directory for demo_grid.png and demo.json (default ./toca-fx-demo)")
    demo.add_argument("--quick", action="store_true", help="a short run: 25 steps, 20 images, unless given")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="the speed-quality benchmark on the bundled model (benchmarks/bench.py)",
                           description="Run benchmarks/bench.py of a source checkout; arguments after 'bench' "
                           "are passed to it (see toca-fx bench --help).", add_help=False)
    bench.set_defaults(func=cmd_bench)   # main() hands everything after 'bench' to the benchmark unparsed

    explain = sub.add_parser("explain", help="show which blocks and sites of a diffusers model are cached",
                             description="Load a diffusers model (a save_pretrained directory, or a model class "
                             "name built from --config), transform it with the default config, run one forward "
                             "call on random inputs and print toca_fx.explain.")
    explain.add_argument("model", metavar="PATH_OR_CLASS", help="model directory or diffusers model class name")
    explain.add_argument("--config", default="{}", metavar="JSON",
                         help="constructor kwargs as a JSON object, when PATH_OR_CLASS is a class name")
    explain.set_defaults(func=cmd_explain)

    presets = sub.add_parser("presets", help="list the named configurations")
    presets.set_defaults(func=cmd_presets)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert 'demo' when no command is given, so ``toca-fx --quick`` works like ``toca-fx demo --quick``."""
    # Only options may stand in for the command: a bare unknown word is a mistyped command.
    if argv and (not argv[0].startswith("-") or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["demo", *argv]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user mistakes, reported in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(_with_default_command(argv))
    try:
        return args.func(args)
    except (UsageError, ToCaError, ValueError) as e:
        # One line, no traceback: these are refusals of what the user asked for, not crashes.
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `toca-fx demo | head`): point stdout at devnull so the
        # interpreter's final flush does not raise again, as the Python docs recommend.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
