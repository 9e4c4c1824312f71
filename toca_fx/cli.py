"""The ``toca-fx`` command line: ``demo`` (the default), ``explain`` and ``presets``.

Example::

    toca-fx demo --quick                 # original vs ToCa vs FORA on a small random DiT
    toca-fx explain ./my-dit             # a diffusers model directory (save_pretrained)
    toca-fx explain DiTTransformer2DModel --config '{"num_layers": 2}'
    toca-fx presets
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import toca_fx

from .config import PRESETS, ToCaConfig
from .errors import ToCaError

PROG = "toca-fx"

# The demo DiT: class-conditional, 16x16 latents in 2x2 patches = 64 tokens, 10 classes + the CFG null class.
DEMO_DIT = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                sample_size=16, patch_size=2, num_embeds_ada_norm=10)
NULL_LABEL = DEMO_DIT["num_embeds_ada_norm"]   # DiT's label table has an extra row, index num_classes, for CFG's null class
GUIDANCE_SCALE = 4.0
LATENT_CHANNELS = 4        # out_channels=8 is eps + learned sigma; CFG mixes only the eps half


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, without a traceback."""


# -- demo ------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """Measurements of one configuration of the demo."""

    config: str
    preset: str | None
    flops: int
    wall_times: list[float]
    rel_l2: float = 0.0
    flops_speedup: float = 1.0
    wall_speedup: float = 1.0
    stats: Any = field(default=None, repr=False)   # toca_fx.stats after one generation; None for the original

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_times)


def _progress(iterable, desc: str):
    """Wrap ``iterable`` in a tqdm bar when tqdm is installed; tqdm is optional, so fall back to no bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    # disable=None: no bar when stderr is not a terminal, so logs and pipes stay clean.
    return tqdm(iterable, desc=desc, leave=False, disable=None, file=sys.stderr)


def build_demo_model(layers: int, device: str) -> torch.nn.Module:
    """A small random-weight class-conditional DiT (the seed is set by the caller).

    Random weights until a trained checkpoint is wired in: the speed and FLOPs numbers are
    meaningful, the sample error is not a statement about image quality.
    """
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_layers=layers, **DEMO_DIT).to(device).eval()


def make_inputs(batch: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting noise and class labels from their own seeded generator, identical for every run."""
    gen = torch.Generator().manual_seed(seed)
    size = DEMO_DIT["sample_size"]
    noise = torch.randn(batch, DEMO_DIT["in_channels"], size, size, generator=gen)
    labels = torch.randint(0, DEMO_DIT["num_embeds_ada_norm"], (batch,), generator=gen)
    return noise.to(device), labels.to(device)


@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, steps: int, desc: str = "") -> torch.Tensor:
    """DDIM sampling with classifier-free guidance done in one batch (conditional and null halves)."""
    from diffusers import DDIMScheduler

    # A new scheduler per run: DDIM keeps the timestep list and step counter on the instance.
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    class_labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    for t in _progress(scheduler.timesteps, desc):
        x_in = torch.cat([x, x])
        t_in = t.to(x.device).expand(x_in.shape[0])
        out = model(x_in, timestep=t_in, class_labels=class_labels).sample
        eps_c, eps_u = out[:, :LATENT_CHANNELS].chunk(2)
        eps = eps_u + GUIDANCE_SCALE * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock times cover the whole sampling loop."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _one_generation(model, steps: int, transformed: bool):
    """A context for one sampling loop: a ToCa generation of ``steps`` calls, or nothing for the original."""
    return toca_fx.generation(model, num_steps=steps) if transformed else contextlib.nullcontext()


def measure(model, label: str, preset: str | None, args, noise, labels) -> tuple[RunResult, torch.Tensor]:
    """Warm up once, time ``args.repeats`` sampling loops, then count FLOPs in a separate loop.

    The warm-up is untimed because the first ToCa call captures and rewrites the blocks, and the
    first call of any model pays for allocator and kernel warm-up. FLOPs are counted outside the
    timed runs since FlopCounterMode's dispatch overhead would distort the wall time.
    """
    from torch.utils.flop_counter import FlopCounterMode

    transformed = preset is not None
    with _one_generation(model, args.steps, transformed):
        sample(model, noise, labels, args.steps, f"{label} warm-up")
    # Stats after exactly one generation; later runs would only multiply the counts.
    stats = toca_fx.stats(model) if transformed else None

    times, latents = [], None
    for i in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        with _one_generation(model, args.steps, transformed):
            x = sample(model, noise, labels, args.steps, f"{label} run {i + 1}/{args.repeats}")
        _sync(args.device)
        times.append(time.perf_counter() - start)
        if i == 0:
            latents = x   # every run starts from the same noise, so any one serves for the error

    counter = FlopCounterMode(display=False)
    with counter, _one_generation(model, args.steps, transformed):
        sample(model, noise, labels, args.steps, f"{label} FLOPs")
    result = RunResult(config=label, preset=preset, flops=counter.get_total_flops(), wall_times=times, stats=stats)
    return result, latents


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64 so tiny differences are not rounded away."""
    x, ref = x.double(), ref.double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def _demo_configs(preset: str) -> list[tuple[str, str | None]]:
    """(label, preset) pairs: the original, the chosen preset, and FORA (once, if it was the choice)."""
    configs = [("original", None), (preset, preset)]
    if preset != "fora":
        configs.append(("fora", "fora"))
    return configs


def format_table(results: list[RunResult]) -> str:
    """The comparison table. Speed-ups are original / this run (>1 means cheaper), as in toca_fx.stats."""
    header = (f"{'config':<18} {'GFLOPs':>9} {'FLOPs speed-up':>14} {'wall s':>8} {'wall speed-up':>13} "
              f"{'rel. L2 vs original':>19}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.config:<18} {r.flops / 1e9:>9.3f} {r.flops_speedup:>13.2f}x {r.wall:>8.3f} "
                     f"{r.wall_speedup:>12.2f}x {r.rel_l2:>19.2e}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    """Compare the original model, ``--preset`` and FORA on a small random DiT."""
    if args.quick:
        args.steps, args.layers = 10, 4
    # Validate user input before building anything, so mistakes fail fast and in one line.
    ToCaConfig.preset(args.preset)
    for name in ("steps", "batch", "layers", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, not {getattr(args, name)}")
    _check_device(args.device)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json!r}: its directory does not exist")

    torch.manual_seed(args.seed)
    model = build_demo_model(args.layers, args.device)
    noise, labels = make_inputs(args.batch, args.seed, args.device)
    print(f"{PROG} demo: random-weight DiT, {args.layers} layers, "
          f"{(DEMO_DIT['sample_size'] // DEMO_DIT['patch_size']) ** 2} tokens, batch {args.batch} x 2 (CFG), "
          f"DDIM {args.steps} steps, seed {args.seed}, device {args.device}, median of {args.repeats} timed run(s)")

    results, reference = [], None
    for label, preset in _demo_configs(args.preset):
        if preset is not None:
            toca_fx.transform(model, preset)
        try:
            result, latents = measure(model, label, preset, args, noise, labels)
        finally:
            if preset is not None:
                toca_fx.remove(model)
        if reference is None:
            reference = latents
        result.rel_l2 = _rel_l2(latents, reference)
        results.append(result)

    base = results[0]
    for r in results:
        r.flops_speedup = base.flops / r.flops if r.flops else float("nan")
        r.wall_speedup = base.wall / r.wall if r.wall else float("nan")

    print(format_table(results))
    print("FLOPs: whole model (torch FlopCounterMode) over one sampling loop. The weights are random, so the "
          "rel. L2 error says nothing about image quality; it only shows how far the caches moved the samples.")
    toca = results[1]
    print(f"\n{toca.config}, one generation:")
    print(toca.stats)
    if args.json:
        _write_json(args, results)
    return 0


def _check_device(device: str) -> None:
    """Fail in one line on a device string torch does not know, or a GPU that is not there."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available")


def _write_json(args, results: list[RunResult]) -> None:
    """Write the settings and per-configuration measurements to ``args.json``."""
    settings = {k: getattr(args, k) for k in ("steps", "preset", "seed", "batch", "layers", "repeats", "device")}
    data = dict(settings=settings, random_weights=True,
                results=[{**asdict(r), "wall": r.wall, "gflops": r.flops / 1e9} for r in results])
    try:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    except OSError as e:
        raise UsageError(f"cannot write --json {args.json!r}: {e.strerror}") from None
    print(f"\nwrote {args.json}")


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
    sub = parser.add_subparsers(dest="command", metavar="{demo,explain,presets}")

    demo = sub.add_parser("demo", help="original vs ToCa vs FORA on a small random-weight DiT (the default)",
                          description="Sample a small random-weight DiT with DDIM and CFG three ways (original, "
                          "--preset, fora) and compare FLOPs, wall time and the difference of the samples.")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    demo.add_argument("--preset", default="toca-dit-ddim50",
                      help=f"ToCa preset to compare (default toca-dit-ddim50; one of {', '.join(PRESETS)})")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights, noise and labels (default 0)")
    demo.add_argument("--batch", type=int, default=2, help="images per run, doubled by CFG (default 2)")
    demo.add_argument("--layers", type=int, default=12, help="DiT blocks (default 12)")
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the median is "
                      "reported (default 1)")
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--quick", action="store_true", help="10 steps and 4 layers (overrides --steps/--layers)")
    demo.set_defaults(func=cmd_demo)

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
