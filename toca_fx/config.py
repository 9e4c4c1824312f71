"""`ToCaConfig`: the frozen, validated configuration of the pass, and its presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .passes.scores import SCORES as _SCORE_REGISTRY
from .runtime.schedule import SCHEDULES as _SCHEDULE_REGISTRY

# allowed values come from the registries that implement them
RATIO_SCHEDULES = tuple(_SCHEDULE_REGISTRY)
SCORES = tuple(_SCORE_REGISTRY)
SELF_ATTENTION_MODES = ("reuse", "partial", "partial-kv")
CACHE_DTYPES = (None, "float32", "bfloat16", "float16")
CYCLES = ("partial", "duca")
FORECAST_VARIABLES = ("step", "timestep")


@dataclass(frozen=True)
class ToCaConfig:
    """How toca_fx caches. Frozen and validated; bad values raise ``ValueError``.

    Example::

        cfg = ToCaConfig(interval=3, fresh_ratio=0.07, ratio_schedule="toca-ddim50")
        cfg2 = ToCaConfig.from_dict(cfg.to_dict())          # round-trip
        cfg3 = ToCaConfig.preset("fora")
    """

    interval: int = 3
    """N: a fresh step every N model calls (per CFG branch); the first call is always fresh."""
    fresh_ratio: float = 0.1
    """r0: the fraction of tokens recomputed on partial steps (before the ratio schedule)."""
    ratio_schedule: str = "constant"
    """"constant" or one of ToCa's schedules ("toca-ddim50", "toca-ddpm250", "toca-pixart")."""
    self_attention: str = "reuse"
    """"reuse": reuse the whole self-attention output on partial steps (ToCa's default);
    "partial": the selected tokens' queries attend over freshly computed keys/values of all tokens;
    "partial-kv": the selected tokens recompute query, key and value; they attend over the cached
    keys/values of the other tokens (every projection on k tokens: the cost falls with k)."""
    score: str = "toca"
    """Token score: "toca" (s1/s2 + s3 + s4), "v-norm", "k-norm", "random", "staleness"."""
    compile: bool = False
    """Hand each captured variant graph to ``torch.compile``."""
    staleness_weight: float = 0.25
    """Weight of s3 (tokens not recomputed for a while rank higher)."""
    spatial_bonus: float | None = None
    """beta of s4; None picks ToCa's (0.6 without cross-attention, 0.4 with)."""
    spatial_grid: int | None = None
    """g of s4 (tile side); None picks ToCa's (2 without cross-attention, 4 with); 1 disables s4."""
    num_steps: int | None = None
    """Model calls per branch in one generation, when no pipeline or ``generation()`` says it."""
    max_branches: int = 2
    """Calls with the same timestep in a row count as CFG branches of one step, up to this many."""
    timestep_arg: str | None = None
    """Keyword carrying the timestep; None tries "timestep", "timesteps", "t"."""
    probe: bool = True
    """Confirm the token-locality proof numerically on the first call."""
    seed: int = 0
    """Seed of the generator behind the "random" score."""
    cache_dtype: str | None = None
    """Store caches in this dtype ("bfloat16", "float16", "float32"); None keeps the model's."""
    k_buckets: int | None = None
    """Round k up to one of this many sizes per site (fewer compiled shapes); None: 8 when
    ``compile`` is set, else exact k."""
    warmup: int = 1
    """Fresh calls at the start of every generation (TaylorSeer's ``first_enhance``: 2)."""
    forecast_order: int | None = None
    """TaylorSeer: on non-fresh steps forecast each branch output from a Taylor expansion of this
    order (m + 1 stored tensors per site) instead of reusing it; with ``fresh_ratio`` > 0 the
    selected tokens are computed and the others forecast (token-wise forecasting). None: reuse."""
    forecast_variable: str = "step"
    """The expansion variable: "step" (the call index, as TaylorSeer's code) or "timestep"
    (the scheduler's timestep, read on the host once per call)."""
    fresh_steps: tuple | None = None
    """Explicit fresh call indices of each generation (e.g. an official schedule written down); the
    warm-up calls are fresh too. None: the interval rule."""
    fresh_align: str = "start"
    """Where the fresh steps sit when the generation's length is known: "start" (every ``interval``
    calls after the warm-up) or "end" (every ``interval`` calls counted back from the first of the
    ``tail_fresh`` final calls, or from the last call), so the grid ends where the sampler settles
    the details (measured on the digit model: BENCHMARKS.md, "Where the fresh steps sit")."""
    tail_fresh: int = 0
    """The last this-many calls of a generation are fresh (needs the generation's length)."""
    cycle: str = "partial"
    """What the calls between fresh steps do: "partial" (token-wise by the ratio schedule) or "duca"
    (DuCa: odd offsets from the last fresh step token-wise, even offsets aggressive: every branch
    reused or forecast)."""
    max_captures: int = 64
    """At most this many block captures are kept (least recently used evicted; ``explain()`` shows
    the count). One capture serves every block of a class for one input signature."""
    adaptive_threshold: float | None = None
    """Adaptive fresh steps: a call is fresh when the accumulated relative L1 change of the first
    block's input since the last fresh call reaches this; ``interval`` is then the most calls
    between fresh ones. None: fresh every ``interval`` calls."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"ToCaConfig.{name}={getattr(self, name)!r} is invalid: allowed {allowed}")

        def integer(v) -> bool:            # a real int: True / False are not counts
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:             # a finite real number, not a bool
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not integer(self.interval) or self.interval < 1:
            bad("interval", "an integer >= 1")
        if not number(self.fresh_ratio) or not 0.0 <= float(self.fresh_ratio) <= 1.0:
            bad("fresh_ratio", "a number in [0, 1]")
        if self.ratio_schedule not in RATIO_SCHEDULES:
            bad("ratio_schedule", f"one of {RATIO_SCHEDULES}")
        if self.self_attention not in SELF_ATTENTION_MODES:
            bad("self_attention", f"one of {SELF_ATTENTION_MODES}")
        if self.score not in SCORES:
            bad("score", f"one of {SCORES}")
        if not isinstance(self.compile, bool):
            bad("compile", "True or False")
        if not isinstance(self.probe, bool):
            bad("probe", "True or False")
        if not number(self.staleness_weight) or self.staleness_weight < 0:
            bad("staleness_weight", "a finite number >= 0")
        if self.spatial_bonus is not None and (not number(self.spatial_bonus) or self.spatial_bonus < 0):
            bad("spatial_bonus", "None or a finite number >= 0")
        if self.spatial_grid is not None and (not integer(self.spatial_grid) or self.spatial_grid < 1):
            bad("spatial_grid", "None or an integer >= 1")
        if self.num_steps is not None and (not integer(self.num_steps) or self.num_steps < 1):
            bad("num_steps", "None or an integer >= 1")
        if not integer(self.max_branches) or self.max_branches < 1:
            bad("max_branches", "an integer >= 1")
        if self.timestep_arg is not None and not (isinstance(self.timestep_arg, str) and self.timestep_arg.isidentifier()):
            bad("timestep_arg", "None or a keyword name")
        # every block seeds its generator with seed + layer: it must stay a valid 64-bit seed
        if not integer(self.seed) or not 0 <= self.seed < 2 ** 63:
            bad("seed", "an integer in [0, 2**63)")
        if self.cache_dtype not in CACHE_DTYPES:
            bad("cache_dtype", f"one of {CACHE_DTYPES}")
        if self.k_buckets is not None and (not integer(self.k_buckets) or self.k_buckets < 1):
            bad("k_buckets", "None or an integer >= 1")
        if not integer(self.warmup) or self.warmup < 1:
            bad("warmup", "an integer >= 1")
        if not integer(self.max_captures) or self.max_captures < 1:
            bad("max_captures", "an integer >= 1")
        if self.forecast_order is not None and (not integer(self.forecast_order) or not 0 <= self.forecast_order <= 8):
            bad("forecast_order", "None or an integer in [0, 8]")
        if self.forecast_order is not None and self.self_attention == "partial-kv":
            bad("forecast_order", "None with self_attention='partial-kv' (its key/value caches are not forecast)")
        if self.score == "forecast-error" and not self.forecast_order:
            bad("score", "'forecast-error' only with forecast_order >= 1 (it ranks tokens by their forecast's last term)")
        if self.forecast_variable not in FORECAST_VARIABLES:
            bad("forecast_variable", f"one of {FORECAST_VARIABLES}")
        if self.fresh_steps is not None:
            if isinstance(self.fresh_steps, list):
                object.__setattr__(self, "fresh_steps", tuple(self.fresh_steps))
            if not isinstance(self.fresh_steps, tuple) or not all(
                    integer(s) and s >= 0 for s in self.fresh_steps):
                bad("fresh_steps", "None or a tuple of call indices >= 0")
        if not integer(self.tail_fresh) or self.tail_fresh < 0:
            bad("tail_fresh", "an integer >= 0")
        if self.fresh_align not in ("start", "end"):
            bad("fresh_align", "'start' or 'end'")
        if self.cycle not in CYCLES:
            bad("cycle", f"one of {CYCLES}")
        if self.adaptive_threshold is not None and (not number(self.adaptive_threshold)
                                                    or not self.adaptive_threshold > 0):
            bad("adaptive_threshold", "None or a finite number > 0")

    # -- defaults that depend on other fields, resolved in one place ---------------------------
    @property
    def resolved_k_buckets(self) -> int | None:
        """k bucket count in force: ``k_buckets``, or 8 under ``compile`` (few compiled shapes)."""
        return self.k_buckets if self.k_buckets is not None else (8 if self.compile else None)

    # -- presets and round-trips ------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ToCaConfig":
        """A named configuration from the papers, e.g. ``ToCaConfig.preset("toca-dit-ddim50")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: allowed {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToCaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ToCaConfig fields {sorted(unknown)}: allowed {sorted(names)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "ToCaConfig":
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, dict[str, Any]] = {
    # ToCa, DiT-XL/2, DDIM 50 steps: N=3, r0=0.07, step/layer/module schedule with varying N.
    "toca-dit-ddim50": dict(interval=3, fresh_ratio=0.07, ratio_schedule="toca-ddim50", score="toca"),
    # ToCa, DiT-XL/2, DDPM 250 steps: N=4, r0=0.07.
    "toca-dit-ddpm250": dict(interval=4, fresh_ratio=0.07, ratio_schedule="toca-ddpm250", score="toca"),
    # ToCa, PixArt-alpha, 20 DPM-Solver++ steps: N=3, R=70% (r0=0.30).
    "toca-pixart": dict(interval=3, fresh_ratio=0.30, ratio_schedule="toca-pixart", score="toca"),
    # The bundled digit DiT (toca_fx.demo: 6 blocks, 64 tokens on an 8x8 grid), DDIM 50 steps with CFG.
    "toca-digits": dict(interval=3, fresh_ratio=0.1, ratio_schedule="constant", score="toca"),
    # FORA: whole-module reuse between fresh steps.
    "fora": dict(interval=3, fresh_ratio=0.0, ratio_schedule="constant", score="staleness"),
    # TaylorSeer-DiT (Shenyi-Z/TaylorSeer): N=5, order 3, first_enhance=2: fresh calls 0, 1, 6, ..., 46 (11 of 50).
    "taylorseer": dict(interval=5, fresh_ratio=0.0, forecast_order=3, warmup=2, score="staleness"),
    # toca_fx's forecast at >= 3x FLOPs: order 2, a fresh grid of 4 anchored at the last two calls.
    "forecast-n4": dict(interval=4, fresh_ratio=0.0, forecast_order=2, warmup=2, fresh_align="end", tail_fresh=2,
                        score="staleness"),
    # ... and at >= 4x FLOPs: a grid of 6.
    "forecast-n6": dict(interval=6, fresh_ratio=0.0, forecast_order=2, warmup=2, fresh_align="end", tail_fresh=2,
                        score="staleness"),
    # Token-wise forecasting: 10% of the tokens (ranked by their forecast's last term) computed, the rest forecast.
    "toca-taylor": dict(interval=5, fresh_ratio=0.1, forecast_order=2, warmup=2, fresh_align="end", tail_fresh=2,
                        score="forecast-error"),
    # DuCa (Shenyi-Z/DuCa, DiT README): N=3, r0=0.05; odd offsets token-wise, even offsets aggressive (reuse).
    "duca": dict(interval=3, fresh_ratio=0.05, cycle="duca", score="toca"),
    # Adaptive fresh calls from the first block's input change, forecasting in between (at most 6 apart).
    "toca-adaptive": dict(interval=6, fresh_ratio=0.0, forecast_order=2, warmup=2, adaptive_threshold=0.3,
                          tail_fresh=2, score="staleness"),
}
