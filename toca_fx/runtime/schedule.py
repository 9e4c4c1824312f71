"""When to run fresh, and how many tokens each site recomputes on partial steps (DESIGN.md §3).

Every factor has ToCa's form ``1 - w + 2 w p``: the step factor with p = sampling progress, the
layer factor with p = 1 - depth (front layers recompute more), and a per-kind module factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:     # config reads SCHEDULES for its allowed values
    from ..config import ToCaConfig


@dataclass(frozen=True)
class Schedule:
    step_weight: float = 0.0
    layer_weight: float = 0.0
    module: dict = field(default_factory=dict)      # kind -> factor (missing: 1.0)
    vary_interval: bool = False                      # ToCa's DiT force scheduler: N / step factor
    sensitive_window: tuple | None = None            # progress window with interval 2 (DDPM-250)


# ToCa's DiT code: module weight 2.5, "time weight" 0.6: attention 1 - 0.4 * 2.5 = 0, MLP 1 + 0.6 * 2.5.
_DIT_MODULES = {"self_attn": 0.0, "cross_attn": 0.0, "joint_attn": 0.0, "mlp": 2.5, "parallel": 2.5, "other": 2.5}
# ToCa's PixArt code: module weight 1.0: cross-attention 0.6, everything else 1.6.
_PIXART_MODULES = {"self_attn": 1.6, "cross_attn": 0.6, "joint_attn": 1.6, "mlp": 1.6, "parallel": 1.6, "other": 1.6}

SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(),
    "toca-ddim50": Schedule(step_weight=0.4, layer_weight=0.8, module=_DIT_MODULES, vary_interval=True),
    "toca-ddpm250": Schedule(step_weight=0.4, layer_weight=0.8, module=_DIT_MODULES, vary_interval=True,
                             sensitive_window=(0.6, 0.8)),
    "toca-pixart": Schedule(step_weight=-0.9, layer_weight=0.6, module=_PIXART_MODULES),
}


def _factor(w: float, p: float) -> float:
    return 1.0 - w + 2.0 * w * p


def fresh_interval(config: "ToCaConfig", progress: float | None) -> int:
    """Model calls between two fresh steps at this point of sampling."""
    sched = SCHEDULES[config.ratio_schedule]
    n = config.interval
    if progress is None or not sched.vary_interval or config.fresh_ratio == 0:
        return n
    if sched.sensitive_window and sched.sensitive_window[0] < progress <= sched.sensitive_window[1]:
        return min(n, 2)
    return max(1, round(n / _factor(sched.step_weight, progress)))


def is_fresh(config: "ToCaConfig", step: int, last_fresh: int | None, progress: float | None,
             num_steps: int | None = None) -> bool:
    """Fresh on the first ``warmup`` calls, then whenever the interval since the last fresh step has
    passed (``fresh_align="end"`` with a known length: every ``interval`` calls back from the last)."""
    if last_fresh is None or step < config.warmup:
        return True
    if config.fresh_steps is not None:
        return step in config.fresh_steps
    if num_steps and num_steps - config.tail_fresh <= step < num_steps:
        return True
    sched = SCHEDULES[config.ratio_schedule]
    if config.fresh_align == "end" and num_steps and not sched.vary_interval and step < num_steps:
        anchor = num_steps - max(config.tail_fresh, 1)
        return (anchor - step) % config.interval == 0
    return step - last_fresh >= fresh_interval(config, progress)


def is_aggressive(config: "ToCaConfig", step: int, last_fresh: int, fresh: bool) -> bool:
    """DuCa's cycle: a non-fresh call at an even offset from the last fresh one recomputes nothing."""
    return not fresh and config.cycle == "duca" and (step - last_fresh) % 2 == 0


def ratio_varies(config: "ToCaConfig") -> bool:
    """Does ``ratio`` depend on the sampling progress (otherwise a block's k is the same on every call)?"""
    return bool(SCHEDULES[config.ratio_schedule].step_weight)


def ratio(config: "ToCaConfig", progress: float | None, layer: int, num_layers: int, kind: str) -> float:
    """r(t, l, m) = clamp(r0 * f_step * f_layer * f_module, 0, 1)."""
    sched = SCHEDULES[config.ratio_schedule]
    r = float(config.fresh_ratio)
    if progress is not None and sched.step_weight:
        r *= _factor(sched.step_weight, progress)
    if sched.layer_weight and num_layers > 1:
        r *= _factor(sched.layer_weight, 1.0 - layer / (num_layers - 1))
    r *= sched.module.get(kind, 1.0)
    return min(max(r, 0.0), 1.0)


def tokens_for(r: float, n_tokens: int) -> int:
    """k = floor(r * N), as in ToCa."""
    return min(n_tokens, max(0, math.floor(r * n_tokens + 1e-9)))


def bucket(k: int, n_tokens: int, buckets: int | None) -> int:
    """Round k up to a multiple of ceil(N / buckets), so few distinct k (compiled shapes) occur."""
    if not buckets or k == 0:
        return k
    step = math.ceil(n_tokens / buckets)
    return min(n_tokens, math.ceil(k / step) * step)
